"""Multi-head latent attention (``attention: mla``), flax backend: the forward against transformers'
DeepseekV3, the latent KV cache against recomputation, and the kernels it refuses."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from backends.flax.convert import from_canonical
from backends.flax.model import MultiHeadLatentAttention
from llm.spec import init_params
from parity_tests.deepseek_reference import hf_model, mla_spec

VOCAB, SEQ = 64, 24


def ids_for(seed: int, batch: int = 2, length: int = 13) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, length))


@pytest.mark.parametrize("q_lora_rank", [16, None])
def test_forward_matches_transformers_deepseek_v3(q_lora_rank):
    spec = mla_spec(q_lora_rank=q_lora_rank)
    params = init_params(spec, 1)
    ids = ids_for(1)
    ours = np.asarray(from_canonical(spec, params)(jnp.asarray(ids)).logits)
    with torch.no_grad():
        ref = hf_model(spec, params)(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(ref).max() > 1.0
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("q_lora_rank", [16, None])
def test_kv_cache_holds_the_latent_and_rope_key_and_equals_recomputation(q_lora_rank):
    spec = mla_spec(q_lora_rank=q_lora_rank, sliding_window=6)
    model = from_canonical(spec, init_params(spec, 7))
    ids = jnp.asarray(ids_for(7, length=12))
    full = np.asarray(model(ids).logits)
    cache = model.new_cache(2)
    assert cache[0].k[...].shape == (2, SEQ, 1, spec.kv_lora_rank)  # not (B, S, H, n + p)
    assert cache[0].v[...].shape == (2, SEQ, 1, spec.qk_rope_head_dim)
    steps = [model(ids[:, :5], cache=cache).logits]
    steps += [model(ids[:, p:p + 1], cache=cache, start_pos=p).logits for p in range(5, 12)]
    np.testing.assert_allclose(np.concatenate([np.asarray(s) for s in steps], 1), full, atol=1e-5, rtol=1e-5)


def test_cudnn_is_refused_with_a_one_line_reason():
    spec = mla_spec(num_layers=1)
    attn = MultiHeadLatentAttention(spec, rngs=nnx.Rngs(0))
    attn.attention_impl = "cudnn"
    with pytest.raises(ValueError, match=r"attention_impl='cudnn' does not apply to attention=mla") as err:
        attn(jnp.zeros((1, 3, spec.hidden_size)))
    assert "\n" not in str(err.value)
    attn.attention_impl = "xla"
    assert attn(jnp.ones((1, 3, spec.hidden_size))).shape == (1, 3, spec.hidden_size)
