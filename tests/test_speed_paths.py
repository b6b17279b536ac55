"""The fast paths the benchmark uses compute what the reference paths compute.

* torch ``forward(..., return_logits=False)``: same loss and gradients, no logits returned.
* flax ``attention_impl``: ``auto`` falls back to the einsum path off the GPU (bit-identical here),
  ``xla`` forces it, ``cudnn`` refuses loudly where cuDNN cannot apply, anything else is an error.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from backends.flax.model import DecoderModel as FlaxModel
from backends.torch.model import DecoderModel as TorchModel
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
        model = TorchModel.from_spec(SPEC, seed=1)
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
    model = TorchModel.from_spec(SPEC)
    with pytest.raises(ValueError, match="needs targets"):
        model(torch.zeros((1, 4), dtype=torch.long), return_logits=False)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_flax_attention_impl_switch_off_gpu(dtype):
    assert jax.default_backend() == "cpu"
    ids, tgt = (jnp.asarray(a) for a in _batch())
    model = FlaxModel.from_spec(SPEC, seed=1, dtype=dtype)
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
    model = FlaxModel.from_spec(SPEC, seed=1, dtype=dtype)
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
