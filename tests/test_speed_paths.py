"""The fast paths the benchmark uses compute what the reference paths compute.

* torch ``forward(..., return_logits=False)``: same loss and gradients, no logits returned.
* flax ``loss_impl="pallas"``: the one-pass log-sum-exp kernel gives XLA's loss and gradients.
* flax ``attention_impl``: ``auto`` falls back to the einsum path off the GPU (bit-identical here),
  ``xla`` forces it, ``cudnn`` refuses loudly where cuDNN cannot apply, anything else is an error.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from backends.flax import from_spec as flax_from_spec
from backends.torch import from_spec as torch_from_spec
from llm.spec import ModelSpec

SPEC = ModelSpec(vocab_size=97, max_seq_len=16, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                 use_glu=True, activation="silu", norm_type="rmsnorm", position="rope")


def _batch(seed=0, B=3, T=12):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, SPEC.vocab_size, (B, T))
    tgt = rng.integers(0, SPEC.vocab_size, (B, T))
    tgt[0, :4] = -100
    return ids, tgt


@pytest.mark.parametrize("autocast", [False, True])
def test_torch_loss_only_path_matches(autocast):
    ids, tgt = (torch.as_tensor(a) for a in _batch())
    grads = []
    losses = []
    for return_logits in (True, False):
        model = torch_from_spec(SPEC, seed=1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(ids, tgt, return_logits=return_logits)
        assert (out.logits is None) == (not return_logits)
        if return_logits:
            assert out.logits.dtype == torch.float32
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert torch.equal(losses[0], losses[1])
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


def test_torch_loss_only_needs_targets():
    model = torch_from_spec(SPEC)
    with pytest.raises(ValueError, match="needs targets"):
        model(torch.zeros((1, 4), dtype=torch.long), return_logits=False)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_flax_attention_impl_switch_off_gpu(dtype):
    assert jax.default_backend() == "cpu"
    ids, tgt = (jnp.asarray(a) for a in _batch())
    model = flax_from_spec(SPEC, seed=1, dtype=dtype)
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
    from flax import nnx

    ids, tgt = (jnp.asarray(a) for a in _batch())
    model = flax_from_spec(SPEC, seed=1, dtype=dtype)
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
    from flax import nnx

    ids, tgt = (jnp.asarray(a) for a in _batch())
    model = flax_from_spec(SPEC, seed=1, dtype=dtype)
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


MOE_SPECS = {
    "glu_top2": SPEC.replace(use_moe=True, num_experts=4, num_experts_per_token=2, router_z_loss_coef=1e-3),
    "plain_bias_top1_capacity": SPEC.replace(use_moe=True, num_experts=3, num_experts_per_token=1, use_glu=False,
                                             activation="gelu", mlp_bias=True, capacity_factor=0.7),
    "top3_of_5_capacity": SPEC.replace(use_moe=True, num_experts=5, num_experts_per_token=3, capacity_factor=1.0,
                                       norm_topk_prob=False),
}


def test_block_rows_and_padding():
    from llm.moe_dispatch import block_rows, padded_rows

    assert block_rows(16384 * 2, 8) == 1024 and block_rows(10, 8) == 16 and block_rows(10**9, 2) == 2048
    for a, e in [(72, 4), (32768, 8), (5, 3)]:
        b = block_rows(a, e)
        p = padded_rows(a, e, b)
        assert p % b == 0 and p >= a + e * (b - 1) and p - (a + e * (b - 1)) < b


@pytest.mark.parametrize("name", list(MOE_SPECS))
def test_torch_blocked_moe_matches_dense(name):
    spec = MOE_SPECS[name]
    ids, tgt = (torch.as_tensor(a) for a in _batch(seed=7))
    outs = {}
    for impl in ("dense", "blocked"):
        model = torch_from_spec(spec, seed=2).double()
        for m in model.modules():
            if hasattr(m, "moe_impl"):
                m.moe_impl = impl
        out = model(ids, tgt)
        (out.loss + out.aux_loss + out.z_loss).backward()
        outs[impl] = (out, {n: p.grad.clone() for n, p in model.named_parameters()})
    (a, ga), (b, gb) = outs["dense"], outs["blocked"]
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-12, atol=0)
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-9, atol=1e-13, msg=n)
    model.layers[0].mlp.moe_impl = "sparse"
    with pytest.raises(ValueError, match="not one of: dense, blocked"):
        model(ids, tgt)


@pytest.mark.parametrize("name", list(MOE_SPECS))
def test_flax_blocked_moe_matches_dense(name):
    from flax import nnx

    spec = MOE_SPECS[name]
    ids, tgt = (jnp.asarray(a) for a in _batch(seed=7))
    model = flax_from_spec(spec, seed=2)
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


def test_blocked_moe_agrees_across_backends_in_bf16():
    """Same weights, bf16 compute: the two blocked paths agree as closely as the dense ones do."""
    spec = MOE_SPECS["glu_top2"]
    ids, tgt = _batch(seed=11)
    tmodel = torch_from_spec(spec, seed=3)
    fmodel = flax_from_spec(spec, seed=3, dtype=jnp.bfloat16)
    losses = {}
    for impl in ("dense", "blocked"):
        for m in tmodel.modules():
            if hasattr(m, "moe_impl"):
                m.moe_impl = impl
        fmodel.set_attributes(moe_impl=impl)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            t = float(tmodel(torch.as_tensor(ids), torch.as_tensor(tgt)).loss)
        f = float(fmodel(jnp.asarray(ids), jnp.asarray(tgt)).loss)
        losses[impl] = (t, f)
    for t, f in losses.values():
        assert abs(t - f) < 2e-2 * abs(t)
    assert abs(losses["blocked"][0] - losses["dense"][0]) < 1e-2 * abs(losses["dense"][0])
