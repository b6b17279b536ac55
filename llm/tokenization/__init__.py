"""Tokenizers: a character tokenizer, a byte-level BPE and imported Hugging Face tokenizers (``hf``),
one JSON file format, one interface.

Every tokenizer offers ``encode(str) -> list[int]``, ``encode_batch``, ``encode_array(s)`` (int64
numpy), ``decode(ids, skip_special_tokens=False)``, ``vocab_size``, ``pad_id/unk_id/bos_id/eos_id``
(``0..3`` for char and bpe), ``identity`` (sha256 of the JSON form), ``save(path)``, ``to_bytes()``
(what ``save`` writes) and ``load(path)``.

* ``build_tokenizer(kind, texts, vocab_size=...)`` -- train/build one of ``"char"``, ``"bpe"``.
* ``load_tokenizer(path)`` -- read any tokenizer file, dispatching on its ``type`` field
  (``"char"``, ``"bpe"``, or ``"hf"``: a ``tokenizers``-library file of an imported model, see
  ``llm.tokenization.hf``; its special ids are the source's, not ``0..3``).
* ``check_vocab(tokenizer, spec_vocab_size)`` -- fail when ids would not fit the embedding table.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from llm.tokenization.bpe import BPETokenizer
from llm.tokenization.char import (
    SPECIAL_TOKENS,
    SimpleCharacterTokenizer,
    TokenizerError,
    read_tokenizer_json,
)
from llm.tokenization.hf import HFTokenizer

__all__ = [
    "SPECIAL_TOKENS",
    "BPETokenizer",
    "HFTokenizer",
    "SimpleCharacterTokenizer",
    "Tokenizer",
    "TokenizerError",
    "build_tokenizer",
    "check_vocab",
    "load_tokenizer",
]

Tokenizer = SimpleCharacterTokenizer | BPETokenizer | HFTokenizer

_TYPES: dict[str, Any] = {"char": SimpleCharacterTokenizer, "bpe": BPETokenizer, "hf": HFTokenizer}
_BUILDABLE = ("char", "bpe")  # "hf" tokenizers come with an imported model (llm.hf), never trained here


def _kind_name(kind: Any) -> str:
    return str(getattr(kind, "value", kind)).lower()  # accepts llm.config.TokenizerKind members


def build_tokenizer(kind: Any, texts: Iterable[str | os.PathLike] = (), *, vocab_size: int = 4096,
                    special_tokens: tuple[str, ...] = SPECIAL_TOKENS) -> Tokenizer:
    """A tokenizer of ``kind`` (``"char"`` or ``"bpe"``) built from ``texts``.

    ``vocab_size`` is the BPE target; the char vocabulary is whatever characters ``texts`` holds.
    For ``"bpe"``, ``pathlib.Path`` items are read as files.
    """
    name = _kind_name(kind)
    if name == "char":
        items = list(texts)
        if any(not isinstance(t, str) for t in items):
            raise TokenizerError("build_tokenizer('char', ...) takes strings, not paths")
        return SimpleCharacterTokenizer(items, special_tokens=special_tokens)
    if name == "bpe":
        return BPETokenizer.train(texts, vocab_size, special_tokens)
    raise TokenizerError(f"unknown tokenizer kind {kind!r}; expected one of: {', '.join(_BUILDABLE)}")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load any tokenizer file written by ``save``; the JSON's ``type`` picks the class."""
    data = read_tokenizer_json(path)
    cls = _TYPES.get(data["type"])
    if cls is None:
        raise TokenizerError(f"{path}: unknown tokenizer type {data['type']!r}; "
                             f"expected one of: {', '.join(_TYPES)}")
    return cls.from_json_dict(data, where=str(path))


def check_vocab(tokenizer: Tokenizer, spec_vocab_size: Any) -> None:
    """Raise TokenizerError when the tokenizer's ids do not fit ``spec_vocab_size`` embedding rows.

    ``spec_vocab_size`` is an int or anything with ``.vocab_size`` (a ModelSpec). A model table larger
    than the tokenizer is fine (unused rows, e.g. padded to a multiple of 64 for speed).
    """
    limit = int(getattr(spec_vocab_size, "vocab_size", spec_vocab_size))
    if tokenizer.vocab_size > limit:
        raise TokenizerError(
            f"tokenizer ({tokenizer.type}) has {tokenizer.vocab_size} tokens but model.vocab_size="
            f"{limit}; ids would index past the embedding table -- set model.vocab_size >= "
            f"{tokenizer.vocab_size}")
