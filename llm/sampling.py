"""Sampling rules both backends' decoding loops follow, written once.

``backends/{torch,flax}/inference.py`` implement the decoding loop (prefill the prompt in one
forward with a KV cache, then one token per step); this module holds what must be identical in
both:

* ``Sampling`` -- temperature / top-k / top-p, validated (a bad value is a ``ValueError`` naming it).
  ``temperature == 0`` means greedy (argmax; ties go to the lowest token id in both backends).
  Otherwise, in float32: ``logits / temperature`` -> keep the ``top_k`` largest (ties to the lower
  id) -> keep the smallest prefix of the sorted distribution whose probability reaches ``top_p``
  (the top token always stays) -> sample from the renormalised rest.
* ``check_prompt`` -- the prompt and length rules. There is no sliding-window crop: a prompt plus
  ``max_new_tokens`` longer than ``spec.max_seq_len`` is a ``ValueError`` (positions past
  ``max_seq_len`` have no RoPE row / position embedding the model was trained with).
* ``check_seed`` / ``check_eos`` -- the seed is an int in ``[0, 2**32)``; ``eos_id`` a valid id.
* ``check_vocab_limit`` -- ``vocab_limit=N`` restricts every pick (greedy too) to ids ``< N``: the
  logits of ids ``>= N`` become ``-inf`` before temperature, top-k and top-p. A model's embedding table
  may be padded past its tokenizer's vocabulary (``model.vocab_size`` > the tokenizer's size); those
  rows have no text, so decoding for text passes the tokenizer's size and never proposes them.
* ``sample_text`` -- prompt text in, prompt + continuation out, with a backend's ``generate``.

EOS: with ``eos_id`` set, a row that emits it is finished, every later position of that row holds
``eos_id``, and decoding stops early once every row is finished. The output is always
``(B, T0 + max_new_tokens)``.

This module never imports torch or jax.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from llm.spec import ModelSpec

__all__ = ["Sampling", "check_eos", "check_prompt", "check_prompt_mask", "check_seed", "check_vocab_limit", "sample_text"]


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked (frozen and hashable).

    Build with ``Sampling.create`` (validates and normalises: greedy drops ``top_k``/``top_p``, a
    ``top_k`` >= vocab and ``top_p == 1`` are no-ops and become None).
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def create(cls, temperature: Any = 0.0, top_k: Any = None, top_p: Any = None, *,
               vocab_size: int | None = None) -> Sampling:
        if not _is_number(temperature) or not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature={temperature!r} must be a finite number >= 0 (0 = greedy)")
        if top_k is not None and (not _is_int(top_k) or top_k < 1):
            raise ValueError(f"top_k={top_k!r} must be an integer >= 1 or None")
        if top_p is not None and (not _is_number(top_p) or not 0.0 < top_p <= 1.0):
            raise ValueError(f"top_p={top_p!r} must be a number in (0, 1] or None")
        temperature = float(temperature)
        if temperature == 0.0:
            return cls(0.0, None, None)
        if top_k is not None and vocab_size is not None and top_k >= vocab_size:
            top_k = None
        if top_p is not None and top_p >= 1.0:
            top_p = None
        return cls(temperature, None if top_k is None else int(top_k),
                   None if top_p is None else float(top_p))


def check_prompt(token_ids: Any, spec: ModelSpec, max_new_tokens: Any) -> np.ndarray:
    """The prompt as an int64 ``(B, T0)`` array, or a ValueError saying what is wrong with it."""
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
    ids = np.asarray(token_ids)
    if ids.ndim != 2:
        raise ValueError(f"token_ids must be a (batch, length) array, got shape {ids.shape}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"empty prompt (token_ids shape {ids.shape}): give at least one token per row")
    if ids.dtype.kind not in "iu":
        raise ValueError(f"token_ids must be integers, got dtype {ids.dtype}")
    bad = (ids < 0) | (ids >= spec.vocab_size)
    if bad.any():
        raise ValueError(f"token id {int(ids[bad][0])} is out of range for vocab_size={spec.vocab_size}")
    total = ids.shape[1] + int(max_new_tokens)
    if total > spec.max_seq_len:
        raise ValueError(f"prompt of {ids.shape[1]} tokens + max_new_tokens={max_new_tokens} = {total} "
                         f"exceeds max_seq_len={spec.max_seq_len} (no sliding-window crop is done; "
                         "shorten the prompt or ask for fewer tokens)")
    return ids.astype(np.int64)


def check_prompt_mask(attention_mask: Any, ids: np.ndarray, max_new_tokens: int) -> np.ndarray | None:
    """The decoding mask (B, T0 + max_new_tokens) of a left-padded prompt's 1/0 ``attention_mask``
    (B, T0): the prompt's mask then 1 for every new token; None without a mask. Each row must be
    0s then 1s with at least one 1 (the next token is read off the last slot, so it must be real)."""
    if attention_mask is None:
        return None
    mask = np.asarray(attention_mask)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask must have the prompt's shape {ids.shape}, got {mask.shape}")
    if not np.isin(mask, (0, 1)).all():
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (a real token)")
    if (np.diff(mask.astype(np.int64), axis=1) < 0).any() or (mask[:, -1] == 0).any():
        raise ValueError("attention_mask must be left padding for generation (each row 0s then 1s, "
                         "ending in a real token)")
    return np.concatenate([mask, np.ones((ids.shape[0], max_new_tokens), mask.dtype)], axis=1).astype(np.int64)


def check_seed(seed: Any) -> int:
    if not _is_int(seed) or not 0 <= seed < 2**32:
        raise ValueError(f"seed={seed!r} must be an integer in [0, 2**32)")
    return int(seed)


def check_vocab_limit(vocab_limit: Any, spec: ModelSpec) -> int | None:
    """``vocab_limit`` as an int in ``[1, spec.vocab_size]``, None when it restricts nothing."""
    if vocab_limit is None:
        return None
    if not _is_int(vocab_limit) or not 1 <= vocab_limit <= spec.vocab_size:
        raise ValueError(f"vocab_limit={vocab_limit!r} must be an integer in [1, {spec.vocab_size}] or None")
    return None if vocab_limit == spec.vocab_size else int(vocab_limit)


def check_eos(eos_id: Any, spec: ModelSpec) -> int | None:
    if eos_id is None:
        return None
    if not _is_int(eos_id) or not 0 <= eos_id < spec.vocab_size:
        raise ValueError(f"eos_id={eos_id!r} must be a token id in [0, {spec.vocab_size}) or None")
    return int(eos_id)


def sample_text(generate: Any, model: Any, tokenizer: Any, prompt: str = "def ", max_new_tokens: int = 200,
                temperature: float = 0.8, top_k: int | None = None, seed: int = 0) -> str:
    """Prompt + a sampled continuation (temperature 0 = greedy), decoded, cut at the first EOS and
    at ``model.spec.max_seq_len``; ``generate`` is a backend's ``generate`` function. Only ids the
    tokenizer knows are sampled (``vocab_limit``), however far the model's table is padded."""
    ids = tokenizer.encode(prompt) or [tokenizer.bos_id or 0]
    new = max(0, min(max_new_tokens, model.spec.max_seq_len - len(ids)))
    limit = min(tokenizer.vocab_size, model.spec.vocab_size)
    eos = tokenizer.eos_id if tokenizer.eos_id is not None and tokenizer.eos_id < limit else None
    out = generate(model, np.array([ids]), new, temperature=temperature, top_k=top_k, seed=seed,
                   eos_id=eos, vocab_limit=limit)[0, len(ids):].tolist()
    if eos in out:
        out = out[:out.index(eos)]
    return prompt + tokenizer.decode(out, skip_special_tokens=True)
