"""Autoregressive decoding for the Flax NNX ``DecoderModel`` (mirrors ``backends/torch/inference.py``).

``generate`` prefills the whole prompt in one forward that fills a KV cache sized to
``T0 + max_new_tokens``, then feeds one token per step. Both are ``jax.jit``-compiled module-level
functions taking the model and cache as ``nnx.split`` (graphdef static, state traced) and the
position as a traced int32: the decode step compiles once per (model structure, batch, cache
length, sampling mode: greedy / plain / filtered), not once per token, and is reused across
``generate`` calls; temperature, top-k and top-p values are traced too, so changing them does not
recompile. The cache
state is donated to each step, so it is updated in place where the platform allows.

The argument rules and the sampling recipe are ``llm.sampling``'s (``Sampling``,
``check_prompt``): greedy is ``argmax`` (first maximum = lowest id on ties, like torch); sampling
is float32 temperature -> top-k -> top-p over ``lax.top_k`` (descending, equal logits in id order),
drawn with ``jax.random.categorical`` under ``fold_in(key(seed), p)`` for the token after position
``p``, so a seed reproduces its tokens (sampled tokens are not expected to match torch's).

``generate_no_cache`` recomputes the whole sequence every step (tests only): a full causal
forward over a fixed ``(B, T0 + max_new_tokens)`` buffer whose not-yet-generated slots the causal
mask hides, so it too compiles once. With MoE ``capacity_factor`` set, cached decoding matches full recomputation only for
dropless MoE (capacity depends on the tokens per forward).

This module must never import torch.
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from backends.flax.convert import from_canonical
from backends.flax.model import DecoderModel
from llm.sampling import Sampling, check_eos, check_prompt, check_prompt_mask, check_seed, check_vocab_limit
from llm.spec import ModelSpec

__all__ = ["generate", "generate_no_cache", "load_model", "logits", "next_token", "TRACES"]

# How many times each jitted function below was traced (compiled); tests read it.
TRACES: collections.Counter[str] = collections.Counter()


def _mode(sampling: Sampling) -> str:
    """The part of ``sampling`` that changes the program (static under jit)."""
    if sampling.greedy:
        return "greedy"
    return "plain" if sampling.top_k is None and sampling.top_p is None else "filtered"


def _knobs(sampling: Sampling, vocab_limit: int | None = None) -> tuple[np.float32, np.int32, np.float32, np.int32]:
    """The values passed traced, so new ones reuse the compiled step: temperature, top_k (0 = off),
    top_p (2 = off: the mass before any rank is at most 1), vocab_limit (int32 max = off)."""
    return (np.float32(sampling.temperature or 1.0), np.int32(sampling.top_k or 0),
            np.float32(2.0 if sampling.top_p is None else sampling.top_p),
            np.int32(np.iinfo(np.int32).max if vocab_limit is None else vocab_limit))


def _pick(logits: jax.Array, mode: str, knobs, key: jax.Array) -> jax.Array:
    temperature, top_k, top_p, vocab_limit = knobs
    logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits.astype(jnp.float32), -jnp.inf)
    if mode == "greedy":
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / temperature  # (B, V) float32
    if mode == "plain":
        return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
    # Work in sorted order: rank r holds the r-th largest logit, equal logits in id order.
    V = scaled.shape[-1]
    sorted_logits, sorted_idx = jax.lax.top_k(scaled, V)  # (B, V)
    keep = (top_k == 0) | (jnp.arange(V) < top_k)  # (V,)
    probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
    # Probability of the strictly higher ranks; 0 at rank 0, so the top token always stays.
    mass_before = jnp.concatenate([jnp.zeros_like(probs[:, :1]), jnp.cumsum(probs, axis=-1)[:, :-1]], axis=-1)
    keep = keep & (mass_before < top_p)  # (B, V)
    rank = jax.random.categorical(key, jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)  # (B,)
    return jnp.take_along_axis(sorted_idx, rank[:, None], axis=-1)[:, 0].astype(jnp.int32)


def next_token(logits: jax.Array, sampling: Sampling, key: jax.Array, vocab_limit: int | None = None) -> jax.Array:
    """Pick one token per row from ``logits`` (B, V) -> (B,) int32, among ids ``< vocab_limit``."""
    return _pick(logits, _mode(sampling), _knobs(sampling, vocab_limit), key)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _forward(graphdef, state, ids):
    TRACES["forward"] += 1
    return nnx.merge(graphdef, state)(ids).logits


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_def", "mode"),
                   donate_argnames=("cache_state",))
def _prefill(graphdef, state, cache_def, cache_state, ids, mask, key, knobs, *, mode):
    """Run the prompt (B, T0) into an empty cache; return the token for position T0 and the cache.

    ``mask``: None, or the (B, cache length) 1/0 mask of a left-padded batch."""
    TRACES["prefill"] += 1
    model, cache = nnx.merge(graphdef, state), nnx.merge(cache_def, cache_state)
    last = model(ids, cache=cache, start_pos=0, attention_mask=mask).logits[:, -1]  # (B, V)
    token = _pick(last, mode, knobs, jax.random.fold_in(key, ids.shape[1] - 1))
    return token, nnx.state(cache)


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_def", "mode"),
                   donate_argnames=("cache_state",))
def _decode_step(graphdef, state, cache_def, cache_state, token, pos, mask, key, knobs, *, mode):
    """Feed ``token`` (B,) at traced slot ``pos``; return the token for ``pos + 1`` and the cache."""
    TRACES["decode_step"] += 1
    model, cache = nnx.merge(graphdef, state), nnx.merge(cache_def, cache_state)
    last = model(token[:, None], cache=cache, start_pos=pos, attention_mask=mask).logits[:, -1]  # (B, V)
    return _pick(last, mode, knobs, jax.random.fold_in(key, pos)), nnx.state(cache)


@functools.partial(jax.jit, static_argnames=("graphdef", "mode"))
def _full_step(graphdef, state, buffer, pos, mask, key, knobs, *, mode):
    """No cache: a full causal forward over ``buffer`` (B, total); return the token for ``pos + 1``.

    Slots after ``pos`` hold placeholders that the causal mask hides from position ``pos``, so
    this is full recomputation of the prefix with one compiled shape for every step.
    """
    TRACES["full_step"] += 1
    all_logits = nnx.merge(graphdef, state)(buffer, attention_mask=mask).logits  # (B, total, V)
    last = jax.lax.dynamic_index_in_dim(all_logits, pos, axis=1, keepdims=False)  # (B, V)
    return _pick(last, mode, knobs, jax.random.fold_in(key, pos))


def _decode(model: DecoderModel, token_ids, max_new_tokens: int, *, temperature: float, top_k: int | None,
            top_p: float | None, seed: int, eos_id: int | None, vocab_limit: int | None,
            use_cache: bool, attention_mask=None) -> np.ndarray:
    spec = model.spec
    sampling = Sampling.create(temperature, top_k, top_p, vocab_size=spec.vocab_size)
    ids = check_prompt(token_ids, spec, max_new_tokens)
    seed, eos_id = check_seed(seed), check_eos(eos_id, spec)
    vocab_limit = check_vocab_limit(vocab_limit, spec)
    full_mask = check_prompt_mask(attention_mask, ids, max_new_tokens)  # (B, total) or None
    mask = None if full_mask is None else jnp.asarray(full_mask, jnp.int32)
    B, T0 = ids.shape
    total = T0 + max_new_tokens
    out = np.full((B, total), 0 if eos_id is None else eos_id, np.int64)
    out[:, :T0] = ids
    if max_new_tokens == 0:
        return out

    key = jax.random.key(seed)
    mode, knobs = _mode(sampling), _knobs(sampling, vocab_limit)
    graphdef, state = nnx.split(model)
    prompt = jnp.asarray(ids, jnp.int32)
    if use_cache:
        cache_def, cache_state = nnx.split(model.new_cache(B, max_seq_len=total))
    finished = jnp.zeros((B,), jnp.bool_)
    new_tokens: list[jax.Array] = []
    for p in range(T0 - 1, total - 1):
        if not use_cache:
            if new_tokens:  # host copy of the sequence so far; later slots are placeholders
                out[:, p] = np.asarray(new_tokens[-1])
            token = _full_step(graphdef, state, out.astype(np.int32), np.int32(p), mask, key, knobs,
                               mode=mode)
        elif p == T0 - 1:
            token, cache_state = _prefill(graphdef, state, cache_def, cache_state, prompt, mask, key, knobs,
                                          mode=mode)
        else:
            token, cache_state = _decode_step(graphdef, state, cache_def, cache_state, new_tokens[-1],
                                              np.int32(p), mask, key, knobs, mode=mode)
        if eos_id is not None:
            token = jnp.where(finished, eos_id, token)
            finished = finished | (token == eos_id)
        new_tokens.append(token)
        if eos_id is not None and bool(finished.all()):
            break  # the rest of ``out`` already holds eos_id
    # One host transfer at the end: without eos the loop only enqueues device work.
    out[:, T0:T0 + len(new_tokens)] = np.stack([np.asarray(t) for t in new_tokens], axis=1)
    return out


def generate(model: DecoderModel, token_ids, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             eos_id: int | None = None, vocab_limit: int | None = None, attention_mask=None) -> np.ndarray:
    """Continue each row of ``token_ids`` (B, T0) by ``max_new_tokens``; returns int64 (B, T0 + new).

    KV-cached: one jitted prefill over the prompt, then one jitted single-token step per new token
    (compiled once, traced position). ``attention_mask`` (B, T0) of 1/0 batches prompts of
    different lengths, left-padded: each row decodes as it would alone
    (``llm.sampling.check_prompt_mask``).
    """
    return _decode(model, token_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   seed=seed, eos_id=eos_id, vocab_limit=vocab_limit, use_cache=True,
                   attention_mask=attention_mask)


def generate_no_cache(model: DecoderModel, token_ids, max_new_tokens: int, *, temperature: float = 0.0,
                      top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                      eos_id: int | None = None, vocab_limit: int | None = None,
                      attention_mask=None) -> np.ndarray:
    """``generate`` by full recomputation of the prefix at every step (the reference for tests)."""
    return _decode(model, token_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   seed=seed, eos_id=eos_id, vocab_limit=vocab_limit, use_cache=False,
                   attention_mask=attention_mask)


def logits(model: DecoderModel, token_ids) -> np.ndarray:
    """Float32 logits (B, T, V) of a (B, T) int array (jitted, deterministic: no dropout)."""
    graphdef, state = nnx.split(model)
    ids = jnp.asarray(np.asarray(token_ids), jnp.int32)
    return np.asarray(_forward(graphdef, state, ids), dtype=np.float32)


def _jax_device(device):
    if device is None or isinstance(device, jax.Device):
        return device
    platform, _, index = str(device).partition(":")
    try:
        return jax.devices(platform)[int(index or 0)]
    except (RuntimeError, ValueError, IndexError) as e:
        raise ValueError(f"jax device {device!r} is not available ({e}); "
                         f"have {[str(d) for d in jax.devices()]}") from None


def load_model(spec: ModelSpec, params: dict[str, np.ndarray], *, device=None, dtype: str = "float32") -> DecoderModel:
    """A ``DecoderModel`` holding canonical ``params`` (kept float32) that computes in ``dtype``
    (``"float32"`` or ``"bfloat16"``), on ``device`` (a platform[:index]; default jax's own)."""
    target = _jax_device(device)
    model = from_canonical(spec, params, dtype=getattr(jnp, dtype))
    if target is not None:
        nnx.update(model, jax.device_put(nnx.state(model), target))
    return model
