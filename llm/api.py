"""The small public API: ``llm.load(checkpoint_dir, backend=...)`` -> a ``LoadedModel``.

```
model = llm.load("runs/x/checkpoints/step_1000", backend="jax")
model.logits([[5, 6, 7]])              # float32 numpy (B, T, V)
model.generate([5, 6, 7], 20)          # int64 numpy (B, T0 + 20); greedy unless temperature > 0
model.generate_text("Once upon", 40, temperature=0.8, top_k=50)   # the continuation, a str
```

The backend is chosen here, once, by name (keras-3 style): ``"torch"`` or ``"jax"`` (alias
``"flax"``). Its package is imported only when a model is built, so ``import llm.api`` (and
``llm.load(..., backend="torch")``) never imports jax, and ``backend="jax"`` never imports torch.
Every array in and out is numpy; the backend model is ``LoadedModel.model`` for anything more.

Loading goes through ``llm.checkpoint.open_checkpoint``: a missing, torn or corrupt checkpoint
raises its ``CheckpointError`` and nothing is half-loaded, and so does a named checkpoint (a
task's own model, e.g. ``regression``'s MLP: not a decoder, nothing here could run it). A directory holding ``step_<N>``
checkpoints (a run's ``checkpoints/``) loads the newest one that verifies. A ``tokenizer.json``
saved beside the weights becomes ``LoadedModel.tokenizer`` (else None).

Generation rules (greedy tie-breaking, top-k/top-p, the no-crop length rule, EOS) are in
``llm.sampling``; ``LoadedModel.generate`` is ``backends.<name>.generate``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from llm.backend import backend as get_backend
from llm.backend import canonical_name
from llm.checkpoint import open_checkpoint, resolve_checkpoint
from llm.io import TOKENIZER_FILE
from llm.sampling import check_prompt
from llm.spec import ModelSpec
from llm.tokenization import Tokenizer, check_vocab, load_tokenizer

__all__ = ["DTYPES", "TOKENIZER_FILE", "LoadedModel", "load", "from_params", "resolve_checkpoint"]

DTYPES = ("float32", "bfloat16")


def _check_dtype(dtype: Any) -> str:
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of: {', '.join(DTYPES)} (parameters are loaded "
                         "from float32 checkpoints and cast)")
    return dtype


# ---------------------------------------------------------------------- the loaded model
class LoadedModel:
    """A model of either backend behind one numpy interface.

    ``spec`` (ModelSpec), ``tokenizer`` (or None), ``backend`` ("torch" or "jax"), ``model`` (the
    backend's ``DecoderModel``), ``path`` (the checkpoint directory, None when built in memory).
    Token ids may be a list, a 1-D array (one sequence: batch 1) or a 2-D ``(batch, length)`` array.
    """

    def __init__(self, spec: ModelSpec, model: Any, backend: str, tokenizer: Tokenizer | None = None,
                 path: Path | None = None):
        self.spec = spec
        self.model = model
        self.backend = backend
        self.tokenizer = tokenizer
        self.path = path
        self._ops = get_backend(backend)

    def __repr__(self) -> str:
        where = f", path={str(self.path)!r}" if self.path else ""
        return (f"LoadedModel(backend={self.backend!r}, layers={self.spec.num_layers}, "
                f"hidden={self.spec.hidden_size}, vocab={self.spec.vocab_size}{where})")

    def _batch(self, token_ids: Any) -> np.ndarray:
        """``token_ids`` as a 2-D array (a list or 1-D array is a batch of one); the rest of the checks
        are ``llm.sampling.check_prompt``'s."""
        try:
            ids = np.asarray(token_ids)
        except ValueError:
            raise ValueError("token_ids rows must all have the same length (no ragged batches)") from None
        return ids[None, :] if ids.ndim == 1 else ids

    def logits(self, token_ids: Any) -> np.ndarray:
        """Float32 next-token logits ``(B, T, V)`` for every position (eval mode, no dropout)."""
        return self._ops.logits(self.model, check_prompt(self._batch(token_ids), self.spec, 0))

    def generate(self, token_ids: Any, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int = 0, eos_id: int | None = None,
                 vocab_limit: int | None = None) -> np.ndarray:
        """Prompt plus ``max_new_tokens`` new ids, int64 ``(B, T0 + max_new_tokens)`` (always 2-D).

        ``temperature=0`` is greedy; see ``llm.sampling`` for top-k / top-p / EOS behaviour;
        ``vocab_limit=N`` picks only ids ``< N`` (``text_vocab_limit`` is the tokenizer's).
        """
        # backends.<name>.generate checks the prompt (llm.sampling.check_prompt)
        return self._ops.generate(self.model, self._batch(token_ids), max_new_tokens, temperature=temperature,
                                  top_k=top_k, top_p=top_p, seed=seed, eos_id=eos_id, vocab_limit=vocab_limit)

    @property
    def text_vocab_limit(self) -> int | None:
        """The ids that have text: the tokenizer's size when the model's table is padded past it."""
        if self.tokenizer is None or self.tokenizer.vocab_size >= self.spec.vocab_size:
            return None
        return self.tokenizer.vocab_size

    def generate_texts(self, prompt: str, max_new_tokens: int = 64, *, num_samples: int = 1,
                       temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                       seed: int = 0, stop_at_eos: bool = True) -> list[str]:
        """``num_samples`` continuations of ``prompt`` (drawn as one batch from one seed).

        Each is the decoded new tokens only (not the prompt), cut before the first EOS when
        ``stop_at_eos``, with special tokens left out of the text. Only ids the tokenizer knows are
        sampled (``text_vocab_limit``), however far the model's embedding table is padded.
        """
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer (no tokenizer.json in the checkpoint); "
                             "use generate() with token ids")
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
            raise ValueError(f"num_samples={num_samples!r} must be an integer >= 1")
        ids = self.tokenizer.encode(prompt)
        if not ids:
            raise ValueError("empty prompt: it encodes to no tokens; give at least one character")
        limit = self.text_vocab_limit
        eos = self.tokenizer.eos_id if stop_at_eos else None
        eos = eos if eos is not None and eos < (limit or self.spec.vocab_size) else None
        batch = np.tile(np.asarray(ids, np.int64), (num_samples, 1))
        out = self.generate(batch, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            seed=seed, eos_id=eos, vocab_limit=limit)
        texts = []
        for row in out[:, len(ids):]:
            if eos is not None and (row == eos).any():
                row = row[:int(np.argmax(row == eos))]
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True))
        return texts

    def generate_text(self, prompt: str, max_new_tokens: int = 64, *, temperature: float = 0.0,
                      top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                      stop_at_eos: bool = True) -> str:
        """The continuation of ``prompt`` as text (see ``generate_texts``)."""
        return self.generate_texts(prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                   seed=seed, stop_at_eos=stop_at_eos)[0]


# ---------------------------------------------------------------------- entry points
def from_params(spec: ModelSpec, params: dict[str, np.ndarray], backend: str = "torch",
                tokenizer: Tokenizer | None = None, *, device: Any = None, dtype: str = "float32",
                path: Path | None = None) -> LoadedModel:
    """A ``LoadedModel`` from canonical in-memory weights (strict: names and shapes must match)."""
    name, dtype = canonical_name(backend), _check_dtype(dtype)
    if not isinstance(spec, ModelSpec):
        raise ValueError(f"spec must be a ModelSpec, got {type(spec).__name__}")
    if tokenizer is not None:
        check_vocab(tokenizer, spec)
    model = get_backend(name).load_model(spec, params, device=device, dtype=dtype)
    return LoadedModel(spec, model, name, tokenizer, path)


def load(checkpoint_dir: str | os.PathLike, backend: str = "torch", *, device: Any = None,
         dtype: str = "float32") -> LoadedModel:
    """Load a canonical checkpoint into ``backend`` (``"torch"``, ``"jax"`` or ``"flax"``); a named
    one (not a decoder) is a ``CheckpointError`` saying so.

    ``device``: a torch device (``"cpu"``, ``"cuda:0"``) or a jax platform[:index] (``"cpu"``,
    ``"gpu:1"``); None = CPU for torch, jax's default device. ``dtype``: ``"float32"`` or
    ``"bfloat16"`` (torch casts the parameters; flax keeps float32 parameters and computes in it).
    Logits come back float32 either way.
    """
    canonical_name(backend)
    _check_dtype(dtype)
    ckpt = open_checkpoint(checkpoint_dir, load_state=False)
    tokenizer = None
    if (ckpt.path / TOKENIZER_FILE).is_file():
        tokenizer = load_tokenizer(ckpt.path / TOKENIZER_FILE)
    return from_params(ckpt.spec, ckpt.params, backend, tokenizer, device=device, dtype=dtype, path=ckpt.path)
