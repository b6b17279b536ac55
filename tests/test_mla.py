"""Multi-head latent attention (``attention: mla``), torch backend: the spec's fields and rules,
the forward against transformers' DeepseekV3 (the MLA attention inside a tiny dense model), the
RoPE convention, and the latent KV cache against recomputation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backends.torch.convert import from_canonical
from backends.torch.inference import generate, generate_no_cache
from backends.torch.model import MultiHeadLatentAttention
from llm.spec import ModelSpec, SpecError, init_params
from parity_tests.deepseek_reference import hf_model, hf_state_dict, mla_spec

VOCAB, SEQ = 64, 24


def ids_for(seed: int, batch: int = 2, length: int = 13) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, VOCAB, (batch, length)))


@pytest.mark.parametrize("q_lora_rank", [16, None])
def test_forward_matches_transformers_deepseek_v3(q_lora_rank):
    spec = mla_spec(q_lora_rank=q_lora_rank)
    params = init_params(spec, 1)
    ids = ids_for(1)
    ours = from_canonical(spec, params).eval()(ids).logits
    with torch.no_grad():
        ref = hf_model(spec, params)(ids).logits
    assert ref.abs().max() > 1.0  # the weights are large enough for a wrong path to show
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_attention_bias_placement_matches_transformers():
    """HF's attention_bias is on q_a_proj, kv_a_proj_with_mqa and o_proj only; biases set nonzero."""
    spec = mla_spec(attention_bias=True, num_layers=1)
    params = init_params(spec, 2)
    rng = np.random.default_rng(2)
    biased = sorted(k for k in params if k.endswith(".bias"))
    assert biased == ["layers.0.attn.kv_a_proj_with_mqa.bias", "layers.0.attn.o_proj.bias",
                      "layers.0.attn.q_a_proj.bias"]
    for k in biased:
        params[k] = rng.standard_normal(params[k].shape).astype(np.float32)
    ids = ids_for(2)
    with torch.no_grad():
        ref = hf_model(spec, params)(ids).logits
    torch.testing.assert_close(from_canonical(spec, params).eval()(ids).logits, ref, atol=1e-4, rtol=0)


def interleaved_rows(spec: ModelSpec, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``params`` for transformers' ``rope_interleave=True``: the rope rows of every query head and of
    the shared rope key re-ordered so that interleaved pair (2i, 2i+1) is rotate-half pair (i, i + p/2)."""
    n, p, r, h = spec.qk_nope_head_dim, spec.qk_rope_head_dim, spec.kv_lora_rank, spec.num_heads
    # interleaved position 2i holds rotate-half dim i, position 2i+1 holds dim i + p/2
    order = np.empty(p, np.int64)
    order[0::2], order[1::2] = np.arange(p // 2), np.arange(p // 2) + p // 2
    out = dict(params)
    for i in range(spec.num_layers):
        q = f"layers.{i}.attn.{'q_proj' if spec.q_lora_rank is None else 'q_b_proj'}.weight"
        w = params[q].reshape(h, n + p, -1)
        out[q] = np.concatenate([w[:, :n], w[:, n:][:, order]], axis=1).reshape(params[q].shape)
        kv = f"layers.{i}.attn.kv_a_proj_with_mqa.weight"
        out[kv] = np.concatenate([params[kv][:r], params[kv][r:][order]], axis=0)
    return out


def test_rope_is_rotate_half_and_interleaved_checkpoints_are_a_row_permutation():
    spec = mla_spec()
    params = init_params(spec, 3)
    ids = ids_for(3)
    ours = from_canonical(spec, params).eval()(ids).logits
    with torch.no_grad():
        plain = hf_model(spec, params, rope_interleave=True)(ids).logits
        permuted = hf_model(spec, interleaved_rows(spec, params), rope_interleave=True)(ids).logits
    assert (plain - ours).abs().max() > 1e-2  # interleaved pairs are a different function on the same rows
    torch.testing.assert_close(ours, permuted, atol=1e-4, rtol=0)


def test_gradients_match_transformers():
    spec = mla_spec(num_layers=1)
    params = init_params(spec, 4)
    ids, targets = ids_for(4), ids_for(5)
    ours = from_canonical(spec, params).train()
    ours(ids, targets).loss.backward()
    ref = hf_model(spec, params).train()
    ref(ids, labels=None).logits.reshape(-1, VOCAB).log_softmax(-1).gather(1, targets.reshape(-1, 1)).mean().neg().backward()
    names = {hf: ours_name for ours_name, hf in zip(params, hf_state_dict(params), strict=True)}
    ref_grads = {names[n]: p.grad for n, p in ref.named_parameters()}
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_softmax_scale_is_over_nope_plus_rope():
    """With the rope part rotated by position 0 only (one token), the score is q.k / sqrt(n + p)."""
    spec = mla_spec(num_layers=1, q_lora_rank=None, max_seq_len=4)
    params = init_params(spec, 6)
    attn = MultiHeadLatentAttention(spec)
    from backends.torch.convert import load_canonical
    load_canonical(attn, {k[len("layers.0.attn."):]: v for k, v in params.items() if k.startswith("layers.0.attn.")})
    x = torch.randn(1, 2, spec.hidden_size)
    y = attn(x)
    n, p, dv = spec.qk_nope_head_dim, spec.qk_rope_head_dim, spec.v_head_dim
    # by hand: query/key heads of n + p, softmax scale 1 / sqrt(n + p), a causal 2-token window
    q = attn.q_proj(x).view(1, 2, 4, n + p)
    latent, k_rope = attn.kv_a_proj_with_mqa(x).split([spec.kv_lora_rank, p], -1)
    kv = attn.kv_b_proj(attn.kv_a_layernorm(latent)).view(1, 2, 4, n + dv)
    cos, sin = attn.rope_cos[:2, None], attn.rope_sin[:2, None]

    def rot(t):
        return t * cos + torch.cat((-t[..., p // 2:], t[..., :p // 2]), -1) * sin
    qh = torch.cat((q[..., :n], rot(q[..., n:])), -1)
    kh = torch.cat((kv[..., :n], rot(k_rope[:, :, None].expand(1, 2, 4, p))), -1)
    scores = torch.einsum("bthd,bshd->bhts", qh, kh) / (n + p) ** 0.5
    scores = scores.masked_fill(torch.triu(torch.ones(2, 2, dtype=torch.bool), 1), float("-inf"))
    by_hand = attn.o_proj(torch.einsum("bhts,bshd->bthd", scores.softmax(-1), kv[..., n:]).reshape(1, 2, -1))
    torch.testing.assert_close(y, by_hand, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("q_lora_rank", [16, None])
def test_kv_cache_holds_the_latent_and_rope_key_and_equals_recomputation(q_lora_rank):
    spec = mla_spec(q_lora_rank=q_lora_rank, sliding_window=6)
    model = from_canonical(spec, init_params(spec, 7)).eval()
    ids = ids_for(7, length=12)
    full = model(ids).logits
    cache = model.new_cache(2)
    assert tuple(cache[0].k.shape) == (2, 1, SEQ, spec.kv_lora_rank)  # not (B, H, S, n + p)
    assert tuple(cache[0].v.shape) == (2, 1, SEQ, spec.qk_rope_head_dim)
    steps = [model(ids[:, :5], cache=cache).logits]
    steps += [model(ids[:, p:p + 1], cache=cache, start_pos=p).logits for p in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_greedy_generation_with_cache_equals_without():
    spec = mla_spec()
    model = from_canonical(spec, init_params(spec, 8)).eval()
    prompt = ids_for(8, length=5).numpy()
    cached = generate(model, prompt, 10)
    assert np.array_equal(cached, generate_no_cache(model, prompt, 10))
    assert cached.shape == (2, 15)


def test_param_table_names_shapes_and_axes():
    spec = mla_spec(num_layers=1)
    table = {p.name: (p.shape, p.axes) for p in spec.param_table() if p.name.startswith("layers.0.attn.")}
    assert table == {
        "layers.0.attn.q_a_proj.weight": ((16, 32), ("q_lora", "embed")),
        "layers.0.attn.q_a_layernorm.weight": ((16,), ("q_lora",)),
        "layers.0.attn.q_b_proj.weight": ((4 * 10, 16), ("heads", "q_lora")),
        "layers.0.attn.kv_a_proj_with_mqa.weight": ((8 + 6, 32), ("kv_lora", "embed")),
        "layers.0.attn.kv_a_layernorm.weight": ((8,), ("kv_lora",)),
        "layers.0.attn.kv_b_proj.weight": ((4 * (4 + 5), 8), ("heads", "kv_lora")),
        "layers.0.attn.o_proj.weight": ((32, 4 * 5), ("embed", "heads")),
    }
    no_compression = {p.name for p in mla_spec(num_layers=1, q_lora_rank=None).param_table()}
    assert "layers.0.attn.q_proj.weight" in no_compression and "layers.0.attn.q_a_proj.weight" not in no_compression
    assert set(from_canonical(spec, init_params(spec)).state_dict()) == {p.name for p in spec.param_table()}


def test_flops_count_query_key_and_value_head_sizes():
    spec = mla_spec(num_layers=1)
    dense = spec.flops_per_token(8) - 6 * sum(p.size for p in spec.param_table() if p.weight_decay)
    assert dense == pytest.approx(6 * 1 * 4 * ((4 + 6) + 5) * 8)


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(num_kv_heads=2), "model.num_kv_heads=2 must be null or num_heads=4 for attention=mla"),
    (dict(head_dim=8), "model.head_dim=8 must be null for attention=mla"),
    (dict(position="learned"), "model.position='learned' must be rope for attention=mla"),
    (dict(qk_rope_head_dim=5), "model.qk_rope_head_dim=5 must be even"),
    (dict(kv_lora_rank=0), "model.kv_lora_rank=0 must be >= 1"),
    (dict(q_lora_rank=0), "model.q_lora_rank=0 must be >= 1 or null"),
    (dict(v_head_dim=0), "model.v_head_dim=0 must be >= 1"),
    (dict(qk_nope_head_dim=0), "model.qk_nope_head_dim=0 must be >= 1"),
    (dict(attention="mqa"), "model.attention"),
    (dict(rope_scaling=dict(rope_type="yarn", factor=4.0)),
     "model.rope_scaling.original_max_position_embeddings"),  # yarn needs the length it stretches
])
def test_validation_names_the_field(overrides, message):
    with pytest.raises(SpecError) as err:
        mla_spec(**overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)
