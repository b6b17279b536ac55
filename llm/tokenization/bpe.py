"""A byte-level BPE tokenizer on the Hugging Face ``tokenizers`` library (the GPT-2 scheme).

Text is split GPT-2 style, mapped to bytes and merged; the 256 byte symbols are always in the
vocabulary, so any string encodes without ``<UNK>`` and ``decode(encode(s)) == s`` for every
string (ASCII, any unicode, whitespace runs). No normaliser runs, so nothing is rewritten.
Special tokens ``<PAD>, <UNK>, <BOS>, <EOS>`` take ids ``0..3``; their text inside ordinary input is
encoded as ordinary text (``encode_special_tokens``), so a corpus that contains ``"<EOS>"``
round-trips too.

File format (JSON, never pickle)::

    {"type": "bpe", "format_version": 1, "tokenizer": <the tokenizers library's JSON>}
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from llm.tokenization.char import SPECIAL_TOKENS, TokenizerError
from llm.tokenization.library import LibraryTokenizer

__all__ = ["BPETokenizer"]


class BPETokenizer(LibraryTokenizer):
    """Byte-level BPE; build with ``BPETokenizer.train(...)`` or ``BPETokenizer.load(path)``."""

    type = "bpe"

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._tok.encode_special_tokens = True  # not serialised by the library: set on every build
        self._roles = {"pad": "<PAD>", "unk": "<UNK>", "bos": "<BOS>", "eos": "<EOS>"}

    @classmethod
    def train(cls, texts_or_files: Iterable[str | os.PathLike], vocab_size: int,
              special_tokens: Sequence[str] = SPECIAL_TOKENS, *, min_frequency: int = 2) -> BPETokenizer:
        """Learn merges from texts (``str`` items) and/or files (``pathlib.Path`` / PathLike items).

        ``vocab_size`` counts every id (specials + 256 bytes + merges); it is an upper bound, a small
        corpus may stop earlier. Training is deterministic for the same inputs.
        """
        specials = list(special_tokens)
        if vocab_size < 256 + len(specials):
            raise TokenizerError(f"vocab_size={vocab_size} must be >= {256 + len(specials)} "
                                 f"(256 byte tokens + {len(specials)} special tokens)")
        texts: list[str] = []
        for item in texts_or_files:
            if isinstance(item, str):
                texts.append(item)
                continue
            path = Path(item)
            try:
                texts.append(path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise TokenizerError(f"BPE training file not found: {path}") from None
            except UnicodeDecodeError as e:
                raise TokenizerError(f"BPE training file is not UTF-8 text: {path} ({e})") from None
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
        return cls(tok)

    # ------------------------------------------------------------------ files
    def to_json_dict(self) -> dict[str, Any]:
        return {"type": self.type, "tokenizer": json.loads(self._tok.to_str())}

    @classmethod
    def from_json_dict(cls, data: dict[str, Any], *, where: str = "tokenizer") -> BPETokenizer:
        inner = data.get("tokenizer")
        if not isinstance(inner, dict):
            raise TokenizerError(f"{where}: corrupt bpe tokenizer (no 'tokenizer' object)")
        try:
            tok = Tokenizer.from_str(json.dumps(inner))
        except Exception as e:  # the library raises a bare Exception on malformed JSON models
            raise TokenizerError(f"{where}: corrupt bpe tokenizer ({e})") from None
        return cls(tok)
