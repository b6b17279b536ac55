"""The generation cases every backend must pass, written against a ``backend`` fixture.

``tests/test_torch_generate.py`` and ``tests/test_flax_generate.py`` import the cases
(``from generate_cases import *``), so pytest collects them once per backend, and define
``backend`` as a module fixture returning ``Backend(<its inference module>, <its from_canonical>)``.
This module imports neither framework: ``tests/test_generate.py`` takes the specs and the
``checkpoint`` fixture from it and stays framework-free.

Models are tiny (V=48, D=16, 2 layers) with ``init_std=0.3``, so logits are spread out and greedy
choices are not near-ties; every batch shape is shared so the Flax steps compile once per spec.
The cross-backend greedy check over 32 tokens lives in ``parity_tests/test_generation_parity.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from llm.checkpoint import save_checkpoint
from llm.spec import ModelSpec, init_params
from llm.tokenization import build_tokenizer

__all__ = ["B", "CORPUS", "NEW", "SPECS", "T0", "Backend", "checkpoint", "prompt",
           "test_eos_ends_a_row_and_fills_it", "test_generate_argument_errors",
           "test_kv_cache_greedy_equals_full_recomputation", "test_sampling_is_seeded",
           "test_top_k_1_and_tiny_top_p_are_greedy", "test_top_k_and_top_p_restrict_the_support",
           "test_vocab_limit_keeps_every_pick_below_it", "test_vocab_limit_out_of_range_is_a_value_error",
           "test_left_padded_batch_generates_each_prompt_as_alone", "test_generate_attention_mask_errors"]

BASE = dict(vocab_size=48, max_seq_len=40, hidden_size=16, num_layers=2, num_heads=4, init_std=0.3)
SPECS = {
    "rope_gqa": ModelSpec(**BASE, num_kv_heads=2, norm_type="rmsnorm", use_glu=True, activation="silu"),
    "learned_tied": ModelSpec(**BASE, position="learned", tie_embeddings=True, attention_bias=True),
    "sliding_window": ModelSpec(**BASE, sliding_window=3, num_kv_heads=1, position="sinusoidal"),
    "moe_dropless": ModelSpec(**BASE, use_moe=True, num_experts=4, num_experts_per_token=2, num_kv_heads=2,
                              use_glu=True, norm_type="rmsnorm"),
}
B, T0, NEW = 2, 6, 16  # the prompt (6) is longer than the sliding window (3)
CORPUS = "the quick brown fox jumps over the lazy dog."


class Backend:
    """What the cases use of one backend: its decoding loops (``generate``, ``generate_no_cache``,
    ``logits``) and its canonical-weights constructor; ``model(name)`` builds each spec once."""

    def __init__(self, inference: ModuleType, from_canonical: Callable[[ModelSpec, dict], Any]):
        self.inference, self.from_canonical = inference, from_canonical
        self._models: dict[str, Any] = {}

    def model(self, name: str) -> Any:
        if name not in self._models:
            self._models[name] = self.from_canonical(SPECS[name], init_params(SPECS[name], 1))
        return self._models[name]


def prompt(seed: int = 0, batch: int = B, length: int = T0) -> np.ndarray:
    return np.random.default_rng(seed).integers(4, 48, (batch, length))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """``with_tok`` (a char tokenizer of ``CORPUS`` beside the weights) and ``no_tok``, both of the
    ``rope_gqa`` spec with weights of seed 2."""
    root = tmp_path_factory.mktemp("ckpt")
    tok = build_tokenizer("char", [CORPUS])
    assert tok.vocab_size <= 48
    tok.save(root / "tok.json")
    spec = SPECS["rope_gqa"]
    save_checkpoint(root / "with_tok", init_params(spec, 2), {"model": spec.to_dict()},
                    extra_files={"tokenizer.json": root / "tok.json"})
    save_checkpoint(root / "no_tok", init_params(spec, 2), {"model": spec.to_dict()})
    return root


# ---------------------------------------------------------------------- cache vs recomputation
@pytest.mark.parametrize("name", SPECS)
def test_kv_cache_greedy_equals_full_recomputation(backend, name):
    gen, model = backend.inference, backend.model(name)
    ids = prompt()
    cached = gen.generate(model, ids, NEW)
    full = gen.generate_no_cache(model, ids, NEW)
    assert cached.shape == (B, T0 + NEW) and cached.dtype == np.int64
    np.testing.assert_array_equal(cached[:, :T0], ids)
    np.testing.assert_array_equal(cached, full)
    assert len(np.unique(cached[:, T0:])) >= 3  # a real continuation, not one repeated id


# ---------------------------------------------------------------------- sampling
def test_sampling_is_seeded(backend):
    gen, model = backend.inference, backend.model("rope_gqa")
    ids = prompt(1)
    a = gen.generate(model, ids, NEW, temperature=1.0, seed=7)
    b = gen.generate(model, ids, NEW, temperature=1.0, seed=7)
    c = gen.generate(model, ids, NEW, temperature=1.0, seed=8)
    greedy = gen.generate(model, ids, NEW)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any() and (a != greedy).any()
    assert (a[0, T0:] != a[1, T0:]).any() or (ids[0] != ids[1]).any()


def test_top_k_1_and_tiny_top_p_are_greedy(backend):
    gen, model = backend.inference, backend.model("rope_gqa")
    ids = prompt(2)
    greedy = gen.generate(model, ids, NEW)
    np.testing.assert_array_equal(gen.generate(model, ids, NEW, temperature=1.5, top_k=1, seed=3), greedy)
    np.testing.assert_array_equal(gen.generate(model, ids, NEW, temperature=1.5, top_p=1e-6, seed=3), greedy)


def test_top_k_and_top_p_restrict_the_support(backend):
    gen, model = backend.inference, backend.model("rope_gqa")
    ids = prompt(3)
    for kwargs in (dict(top_k=3), dict(top_p=0.5)):
        out = gen.generate(model, ids, NEW, temperature=2.0, seed=11, **kwargs)
        logits = gen.logits(model, out)[:, T0 - 1:-1] / 2.0  # (B, NEW, V): what each draw saw
        chosen = out[:, T0:]
        picked = np.take_along_axis(logits, chosen[..., None], -1)
        rank = (logits > picked).sum(-1)  # how many ids beat the chosen one
        if "top_k" in kwargs:
            assert rank.max() < 3 and rank.max() > 0  # inside the top 3, and not always the argmax
        else:
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            mass_before = np.where(logits > picked, probs, 0.0).sum(-1)
            assert mass_before.max() < 0.5 + 1e-5 and rank.max() > 0


def test_eos_ends_a_row_and_fills_it(backend):
    gen, model = backend.inference, backend.model("rope_gqa")
    ids = prompt(4)
    greedy = gen.generate(model, ids, NEW)
    eos = int(greedy[0, T0 + 3])
    out = gen.generate(model, ids, NEW, eos_id=eos)
    first = T0 + int(np.argmax(greedy[0, T0:] == eos))
    np.testing.assert_array_equal(out[0, :first + 1], greedy[0, :first + 1])
    assert (out[0, first:] == eos).all()
    for row in range(B):  # every row: greedy up to its first eos, eos after
        hits = np.flatnonzero(greedy[row, T0:] == eos)
        end = T0 + (hits[0] if len(hits) else NEW)
        np.testing.assert_array_equal(out[row, :end], greedy[row, :end])
        assert (out[row, end:] == eos).all()


def test_generate_argument_errors(backend):
    gen, model = backend.inference, backend.model("rope_gqa")
    ids = prompt()
    cases = [
        (dict(token_ids=ids, max_new_tokens=NEW, temperature=-1.0), "temperature"),
        (dict(token_ids=ids, max_new_tokens=NEW, temperature=1.0, top_k=0), "top_k"),
        (dict(token_ids=ids, max_new_tokens=NEW, temperature=1.0, top_p=2.0), "top_p"),
        (dict(token_ids=np.zeros((2, 0), np.int64), max_new_tokens=NEW), "empty prompt"),
        (dict(token_ids=ids, max_new_tokens=40 - T0 + 1), "exceeds max_seq_len=40"),
        (dict(token_ids=ids, max_new_tokens=-1), "max_new_tokens"),
        (dict(token_ids=ids[0], max_new_tokens=NEW), r"\(batch, length\)"),
        (dict(token_ids=ids + 48, max_new_tokens=NEW), "out of range"),
        (dict(token_ids=ids.astype(np.float32), max_new_tokens=NEW), "integers"),
        (dict(token_ids=ids, max_new_tokens=NEW, eos_id=48), "eos_id"),
        (dict(token_ids=ids, max_new_tokens=NEW, temperature=1.0, seed=-1), "seed"),
    ]
    for kwargs, message in cases:
        kwargs = dict(kwargs)
        token_ids, n = kwargs.pop("token_ids"), kwargs.pop("max_new_tokens")
        with pytest.raises(ValueError, match=message):
            gen.generate(model, token_ids, n, **kwargs)
    out = gen.generate(model, ids, 40 - T0)  # exactly max_seq_len is fine
    assert out.shape == (B, 40)
    np.testing.assert_array_equal(gen.generate(model, ids, 0), ids)


# ---------------------------------------------------------------------- vocab_limit (a padded table)
def _boosted(backend: Backend, limit: int) -> Any:
    """A model whose logits favour the ids ``>= limit`` (embedding rows past a tokenizer's size)."""
    spec = SPECS["learned_tied"]
    params = init_params(spec, 1)
    params["embed.weight"][limit:] *= 20.0  # tied head: these rows dominate every logit vector
    return backend.from_canonical(spec, params)


def test_vocab_limit_keeps_every_pick_below_it(backend):
    gen, limit = backend.inference, 10
    model = _boosted(backend, limit)
    free = gen.generate(model, prompt(), NEW)[:, T0:]
    assert (free >= limit).any()  # without the limit the padded rows win
    for kwargs in (dict(), dict(temperature=3.0, seed=1), dict(temperature=1.0, top_k=5, seed=2),
                   dict(temperature=1.0, top_p=0.9, seed=3)):
        out = gen.generate(model, prompt(), NEW, vocab_limit=limit, **kwargs)[:, T0:]
        assert out.max() < limit, kwargs
    assert (gen.generate_no_cache(model, prompt(), NEW, vocab_limit=limit)[:, T0:] < limit).all()


def test_vocab_limit_out_of_range_is_a_value_error(backend):
    model = backend.model("rope_gqa")
    for bad in (0, 49, 2.5, True):
        with pytest.raises(ValueError, match=r"vocab_limit=.* must be an integer in \[1, 48\]"):
            backend.inference.generate(model, prompt(), 2, vocab_limit=bad)


# ---------------------------------------------------------------------- left-padded batches
@pytest.mark.parametrize("name", ["rope_gqa", "learned_tied", "sliding_window"])
def test_left_padded_batch_generates_each_prompt_as_alone(backend, name):
    """Prompts of lengths 6, 3 and 1 batched with left padding give, greedy, the tokens each gives alone."""
    lengths = (T0, 3, 1)
    prompts = [prompt(seed=i, batch=1, length=n) for i, n in enumerate(lengths)]
    ids = np.zeros((len(lengths), T0), np.int64)
    mask = np.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, T0 - p.shape[1]:] = p[0]
        mask[row, T0 - p.shape[1]:] = 1
    model = backend.model(name)
    batched = backend.inference.generate(model, ids, NEW, attention_mask=mask)
    for row, p in enumerate(prompts):
        alone = backend.inference.generate(model, p, NEW)
        np.testing.assert_array_equal(batched[row, T0:], alone[0, p.shape[1]:], err_msg=f"row {row}")
    recomputed = backend.inference.generate_no_cache(model, ids, NEW, attention_mask=mask)
    np.testing.assert_array_equal(batched, recomputed)
    unpadded_rows_differ = backend.inference.generate(model, ids, NEW)  # the mask is what makes them equal
    assert not np.array_equal(unpadded_rows_differ[1:, T0:], batched[1:, T0:])


def test_generate_attention_mask_errors(backend):
    model, ids = backend.model("rope_gqa"), prompt()
    for mask, match in ((np.ones((B, T0 - 1)), "prompt's shape"), (np.full((B, T0), 2), "only 0"),
                        (np.tile([1, 1, 1, 1, 1, 0], (B, 1)), "left padding")):
        with pytest.raises(ValueError, match=match):
            backend.inference.generate(model, ids, 2, attention_mask=mask)
