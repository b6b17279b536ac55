"""Autoregressive decoding for the PyTorch ``DecoderModel`` (mirrors ``backends/flax/inference.py``).

``generate`` prefills the whole prompt in one forward that fills a KV cache sized to
``T0 + max_new_tokens``, then feeds one token per step at ``start_pos = T0 + i``. The argument
rules and the sampling recipe are ``llm.sampling``'s (``Sampling``, ``check_prompt``): greedy is
``argmax`` (first maximum = lowest id on ties); sampling is float32 temperature -> top-k -> top-p
over a stable descending sort (equal logits keep id order), drawn with a ``torch.Generator``
seeded by ``seed``, so a seed reproduces its tokens on the same device.

``generate_no_cache`` recomputes the full prefix every step; it exists so tests can prove the
cache changes nothing. Both run under ``torch.inference_mode()`` in eval mode (the model's
train/eval flag is restored afterwards).

With MoE ``capacity_factor`` set, expert capacity depends on how many tokens a forward sees, so
cached decoding matches full recomputation only for dropless MoE (and dense models).

This module must never import jax or flax.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numpy as np
import torch

from backends.torch.convert import from_canonical
from backends.torch.model import DecoderModel
from llm.sampling import Sampling, check_eos, check_prompt, check_prompt_mask, check_seed, check_vocab_limit
from llm.spec import ModelSpec

__all__ = ["generate", "generate_no_cache", "load_model", "logits", "next_token"]


@contextlib.contextmanager
def _eval_mode(model: DecoderModel) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _device(model: DecoderModel) -> torch.device:
    return model.embed.weight.device


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None,
               vocab_limit: int | None = None) -> torch.Tensor:
    """Pick one token per row from ``logits`` (B, V) -> (B,) int64, among ids ``< vocab_limit``."""
    logits = logits.float()
    if vocab_limit is not None:
        logits = logits.masked_fill(torch.arange(logits.shape[-1], device=logits.device) >= vocab_limit,
                                    float("-inf"))
    if sampling.greedy:
        return logits.argmax(dim=-1)
    scaled = logits / sampling.temperature  # (B, V) float32
    if sampling.top_k is None and sampling.top_p is None:
        probs = torch.softmax(scaled, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    # Work in sorted order: rank r holds the r-th largest logit, equal logits in id order.
    sorted_logits, sorted_idx = torch.sort(scaled, dim=-1, descending=True, stable=True)  # (B, V)
    keep = torch.ones_like(sorted_logits, dtype=torch.bool)
    if sampling.top_k is not None:
        keep[:, sampling.top_k:] = False
    if sampling.top_p is not None:
        probs = torch.softmax(sorted_logits.masked_fill(~keep, float("-inf")), dim=-1)
        # Probability of the strictly higher ranks; 0 at rank 0, so the top token always stays.
        mass_before = torch.cat([torch.zeros_like(probs[:, :1]), torch.cumsum(probs, dim=-1)[:, :-1]], dim=-1)
        keep &= mass_before < sampling.top_p
    probs = torch.softmax(sorted_logits.masked_fill(~keep, float("-inf")), dim=-1)
    rank = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
    return sorted_idx.gather(-1, rank).squeeze(-1)


def _decode(model: DecoderModel, token_ids, max_new_tokens: int, *, temperature: float, top_k: int | None,
            top_p: float | None, seed: int, eos_id: int | None, vocab_limit: int | None,
            use_cache: bool, attention_mask=None) -> np.ndarray:
    spec = model.spec
    sampling = Sampling.create(temperature, top_k, top_p, vocab_size=spec.vocab_size)
    ids = check_prompt(token_ids, spec, max_new_tokens)
    seed, eos_id = check_seed(seed), check_eos(eos_id, spec)
    vocab_limit = check_vocab_limit(vocab_limit, spec)
    full_mask = check_prompt_mask(attention_mask, ids, max_new_tokens)  # (B, total) or None
    B, T0 = ids.shape
    total = T0 + max_new_tokens
    device = _device(model)
    mask = None if full_mask is None else torch.as_tensor(full_mask, device=device)
    generator = None if sampling.greedy else torch.Generator(device=device).manual_seed(seed)

    with _eval_mode(model):
        out = torch.full((B, total), 0 if eos_id is None else eos_id, dtype=torch.long, device=device)
        out[:, :T0] = torch.as_tensor(ids, device=device)
        if max_new_tokens == 0:
            return out.cpu().numpy()
        step: Callable[[int], torch.Tensor]  # position p -> logits (B, V) predicting position p + 1
        if use_cache:
            cache = model.new_cache(B, max_seq_len=total)

            def step(p: int) -> torch.Tensor:
                if p == T0 - 1:  # prefill: the whole prompt in one forward
                    return model(out[:, :T0], cache=cache, start_pos=0, attention_mask=mask).logits[:, -1]
                return model(out[:, p:p + 1], cache=cache, start_pos=p, attention_mask=mask).logits[:, -1]
        else:
            def step(p: int) -> torch.Tensor:
                prefix_mask = None if mask is None else mask[:, :p + 1]
                return model(out[:, :p + 1], attention_mask=prefix_mask).logits[:, -1]

        finished = torch.zeros(B, dtype=torch.bool, device=device)
        for p in range(T0 - 1, total - 1):
            token = next_token(step(p), sampling, generator, vocab_limit)  # (B,)
            if eos_id is not None:
                token = token.masked_fill(finished, eos_id)
                finished |= token == eos_id
            out[:, p + 1] = token
            if eos_id is not None and bool(finished.all()):
                break  # the rest of ``out`` already holds eos_id
        return out.cpu().numpy()


def generate(model: DecoderModel, token_ids, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             eos_id: int | None = None, vocab_limit: int | None = None, attention_mask=None) -> np.ndarray:
    """Continue each row of ``token_ids`` (B, T0) by ``max_new_tokens``; returns int64 (B, T0 + new).

    KV-cached: one prefill forward over the prompt, then one single-token forward per new token.
    ``attention_mask`` (B, T0) of 1/0 batches prompts of different lengths, left-padded: each
    row decodes as it would alone (``llm.sampling.check_prompt_mask``).
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
    """Float32 logits (B, T, V) of a (B, T) int array, in eval mode without gradients."""
    ids = np.asarray(token_ids)
    with _eval_mode(model):
        out = model(torch.as_tensor(ids, dtype=torch.long, device=_device(model))).logits
        return out.float().cpu().numpy()


def load_model(spec: ModelSpec, params: dict[str, np.ndarray], *, device=None, dtype: str = "float32") -> DecoderModel:
    """An eval-mode ``DecoderModel`` holding canonical ``params``, its parameters cast to ``dtype``
    (``"float32"`` or ``"bfloat16"``) on ``device`` (default CPU)."""
    model = from_canonical(spec, params)
    try:
        model.to(device=torch.device("cpu" if device is None else device), dtype=getattr(torch, dtype))
    except (RuntimeError, TypeError) as e:  # an unknown or unavailable device
        raise ValueError(f"torch device {device!r}: {e}") from None
    return model.eval()
