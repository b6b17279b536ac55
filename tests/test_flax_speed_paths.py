"""The flax fast paths the benchmark uses compute what the reference paths compute.

* ``forward(..., return_logits=False)`` and ``lean_cross_entropy``: the loss and gradients of the
  float32 reference, no logits returned.
* ``loss_impl="pallas"``: the one-pass log-sum-exp kernel gives XLA's loss and gradients.
* ``attention_impl``: ``auto`` falls back to the einsum path off the GPU (bit-identical here),
  ``xla`` forces it, ``cudnn`` refuses loudly where cuDNN cannot apply, anything else is an error.
* ``moe_impl`` ``"blocked"`` and ``"grouped"`` (``jax.lax.ragged_dot``): the sort-based dispatches
  give the dense path's outputs and every gradient (router included), on fixed models and on drawn
  MoE layers with top-k 1..3, capacity drops and exact router ties; their jitted gradient programs
  hold no scatter; the engine builds the impl ``optimization.moe_impl`` resolves to.

The torch half is ``tests/test_torch_speed_paths.py``; the cross-backend check of the blocked paths
is ``parity_tests/test_speed_paths_parity.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from speed_cases import MOE_SPECS, SPEC, batch, moe_layer_cases

from backends.flax import from_spec
from backends.flax.convert import load_canonical
from backends.flax.model import MoE, set_moe_impl
from llm.spec import init_params


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


@pytest.mark.parametrize("impl", ["blocked", "grouped"])
@pytest.mark.parametrize("name", list(MOE_SPECS))
def test_flax_sparse_moe_matches_dense(name, impl):
    spec = MOE_SPECS[name]
    ids, tgt = (jnp.asarray(a) for a in batch(seed=7))
    model = from_spec(spec, seed=2)
    res = {}
    for mode in ("dense", impl):
        set_moe_impl(model, mode)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def objective(params, graphdef=graphdef, rest=rest):
            out = nnx.merge(graphdef, params, rest)(ids, tgt)
            return out.loss + out.aux_loss + out.z_loss, out.logits

        (loss, logits), grads = jax.value_and_grad(objective, has_aux=True)(params)
        res[mode] = (loss, logits, grads)
    (la, za, ga), (lb, zb, gb) = res["dense"], res[impl]
    np.testing.assert_allclose(np.asarray(zb), np.asarray(za), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(lb), float(la), rtol=1e-6)
    for x, y in zip(jax.tree.leaves(gb), jax.tree.leaves(ga), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="moe_impl='auto' is not one of: dense, blocked, grouped"):
        set_moe_impl(model, "auto")  # auto is resolved before it reaches a model


def _moe_layer_gradient(spec, params, impl):
    """The jitted (y, gradients of ``sum(y * g) + balance + z`` wrt x and every param) of one layer."""
    layer = MoE(spec)
    load_canonical(layer, params)
    layer.moe_impl = impl
    graphdef, state, rest = nnx.split(layer, nnx.Param, ...)

    def objective(state, x, g):
        y, balance, z, _ = nnx.merge(graphdef, state, rest)(x)
        return jnp.sum(y * g) + balance + z, y

    return jax.jit(jax.grad(objective, argnums=(0, 1), has_aux=True)), state


@settings(max_examples=6, deadline=None)  # each example compiles three programs
@given(case=moe_layer_cases())
def test_flax_moe_impls_equal_dense_on_drawn_layers(case):
    spec, x, params = case
    x = jnp.asarray(x[None])
    g = jnp.asarray(np.random.default_rng(5).standard_normal(x.shape[:2] + (spec.hidden_size,)), jnp.float32)
    results = {}
    for impl in ("dense", "blocked", "grouped"):
        step, state = _moe_layer_gradient(spec, params, impl)
        (g_state, g_x), y = step(state, x, g)
        results[impl] = {"y": y, "x": g_x, **{".".join(map(str, k)): v[...] for k, v in nnx.to_flat_state(g_state)}}
    for impl in ("blocked", "grouped"):
        for n, want in results["dense"].items():
            want = np.asarray(want)
            np.testing.assert_allclose(np.asarray(results[impl][n]), want, rtol=1e-5,
                                       atol=1e-5 * float(np.abs(want).max()) + 1e-7, err_msg=f"{impl}: {n}")


@pytest.mark.parametrize("impl", ["blocked", "grouped"])
def test_flax_sparse_moe_gradient_has_no_scatter(impl):
    """Every row move of the sparse dispatches is a gather forward and backward (``gather_rows``,
    ``expert_rows``): XLA's scatter-add fusions were the slow part of the blocked backward on GPU.
    (The router's top-k has a scatter in its gradient in every impl; the dispatch is checked alone.)"""
    spec = MOE_SPECS["plain_bias_top1_capacity"].replace(num_experts_per_token=2)
    experts = MoE(spec).experts
    graphdef, state = nnx.split(experts)
    mix = "mix_selected" if impl == "blocked" else "mix_grouped"

    def objective(state, x, w, idx):
        return jnp.sum(getattr(nnx.merge(graphdef, state), mix)(x, idx, w))

    x, w = jnp.ones((6, spec.hidden_size)), jnp.ones((6, 2))
    idx = jnp.zeros((6, 2), jnp.int32)
    hlo = jax.jit(jax.grad(objective, argnums=(0, 1, 2))).lower(state, x, w, idx).as_text()
    assert "gather" in hlo and "scatter" not in hlo


@pytest.mark.parametrize("setting,built", [("auto", "blocked"), ("grouped", "grouped"), ("dense", "dense")])
def test_flax_engine_builds_the_resolved_moe_impl(tmp_path, setting, built):
    from engine_checks import tiny

    from backends.flax import TrainingEngine

    config = tiny(tmp_path, "model.use_moe=true", "model.num_experts=4", "model.num_experts_per_token=2",
                  f"optimization.moe_impl={setting}")
    with TrainingEngine(config, run_dir=tmp_path / "run") as engine:
        layers = [m for _, m in nnx.iter_graph(engine._model) if isinstance(m, MoE)]
        assert [m.moe_impl for m in layers] == [built]
