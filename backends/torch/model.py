"""The decoder-only transformer in PyTorch, written to ``docs/architecture.md``.

Every module's attribute path is the canonical parameter name (``layers.0.attn.q_proj.weight``),
so ``DecoderModel(spec).state_dict()`` keys equal ``spec.param_table()`` names exactly and the
canonical layout is the torch layout (no transposes anywhere in this backend).

Shapes in comments: B batch, T query length, S key length, D hidden, H query heads, KV key/value
heads, hd head size, F intermediate size, E experts, k experts per token, N = B*T tokens, V vocab.

Construction draws no random numbers: every parameter starts at zero (see ``_zeroed``) and the
starting weights come from ``llm.spec.init_params`` through ``backends.torch.convert.from_spec``,
the one place initialisation is defined.

Precision: parameters may be float32 or bfloat16 and the forward pass runs under
``torch.autocast``; norms, softmaxes, the router and the loss are computed in float32 regardless,
and logits are returned in float32.

This module must never import jax or flax.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DeviceMesh, DTensor, Partial, Replicate

from backends.torch.loss import IGNORE_INDEX, chunked_cross_entropy
from llm.moe_dispatch import MOE_IMPLS, block_rows, padded_rows
from llm.spec import (
    MLA_LATENT_NORM_EPS,
    Activation,
    GroupScore,
    ModelSpec,
    NormPosition,
    NormType,
    Position,
    RouterScoring,
    mla_softmax_scale,
    rope_cos_sin,
    sinusoidal_table,
)

__all__ = [
    "RMSNorm",
    "LayerNorm",
    "build_norm",
    "EmbeddingLayer",
    "LayerKVCache",
    "KVCache",
    "MultiHeadAttention",
    "MultiHeadLatentAttention",
    "build_attention",
    "positions_from_mask",
    "attention_rule",
    "MLP",
    "MoE",
    "balanced_selection_bias",
    "set_moe_impl",
    "TransformerBlock",
    "ModelOutput",
    "DecoderModel",
]

def _zeroed(layer_cls: type[nn.Module], *args, **kwargs) -> nn.Module:
    """``layer_cls(*args, **kwargs)`` (``nn.Linear``, ``nn.Embedding``) with every parameter zero.

    Built on the meta device, so torch's default initialiser (random draws that ``from_spec`` would
    overwrite at once) touches no storage and no generator; then allocated on the default device
    (which honours ``with torch.device(...)``) and zeroed. Zeros rather than uninitialised memory:
    an unloaded model is a deterministic function, the same in both backends.
    """
    layer = layer_cls(*args, **kwargs, device="meta").to_empty(device=torch.get_default_device())
    with torch.no_grad():
        for p in layer.parameters():
            p.zero_()
    return layer


# ---------------------------------------------------------------------- norms
class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale and no bias, computed in float32.

    ``heads_split_over``: the tensor-parallel mesh when this is a per-head norm (``qk_norm``) whose
    input holds only this rank's heads (set by ``backends.torch.parallel``); the weight then sums
    its gradient over that mesh, each rank's being the partial sum over its own heads."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))
        self.heads_split_over: DeviceMesh | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        weight = self.weight if self.heads_split_over is None else _grad_summed_over(self.weight, self.heads_split_over)
        return (weight.float() * normed).to(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with weight and bias; statistics in float32, output in the input dtype.

    ``nn.LayerNorm`` would return float32 under autocast; this one keeps the residual dtype.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.float(), (x.shape[-1],), self.weight.float(), self.bias.float(), self.eps)
        return y.to(x.dtype)


def build_norm(spec: ModelSpec) -> RMSNorm | LayerNorm:
    """The norm the spec asks for, over the hidden size."""
    if spec.norm_type is NormType.RMSNORM:
        return RMSNorm(spec.hidden_size, spec.norm_eps)
    return LayerNorm(spec.hidden_size, spec.norm_eps)


def _activation(spec: ModelSpec, x: torch.Tensor) -> torch.Tensor:
    if spec.activation is Activation.GELU:
        return F.gelu(x)  # exact erf form
    if spec.activation is Activation.GELU_TANH:
        return F.gelu(x, approximate="tanh")
    if spec.activation is Activation.SILU:
        return F.silu(x)
    return F.relu(x)


# ---------------------------------------------------------------------- tensor-parallel boundaries
def _like(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x`` as a replicated DTensor on ``weight``'s mesh when tensor parallel made ``weight`` a
    DTensor (``backends.torch.parallel``: the vocab-split token table); ``x`` itself otherwise."""
    if isinstance(weight, DTensor):
        return DTensor.from_local(x, weight.device_mesh, [Replicate()] * weight.device_mesh.ndim)
    return x


def _grad_summed_over(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """``x`` itself in the forward; in the backward its gradient summed over ``mesh``'s ranks (each
    computed a partial one): the local gradient is declared ``Partial`` and DTensor reduces it to
    the ``Replicate`` placement ``x`` had."""
    return DTensor.from_local(x, mesh, [Replicate()], run_check=False).to_local(grad_placements=[Partial()])


def _whole(x: torch.Tensor) -> torch.Tensor:
    """A DTensor result gathered (or summed) whole onto every rank, as a plain tensor."""
    return x.full_tensor() if isinstance(x, DTensor) else x


def _partial_sums_added(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """The sum over ``mesh``'s ranks of their partial ``x`` (a row-parallel matmul's outputs), on every
    rank; its gradient is the whole result's, unchanged, on each rank."""
    return DTensor.from_local(x, mesh, [Partial()], run_check=False).full_tensor()


# ---------------------------------------------------------------------- embedding
class EmbeddingLayer(nn.Module):
    """Token table plus the absolute position signal (learned or sinusoidal); RoPE adds nothing here.

    ``weight`` is the token table (V, D); it doubles as the output projection when embeddings are
    tied. The sinusoidal table is a non-persistent buffer: a constant, not a parameter.
    """

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.weight = nn.Parameter(torch.zeros(spec.vocab_size, spec.hidden_size))
        if spec.position is Position.LEARNED:
            self.position = _zeroed(nn.Embedding, spec.max_seq_len, spec.hidden_size)
        elif spec.position is Position.SINUSOIDAL:
            self.register_buffer("sinusoidal", torch.from_numpy(sinusoidal_table(spec)), persistent=False)
        self.dropout = nn.Dropout(spec.dropout)

    def forward(self, input_ids: torch.Tensor, start_pos: int = 0,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """``positions`` (B, T) replaces ``start_pos .. start_pos+T-1`` when given (padding, packing)."""
        T = input_ids.shape[1]
        x = _whole(F.embedding(_like(input_ids, self.weight), self.weight,
                               padding_idx=self.spec.pad_token_id))  # (B, T, D)
        if positions is None:
            positions = torch.arange(start_pos, start_pos + T, device=input_ids.device)  # (T,)
        if self.spec.position is Position.LEARNED:
            x = x + self.position(positions)  # (T, D) or (B, T, D)
        elif self.spec.position is Position.SINUSOIDAL:
            x = x + self.sinusoidal[positions].to(x.dtype)
        return self.dropout(x)


# ---------------------------------------------------------------------- attention
class LayerKVCache:
    """Preallocated keys and values of one layer, (B, KV, max_seq_len, hd), keys already rotated.

    With MLA (``MultiHeadLatentAttention``) the two slots hold what that attention caches instead
    of full keys and values: ``k`` the normed compressed latent (B, 1, max_seq_len, kv_lora_rank),
    ``v`` the one rotated rope key (B, 1, max_seq_len, qk_rope_head_dim).
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k = k
        self.v = v

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[2]

    def update(self, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, KV, T, hd) at positions start_pos.. and return all keys/values so far."""
        B, _, T, _ = k.shape
        if B != self.k.shape[0]:
            raise ValueError(f"KV cache holds batch size {self.k.shape[0]}, got a batch of {B}")
        end = start_pos + T
        if end > self.max_seq_len:
            raise ValueError(f"KV cache overflow: start_pos={start_pos} + {T} new tokens > "
                             f"cache length {self.max_seq_len}")
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]  # (B, KV, end, hd)


class KVCache:
    """One ``LayerKVCache`` per layer, for incremental decoding.

    The caller owns the position: ``model(ids, cache=cache, start_pos=p)`` writes the new tokens at
    ``p .. p+T-1`` and attends to everything before them, so a prompt can be prefilled in one call
    and then decoded one token at a time.
    """

    def __init__(self, spec: ModelSpec, batch_size: int, *, max_seq_len: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        length = spec.max_seq_len if max_seq_len is None else max_seq_len
        if spec.is_mla:
            k_shape = (batch_size, 1, length, spec.kv_lora_rank)
            v_shape = (batch_size, 1, length, spec.qk_rope_head_dim)
        else:
            k_shape = v_shape = (batch_size, spec.kv_heads, length, spec.dim_head)
        self.layers = [
            LayerKVCache(torch.zeros(k_shape, dtype=dtype, device=device),
                         torch.zeros(v_shape, dtype=dtype, device=device))
            for _ in range(spec.num_layers)
        ]

    def __getitem__(self, layer_idx: int) -> LayerKVCache:
        return self.layers[layer_idx]

    def __len__(self) -> int:
        return len(self.layers)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rope(x: torch.Tensor, rope_cos: torch.Tensor, rope_sin: torch.Tensor, start_pos: int,
                positions: torch.Tensor | None) -> torch.Tensor:
    """Rotate-half RoPE on x (B, T, heads, r) with tables (max_seq_len, r) at the given positions."""
    T = x.shape[1]
    if positions is None:
        cos = rope_cos[start_pos:start_pos + T, None, :].to(x.dtype)  # (T, 1, r)
        sin = rope_sin[start_pos:start_pos + T, None, :].to(x.dtype)
    else:
        cos = rope_cos[positions][:, :, None, :].to(x.dtype)  # (B, T, 1, r)
        sin = rope_sin[positions][:, :, None, :].to(x.dtype)
    return x * cos + _rotate_half(x) * sin  # (B, T, heads, r)


def _check_attention_call(causal: bool, cache: LayerKVCache | None, segment_ids: torch.Tensor | None) -> None:
    if cache is not None and not causal:
        raise ValueError("a KV cache needs causal attention (this layer has causal=False)")
    if cache is not None and segment_ids is not None:
        raise ValueError("segment_ids cannot be used with a KV cache (decode one document per row)")


def _layer_mask(spec: ModelSpec, causal: bool, start_pos: int, key_start: int, T: int, S: int,
                attention_mask: torch.Tensor | None, segment_ids: torch.Tensor | None,
                device: torch.device) -> torch.Tensor | None:
    """SDPA's boolean ``attn_mask`` (B|1, 1, T, S) for T queries at ``start_pos..`` and S keys at
    ``key_start..``; None when the plain causal triangle (``is_causal``) is the whole rule."""
    if spec.sliding_window is None and S == T and attention_mask is None and segment_ids is None:
        return None
    key_valid = query_valid = None
    if attention_mask is not None:
        key_valid = attention_mask[:, key_start:key_start + S]  # (B, S)
        query_valid = attention_mask[:, start_pos:start_pos + T]  # (B, T)
    return attention_rule(
        torch.arange(start_pos, start_pos + T, device=device),
        torch.arange(key_start, key_start + S, device=device),
        causal=causal, window=spec.sliding_window, query_valid=query_valid,
        key_valid=key_valid, q_segment=segment_ids, k_segment=segment_ids)[:, None]  # (B|1, 1, T, S)


def positions_from_mask(attention_mask: torch.Tensor, start_pos: int, length: int) -> torch.Tensor:
    """Positions (B, length) of slots ``start_pos ..`` of a 1/0 ``attention_mask`` (B, L >= start_pos+length).

    ``cumsum(mask) - 1`` clamped at 0: the first real token of a left-padded row is position 0, so
    the row computes what the unpadded prompt does; padded slots sit at the next real position (0
    for leading padding) and are never attended by real tokens.
    """
    pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return pos[:, start_pos:start_pos + length]


def attention_rule(q_slot: torch.Tensor, k_slot: torch.Tensor, *, causal: bool, window: int | None,
                   query_valid: torch.Tensor | None = None, key_valid: torch.Tensor | None = None,
                   q_segment: torch.Tensor | None = None, k_segment: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """Which key slots each query slot may attend: bool (1 or B, T, S), True = may attend.

    Slots are indices into the sequence (T queries ``q_slot``, S keys ``k_slot``). Causal: k <= q,
    and a window w keeps k > q - w; non-causal: |q - k| < w. Segments (B, T) / (B, S): only equal
    ids. Padding: a key whose ``key_valid`` is 0 is never attended, and a padded query
    (``query_valid`` 0) attends to its own slot only, so its output is defined and finite.
    """
    q, k = q_slot[:, None], k_slot[None, :]  # (T, 1), (1, S)
    allowed = torch.ones(q.shape[0], k.shape[1], dtype=torch.bool, device=q.device)
    if causal:
        allowed = k <= q
    if window is not None:
        allowed = allowed & ((k > q - window) if causal else ((q - k).abs() < window))
    allowed = allowed[None]  # (1, T, S)
    if q_segment is not None:
        allowed = allowed & (q_segment[:, :, None] == k_segment[:, None, :])
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :].bool()
    if query_valid is not None:
        allowed = torch.where(query_valid[:, :, None].bool(), allowed, (k == q)[None])
    return allowed


class MultiHeadAttention(nn.Module):
    """Self-attention with grouped-query heads, optional RoPE, sliding window and per-head q/k RMSNorm
    (``qk_norm``); causal by default.

    The RoPE tables come from ``llm.spec.rope_cos_sin`` (rows = absolute positions) and are kept as
    non-persistent buffers so both backends rotate with the very same float32 numbers.

    ``causal=False`` drops the triangle (an encoder-style layer): a sliding window then keeps keys
    with ``|i - j| < window``; a KV cache needs ``causal=True``. ``forward``'s ``attention_mask``
    (B, T; with a cache B, cache length), ``segment_ids`` (B, T) and ``positions`` (B, T) follow
    ``attention_rule`` and ``positions_from_mask``. SDPA runs fused either way: ``is_causal`` when
    the plain triangle is the whole rule, a boolean ``attn_mask`` otherwise.
    """

    def __init__(self, spec: ModelSpec, causal: bool = True):
        super().__init__()
        self.spec = spec
        self.causal = causal
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.kv_heads, spec.dim_head
        d, h, kv, hd = spec.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        self.q_proj = _zeroed(nn.Linear, d, h * hd, bias=spec.attention_bias)
        self.k_proj = _zeroed(nn.Linear, d, kv * hd, bias=spec.attention_bias)
        self.v_proj = _zeroed(nn.Linear, d, kv * hd, bias=spec.attention_bias)
        self.o_proj = _zeroed(nn.Linear, h * hd, d, bias=spec.out_bias)
        if spec.qk_norm:  # one (hd,) scale per projection, shared by its heads
            self.q_norm = RMSNorm(hd, spec.norm_eps)
            self.k_norm = RMSNorm(hd, spec.norm_eps)
        if spec.position is Position.ROPE:
            cos, sin = rope_cos_sin(spec)  # (max_seq_len, hd) each
            self.register_buffer("rope_cos", torch.from_numpy(cos), persistent=False)
            self.register_buffer("rope_sin", torch.from_numpy(sin), persistent=False)

    def _rope(self, x: torch.Tensor, start_pos: int, positions: torch.Tensor | None) -> torch.Tensor:
        return _apply_rope(x, self.rope_cos, self.rope_sin, start_pos, positions)  # (B, T, heads, hd)

    def forward(self, x: torch.Tensor, start_pos: int = 0, cache: LayerKVCache | None = None, *,
                attention_mask: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        _check_attention_call(self.causal, cache, segment_ids)
        if positions is None and attention_mask is not None:
            positions = positions_from_mask(attention_mask, start_pos, T)
        # -1: tensor parallel leaves H / tensor query and KV / tensor kv heads on this rank.
        q = self.q_proj(x).view(B, T, -1, self.head_dim)  # (B, T, H, hd)
        k = self.k_proj(x).view(B, T, -1, self.head_dim)  # (B, T, KV, hd)
        v = self.v_proj(x).view(B, T, -1, self.head_dim)
        if self.spec.qk_norm:  # per head, before the rotation (HF Qwen3Attention)
            q, k = self.q_norm(q), self.k_norm(k)
        if self.spec.position is Position.ROPE:
            q, k = self._rope(q, start_pos, positions), self._rope(k, start_pos, positions)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)

        # Keys cover slots key_start .. key_start+S-1: the whole prefix when caching.
        key_start = start_pos
        if cache is not None:
            k, v = cache.update(k, v, start_pos)  # (B, KV, S, hd), S = start_pos + T
            key_start = 0
        S = k.shape[2]
        mask = _layer_mask(self.spec, self.causal, start_pos, key_start, T, S, attention_mask, segment_ids,
                           x.device)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and self.causal,
            dropout_p=self.spec.dropout if self.training else 0.0,
            scale=1.0 / math.sqrt(self.head_dim), enable_gqa=self.num_kv_heads != self.num_heads,
        )  # (B, H, T, hd); query head h reads kv head h // (H/KV)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, H*hd)
        return self.o_proj(y)


class MultiHeadLatentAttention(nn.Module):
    """DeepSeek-V2/V3 multi-head latent attention (MLA), as transformers' ``DeepseekV3Attention``.

    Shapes: r = kv_lora_rank, n = qk_nope_head_dim, p = qk_rope_head_dim, dv = v_head_dim.
    Query: ``q_b_proj(q_a_layernorm(q_a_proj(x)))`` (or ``q_proj(x)`` with ``q_lora_rank`` null)
    -> (B, T, H, n + p), split into a pass part (n) and a rope part (p). Key/value:
    ``kv_a_proj_with_mqa(x)`` -> (B, T, r + p): the latent (r) goes through ``kv_a_layernorm`` and
    ``kv_b_proj`` to per-head (k_nope (n), v (dv)); the rope part (p) is one key shared by every head
    (the decoupled rope key). Keys are ``[k_nope, rope(k_rope)]``, queries ``[q_nope, rope(q_rope)]``,
    the softmax scale ``1 / sqrt(n + p)``, times YaRN's ``mscale_all_dim`` term when set
    (``llm.spec.mla_softmax_scale``).

    RoPE is rotate-half over the p rope dimensions (transformers' ``rope_interleave=False``).
    DeepSeek's released weights rotate interleaved pairs (``rope_interleave=True``, transformers'
    default); that is the same function after permuting the rope rows of the query projection and of
    ``kv_a_proj_with_mqa`` (even dimensions first, then odd), which a checkpoint converter applies.

    The KV cache holds the normed latent and the rotated rope key (``LayerKVCache``'s two slots),
    not full keys and values: every step re-expands the cached latents through ``kv_b_proj``.
    Masks, padding, segments and positions follow ``MultiHeadAttention``.
    """

    def __init__(self, spec: ModelSpec, causal: bool = True):
        super().__init__()
        self.spec = spec
        self.causal = causal
        d, h = spec.hidden_size, spec.num_heads
        self.num_heads, self.qk_head_dim = h, spec.qk_head_dim
        if spec.q_lora_rank is None:
            self.q_proj = _zeroed(nn.Linear, d, h * spec.qk_head_dim, bias=False)
        else:
            self.q_a_proj = _zeroed(nn.Linear, d, spec.q_lora_rank, bias=spec.attention_bias)
            self.q_a_layernorm = RMSNorm(spec.q_lora_rank, MLA_LATENT_NORM_EPS)
            self.q_b_proj = _zeroed(nn.Linear, spec.q_lora_rank, h * spec.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = _zeroed(nn.Linear, d, spec.kv_lora_rank + spec.qk_rope_head_dim,
                                          bias=spec.attention_bias)
        self.kv_a_layernorm = RMSNorm(spec.kv_lora_rank, MLA_LATENT_NORM_EPS)
        self.kv_b_proj = _zeroed(nn.Linear, spec.kv_lora_rank, h * (spec.qk_nope_head_dim + spec.v_head_dim),
                                 bias=False)
        self.o_proj = _zeroed(nn.Linear, h * spec.v_head_dim, d, bias=spec.out_bias)
        cos, sin = rope_cos_sin(spec)  # (max_seq_len, p) each
        self.register_buffer("rope_cos", torch.from_numpy(cos), persistent=False)
        self.register_buffer("rope_sin", torch.from_numpy(sin), persistent=False)

    def forward(self, x: torch.Tensor, start_pos: int = 0, cache: LayerKVCache | None = None, *,
                attention_mask: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        spec = self.spec
        n, p, r, dv = spec.qk_nope_head_dim, spec.qk_rope_head_dim, spec.kv_lora_rank, spec.v_head_dim
        B, T, _ = x.shape
        _check_attention_call(self.causal, cache, segment_ids)
        if positions is None and attention_mask is not None:
            positions = positions_from_mask(attention_mask, start_pos, T)
        if spec.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, -1, n + p)  # (B, T, H, n + p); -1: tensor parallel leaves H / tensor heads
        q_nope, q_rope = q.split([n, p], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([r, p], dim=-1)  # (B, T, r), (B, T, p)
        latent = self.kv_a_layernorm(latent)
        q_rope = _apply_rope(q_rope, self.rope_cos, self.rope_sin, start_pos, positions)
        k_rope = _apply_rope(k_rope[:, :, None, :], self.rope_cos, self.rope_sin, start_pos, positions)
        q = torch.cat((q_nope, q_rope), dim=-1).transpose(1, 2)  # (B, H, T, n + p)
        latent, k_rope = latent[:, None], k_rope.transpose(1, 2)  # (B, 1, T, r), (B, 1, T, p)

        key_start = start_pos
        if cache is not None:
            latent, k_rope = cache.update(latent, k_rope, start_pos)  # (B, 1, S, r), (B, 1, S, p)
            key_start = 0
        S = latent.shape[2]
        kv = self.kv_b_proj(latent[:, 0]).view(B, S, -1, n + dv).transpose(1, 2)  # (B, H, S, n + dv)
        k_nope, v = kv.split([n, dv], dim=-1)
        k = torch.cat((k_nope, k_rope.expand(-1, k_nope.shape[1], -1, -1)), dim=-1)  # (B, H, S, n + p)
        mask = _layer_mask(spec, self.causal, start_pos, key_start, T, S, attention_mask, segment_ids, x.device)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and self.causal,
            dropout_p=spec.dropout if self.training else 0.0, scale=mla_softmax_scale(spec),
        )  # (B, H, T, dv)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


def build_attention(spec: ModelSpec, causal: bool = True) -> MultiHeadAttention | MultiHeadLatentAttention:
    """The attention the spec asks for (``attention: mha | mla``)."""
    if spec.is_mla:
        return MultiHeadLatentAttention(spec, causal)
    return MultiHeadAttention(spec, causal)


# ---------------------------------------------------------------------- feed-forward
class MLP(nn.Module):
    """Dense feed-forward: ``down(act(gate(x)) * up(x))`` with GLU, else ``down(act(up(x)))``.
    ``width`` is the intermediate size (default ``spec.ffn_size``; the MoE's shared experts pass
    ``spec.shared_ffn_size``)."""

    def __init__(self, spec: ModelSpec, width: int | None = None):
        super().__init__()
        self.spec = spec
        d, f = spec.hidden_size, spec.ffn_size if width is None else width
        if spec.use_glu:
            self.gate_proj = _zeroed(nn.Linear, d, f, bias=spec.mlp_bias)
        self.up_proj = _zeroed(nn.Linear, d, f, bias=spec.mlp_bias)
        self.down_proj = _zeroed(nn.Linear, f, d, bias=spec.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.use_glu:
            h = _activation(self.spec, self.gate_proj(x)) * self.up_proj(x)
        else:
            h = _activation(self.spec, self.up_proj(x))
        return self.down_proj(h)


class ExpertLinear(nn.Module):
    """E stacked linear maps: ``weight`` (E, out, in), optional ``bias`` (E, out)."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(num_experts, out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, in) for every expert alike, or (E, N, in) per expert -> (E, N, out)."""
        eq = "ni,eoi->eno" if x.dim() == 2 else "eni,eoi->eno"
        y = torch.einsum(eq, x, self.weight)
        if self.bias is not None:
            y = y + self.bias[:, None, :].to(y.dtype)
        return y


class Experts(nn.Module):
    """The E expert MLPs of one MoE layer, stacked so all run as one batched matmul.

    Tensor parallel (``backends.torch.parallel``) makes the weights DTensors split on F. The dense
    ``forward`` computes in DTensor; the sparse dispatches (``mix_selected``, ``mix_grouped``) run
    on each rank's local F slice (``local_projections``): the input's gradient is summed over the
    tensor mesh, the down projection's partial outputs are summed before its bias is added and the
    tokens mixed.
    """

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        e, d, f, bias = spec.num_experts, spec.hidden_size, spec.expert_ffn_size, spec.mlp_bias
        if spec.use_glu:
            self.gate_proj = ExpertLinear(e, d, f, bias)
        self.up_proj = ExpertLinear(e, d, f, bias)
        self.down_proj = ExpertLinear(e, f, d, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, D) -> every expert's output on every token, (E, N, D)."""
        x = _like(x, self.up_proj.weight)  # tensor parallel: F split, the down projection's sum gathered
        if self.spec.use_glu:
            h = _activation(self.spec, self.gate_proj(x)) * self.up_proj(x)  # (E, N, F)
        else:
            h = _activation(self.spec, self.up_proj(x))
        return _whole(self.down_proj(h))

    def local_projections(self) -> tuple[DeviceMesh | None, dict[str, tuple[torch.Tensor, torch.Tensor | None]]]:
        """The tensor mesh the experts are split over (None: whole) and each projection's (weight,
        bias) as plain tensors: this rank's F slice, whose gradient flows back to the DTensor shard."""
        mesh = self.up_proj.weight.device_mesh if isinstance(self.up_proj.weight, DTensor) else None
        names = ("gate_proj", "up_proj", "down_proj") if self.spec.use_glu else ("up_proj", "down_proj")
        out = {}
        for name in names:
            layer = getattr(self, name)
            out[name] = tuple(None if t is None else t.to_local() if isinstance(t, DTensor) else t
                              for t in (layer.weight, layer.bias))
        return mesh, out

    def mix_selected(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``sum_slot w[n, slot] * expert_{idx[n, slot]}(x[n])`` on the selected pairs only, (N, D).

        The blocked dispatch of ``llm.moe_dispatch`` (static shapes, no loop over experts): each
        assignment gets a row of a padded buffer in which every block of ``b`` rows belongs to one
        expert, and the experts run as one batched matmul over blocks with gathered weights.
        """
        spec = self.spec
        mesh, proj = self.local_projections()
        if mesh is not None:  # each rank's F slice adds to x's gradient
            x = _grad_summed_over(x, mesh)
        N, D = x.shape
        E, k = spec.num_experts, spec.num_experts_per_token
        A = N * k
        b = block_rows(A, E)
        P = padded_rows(A, E, b)
        dev = x.device
        dt = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else x.dtype
        expert = idx.reshape(A)  # assignment a = n * k + slot
        order = torch.argsort(expert, stable=True)  # (A,) assignments grouped by expert
        sorted_e = expert[order]
        counts = torch.zeros(E, dtype=torch.long, device=dev).scatter_add_(0, expert, torch.ones_like(expert))
        padded = (counts + b - 1) // b * b
        ends = torch.cumsum(padded, 0)
        dest = (ends - padded)[sorted_e] + torch.arange(A, device=dev) - (torch.cumsum(counts, 0) - counts)[sorted_e]
        pos = torch.empty_like(dest).scatter_(0, order, dest)  # (A,) buffer row of each assignment
        block_expert = torch.searchsorted(ends, torch.arange(P // b, device=dev) * b, right=True).clamp(max=E - 1)
        rows = x.new_zeros(P, D, dtype=dt).index_copy(0, pos, x.to(dt).repeat_interleave(k, dim=0))
        h = rows.view(P // b, b, D)  # (nb, b, D), block i belongs to expert block_expert[i]

        def linear(name: str, h: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
            weight, bias = proj[name]
            y = torch.bmm(h, weight.to(dt)[block_expert].transpose(1, 2))  # (nb, b, out)
            return y + bias.to(dt)[block_expert][:, None, :] if with_bias and bias is not None else y

        if spec.use_glu:
            h = _activation(spec, linear("gate_proj", h)) * linear("up_proj", h)  # (nb, b, F)
        else:
            h = _activation(spec, linear("up_proj", h))
        out = linear("down_proj", h, with_bias=False)  # (nb, b, D), a partial sum over F when split
        if mesh is not None:
            out = _partial_sums_added(out, mesh)
        down_bias = proj["down_proj"][1]
        if down_bias is not None:
            out = out + down_bias.to(dt)[block_expert][:, None, :]
        out = out.reshape(P, D)
        acc = torch.promote_types(dt, torch.float32)  # mix in (at least) float32
        return (out[pos].view(N, k, D).to(acc) * w.to(acc).unsqueeze(-1)).sum(dim=1)  # (N, D)

    def mix_grouped(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``mix_selected``'s function as one grouped GEMM per projection (``llm.moe_dispatch``).

        The A = N*k assignments are stable-sorted by expert, so expert e owns the rows
        ``offsets[e-1]:offsets[e]`` of the sorted (A, D) buffer (no padding); ``grouped_mm`` runs each
        projection on each run with its expert's weight, and the inverse permutation un-sorts.
        """
        spec = self.spec
        mesh, proj = self.local_projections()
        if mesh is not None:  # each rank's F slice adds to x's gradient
            x = _grad_summed_over(x, mesh)
        N, D = x.shape
        E, k = spec.num_experts, spec.num_experts_per_token
        A = N * k
        dev = x.device
        dt = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else x.dtype
        expert = idx.reshape(A)  # assignment a = n * k + slot
        order = torch.argsort(expert, stable=True)  # (A,) assignments grouped by expert
        sorted_e = expert[order]
        offsets = torch.cumsum(torch.bincount(expert, minlength=E), 0).to(torch.int32)  # (E,) run ends
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(A, device=dev))  # sorted row of a
        h = x.to(dt)[order // k]  # (A, D), row j is the token of the j-th sorted assignment

        def linear(name: str, h: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
            weight, bias = proj[name]
            y = grouped_mm(h, weight.to(dt), offsets)  # (A, out)
            return y + bias.to(dt)[sorted_e] if with_bias and bias is not None else y

        if spec.use_glu:
            h = _activation(spec, linear("gate_proj", h)) * linear("up_proj", h)  # (A, F)
        else:
            h = _activation(spec, linear("up_proj", h))
        out = linear("down_proj", h, with_bias=False)  # (A, D), sorted; a partial sum over F when split
        if mesh is not None:
            out = _partial_sums_added(out, mesh)
        down_bias = proj["down_proj"][1]
        if down_bias is not None:
            out = out + down_bias.to(dt)[sorted_e]
        acc = torch.promote_types(dt, torch.float32)  # mix in (at least) float32
        return (out[inverse].view(N, k, D).to(acc) * w.to(acc).unsqueeze(-1)).sum(dim=1)  # (N, D)


def grouped_kernel_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` runs ``grouped_mm(x, weight, ...)``: CUDA, compute capability 9.0+
    (its kernel is Hopper's), bf16, and rows 16-byte aligned (``in`` and ``out`` multiples of 8)."""
    return (hasattr(torch, "_grouped_mm") and x.is_cuda and x.dtype == torch.bfloat16 == weight.dtype
            and torch.cuda.get_device_capability(x.device) >= (9, 0)
            and x.shape[-1] % 8 == 0 and weight.shape[-2] % 8 == 0)


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x (A, in) in runs, weight (E, out, in), offsets (E,) int32 run ends -> (A, out): run e times
    ``weight[e].T``. ``torch._grouped_mm`` where it applies, else one matmul per run (the host reads
    the offsets: a sync, and a graph break under ``torch.compile``)."""
    if grouped_kernel_applies(x, weight):
        return torch._grouped_mm(x, weight.transpose(-2, -1), offs=offsets)
    ends = offsets.tolist()
    starts = [0, *ends[:-1]]
    return torch.cat([F.linear(x[s:e], weight[i]) for i, (s, e) in enumerate(zip(starts, ends, strict=True))])


class MoE(nn.Module):
    """Top-k mixture of experts with optional capacity dropping (contract, "MoE" steps 1-5).

    Vectorised with static shapes (no ``.item()``, no boolean indexing) so it runs under
    ``torch.compile(fullgraph=True)``: every expert is evaluated on every token and the outputs are
    mixed by a dense (N, E) weight matrix that is zero off the selected experts, which gives the
    same values and gradients as a sparse dispatch. ``forward`` returns ``(y, balance, z, load)``
    with the losses unscaled (the model applies the coefficients) and ``load`` (E,) the tokens
    routed to each expert (the count ``balanced_selection_bias`` reads).

    ``moe_impl`` (``set_moe_impl(model, impl)``; the spec does not change) picks how the experts run
    (``llm.moe_dispatch``): ``"dense"`` as above (the reference), ``"blocked"``
    (``Experts.mix_selected``) or ``"grouped"`` (``Experts.mix_grouped``) on the selected pairs only:
    the same function with k/E of the expert FLOPs. The engines set the impl that
    ``optimization.moe_impl`` resolves to.

    The routed output is scaled by ``routed_scaling_factor``; the shared experts (``shared``, one
    dense MLP, with ``num_shared_experts``) run on every token outside the dispatch, so every impl
    adds them the same way, gated per token by ``sigmoid(shared_gate(x))`` with ``shared_expert_gate``.
    """

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.router = _zeroed(nn.Linear, spec.hidden_size, spec.num_experts, bias=False)
        if spec.router_selection_bias:
            # Untrained state (a buffer: no gradient, no optimiser, in the state_dict under its
            # canonical name); the engines move it with ``balanced_selection_bias``.
            self.router.register_buffer("selection_bias", torch.zeros(spec.num_experts))
        self.experts = Experts(spec)
        if spec.num_shared_experts:
            self.shared = MLP(spec, spec.shared_ffn_size)
        if spec.shared_expert_gate:
            self.shared_gate = _zeroed(nn.Linear, spec.hidden_size, 1, bias=False)
        self.moe_impl = "dense"

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, D) -> combine (N, E) float32 mixing weights, idx (N, k), logits and probs (N, E).

        ``probs`` is each token's distribution over experts the balance loss averages: the softmax,
        or the sigmoid scores divided by their sum (``router_scoring=sigmoid``, whose top-k and
        weights use the scores themselves). The experts are chosen on the selection scores (the
        scores plus ``selection_bias``, limited to the ``topk_groups`` best groups); the chosen
        experts weigh their un-biased scores."""
        spec = self.spec
        E, k = spec.num_experts, spec.num_experts_per_token
        N = x.shape[0]
        # The router stays in float32 even under autocast: top-k choices flip on bf16 rounding.
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.router.weight.float())  # (N, E)
        if spec.router_scoring is RouterScoring.SIGMOID:
            scores = torch.sigmoid(logits)
            probs = scores / scores.sum(dim=-1, keepdim=True)
        else:
            scores = probs = torch.softmax(logits, dim=-1)
        choice = scores.detach()  # (N, E); indices only, no gradient
        if spec.router_selection_bias:
            choice = choice + self.router.selection_bias.float()
        if spec.num_expert_groups > 1:
            choice = self._limit_to_groups(choice)
        # A stable descending sort keeps equal scores in index order: ties go to the lower expert.
        _, order = torch.sort(choice, dim=-1, descending=True, stable=True)
        idx = order[:, :k]  # (N, k)
        w = scores.gather(1, idx)  # (N, k)
        if spec.norm_topk_prob and k == 1:
            # w / w is the constant 1: no gradient in exact arithmetic, so none in float32 either
            # (the division would hand the router rounding noise that AdamW amplifies to lr-sized steps).
            w = torch.ones_like(w).detach()
        elif spec.norm_topk_prob:
            w = w / w.sum(dim=-1, keepdim=True)
        onehot = F.one_hot(idx, E)  # (N, k, E) int64

        capacity = spec.capacity(N)
        if capacity is not None:
            # Rank of each assignment among those to the same expert, counted token-major
            # (integer cumsum: exact at any batch size).
            flat = onehot.reshape(N * k, E)
            rank = ((flat.cumsum(dim=0) - 1) * flat).sum(dim=-1).reshape(N, k)  # (N, k)
            w = w * (rank < capacity).to(w.dtype)  # dropped assignments weigh 0, no renormalising
        combine = (w.unsqueeze(-1) * onehot.to(w.dtype)).sum(dim=1)  # (N, E); top-k experts are distinct
        return combine, idx, logits, probs

    def _limit_to_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """choice (N, E) with every expert outside each token's ``topk_groups`` best groups at -inf.

        A group scores its best selection score (``max``) or the sum of its two best (``top2_sum``);
        equal group scores keep the lower group (a stable sort), as equal experts do."""
        spec = self.spec
        N, E, g = choice.shape[0], spec.num_experts, spec.num_expert_groups
        grouped = choice.reshape(N, g, E // g)  # (N, g, E/g)
        if spec.router_group_score is GroupScore.TOP2_SUM:
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (N, g)
        else:
            group_scores = grouped.amax(dim=-1)  # (N, g)
        _, group_order = torch.sort(group_scores, dim=-1, descending=True, stable=True)
        kept = group_order[:, :spec.topk_groups]  # (N, topk_groups)
        group_mask = torch.zeros(N, g, dtype=torch.bool, device=choice.device).scatter(1, kept, True)
        return choice.masked_fill(~group_mask.repeat_interleave(E // g, dim=1), float("-inf"))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, D = x.shape
        spec = self.spec
        E, k = spec.num_experts, spec.num_experts_per_token
        xf = x.reshape(B * T, D)  # (N, D)
        combine, idx, logits, probs = self.route(xf)

        if self.moe_impl not in MOE_IMPLS:
            raise ValueError(f"moe_impl={self.moe_impl!r} is not one of: {', '.join(MOE_IMPLS)}")
        if self.moe_impl == "blocked":
            y = self.experts.mix_selected(xf, idx, combine.gather(1, idx))  # (N, D) float32
        elif self.moe_impl == "grouped":
            y = self.experts.mix_grouped(xf, idx, combine.gather(1, idx))  # (N, D) float32
        else:
            expert_out = self.experts(xf)  # (E, N, D)
            y = torch.einsum("ne,end->nd", combine.to(expert_out.dtype), expert_out)  # (N, D)
        if spec.routed_scaling_factor != 1.0:
            y = y * spec.routed_scaling_factor
        if spec.num_shared_experts:
            shared = self.shared(xf)  # (N, D)
            if spec.shared_expert_gate:
                with torch.autocast(device_type=x.device.type, enabled=False):
                    gate = torch.sigmoid(F.linear(xf.float(), self.shared_gate.weight.float()))  # (N, 1)
                shared = gate * shared.float()
            y = y + shared

        # Load balance counts assignments before capacity drops; f carries no gradient, P does.
        load = F.one_hot(idx, E).sum(dim=(0, 1)).float()  # (E,) tokens routed to each expert
        f = load / (idx.shape[0] * k)  # (E,)
        balance = E * (f * probs.mean(dim=0)).sum()
        z = torch.logsumexp(logits, dim=-1).pow(2).mean()
        return y.reshape(B, T, D).to(x.dtype), balance, z, load


def balanced_selection_bias(bias: torch.Tensor, load: torch.Tensor, rate: float) -> torch.Tensor:
    """DeepSeek-V3's aux-loss-free balancing step: ``bias + rate * sign(mean(load) - load)``.

    bias, load (E,) float32 (``load``: a step's tokens per expert over the global batch); an
    overloaded expert's bias goes down by ``rate``, an underloaded one's up, an even one's stays.
    A positive factor on ``load`` (a count repeated on every tensor rank) changes nothing."""
    return bias + rate * torch.sign(load.mean() - load)


def set_moe_impl(model: nn.Module, impl: str) -> None:
    """Run every MoE layer of ``model`` with ``impl`` (one of ``llm.moe_dispatch.MOE_IMPLS``; ``auto``
    is resolved before, by ``resolve_moe_impl``); a model without MoE layers is left as it is."""
    if impl not in MOE_IMPLS:
        raise ValueError(f"moe_impl={impl!r} is not one of: {', '.join(MOE_IMPLS)}")
    for module in model.modules():
        if isinstance(module, MoE):
            module.moe_impl = impl


# ---------------------------------------------------------------------- block and model
class TransformerBlock(nn.Module):
    """Pre-norm block: ``x += attn(attn_norm(x))``; ``x += mlp(mlp_norm(x))``, residual dropout.
    ``norm_position=post``: ``x = attn_norm(x + attn(x))``; ``x = mlp_norm(x + mlp(x))``."""

    def __init__(self, spec: ModelSpec, layer_idx: int):
        super().__init__()
        self.spec = spec
        self.layer_idx = layer_idx
        self.attn_norm = build_norm(spec)
        self.attn = build_attention(spec)
        self.mlp_norm = build_norm(spec)
        self.mlp = MoE(spec) if spec.is_moe_layer(layer_idx) else MLP(spec)
        self.dropout = nn.Dropout(spec.dropout)
        # Activation checkpointing (``backends.torch.parallel.apply_activation_checkpointing``): a
        # ``torch.utils.checkpoint.checkpoint``-like ``recompute(fn, *args, **kwargs)``, or None.
        self.recompute = None

    def forward(self, x: torch.Tensor, start_pos: int = 0, cache: LayerKVCache | None = None, *,
                attention_mask: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
                positions: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(x, balance, z, load): the MoE's losses and (E,) expert load, zeros and None in a dense block."""
        if self.recompute is not None and cache is None and torch.is_grad_enabled():
            return self.recompute(self._forward, x, start_pos, None, attention_mask=attention_mask,
                                  segment_ids=segment_ids, positions=positions)
        return self._forward(x, start_pos, cache, attention_mask=attention_mask, segment_ids=segment_ids,
                             positions=positions)

    def _forward(self, x: torch.Tensor, start_pos: int, cache: LayerKVCache | None, *,
                 attention_mask: torch.Tensor | None, segment_ids: torch.Tensor | None,
                 positions: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        post = self.spec.norm_position is NormPosition.POST
        h = self.attn(x if post else self.attn_norm(x), start_pos, cache, attention_mask=attention_mask,
                      segment_ids=segment_ids, positions=positions)
        x = x + self.dropout(h)
        if post:
            x = self.attn_norm(x)
        if isinstance(self.mlp, MoE):
            h, balance, z, load = self.mlp(x if post else self.mlp_norm(x))
        else:
            h = self.mlp(x if post else self.mlp_norm(x))
            balance = z = torch.zeros((), device=x.device)
            load = None
        x = x + self.dropout(h)
        if post:
            x = self.mlp_norm(x)
        return x, balance, z, load


@dataclass
class ModelOutput:
    """What ``DecoderModel.forward`` returns; the training objective is ``loss + aux_loss + z_loss``.

    ``logits`` (B, T, V) float32 (None with ``return_logits=False``); ``loss`` mean cross-entropy
    over targets != -100 (None without targets, 0 when none is valid); ``aux_loss`` / ``z_loss`` the
    coefficient-scaled layer means of the MoE balance and z losses (scalar zeros without MoE);
    ``expert_load`` (MoE layers, E) float32, the tokens each MoE layer routed to each expert (None
    without MoE), what the engines' selection-bias update reads.
    """

    logits: torch.Tensor | None
    loss: torch.Tensor | None
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    hidden_states: list[torch.Tensor] | None = None  # embed, each block, final_norm (return_hidden)
    expert_load: torch.Tensor | None = None


class DecoderModel(nn.Module):
    """The decoder-only language model: embed -> blocks -> final_norm -> lm_head.

    The constructor allocates zeros and draws nothing; ``from_spec(spec, seed)`` loads
    ``llm.spec.init_params``, the starting weights both backends share.
    """

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.embed = EmbeddingLayer(spec)
        self.layers = nn.ModuleList(TransformerBlock(spec, i) for i in range(spec.num_layers))
        self.final_norm = build_norm(spec)
        # Tied: the output projection is embed.weight, so there is no lm_head module (and no key).
        self.lm_head = (None if spec.tie_embeddings
                        else _zeroed(nn.Linear, spec.hidden_size, spec.vocab_size, bias=spec.lm_head_bias))

    def new_cache(self, batch_size: int, *, max_seq_len: int | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        """An empty KV cache on this model's device (dtype defaults to the parameters')."""
        p = self.embed.weight
        return KVCache(self.spec, batch_size, max_seq_len=max_seq_len,
                       dtype=p.dtype if dtype is None else dtype, device=p.device)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, *,
                cache: KVCache | None = None, start_pos: int = 0,
                attention_mask: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
                positions: torch.Tensor | None = None,
                return_hidden: bool = False, return_logits: bool = True,
                loss_chunk_tokens: int = 0) -> ModelOutput:
        """Logits (float32) and, with ``targets``, the losses.

        ``return_logits=False`` (needs ``targets``) is the training path: ``logits`` is None and the
        float32 (B, T, V) copy is never kept, so under autocast only the bf16 logits exist and
        ``torch.compile`` fuses the upcast into the cross-entropy. The loss is the same number.
        ``loss_chunk_tokens=k >= 1`` (with ``return_logits=False``) computes it with
        ``backends.torch.loss.chunked_cross_entropy``, ``k`` tokens at a time: no (B, T, V) logits
        at all (``optimization.loss_chunk_tokens`` chooses ``k``; 0 = the plain loss).

        ``attention_mask`` (B, T) of 1/0 (with a cache: (B, cache length), 1 for every slot that
        holds or will hold a real token) marks padding, left or right: padded slots are never
        attended, a padded query attends to itself only, positions come from
        ``positions_from_mask`` (left padding computes what the unpadded row does), and the model
        sets the targets of padded slots to -100. A target that *is* padding (the last real token
        of a right-padded row predicts a pad) is the caller's to mark -100.
        ``segment_ids`` (B, T) ints: packed documents, attention never crosses a change of id.
        ``positions`` (B, T) overrides the positions (packed rows that restart at each document).
        """
        spec = self.spec
        if not return_logits and targets is None:
            raise ValueError("return_logits=False needs targets: there would be nothing to return")
        if loss_chunk_tokens and return_logits:
            raise ValueError("loss_chunk_tokens needs return_logits=False: returned logits would exist anyway")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        T = input_ids.shape[1]
        if start_pos < 0 or start_pos + T > spec.max_seq_len:
            raise ValueError(f"positions {start_pos}..{start_pos + T - 1} exceed max_seq_len="
                             f"{spec.max_seq_len} (sequence of {T} tokens at start_pos={start_pos})")
        if cache is not None and len(cache) != len(self.layers):
            raise ValueError(f"KV cache has {len(cache)} layers, the model {len(self.layers)}")

        for name, extra in (("attention_mask", attention_mask), ("segment_ids", segment_ids),
                            ("positions", positions)):
            width = cache[0].max_seq_len if cache is not None and name == "attention_mask" else T
            if extra is not None and tuple(extra.shape) != (input_ids.shape[0], width):
                raise ValueError(f"{name} must be (batch, {width}), got shape {tuple(extra.shape)}")
        if positions is None and attention_mask is not None:
            positions = positions_from_mask(attention_mask, start_pos, T)
        if targets is not None and attention_mask is not None:
            query_valid = attention_mask[:, start_pos:start_pos + T].bool()
            targets = targets.masked_fill(~query_valid, IGNORE_INDEX)

        x = self.embed(input_ids, start_pos, positions)  # (B, T, D)
        hidden = [x]
        balances, zs, loads = [], [], []
        for i, layer in enumerate(self.layers):
            x, balance, z, load = layer(x, start_pos, None if cache is None else cache[i],
                                        attention_mask=attention_mask, segment_ids=segment_ids,
                                        positions=positions)
            balances.append(balance)
            zs.append(z)
            loads.append(load)
            hidden.append(x)
        x = self.final_norm(x)
        hidden.append(x)
        zero = torch.zeros((), device=x.device)
        # means over the MoE layers (the first dense layers have no router)
        moe = spec.num_moe_layers > 0
        first = spec.first_dense_layers
        aux_loss = spec.router_aux_loss_coef * torch.stack(balances[first:]).mean() if moe else zero
        z_loss = spec.router_z_loss_coef * torch.stack(zs[first:]).mean() if moe else zero
        expert_load = torch.stack(loads[first:]).detach() if moe else None  # (MoE layers, E)
        # the output projection (V, D), (V,) or None; tied: the token table, no bias
        head_weight, head_bias = ((self.embed.weight, None) if self.lm_head is None
                                  else (self.lm_head.weight, self.lm_head.bias))
        # A vocab-split head (tensor parallel: a DTensor weight) runs the plain loss on its modules.
        if loss_chunk_tokens and not isinstance(head_weight, DTensor):
            loss = chunked_cross_entropy(x, head_weight, head_bias, targets, loss_chunk_tokens)
            return ModelOutput(logits=None, loss=loss, aux_loss=aux_loss, z_loss=z_loss,
                               hidden_states=hidden if return_hidden else None, expert_load=expert_load)
        if self.lm_head is None:
            logits = F.linear(_like(x, head_weight), head_weight)  # (B, T, V), the autocast dtype
        else:
            logits = self.lm_head(x)
        # Vocab-split (a DTensor, V on tensor): the training loss runs on the shards, which is
        # loss_parallel's sharded cross entropy when the caller holds
        # backends.torch.parallel.vocab_split_loss over forward and backward (the training step
        # does; outside it DTensor gathers the logits for the loss); returned logits are gathered whole.
        vocab_split = isinstance(logits, DTensor) and targets is not None and not return_logits
        if not vocab_split:
            logits = _whole(logits)
        if return_logits:
            logits = logits.float()

        loss = None
        if targets is not None:
            flat_logits, flat_targets = logits.reshape(-1, spec.vocab_size).float(), targets.reshape(-1)
            if vocab_split:  # the backward wants the targets a DTensor too (replicated)
                flat_targets = DTensor.from_local(flat_targets, logits.device_mesh, [Replicate()], run_check=False)
            per_token = F.cross_entropy(flat_logits, flat_targets,
                                        ignore_index=IGNORE_INDEX, reduction="none")  # ignored -> 0
            per_token = _whole(per_token)  # vocab-split: replicated, its local copy
            n_valid = (targets != IGNORE_INDEX).sum()
            loss = per_token.sum() / n_valid.clamp(min=1)  # 0, not nan, when nothing is valid
        return ModelOutput(logits=logits if return_logits else None, loss=loss,
                           aux_loss=aux_loss, z_loss=z_loss,
                           hidden_states=hidden if return_hidden else None, expert_load=expert_load)
