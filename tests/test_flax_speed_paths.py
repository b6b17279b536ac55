"""The flax fast paths the benchmark uses compute what the reference paths compute.

* ``forward(..., return_logits=False)`` and ``lean_cross_entropy``: the loss and gradients of the
  float32 reference, no logits returned.
* ``loss_impl="pallas"``: the one-pass log-sum-exp kernel gives XLA's loss and gradients.
* ``attention_impl``: ``auto`` falls back to the einsum path off the GPU (bit-identical here),
  ``xla`` forces it, ``cudnn`` refuses loudly where cuDNN cannot apply, anything else is an error.
* ``moe_impl="blocked"``: the sort-based dispatch gives the dense path's outputs and gradients.

The torch half is ``tests/test_torch_speed_paths.py``; the cross-backend check of the blocked paths
is ``parity_tests/test_speed_paths_parity.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from speed_cases import MOE_SPECS, SPEC, batch

from backends.flax import from_spec


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_flax_attention_impl_switch_off_gpu(dtype):
    assert jax.default_backend() == "cpu"
    ids, tgt = (jnp.asarray(a) for a in batch())
    model = from_spec(SPEC, seed=1, dtype=dtype)
    auto = model(ids, tgt)
    model.set_attributes(attention_impl="xla")
    forced = model(ids, tgt)
    np.testing.assert_array_equal(np.asarray(auto.logits), np.asarray(forced.logits))
    assert float(auto.loss) == float(forced.loss)

    model.set_attributes(attention_impl="cudnn")
    with pytest.raises(ValueError, match="cannot apply: backend is cpu"):
        model(ids, tgt)
    model.set_attributes(attention_impl="flash")
    with pytest.raises(ValueError, match="not one of: auto, cudnn, xla"):
        model(ids, tgt)


def test_flax_lean_cross_entropy_matches_reference_value_and_gradient():
    from backends.flax.model import cross_entropy, lean_cross_entropy

    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.normal(size=(3, 5, 11)) * 3, jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, (3, 5)))
    targets = targets.at[1, :2].set(-100)
    ref, g_ref = jax.value_and_grad(cross_entropy)(logits, targets)
    got, g_got = jax.value_and_grad(lean_cross_entropy)(logits, targets)
    np.testing.assert_allclose(float(got), float(ref), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g_got), np.asarray(g_ref), rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(g_got[1, :2]).max()) == 0.0  # ignored targets get no gradient
    # bf16 logits: the loss is the float32 loss of the (exactly upcast) bf16 values; grad stays bf16.
    lb = logits.astype(jnp.bfloat16)
    got_b, g_b = jax.value_and_grad(lean_cross_entropy)(lb, targets)
    np.testing.assert_allclose(float(got_b), float(cross_entropy(lb.astype(jnp.float32), targets)), rtol=1e-6)
    assert g_b.dtype == jnp.bfloat16
    # nothing valid: 0, not NaN
    none = jnp.full((2, 3), -100)
    assert float(lean_cross_entropy(logits[:2, :3], none)) == 0.0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_flax_loss_only_path_matches(dtype):
    ids, tgt = (jnp.asarray(a) for a in batch())
    model = from_spec(SPEC, seed=1, dtype=dtype)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, return_logits):
        out = nnx.merge(graphdef, params, rest)(ids, tgt, return_logits=return_logits)
        assert (out.logits is None) == (not return_logits)
        return out.loss

    ref, g_ref = jax.value_and_grad(loss)(params, True)
    got, g_got = jax.value_and_grad(loss)(params, False)
    np.testing.assert_allclose(float(got), float(ref), rtol=1e-6)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol * 1e-2)
    with pytest.raises(ValueError, match="needs targets"):
        model(ids, return_logits=False)


def test_pallas_online_logsumexp_matches_xla():
    """The one-pass kernel (Pallas' interpreter off the GPU) == jax.nn.logsumexp, chunk edges included."""
    from backends.flax.pallas_lse import logsumexp_rows

    rng = np.random.default_rng(4)
    for vocab, block in [(11, 4), (64, 16), (300, 128), (5, 4096)]:  # tail chunks, exact fit, one chunk
        x = jnp.asarray(rng.normal(size=(6, vocab)) * 4, jnp.float32)
        x = x.at[0, -1].set(60.0).at[1, 0].set(-60.0)  # the max in the last (masked) chunk; a far outlier
        want = jax.nn.logsumexp(x, axis=-1)
        np.testing.assert_allclose(np.asarray(logsumexp_rows(x, block=block)), np.asarray(want), rtol=1e-6)
        xb = x.astype(jnp.bfloat16)
        np.testing.assert_allclose(np.asarray(logsumexp_rows(xb, block=block)),
                                   np.asarray(jax.nn.logsumexp(xb.astype(jnp.float32), axis=-1)), rtol=1e-6)
    with pytest.raises(ValueError, match="rows, vocab"):
        logsumexp_rows(jnp.zeros((2, 3, 4)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_flax_pallas_loss_impl_matches_xla(dtype):
    ids, tgt = (jnp.asarray(a) for a in batch())
    model = from_spec(SPEC, seed=1, dtype=dtype)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    results = {}
    for impl in ("xla", "pallas"):
        model.set_attributes(loss_impl=impl, raise_if_not_found=False)
        graphdef, _, _ = nnx.split(model, nnx.Param, ...)

        def loss(params, graphdef=graphdef):
            return nnx.merge(graphdef, params, rest)(ids, tgt, return_logits=False).loss

        results[impl] = jax.jit(jax.value_and_grad(loss))(params)
    (ref, g_ref), (got, g_got) = results["xla"], results["pallas"]
    np.testing.assert_allclose(float(got), float(ref), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    model.set_attributes(loss_impl="fused", raise_if_not_found=False)
    with pytest.raises(ValueError, match="loss_impl='fused' is not one of: xla, pallas"):
        model(ids, tgt, return_logits=False)


@pytest.mark.parametrize("name", list(MOE_SPECS))
def test_flax_blocked_moe_matches_dense(name):
    spec = MOE_SPECS[name]
    ids, tgt = (jnp.asarray(a) for a in batch(seed=7))
    model = from_spec(spec, seed=2)
    res = {}
    for impl in ("dense", "blocked"):
        model.set_attributes(moe_impl=impl)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def objective(params, graphdef=graphdef, rest=rest):
            out = nnx.merge(graphdef, params, rest)(ids, tgt)
            return out.loss + out.aux_loss + out.z_loss, out.logits

        (loss, logits), grads = jax.value_and_grad(objective, has_aux=True)(params)
        res[impl] = (loss, logits, grads)
    (la, za, ga), (lb, zb, gb) = res["dense"], res["blocked"]
    np.testing.assert_allclose(np.asarray(zb), np.asarray(za), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(lb), float(la), rtol=1e-6)
    for x, y in zip(jax.tree.leaves(gb), jax.tree.leaves(ga), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
