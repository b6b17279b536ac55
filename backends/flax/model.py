"""The decoder-only transformer in Flax NNX, written to ``docs/architecture.md``.

Class and attribute names mirror ``backends/torch/model.py``, so NNX state paths are the canonical
parameter names (``layers/0/attn/q_proj/weight`` is ``layers.0.attn.q_proj.weight``). The one
difference is layout: linear weights are stored ``(in, out)`` (``(E, in, out)`` for experts), the
natural ``x @ W`` layout; ``backends/flax/convert.py`` transposes to and from the canonical
``(out, in)`` and is the only place that does.

Shapes in comments: B batch, T query length, S key length, D hidden, H query heads, K key/value
heads, G = H/K query heads per kv head, hd head size, F intermediate size, E experts, k experts per
token, N = B*T tokens, V vocab. Einsum strings use the same letters (``I``/``O`` = in/out features).

Construction draws no random numbers: every ``nnx.Param`` starts as float32 zeros and ``rngs``
seeds only the dropout streams; the starting weights come from ``llm.spec.init_params`` through
``backends.flax.convert.from_spec``, the one place initialisation is defined.

Precision: parameters are float32 and stay float32; ``dtype`` is the compute dtype. With bfloat16
compute, parameters and activations are cast where they are used, while norms, softmaxes, RoPE,
the router and the loss run in float32, and logits are returned in float32.

Position tables (RoPE cos/sin, the sinusoidal table) come from ``llm.spec`` and are held in
``Buffer`` variables: part of the module state (so ``nnx.jit`` passes them as arrays instead of
baking them into every program) but never ``nnx.Param``, never trained and never in a checkpoint.

Static vs traced ``start_pos``: a Python / numpy int is checked against ``max_seq_len`` (and the KV
cache length) and raises ``ValueError``; a traced value (one compiled decode step reused for every
position) cannot be checked, and out-of-range positions are then clamped by XLA.

This module must never import torch.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from backends.flax.loss import IGNORE_INDEX, chunked_cross_entropy
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
    "IGNORE_INDEX",
    "Buffer",
    "SelectionBias",
    "Linear",
    "Embedding",
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
    "ExpertLinear",
    "Experts",
    "MoE",
    "balanced_selection_bias",
    "set_moe_impl",
    "TransformerBlock",
    "ModelOutput",
    "cross_entropy",
    "lean_cross_entropy",
    "DecoderModel",
    "REMAT_POLICIES",
]

_MASKED = float(np.finfo(np.float32).min)  # finite, so a fully masked row could never produce NaN

# Activation checkpointing (``DecoderModel.remat``, set from ``training.activation_checkpointing``):
# each block runs under ``jax.checkpoint`` with one of these policies. ``selective`` keeps the tensors
# tagged with these names -- every linear's output and the attention output (the o_proj input) --
# and recomputes the rest (norms, activations, RoPE, softmax, residual adds) in the backward.
MATMUL_OUTPUT = "matmul_output"
ATTENTION_OUTPUT = "attention_output"
REMAT_POLICIES: dict[str, Any] = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "selective": jax.checkpoint_policies.save_only_these_names(MATMUL_OUTPUT, ATTENTION_OUTPUT),
}


class Buffer(nnx.Variable):
    """A constant array held in module state (position tables): not a Param, not trained, not saved."""


class SelectionBias(nnx.Variable):
    """The router's per-expert selection bias (``mlp.router.selection_bias``): untrained state, not a
    Param (``nnx.grad`` and the optimiser never see it), but converted, sharded and saved like one;
    the engines move it with ``balanced_selection_bias``."""


class _SpecRef:
    """Holds a ModelSpec as a hashable static attribute.

    ``ModelSpec`` is not hashable when ``rope_scaling`` (a dict) is set, and NNX graph definitions
    must be hashable to serve as ``jax.jit`` static arguments; this compares by the spec's JSON.
    """

    __slots__ = ("spec", "_key")

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self._key = json.dumps(spec.to_dict(), sort_keys=True)

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _SpecRef) and self._key == other._key

    def __repr__(self) -> str:
        return f"_SpecRef({self.spec!r})"


class _SpecModule(nnx.Module):
    """Base for modules that keep their ``ModelSpec`` (exposed as ``self.spec``)."""

    def _set_spec(self, spec: ModelSpec) -> None:
        self._spec_ref = _SpecRef(spec)

    @property
    def spec(self) -> ModelSpec:
        return self._spec_ref.spec


def _static_int(value: Any) -> int | None:
    """``value`` as an int when known at trace time (Python / numpy int), else None."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    return None


def _check_positions(start_pos: Any, length: int, limit: int, what: str) -> None:
    start = _static_int(start_pos)
    if start is not None and (start < 0 or start + length > limit):
        raise ValueError(f"positions {start}..{start + length - 1} exceed {what}={limit} "
                         f"(sequence of {length} tokens at start_pos={start})")


def _zeros(*shape: int) -> nnx.Param:
    """A float32 parameter of zeros: allocated, never drawn (``from_spec`` loads the real values)."""
    return nnx.Param(jnp.zeros(shape, jnp.float32))


def _activation(spec: ModelSpec, x: jax.Array) -> jax.Array:
    if spec.activation is Activation.GELU:
        return jax.nn.gelu(x, approximate=False)  # exact erf form
    if spec.activation is Activation.GELU_TANH:
        return jax.nn.gelu(x, approximate=True)
    if spec.activation is Activation.SILU:
        return jax.nn.silu(x)
    return jax.nn.relu(x)


# ---------------------------------------------------------------------- basic layers
class Linear(nnx.Module):
    """``y = x @ weight + bias`` with ``weight`` stored (in, out); computed in ``dtype``."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False, dtype: Any = jnp.float32):
        self.in_features, self.out_features = in_features, out_features
        self.dtype = jnp.dtype(dtype)
        self.weight = _zeros(in_features, out_features)
        self.bias = _zeros(out_features) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x.astype(self.dtype) @ self.weight[...].astype(self.dtype)  # (..., out)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return checkpoint_name(y, MATMUL_OUTPUT)


class Embedding(nnx.Module):
    """A lookup table ``weight`` (rows, D), float32 (the learned position table)."""

    def __init__(self, num_embeddings: int, dim: int):
        self.weight = _zeros(num_embeddings, dim)

    def __call__(self, idx: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], idx, axis=0)


class RMSNorm(nnx.Module):
    """Root-mean-square norm with a learned scale and no bias, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        self.eps = eps
        self.weight = _zeros(dim)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (self.weight[...].astype(jnp.float32) * normed).astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with weight and bias; biased-variance statistics in float32, output in input dtype."""

    def __init__(self, dim: int, eps: float = 1e-5):
        self.eps = eps
        self.weight = _zeros(dim)
        self.bias = _zeros(dim)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


def build_norm(spec: ModelSpec) -> RMSNorm | LayerNorm:
    """The norm the spec asks for, over the hidden size."""
    if spec.norm_type is NormType.RMSNORM:
        return RMSNorm(spec.hidden_size, spec.norm_eps)
    return LayerNorm(spec.hidden_size, spec.norm_eps)


# ---------------------------------------------------------------------- embedding
class EmbeddingLayer(_SpecModule):
    """Token table plus the absolute position signal (learned or sinusoidal); RoPE adds nothing here.

    ``weight`` is the token table (V, D); it doubles as the output projection when embeddings are
    tied (``attend``). The sinusoidal table is a ``Buffer``: a constant, not a parameter.
    """

    def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self._set_spec(spec)
        self.dtype = jnp.dtype(dtype)
        self.weight = _zeros(spec.vocab_size, spec.hidden_size)
        if spec.position is Position.LEARNED:
            self.position = Embedding(spec.max_seq_len, spec.hidden_size)
        elif spec.position is Position.SINUSOIDAL:
            self.sinusoidal = Buffer(jnp.asarray(sinusoidal_table(spec)))  # (max_seq_len, D)
        self.dropout = nnx.Dropout(spec.dropout, rngs=rngs)

    def __call__(self, input_ids: jax.Array, start_pos: Any = 0, positions: jax.Array | None = None, *,
                 deterministic: bool = True) -> jax.Array:
        """``positions`` (B, T) replaces ``start_pos .. start_pos+T-1`` when given (padding, packing)."""
        T = input_ids.shape[1]
        _check_positions(start_pos, T, self.spec.max_seq_len, "max_seq_len")
        x = jnp.take(self.weight[...], input_ids, axis=0)  # (B, T, D) float32
        pad = self.spec.pad_token_id
        if pad is not None:  # torch padding_idx: the pad row's lookup carries no gradient
            x = jnp.where((input_ids == pad)[..., None], jax.lax.stop_gradient(x), x)
        if positions is None:
            positions = start_pos + jnp.arange(T)  # (T,)
        if self.spec.position is Position.LEARNED:
            x = x + self.position(positions)  # (T, D) or (B, T, D)
        elif self.spec.position is Position.SINUSOIDAL:
            x = x + jnp.take(self.sinusoidal[...], positions, axis=0)
        return self.dropout(x.astype(self.dtype), deterministic=deterministic)

    def attend(self, x: jax.Array) -> jax.Array:
        """The tied output projection: ``x @ weight.T`` (B, T, V), in the compute dtype."""
        return jnp.einsum("BTD,VD->BTV", x.astype(self.dtype), self.weight[...].astype(self.dtype))


# ---------------------------------------------------------------------- KV cache
class LayerKVCache(nnx.Module):
    """Preallocated keys and values of one layer, (B, S_max, K, hd) each; keys already rotated.

    Held in ``nnx.Cache`` variables and written in place with ``dynamic_update_slice``, so a decode
    step has static shapes and compiles once whatever ``start_pos`` is.

    With MLA (``MultiHeadLatentAttention``) the two slots hold what that attention caches instead
    of full keys and values: ``k`` the normed compressed latent (B, S_max, 1, kv_lora_rank), ``v``
    the one rotated rope key (B, S_max, 1, qk_rope_head_dim); ``value_dim`` sizes ``v`` when it
    differs from ``head_dim``.
    """

    def __init__(self, batch_size: int, max_seq_len: int, kv_heads: int, head_dim: int,
                 dtype: Any = jnp.float32, *, value_dim: int | None = None):
        shape = (batch_size, max_seq_len, kv_heads, head_dim)
        self.k = nnx.Cache(jnp.zeros(shape, dtype))
        self.v = nnx.Cache(jnp.zeros((*shape[:-1], head_dim if value_dim is None else value_dim), dtype))

    @property
    def max_seq_len(self) -> int:
        return self.k[...].shape[1]

    def update(self, k: jax.Array, v: jax.Array, start_pos: Any) -> tuple[jax.Array, jax.Array]:
        """Write k, v (B, T, K, hd) at positions start_pos.. and return the whole cache (B, S_max, K, hd)."""
        B, T = k.shape[:2]
        cached = self.k[...]
        if B != cached.shape[0]:
            raise ValueError(f"KV cache holds batch size {cached.shape[0]}, got a batch of {B}")
        start = _static_int(start_pos)
        if start is not None and start + T > self.max_seq_len:
            raise ValueError(f"KV cache overflow: start_pos={start} + {T} new tokens > "
                             f"cache length {self.max_seq_len}")
        at = (0, start_pos, 0, 0)
        self.k[...] = jax.lax.dynamic_update_slice(cached, k.astype(cached.dtype), at)
        self.v[...] = jax.lax.dynamic_update_slice(self.v[...], v.astype(cached.dtype), at)
        return self.k[...], self.v[...]


class KVCache(nnx.Module):
    """One ``LayerKVCache`` per layer, for incremental decoding.

    The caller owns the position: ``model(ids, cache=cache, start_pos=p)`` writes the new tokens at
    ``p .. p+T-1`` and attends to everything before them, so a prompt can be prefilled in one call
    and then decoded one token at a time. The cache is NNX state: ``nnx.jit`` carries the in-place
    writes out; under plain ``jax.jit`` split it with ``nnx.split`` and return ``nnx.state(cache)``.
    With ``capacity_factor`` set, MoE capacity depends on the number of tokens in each call, so
    cached decoding reproduces a full forward exactly only for dropless MoE (or dense models).
    """

    def __init__(self, spec: ModelSpec, batch_size: int, *, max_seq_len: int | None = None,
                 dtype: Any = jnp.float32):
        length = spec.max_seq_len if max_seq_len is None else max_seq_len
        if spec.is_mla:
            layers = [LayerKVCache(batch_size, length, 1, spec.kv_lora_rank, dtype, value_dim=spec.qk_rope_head_dim)
                      for _ in range(spec.num_layers)]
        else:
            layers = [LayerKVCache(batch_size, length, spec.kv_heads, spec.dim_head, dtype)
                      for _ in range(spec.num_layers)]
        self.layers = nnx.List(layers)

    def __getitem__(self, layer_idx: int) -> LayerKVCache:
        return self.layers[layer_idx]

    def __len__(self) -> int:
        return len(self.layers)


# ---------------------------------------------------------------------- attention
def _rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def _apply_rope(x: jax.Array, rope_cos: jax.Array, rope_sin: jax.Array, start_pos: Any,
                positions: jax.Array | None) -> jax.Array:
    """Rotate-half RoPE on x (B, T, heads, r) with tables (max_seq_len, r), in float32."""
    T = x.shape[1]
    if positions is None:
        cos = jax.lax.dynamic_slice_in_dim(rope_cos, start_pos, T, axis=0)[None, :, None, :]  # (1, T, 1, r)
        sin = jax.lax.dynamic_slice_in_dim(rope_sin, start_pos, T, axis=0)[None, :, None, :]
    else:
        cos = jnp.take(rope_cos, positions, axis=0)[:, :, None, :]  # (B, T, 1, r)
        sin = jnp.take(rope_sin, positions, axis=0)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    return (x32 * cos + _rotate_half(x32) * sin).astype(x.dtype)  # (B, T, heads, r)


def _check_attention_call(causal: bool, cache: LayerKVCache | None, segment_ids: jax.Array | None) -> None:
    if cache is not None and not causal:
        raise ValueError("a KV cache needs causal attention (this layer has causal=False)")
    if cache is not None and segment_ids is not None:
        raise ValueError("segment_ids cannot be used with a KV cache (decode one document per row)")


def _layer_mask(spec: ModelSpec, causal: bool, start_pos: Any, T: int, cache: LayerKVCache | None,
                attention_mask: jax.Array | None, segment_ids: jax.Array | None) -> jax.Array:
    """Which keys T queries at ``start_pos..`` may attend: bool (B|1, T, S), True = may attend.

    Keys cover slots 0..S_max-1 when caching (unwritten slots lie in the future of every query, so
    the causal rule hides them), else the T slots of this call.
    """
    q_slot = start_pos + jnp.arange(T)
    k_slot = q_slot
    key_valid = query_valid = None
    if attention_mask is not None:
        query_valid = jax.lax.dynamic_slice_in_dim(attention_mask, start_pos, T, axis=1)  # (B, T)
        key_valid = query_valid
    if cache is not None:
        k_slot = jnp.arange(cache.max_seq_len)
        key_valid = attention_mask  # (B, S_max) or None
    return attention_rule(q_slot, k_slot, causal=causal, window=spec.sliding_window,
                          query_valid=query_valid, key_valid=key_valid, q_segment=segment_ids,
                          k_segment=segment_ids)


def positions_from_mask(attention_mask: jax.Array, start_pos: Any, length: int) -> jax.Array:
    """Positions (B, length) of slots ``start_pos ..`` of a 1/0 ``attention_mask`` (B, L >= start_pos+length).

    ``cumsum(mask) - 1`` clamped at 0: the first real token of a left-padded row is position 0, so
    the row computes what the unpadded prompt does; padded slots sit at the next real position (0
    for leading padding) and are never attended by real tokens.
    """
    pos = jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)
    return jax.lax.dynamic_slice_in_dim(pos, start_pos, length, axis=1)


def attention_rule(q_slot: jax.Array, k_slot: jax.Array, *, causal: bool, window: int | None,
                   query_valid: jax.Array | None = None, key_valid: jax.Array | None = None,
                   q_segment: jax.Array | None = None, k_segment: jax.Array | None = None) -> jax.Array:
    """Which key slots each query slot may attend: bool (1 or B, T, S), True = may attend.

    Slots are indices into the sequence (T queries ``q_slot``, S keys ``k_slot``). Causal: k <= q,
    and a window w keeps k > q - w; non-causal: |q - k| < w. Segments (B, T) / (B, S): only equal
    ids. Padding: a key whose ``key_valid`` is 0 is never attended, and a padded query
    (``query_valid`` 0) attends to its own slot only, so its output is defined and finite.
    """
    q, k = q_slot[:, None], k_slot[None, :]  # (T, 1), (1, S)
    allowed = jnp.ones((q.shape[0], k.shape[1]), jnp.bool_)
    if causal:
        allowed = k <= q
    if window is not None:
        allowed = allowed & ((k > q - window) if causal else (jnp.abs(q - k) < window))
    allowed = allowed[None]  # (1, T, S)
    if q_segment is not None:
        allowed = allowed & (q_segment[:, :, None] == k_segment[:, None, :])
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :].astype(jnp.bool_)
    if query_valid is not None:
        allowed = jnp.where(query_valid[:, :, None].astype(jnp.bool_), allowed, (k == q)[None])
    return allowed


class MultiHeadAttention(_SpecModule):
    """Self-attention with grouped-query heads, optional RoPE, sliding window and per-head q/k RMSNorm
    (``qk_norm``); causal by default.

    ``causal=False`` drops the triangle (an encoder-style layer): a sliding window then keeps keys
    with ``|i - j| < window``; a KV cache needs ``causal=True``. ``__call__``'s ``attention_mask``
    (B, T; with a cache B, cache length), ``segment_ids`` (B, T) and ``positions`` (B, T) follow
    ``attention_rule`` and ``positions_from_mask``; the cuDNN path takes the same rule as its
    boolean ``mask=``.

    The RoPE tables come from ``llm.spec.rope_cos_sin`` (rows = absolute positions) and are held
    as ``Buffer`` constants so both backends rotate with the very same float32 numbers. Query head
    ``h`` reads kv head ``h // G``: queries are viewed as (K, G) groups rather than repeating K/V.

    ``attention_impl`` picks the kernel (``model.set_attributes(attention_impl=...)`` sets it on
    every layer): ``"auto"`` uses cuDNN flash attention (``jax.nn.dot_product_attention``,
    ``implementation="cudnn"``) where it computes the same function -- on a GPU, bf16/fp16 compute,
    no KV cache, no sliding window, no attention dropout, head_dim a multiple of 8 up to 128 -- and
    the einsum path below otherwise (every CPU run, so float32 parity is untouched); ``"cudnn"``
    insists (an error where it cannot apply); ``"xla"`` always takes the einsum path.
    """

    def __init__(self, spec: ModelSpec, causal: bool = True, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self._set_spec(spec)
        self.causal = causal
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.kv_heads, spec.dim_head
        self.dtype = jnp.dtype(dtype)
        d, h, kv, hd = spec.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        bias = spec.attention_bias
        self.q_proj = Linear(d, h * hd, bias=bias, dtype=dtype)
        self.k_proj = Linear(d, kv * hd, bias=bias, dtype=dtype)
        self.v_proj = Linear(d, kv * hd, bias=bias, dtype=dtype)
        self.o_proj = Linear(h * hd, d, bias=spec.out_bias, dtype=dtype)
        if spec.qk_norm:  # one (hd,) scale per projection, shared by its heads
            self.q_norm = RMSNorm(hd, spec.norm_eps)
            self.k_norm = RMSNorm(hd, spec.norm_eps)
        if spec.position is Position.ROPE:
            cos, sin = rope_cos_sin(spec)  # (max_seq_len, hd) each
            self.rope_cos = Buffer(jnp.asarray(cos))
            self.rope_sin = Buffer(jnp.asarray(sin))
        self.attn_dropout = nnx.Dropout(spec.dropout, rngs=rngs)
        self.attention_impl = "auto"

    def _cudnn_applies(self, cache: LayerKVCache | None, deterministic: bool) -> bool:
        """Whether the cuDNN flash kernel computes exactly this layer's attention (see the class doc)."""
        if self.attention_impl not in ("auto", "cudnn", "xla"):
            raise ValueError(f"attention_impl={self.attention_impl!r} is not one of: auto, cudnn, xla")
        if self.attention_impl == "xla":
            return False
        why_not = [reason for bad, reason in (
            (jax.default_backend() != "gpu", f"backend is {jax.default_backend()}, not gpu"),
            (self.dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)),
             f"compute dtype {self.dtype} (cuDNN needs bf16/fp16)"),
            (cache is not None, "a KV cache is in use"),
            (self.spec.sliding_window is not None, "sliding_window is set"),
            (not deterministic and self.spec.dropout > 0, "attention dropout is active"),
            (self.head_dim % 8 != 0 or self.head_dim > 128, f"head_dim={self.head_dim}"),
        ) if bad]
        if why_not and self.attention_impl == "cudnn":
            raise ValueError("attention_impl='cudnn' cannot apply: " + "; ".join(why_not))
        return not why_not

    def _rope(self, x: jax.Array, start_pos: Any, positions: jax.Array | None) -> jax.Array:
        return _apply_rope(x, self.rope_cos[...], self.rope_sin[...], start_pos, positions)  # (B, T, heads, hd)

    def __call__(self, x: jax.Array, start_pos: Any = 0, cache: LayerKVCache | None = None, *,
                 attention_mask: jax.Array | None = None, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        spec = self.spec
        B, T, _ = x.shape
        H, K, hd = self.num_heads, self.num_kv_heads, self.head_dim
        _check_positions(start_pos, T, spec.max_seq_len, "max_seq_len")
        _check_attention_call(self.causal, cache, segment_ids)
        if positions is None and attention_mask is not None:
            positions = positions_from_mask(attention_mask, start_pos, T)
        q = self.q_proj(x).reshape(B, T, H, hd)
        k = self.k_proj(x).reshape(B, T, K, hd)
        v = self.v_proj(x).reshape(B, T, K, hd)
        if spec.qk_norm:  # per head, before the rotation (HF Qwen3Attention)
            q, k = self.q_norm(q), self.k_norm(k)
        if spec.position is Position.ROPE:
            q, k = self._rope(q, start_pos, positions), self._rope(k, start_pos, positions)

        mask = _layer_mask(spec, self.causal, start_pos, T, cache, attention_mask, segment_ids)  # (B|1, T, S)

        if self._cudnn_applies(cache, deterministic):
            # Flash attention: no (T, S) scores in memory, float32 softmax statistics inside the
            # kernel; the plain triangle as is_causal, any other rule as the boolean mask.
            plain = self.causal and attention_mask is None and segment_ids is None
            y = jax.nn.dot_product_attention(q.astype(self.dtype), k.astype(self.dtype), v.astype(self.dtype),
                                             mask=None if plain else mask[:, None],
                                             scale=1.0 / math.sqrt(hd), is_causal=plain,
                                             implementation="cudnn")  # (B, T, H, hd); h reads kv h // G
            return self.o_proj(checkpoint_name(y.reshape(B, T, H * hd), ATTENTION_OUTPUT))

        if cache is not None:
            k, v = cache.update(k, v, start_pos)  # (B, S_max, K, hd)
        q = q.reshape(B, T, K, H // K, hd)  # head h = kv * G + g, so it reads kv head h // G
        scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k.astype(q.dtype),
                            preferred_element_type=jnp.float32) * (1.0 / math.sqrt(hd))
        scores = jnp.where(mask[:, None, None], scores, _MASKED)
        probs = jax.nn.softmax(scores, axis=-1)  # float32
        probs = self.attn_dropout(probs, deterministic=deterministic)
        y = jnp.einsum("BKGTS,BSKH->BTKGH", probs.astype(self.dtype), v.astype(self.dtype))
        return self.o_proj(checkpoint_name(y.reshape(B, T, H * hd), ATTENTION_OUTPUT))  # (B, T, D)


class MultiHeadLatentAttention(_SpecModule):
    """DeepSeek-V2/V3 multi-head latent attention (MLA), as transformers' ``DeepseekV3Attention``.

    The mirror of ``backends.torch.model.MultiHeadLatentAttention`` (its docstring has the maths
    and the RoPE convention: rotate-half over the rope part). Shapes: r = kv_lora_rank,
    n = qk_nope_head_dim, p = qk_rope_head_dim, dv = v_head_dim. The KV cache holds the normed
    latent and the rotated rope key (``LayerKVCache``'s two slots, one "head" each), not full keys
    and values. Attention runs on the einsum path only: ``attention_impl`` accepts ``auto`` and
    ``xla``; ``cudnn`` is refused (query/key and value heads differ in size).
    """

    def __init__(self, spec: ModelSpec, causal: bool = True, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self._set_spec(spec)
        self.causal = causal
        self.dtype = jnp.dtype(dtype)
        d, h = spec.hidden_size, spec.num_heads
        self.num_heads, self.qk_head_dim = h, spec.qk_head_dim
        if spec.q_lora_rank is None:
            self.q_proj = Linear(d, h * spec.qk_head_dim, bias=False, dtype=dtype)
        else:
            self.q_a_proj = Linear(d, spec.q_lora_rank, bias=spec.attention_bias, dtype=dtype)
            self.q_a_layernorm = RMSNorm(spec.q_lora_rank, MLA_LATENT_NORM_EPS)
            self.q_b_proj = Linear(spec.q_lora_rank, h * spec.qk_head_dim, bias=False, dtype=dtype)
        self.kv_a_proj_with_mqa = Linear(d, spec.kv_lora_rank + spec.qk_rope_head_dim, bias=spec.attention_bias,
                                         dtype=dtype)
        self.kv_a_layernorm = RMSNorm(spec.kv_lora_rank, MLA_LATENT_NORM_EPS)
        self.kv_b_proj = Linear(spec.kv_lora_rank, h * (spec.qk_nope_head_dim + spec.v_head_dim), bias=False,
                                dtype=dtype)
        self.o_proj = Linear(h * spec.v_head_dim, d, bias=spec.out_bias, dtype=dtype)
        cos, sin = rope_cos_sin(spec)  # (max_seq_len, p) each
        self.rope_cos = Buffer(jnp.asarray(cos))
        self.rope_sin = Buffer(jnp.asarray(sin))
        self.attn_dropout = nnx.Dropout(spec.dropout, rngs=rngs)
        self.attention_impl = "auto"

    def __call__(self, x: jax.Array, start_pos: Any = 0, cache: LayerKVCache | None = None, *,
                 attention_mask: jax.Array | None = None, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        spec = self.spec
        n, p, r, dv = spec.qk_nope_head_dim, spec.qk_rope_head_dim, spec.kv_lora_rank, spec.v_head_dim
        B, T, _ = x.shape
        H = self.num_heads
        if self.attention_impl not in ("auto", "xla"):
            raise ValueError(f"attention_impl={self.attention_impl!r} does not apply to attention=mla "
                             "(one of: auto, xla; cuDNN needs equal query/key and value head sizes)")
        _check_positions(start_pos, T, spec.max_seq_len, "max_seq_len")
        _check_attention_call(self.causal, cache, segment_ids)
        if positions is None and attention_mask is not None:
            positions = positions_from_mask(attention_mask, start_pos, T)
        if spec.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.reshape(B, T, H, n + p)
        rope_cos, rope_sin = self.rope_cos[...], self.rope_sin[...]
        q_rope = _apply_rope(q[..., n:], rope_cos, rope_sin, start_pos, positions)
        q = jnp.concatenate([q[..., :n], q_rope], axis=-1)  # (B, T, H, n + p)
        compressed = self.kv_a_proj_with_mqa(x)  # (B, T, r + p)
        latent = self.kv_a_layernorm(compressed[..., :r])[:, :, None, :]  # (B, T, 1, r)
        k_rope = _apply_rope(compressed[..., None, r:], rope_cos, rope_sin, start_pos, positions)  # (B, T, 1, p)
        mask = _layer_mask(spec, self.causal, start_pos, T, cache, attention_mask, segment_ids)  # (B|1, T, S)

        if cache is not None:
            latent, k_rope = cache.update(latent, k_rope, start_pos)  # (B, S_max, 1, r), (B, S_max, 1, p)
        S = latent.shape[1]
        kv = self.kv_b_proj(latent[:, :, 0]).reshape(B, S, H, n + dv)
        k = jnp.concatenate([kv[..., :n], jnp.broadcast_to(k_rope.astype(kv.dtype), (B, S, H, p))], axis=-1)
        v = kv[..., n:]  # (B, S, H, dv)
        scores = jnp.einsum("BTHD,BSHD->BHTS", q, k.astype(q.dtype),
                            preferred_element_type=jnp.float32) * mla_softmax_scale(spec)
        scores = jnp.where(mask[:, None], scores, _MASKED)
        probs = jax.nn.softmax(scores, axis=-1)  # float32
        probs = self.attn_dropout(probs, deterministic=deterministic)
        y = jnp.einsum("BHTS,BSHD->BTHD", probs.astype(self.dtype), v.astype(self.dtype))
        return self.o_proj(checkpoint_name(y.reshape(B, T, H * dv), ATTENTION_OUTPUT))  # (B, T, D)


def build_attention(spec: ModelSpec, causal: bool = True, *, rngs: nnx.Rngs,
                    dtype: Any = jnp.float32) -> MultiHeadAttention | MultiHeadLatentAttention:
    """The attention the spec asks for (``attention: mha | mla``)."""
    if spec.is_mla:
        return MultiHeadLatentAttention(spec, causal, rngs=rngs, dtype=dtype)
    return MultiHeadAttention(spec, causal, rngs=rngs, dtype=dtype)


# ---------------------------------------------------------------------- feed-forward
class MLP(_SpecModule):
    """Dense feed-forward: ``down(act(gate(x)) * up(x))`` with GLU, else ``down(act(up(x)))``.
    ``width`` is the intermediate size (default ``spec.ffn_size``; the MoE's shared experts pass
    ``spec.shared_ffn_size``)."""

    def __init__(self, spec: ModelSpec, width: int | None = None, *, dtype: Any = jnp.float32):
        self._set_spec(spec)
        d, f, bias = spec.hidden_size, spec.ffn_size if width is None else width, spec.mlp_bias
        if spec.use_glu:
            self.gate_proj = Linear(d, f, bias=bias, dtype=dtype)
        self.up_proj = Linear(d, f, bias=bias, dtype=dtype)
        self.down_proj = Linear(f, d, bias=bias, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.spec.use_glu:
            h = _activation(self.spec, self.gate_proj(x)) * self.up_proj(x)
        else:
            h = _activation(self.spec, self.up_proj(x))
        return self.down_proj(h)


class ExpertLinear(nnx.Module):
    """E stacked linear maps: ``weight`` (E, in, out), optional ``bias`` (E, out)."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, bias: bool, *,
                 dtype: Any = jnp.float32):
        self.dtype = jnp.dtype(dtype)
        self.weight = _zeros(num_experts, in_features, out_features)
        self.bias = _zeros(num_experts, out_features) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (N, in) for every expert alike, or (E, N, in) per expert -> (E, N, out)."""
        eq = "NI,EIO->ENO" if x.ndim == 2 else "ENI,EIO->ENO"
        y = jnp.einsum(eq, x.astype(self.dtype), self.weight[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...][:, None, :].astype(self.dtype)
        return checkpoint_name(y, MATMUL_OUTPUT)


class Experts(_SpecModule):
    """The E expert MLPs of one MoE layer, stacked so all run as one batched matmul."""

    def __init__(self, spec: ModelSpec, *, dtype: Any = jnp.float32):
        self._set_spec(spec)
        e, d, f, bias = spec.num_experts, spec.hidden_size, spec.expert_ffn_size, spec.mlp_bias
        if spec.use_glu:
            self.gate_proj = ExpertLinear(e, d, f, bias, dtype=dtype)
        self.up_proj = ExpertLinear(e, d, f, bias, dtype=dtype)
        self.down_proj = ExpertLinear(e, f, d, bias, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (N, D) -> every expert's output on every token, (E, N, D)."""
        if self.spec.use_glu:
            h = _activation(self.spec, self.gate_proj(x)) * self.up_proj(x)  # (E, N, F)
        else:
            h = _activation(self.spec, self.up_proj(x))
        return self.down_proj(h)

    def mix_selected(self, x: jax.Array, idx: jax.Array, w: jax.Array) -> jax.Array:
        """``sum_slot w[n, slot] * expert_{idx[n, slot]}(x[n])`` on the selected pairs only, (N, D).

        The blocked dispatch of ``llm.moe_dispatch`` (static shapes, no loop over experts): each
        assignment gets a row of a padded buffer in which every block of ``b`` rows belongs to one
        expert, and the experts run as one batched matmul over blocks with gathered weights. Every
        row move is a gather whose gradient is a gather too (``gather_rows``, ``expert_rows``):
        no scatter-add forward or backward.
        """
        spec = self.spec
        N, D = x.shape
        E, k = spec.num_experts, spec.num_experts_per_token
        A = N * k
        b = block_rows(A, E)
        P = padded_rows(A, E, b)
        dt = self.up_proj.dtype
        order, inverse, sorted_e, starts, counts = _sort_by_expert(idx, E)
        padded = (counts + b - 1) // b * b
        ends = jnp.cumsum(padded)
        padded_starts = ends - padded  # (E,) first buffer row of each expert's run
        dest = padded_starts[sorted_e] + jnp.arange(A) - starts[sorted_e]  # (A,) buffer row of sorted j
        pos = dest[inverse]  # (A,) buffer row of each assignment
        block_expert = jnp.minimum(jnp.searchsorted(ends, jnp.arange(P // b) * b, side="right"), E - 1)
        row_expert = jnp.repeat(block_expert, b)  # (P,)
        offset = jnp.arange(P) - padded_starts[row_expert]  # (P,) row's place in its expert's run
        real = offset < counts[row_expert]
        src = jnp.where(real, order[jnp.minimum(starts[row_expert] + offset, A - 1)], A)  # (P,) assignment or A
        rows = gather_rows(jnp.repeat(x.astype(dt), k, axis=0), src, pos)  # (P, D), padding rows zero
        h = rows.reshape(P // b, b, D)  # (nb, b, D), block i belongs to expert block_expert[i]

        def linear(layer: ExpertLinear, h: jax.Array) -> jax.Array:
            y = jnp.einsum("NBI,NIO->NBO", h, expert_rows(layer.weight[...].astype(dt), block_expert))
            if layer.bias is not None:
                y = y + expert_rows(layer.bias[...].astype(dt), block_expert)[:, None, :]
            return checkpoint_name(y, MATMUL_OUTPUT)

        if spec.use_glu:
            h = _activation(spec, linear(self.gate_proj, h)) * linear(self.up_proj, h)  # (nb, b, F)
        else:
            h = _activation(spec, linear(self.up_proj, h))
        out = gather_rows(linear(self.down_proj, h).reshape(P, D), pos, src)  # (A, D)
        acc = jnp.promote_types(dt, jnp.float32)  # mix in (at least) float32
        return jnp.sum(out.reshape(N, k, D).astype(acc) * w[..., None].astype(acc), axis=1)

    def mix_grouped(self, x: jax.Array, idx: jax.Array, w: jax.Array) -> jax.Array:
        """``mix_selected``'s function as one grouped GEMM per projection (``llm.moe_dispatch``).

        The A = N*k assignments are stable-sorted by expert, so expert e owns a run of
        ``counts[e]`` rows of the sorted (A, D) buffer (no padding); ``jax.lax.ragged_dot`` runs each
        projection on each run with its expert's weight, and the inverse permutation un-sorts
        (gathers both ways, ``gather_rows``).
        """
        spec = self.spec
        N, D = x.shape
        E, k = spec.num_experts, spec.num_experts_per_token
        dt = self.up_proj.dtype
        order, inverse, sorted_e, _, counts = _sort_by_expert(idx, E)
        h = gather_rows(jnp.repeat(x.astype(dt), k, axis=0), order, inverse)  # (A, D) sorted by expert

        def linear(layer: ExpertLinear, h: jax.Array) -> jax.Array:
            y = jax.lax.ragged_dot(h, layer.weight[...].astype(dt), counts)  # (A, out)
            if layer.bias is not None:
                y = y + expert_rows(layer.bias[...].astype(dt), sorted_e)
            return y

        if spec.use_glu:
            h = _activation(spec, linear(self.gate_proj, h)) * linear(self.up_proj, h)  # (A, F)
        else:
            h = _activation(spec, linear(self.up_proj, h))
        out = gather_rows(linear(self.down_proj, h), inverse, order)  # (A, D) in assignment order
        acc = jnp.promote_types(dt, jnp.float32)  # mix in (at least) float32
        return jnp.sum(out.reshape(N, k, D).astype(acc) * w[..., None].astype(acc), axis=1)


def _sort_by_expert(idx: jax.Array, num_experts: int) -> tuple[jax.Array, ...]:
    """idx (N, k) -> the A = N*k assignments (a = n * k + slot) stable-sorted by expert, as int32:
    ``order`` (A,) assignment at sorted place j, ``inverse`` (A,) sorted place of assignment a,
    ``sorted_e`` (A,) expert at j, ``starts`` and ``counts`` (E,) each expert's run. Sorts and
    binary searches only (no scatter)."""
    expert = idx.reshape(-1).astype(jnp.int32)
    order = jnp.argsort(expert, stable=True).astype(jnp.int32)
    inverse = jnp.argsort(order).astype(jnp.int32)
    sorted_e = expert[order]
    bounds = jnp.searchsorted(sorted_e, jnp.arange(num_experts + 1, dtype=jnp.int32), side="left")
    starts = bounds[:-1].astype(jnp.int32)
    return order, inverse, sorted_e, starts, (bounds[1:] - bounds[:-1]).astype(jnp.int32)


@jax.custom_vjp
def gather_rows(x: jax.Array, index: jax.Array, inverse: jax.Array) -> jax.Array:
    """x (M, D) -> (P, D): row p is ``x[index[p]]``, zeros where ``index[p] == M``.

    ``index`` reads each row of x at most once and ``inverse`` (M,) names the row of the result each
    x row went to (P where none), so the gradient is the gather ``g[inverse]``: XLA's gather
    transpose would be a scatter-add, slow on GPU for what is a permutation.
    """
    return jnp.take(x, index, axis=0, mode="fill", fill_value=0)


def _gather_rows_fwd(x, index, inverse):
    return gather_rows(x, index, inverse), (index, inverse)


def _gather_rows_bwd(res, g):
    index, inverse = res
    return jnp.take(g, inverse, axis=0, mode="fill", fill_value=0), None, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


@jax.custom_vjp
def expert_rows(table: jax.Array, ids: jax.Array) -> jax.Array:
    """table (E, ...) -> (n, ...): ``table[ids]``; the gradient sums the rows per expert as a
    one-hot matmul (float32 accumulation) instead of a scatter-add."""
    return table[ids]


def _expert_rows_fwd(table, ids):
    return table[ids], (ids, table.shape[0])


def _expert_rows_bwd(res, g):
    ids, num_experts = res
    onehot = jax.nn.one_hot(ids, num_experts, dtype=g.dtype)  # (n, E)
    summed = jnp.tensordot(onehot, g, axes=(0, 0), preferred_element_type=jnp.float32)
    return summed.astype(g.dtype), None


expert_rows.defvjp(_expert_rows_fwd, _expert_rows_bwd)


class MoE(_SpecModule):
    """Top-k mixture of experts with optional capacity dropping (contract, "MoE" steps 1-5).

    Static shapes and no Python loops over tokens, so it runs under ``jax.jit``: every expert is
    evaluated on every token and the outputs are mixed by a dense (N, E) weight matrix that is zero
    off the selected experts, which gives the same values and gradients as a sparse dispatch.
    ``__call__`` returns ``(y, balance, z, load)`` with the losses unscaled (the model applies the
    coefficients) and ``load`` (E,) the tokens routed to each expert (the count
    ``balanced_selection_bias`` reads).

    ``moe_impl`` (``set_moe_impl(model, impl)``; the spec does not change) picks how the experts run
    (``llm.moe_dispatch``): ``"dense"`` as above (the reference), ``"blocked"``
    (``Experts.mix_selected``) or ``"grouped"`` (``Experts.mix_grouped``, ``jax.lax.ragged_dot``) on
    the selected pairs only: the same function with k/E of the expert FLOPs. The engines set the
    impl that ``optimization.moe_impl`` resolves to.

    The routed output is scaled by ``routed_scaling_factor``; the shared experts (``shared``, one
    dense MLP, with ``num_shared_experts``) run on every token outside the dispatch, so every impl
    adds them the same way, gated per token by ``sigmoid(shared_gate(x))`` with ``shared_expert_gate``.
    """

    def __init__(self, spec: ModelSpec, *, dtype: Any = jnp.float32):
        self._set_spec(spec)
        self.dtype = jnp.dtype(dtype)
        # The router runs in float32 whatever the compute dtype: top-k choices flip on bf16 rounding.
        self.router = Linear(spec.hidden_size, spec.num_experts, dtype=jnp.float32)
        if spec.router_selection_bias:
            self.router.selection_bias = SelectionBias(jnp.zeros((spec.num_experts,), jnp.float32))
        self.experts = Experts(spec, dtype=dtype)
        if spec.num_shared_experts:
            self.shared = MLP(spec, spec.shared_ffn_size, dtype=dtype)
        if spec.shared_expert_gate:
            self.shared_gate = Linear(spec.hidden_size, 1, dtype=jnp.float32)
        self.moe_impl = "dense"

    def route(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """x (N, D) -> combine (N, E) float32 mixing weights, idx (N, k), logits and probs (N, E).

        ``probs`` is each token's distribution over experts the balance loss averages: the softmax,
        or the sigmoid scores divided by their sum (``router_scoring=sigmoid``, whose top-k and
        weights use the scores themselves). The experts are chosen on the selection scores (the
        scores plus ``selection_bias``, limited to the ``topk_groups`` best groups); the chosen
        experts weigh their un-biased scores."""
        spec = self.spec
        E, k = spec.num_experts, spec.num_experts_per_token
        N = x.shape[0]
        logits = self.router(x.astype(jnp.float32))  # (N, E)
        if spec.router_scoring is RouterScoring.SIGMOID:
            scores = jax.nn.sigmoid(logits)
            probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
        else:
            scores = probs = jax.nn.softmax(logits, axis=-1)
        choice = jax.lax.stop_gradient(scores)  # (N, E); indices only, no gradient
        if spec.router_selection_bias:
            choice = choice + self.router.selection_bias[...].astype(jnp.float32)
        if spec.num_expert_groups > 1:
            choice = self._limit_to_groups(choice)
        # lax.top_k returns equal values lower index first: ties go to the lower expert, as a
        # stable descending sort would.
        _, idx = jax.lax.top_k(choice, k)  # (N, k)
        w = jnp.take_along_axis(scores, idx, axis=-1)  # (N, k)
        if spec.norm_topk_prob and k == 1:
            # w / w is the constant 1: no gradient in exact arithmetic, so none in float32 either
            # (the division would hand the router rounding noise that AdamW amplifies to lr-sized steps).
            w = jnp.ones_like(w)
        elif spec.norm_topk_prob:
            w = w / jnp.sum(w, axis=-1, keepdims=True)
        onehot = jax.nn.one_hot(idx, E, dtype=jnp.float32)  # (N, k, E)

        capacity = spec.capacity(N)
        if capacity is not None:
            # Rank of each assignment among those to the same expert, counted token-major.
            flat = onehot.reshape(N * k, E)
            rank = jnp.sum((jnp.cumsum(flat, axis=0) - 1.0) * flat, axis=-1).reshape(N, k)
            w = w * (rank < capacity).astype(w.dtype)  # dropped assignments weigh 0, no renormalising
        combine = jnp.sum(w[..., None] * onehot, axis=1)  # (N, E); top-k experts are distinct
        return combine, idx, logits, probs

    def _limit_to_groups(self, choice: jax.Array) -> jax.Array:
        """choice (N, E) with every expert outside each token's ``topk_groups`` best groups at -inf.

        A group scores its best selection score (``max``) or the sum of its two best (``top2_sum``);
        equal group scores keep the lower group (``lax.top_k``), as equal experts do."""
        spec = self.spec
        N, E, g = choice.shape[0], spec.num_experts, spec.num_expert_groups
        grouped = choice.reshape(N, g, E // g)  # (N, g, E/g)
        if spec.router_group_score is GroupScore.TOP2_SUM:
            group_scores = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)  # (N, g)
        else:
            group_scores = jnp.max(grouped, axis=-1)  # (N, g)
        _, kept = jax.lax.top_k(group_scores, spec.topk_groups)  # (N, topk_groups)
        group_mask = jnp.any(jax.nn.one_hot(kept, g, dtype=jnp.bool_), axis=1)  # (N, g)
        return jnp.where(jnp.repeat(group_mask, E // g, axis=1), choice, -jnp.inf)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        B, T, D = x.shape
        E, k = self.spec.num_experts, self.spec.num_experts_per_token
        xf = x.reshape(B * T, D)  # (N, D)
        combine, idx, logits, probs = self.route(xf)

        if self.moe_impl not in MOE_IMPLS:
            raise ValueError(f"moe_impl={self.moe_impl!r} is not one of: {', '.join(MOE_IMPLS)}")
        if self.moe_impl == "blocked":
            y = self.experts.mix_selected(xf, idx, jnp.take_along_axis(combine, idx, axis=-1))  # (N, D)
        elif self.moe_impl == "grouped":
            y = self.experts.mix_grouped(xf, idx, jnp.take_along_axis(combine, idx, axis=-1))  # (N, D)
        else:
            expert_out = self.experts(xf)  # (E, N, D)
            y = jnp.einsum("NE,END->ND", combine.astype(expert_out.dtype), expert_out)
        if self.spec.routed_scaling_factor != 1.0:
            y = y * self.spec.routed_scaling_factor
        if self.spec.num_shared_experts:
            shared = self.shared(xf)  # (N, D)
            if self.spec.shared_expert_gate:
                gate = jax.nn.sigmoid(self.shared_gate(xf.astype(jnp.float32)))  # (N, 1)
                shared = gate * shared.astype(jnp.float32)
            y = y + shared

        # Load balance counts assignments before capacity drops; f carries no gradient, P does.
        load = jnp.sum(jax.nn.one_hot(idx, E, dtype=jnp.float32), axis=(0, 1))  # (E,) tokens routed to each expert
        f = load / (idx.shape[0] * k)  # (E,)
        balance = E * jnp.sum(f * jnp.mean(probs, axis=0))
        z = jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))
        return y.reshape(B, T, D).astype(x.dtype), balance, z, jax.lax.stop_gradient(load)


def balanced_selection_bias(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
    """DeepSeek-V3's aux-loss-free balancing step: ``bias + rate * sign(mean(load) - load)``.

    bias, load (E,) float32 (``load``: a step's tokens per expert over the global batch); an
    overloaded expert's bias goes down by ``rate``, an underloaded one's up, an even one's stays.
    A positive factor on ``load`` changes nothing."""
    return bias + rate * jnp.sign(jnp.mean(load) - load)


def set_moe_impl(model: nnx.Module, impl: str) -> None:
    """Run every MoE layer of ``model`` with ``impl`` (one of ``llm.moe_dispatch.MOE_IMPLS``; ``auto``
    is resolved before, by ``resolve_moe_impl``); a model without MoE layers is left as it is."""
    if impl not in MOE_IMPLS:
        raise ValueError(f"moe_impl={impl!r} is not one of: {', '.join(MOE_IMPLS)}")
    for _, module in nnx.iter_graph(model):
        if isinstance(module, MoE):
            module.moe_impl = impl


# ---------------------------------------------------------------------- block and model
class TransformerBlock(_SpecModule):
    """Pre-norm block: ``x += attn(attn_norm(x))``; ``x += mlp(mlp_norm(x))``, residual dropout.
    ``norm_position=post``: ``x = attn_norm(x + attn(x))``; ``x = mlp_norm(x + mlp(x))``."""

    def __init__(self, spec: ModelSpec, layer_idx: int = 0, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self._set_spec(spec)
        self.layer_idx = layer_idx
        self.attn_norm = build_norm(spec)
        self.attn = build_attention(spec, rngs=rngs, dtype=dtype)
        self.mlp_norm = build_norm(spec)
        self.mlp = MoE(spec, dtype=dtype) if spec.is_moe_layer(layer_idx) else MLP(spec, dtype=dtype)
        self.dropout = nnx.Dropout(spec.dropout, rngs=rngs)

    def __call__(self, x: jax.Array, start_pos: Any = 0, cache: LayerKVCache | None = None, *,
                 attention_mask: jax.Array | None = None, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None, deterministic: bool = True
                 ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
        """(x, balance, z, load): the MoE's losses and (E,) expert load, zeros and None in a dense block."""
        post = self.spec.norm_position is NormPosition.POST
        h = self.attn(x if post else self.attn_norm(x), start_pos, cache, attention_mask=attention_mask,
                      segment_ids=segment_ids, positions=positions, deterministic=deterministic)
        x = x + self.dropout(h, deterministic=deterministic)
        if post:
            x = self.attn_norm(x)
        if isinstance(self.mlp, MoE):
            h, balance, z, load = self.mlp(x if post else self.mlp_norm(x))
        else:
            h = self.mlp(x if post else self.mlp_norm(x))
            balance = z = jnp.zeros((), jnp.float32)
            load = None
        x = x + self.dropout(h, deterministic=deterministic)
        if post:
            x = self.mlp_norm(x)
        return x, balance, z, load


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ModelOutput:
    """What ``DecoderModel.__call__`` returns (a pytree); the objective is ``loss + aux_loss + z_loss``.

    ``logits`` (B, T, V) float32 (None with ``return_logits=False``); ``loss`` mean cross-entropy
    over targets != -100 (None without targets, 0 when none is valid); ``aux_loss`` / ``z_loss`` the coefficient-scaled layer means of
    the MoE balance and z losses (scalar zeros without MoE); ``expert_load`` (MoE layers, E) float32,
    the tokens each MoE layer routed to each expert (None without MoE), what the engines'
    selection-bias update reads. ``hidden_states`` (only with
    ``return_hidden=True``, for layer-by-layer parity) is the embedding output, every block's
    output and the final norm's output: ``num_layers + 2`` arrays (B, T, D).
    """

    logits: jax.Array | None
    loss: jax.Array | None
    aux_loss: jax.Array
    z_loss: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None
    expert_load: jax.Array | None = None


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean float32 cross-entropy over targets != IGNORE_INDEX; 0 (not NaN) when none is valid."""
    logits = logits.astype(jnp.float32)
    valid = targets != IGNORE_INDEX
    safe = jnp.where(valid, targets, 0)  # any in-range index; its term is zeroed below
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    nll = jnp.where(valid, jax.nn.logsumexp(logits, axis=-1) - picked, 0.0)
    return jnp.sum(nll) / jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)


LOSS_IMPLS = ("xla", "pallas")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _token_nll(logits: jax.Array, targets: jax.Array, impl: str) -> jax.Array:
    return _token_nll_fwd(logits, targets, impl)[0]


def _token_nll_fwd(logits, targets, impl):
    valid = targets != IGNORE_INDEX
    safe = jnp.where(valid, targets, 0)
    if impl == "pallas":  # one read of the logits (backends/flax/pallas_lse.py)
        from backends.flax.pallas_lse import logsumexp_rows

        lse = logsumexp_rows(logits.reshape(-1, logits.shape[-1])).reshape(logits.shape[:-1])
    else:
        lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)  # the upcast fuses into the reduction
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0].astype(jnp.float32)
    return jnp.where(valid, lse - picked, 0.0), (logits, lse, safe, valid)


def _token_nll_bwd(impl, res, g):
    logits, lse, safe, valid = res
    g = jnp.where(valid, g, 0.0)[..., None]  # (..., 1)
    probs = jnp.exp(logits.astype(jnp.float32) - lse[..., None])  # float32, one fused pass
    onehot = jnp.arange(logits.shape[-1]) == safe[..., None]
    return ((probs - onehot) * g).astype(logits.dtype), None


_token_nll.defvjp(_token_nll_fwd, _token_nll_bwd)


def lean_cross_entropy(logits: jax.Array, targets: jax.Array, *, impl: str = "xla") -> jax.Array:
    """``cross_entropy`` on logits in the compute dtype, without a float32 copy of them.

    The same float32 math (the upcast happens inside the fused reductions), but the saved residual
    is the bf16 logits and the hand-written VJP writes the gradient ``softmax - onehot`` straight in
    the logits' dtype: one read of the logits forward, one read and one write backward.
    ``impl="pallas"`` computes the log-sum-exp with the one-pass kernel of
    ``backends/flax/pallas_lse.py`` instead of XLA's two reductions.
    """
    if impl not in LOSS_IMPLS:
        raise ValueError(f"loss_impl={impl!r} is not one of: {', '.join(LOSS_IMPLS)}")
    valid = targets != IGNORE_INDEX
    nll = _token_nll(logits, targets, impl)
    return jnp.sum(nll) / jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)


class DecoderModel(_SpecModule):
    """The decoder-only language model: embed -> blocks -> final_norm -> lm_head.

    The constructor allocates zeros and draws nothing (``rngs`` seeds the dropout streams only);
    ``backends.flax.from_spec(spec, seed)`` loads ``llm.spec.init_params``, the starting weights
    both backends share. ``dtype`` is the compute dtype; parameters stay float32.
    """

    def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self._set_spec(spec)
        self.dtype = jnp.dtype(dtype)
        self.embed = EmbeddingLayer(spec, rngs=rngs, dtype=dtype)
        self.layers = nnx.List([TransformerBlock(spec, i, rngs=rngs, dtype=dtype)
                                for i in range(spec.num_layers)])
        self.final_norm = build_norm(spec)
        # Tied: the output projection is embed.weight, so there is no lm_head module (and no name).
        self.lm_head = (None if spec.tie_embeddings
                        else Linear(spec.hidden_size, spec.vocab_size, bias=spec.lm_head_bias, dtype=dtype))
        self.loss_impl = "xla"  # or "pallas": the loss-only path's log-sum-exp (lean_cross_entropy)
        self.remat = "none"  # or a key of REMAT_POLICIES: each block recomputed in the backward

    def _remat_block(self, layer: TransformerBlock, x: jax.Array, start_pos: Any, attention_mask: Any,
                     segment_ids: Any, positions: Any, deterministic: bool
                     ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
        """``layer`` under ``jax.checkpoint`` with ``REMAT_POLICIES[self.remat]`` (the same values and
        gradients as a plain call; only what the backward keeps changes)."""
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}: must be 'none' or one of {sorted(REMAT_POLICIES)}")

        graphdef, state = nnx.split(layer)

        def run(state, h, mask, segments, where):  # start_pos and deterministic stay Python values
            block = nnx.merge(graphdef, state)
            out = block(h, start_pos, None, attention_mask=mask, segment_ids=segments, positions=where,
                        deterministic=deterministic)
            return out, nnx.state(block)  # the dropout streams' counts moved on

        out, state = jax.checkpoint(run, policy=REMAT_POLICIES[self.remat])(state, x, attention_mask, segment_ids,
                                                                            positions)
        if not deterministic:  # only dropout moves a block's state; writing it back unchanged would fail
            nnx.update(layer, state)  # for a model merged inside a plain jax transform (jax.grad of nnx.merge)
        return out

    def new_cache(self, batch_size: int, *, max_seq_len: int | None = None, dtype: Any = None) -> KVCache:
        """An empty KV cache (dtype defaults to the compute dtype)."""
        return KVCache(self.spec, batch_size, max_seq_len=max_seq_len,
                       dtype=self.dtype if dtype is None else dtype)

    def __call__(self, input_ids: jax.Array, targets: jax.Array | None = None, *, deterministic: bool = True,
                 cache: KVCache | None = None, start_pos: Any = 0,
                 attention_mask: jax.Array | None = None, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None, return_hidden: bool = False,
                 return_logits: bool = True, loss_chunk_tokens: int = 0) -> ModelOutput:
        """Logits (float32) and, with ``targets``, the losses.

        ``return_logits=False`` (needs ``targets``) is the training path: ``logits`` is None and the
        loss comes from ``lean_cross_entropy`` on the compute-dtype logits (no float32 (B, T, V)
        copy, forward or backward). The loss is the same float32 quantity.
        ``loss_chunk_tokens=k >= 1`` (with ``return_logits=False``) computes it with
        ``backends.flax.loss.chunked_cross_entropy``, ``k`` tokens at a time: no (B, T, V) logits
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
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        _check_positions(start_pos, input_ids.shape[1], spec.max_seq_len, "max_seq_len")
        if cache is not None and len(cache) != len(self.layers):
            raise ValueError(f"KV cache has {len(cache)} layers, the model {len(self.layers)}")

        T = input_ids.shape[1]
        for name, extra in (("attention_mask", attention_mask), ("segment_ids", segment_ids),
                            ("positions", positions)):
            width = cache[0].max_seq_len if cache is not None and name == "attention_mask" else T
            if extra is not None and tuple(extra.shape) != (input_ids.shape[0], width):
                raise ValueError(f"{name} must be (batch, {width}), got shape {tuple(extra.shape)}")
        if positions is None and attention_mask is not None:
            positions = positions_from_mask(attention_mask, start_pos, T)
        if targets is not None and attention_mask is not None:
            query_valid = jax.lax.dynamic_slice_in_dim(attention_mask, start_pos, T, axis=1)
            targets = jnp.where(query_valid.astype(jnp.bool_), targets, IGNORE_INDEX)

        x = self.embed(input_ids, start_pos, positions, deterministic=deterministic)  # (B, T, D)
        hidden = [x]
        balances, zs, loads = [], [], []
        for i, layer in enumerate(self.layers):
            if self.remat != "none" and cache is None:
                x, balance, z, load = self._remat_block(layer, x, start_pos, attention_mask, segment_ids, positions,
                                                  deterministic)
            else:
                x, balance, z, load = layer(x, start_pos, None if cache is None else cache[i],
                                            attention_mask=attention_mask, segment_ids=segment_ids,
                                            positions=positions, deterministic=deterministic)
            hidden.append(x)
            balances.append(balance)
            zs.append(z)
            loads.append(load)
        x = self.final_norm(x)
        hidden.append(x)
        zero = jnp.zeros((), jnp.float32)
        # means over the MoE layers (the first dense layers have no router)
        moe = spec.num_moe_layers > 0
        first = spec.first_dense_layers
        aux_loss = spec.router_aux_loss_coef * jnp.mean(jnp.stack(balances[first:])) if moe else zero
        z_loss = spec.router_z_loss_coef * jnp.mean(jnp.stack(zs[first:])) if moe else zero
        expert_load = jnp.stack(loads[first:]) if moe else None  # (MoE layers, E)
        if loss_chunk_tokens:  # the head's weight as stored: tied, the token table (V, D); lm_head (D, V)
            if self.lm_head is None:
                weight, bias, layout = self.embed.weight[...], None, "VD"
            else:
                head = self.lm_head
                weight, bias, layout = head.weight[...], None if head.bias is None else head.bias[...], "DV"
            loss = chunked_cross_entropy(x.astype(self.dtype), weight, bias, targets, loss_chunk_tokens,
                                         weight_layout=layout)
            return ModelOutput(logits=None, loss=loss, aux_loss=aux_loss, z_loss=z_loss,
                               hidden_states=tuple(hidden) if return_hidden else None, expert_load=expert_load)
        logits = self.embed.attend(x) if self.lm_head is None else self.lm_head(x)  # (B, T, V)
        if not return_logits:
            return ModelOutput(logits=None, loss=lean_cross_entropy(logits, targets, impl=self.loss_impl),
                               aux_loss=aux_loss, z_loss=z_loss,
                               hidden_states=tuple(hidden) if return_hidden else None, expert_load=expert_load)
        logits = logits.astype(jnp.float32)
        loss = None if targets is None else cross_entropy(logits, targets)
        return ModelOutput(logits=logits, loss=loss, aux_loss=aux_loss, z_loss=z_loss,
                           hidden_states=tuple(hidden) if return_hidden else None, expert_load=expert_load)
