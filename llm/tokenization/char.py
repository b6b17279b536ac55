"""A character tokenizer, plus the JSON file format every tokenizer of this package shares.

Ids ``0..3`` are the special tokens ``<PAD>, <UNK>, <BOS>, <EOS>`` (the same ids as the BPE
tokenizer's), then one id per distinct character of the training text in code-point order. A
character never seen in training encodes to ``<UNK>``.

File format (JSON, never pickle)::

    {"type": "char", "format_version": 1, "special_tokens": [...], "vocab": ["<PAD>", ..., "a", "b"]}

``read_tokenizer_json`` / ``write_tokenizer_json`` implement the envelope (``type`` and
``format_version``) for every tokenizer; ``llm.tokenization.load_tokenizer`` dispatches on ``type``.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llm.io import write_bytes_atomic

__all__ = [
    "FORMAT_VERSION",
    "SPECIAL_TOKENS",
    "SimpleCharacterTokenizer",
    "TokenizerError",
    "read_tokenizer_json",
    "tokenizer_json_bytes",
    "write_tokenizer_json",
]

SPECIAL_TOKENS: tuple[str, ...] = ("<PAD>", "<UNK>", "<BOS>", "<EOS>")
_UNKNOWN_SHOWN = 10  # unknown characters named in encode's warning
FORMAT_VERSION = 1


class TokenizerError(ValueError):
    """A bad tokenizer file, an unknown id or a tokenizer that does not fit the model."""


# ---------------------------------------------------------------------- the shared file envelope
def write_tokenizer_json(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write ``payload`` (which carries ``type``) as JSON, atomically (``llm.io.write_bytes_atomic``)."""
    write_bytes_atomic(path, tokenizer_json_bytes(payload))


def tokenizer_json_bytes(payload: dict[str, Any]) -> bytes:
    """The bytes of the tokenizer file of ``payload`` (UTF-8 JSON, the envelope added)."""
    return json.dumps({"format_version": FORMAT_VERSION, **payload}, ensure_ascii=False).encode("utf-8")


def read_tokenizer_json(path: str | os.PathLike, expected_type: str | None = None) -> dict[str, Any]:
    """Read a tokenizer file; every failure is a TokenizerError naming ``path``."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise TokenizerError(f"tokenizer file not found: {path}") from None
    except IsADirectoryError:
        raise TokenizerError(f"tokenizer path is a directory, not a JSON file: {path}") from None
    if raw[:1] == b"\x80":
        raise TokenizerError(f"{path}: looks like a pickle; tokenizers are stored as JSON only")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path}: corrupt tokenizer file (not UTF-8 text: {e})") from None
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: corrupt tokenizer file (invalid JSON at line {e.lineno}, "
                             f"column {e.colno}: {e.msg})") from None
    if not isinstance(data, dict) or "type" not in data:
        raise TokenizerError(f"{path}: not a tokenizer file (expected a JSON object with a 'type' field)")
    if data.get("format_version") != FORMAT_VERSION:
        raise TokenizerError(f"{path}: format_version={data.get('format_version')!r}, "
                             f"this code reads {FORMAT_VERSION}")
    if expected_type is not None and data["type"] != expected_type:
        raise TokenizerError(f"{path}: tokenizer type is {data['type']!r}, expected {expected_type!r}")
    return data


def check_ids(ids: Sequence[int], vocab_size: int) -> None:
    arr = np.asarray(ids, dtype=np.int64) if len(ids) else np.zeros(0, np.int64)
    bad = (arr < 0) | (arr >= vocab_size)
    if bad.any():
        raise TokenizerError(f"token id {int(arr[bad][0])} is out of range for a vocabulary of "
                             f"{vocab_size} ids")


# ---------------------------------------------------------------------- the tokenizer
class TokenizerFile:
    """What every tokenizer shares about its file: a ``type``-tagged JSON form (``to_json_dict`` /
    ``from_json_dict`` per class), its sha256 ``identity``, ``save`` and ``load``."""

    type = ""

    @property
    def identity(self) -> str:
        """sha256 of the tokenizer's JSON form: equal identities encode identically."""
        blob = json.dumps(self.to_json_dict(), sort_keys=True, ensure_ascii=False).encode()
        return hashlib.sha256(blob).hexdigest()

    def save(self, path: str | os.PathLike) -> None:
        write_tokenizer_json(path, self.to_json_dict())

    def to_bytes(self) -> bytes:
        """What ``save`` writes (e.g. to put the tokenizer into a checkpoint without a file)."""
        return tokenizer_json_bytes(self.to_json_dict())

    @classmethod
    def load(cls, path: str | os.PathLike):
        return cls.from_json_dict(read_tokenizer_json(path, cls.type), where=str(path))


class SimpleCharacterTokenizer(TokenizerFile):
    """One id per character seen in ``text`` (a string or an iterable of strings).

    ``encode`` never fails (unknown characters map to ``unk_id``); ``decode`` renders special ids as
    their token text unless ``skip_special_tokens``; ``decode(encode(s)) == s`` for text made of
    known characters.
    """

    type = "char"

    def __init__(self, text: str | Iterable[str] = "", *,
                 special_tokens: Sequence[str] = SPECIAL_TOKENS):
        texts = [text] if isinstance(text, str) else list(text)
        chars = sorted(set().union(*map(set, texts))) if texts else []
        self._build(list(special_tokens), chars)

    @classmethod
    def from_vocab(cls, vocab: Sequence[str], special_tokens: Sequence[str] = SPECIAL_TOKENS,
                   *, where: str = "vocab") -> SimpleCharacterTokenizer:
        """Rebuild from the id-ordered token list (specials first), as stored in the JSON file."""
        specials = list(special_tokens)
        if list(vocab[:len(specials)]) != specials:
            raise TokenizerError(f"{where}: the first {len(specials)} tokens must be the special "
                                 f"tokens {specials}, got {list(vocab[:len(specials)])}")
        chars = list(vocab[len(specials):])
        bad = [c for c in chars if not isinstance(c, str) or len(c) != 1]
        if bad:
            raise TokenizerError(f"{where}: character entries must be single characters, got {bad[:3]!r}")
        if len(set(chars)) != len(chars) or chars != sorted(chars):
            raise TokenizerError(f"{where}: character entries must be distinct and in code-point order")
        tok = cls.__new__(cls)
        tok._build(specials, chars)
        return tok

    def _build(self, specials: list[str], chars: list[str]) -> None:
        if len(specials) < 2 or specials[0] != "<PAD>" or specials[1] != "<UNK>":
            raise TokenizerError(f"special_tokens must start with '<PAD>', '<UNK>', got {specials}")
        if len(set(specials)) != len(specials) or any(len(s) < 2 for s in specials):
            raise TokenizerError(f"special_tokens must be distinct multi-character strings, got {specials}")
        self.special_tokens = tuple(specials)
        self._vocab = list(specials) + chars
        self._id_of = {tok: i for i, tok in enumerate(self._vocab)}
        # chars are sorted by code point, so a searchsorted lookup encodes a whole text at once
        self._codepoints = np.array([ord(c) for c in chars], dtype=np.int64)
        self._first_char_id = len(specials)

    # ------------------------------------------------------------------ ids
    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def unk_id(self) -> int:
        return 1

    @property
    def bos_id(self) -> int | None:
        return self._id_of.get("<BOS>")

    @property
    def eos_id(self) -> int | None:
        return self._id_of.get("<EOS>")

    def token_to_id(self, token: str) -> int | None:
        return self._id_of.get(token)

    def id_to_token(self, idx: int) -> str:
        check_ids([idx], self.vocab_size)
        return self._vocab[idx]

    # ------------------------------------------------------------------ encode / decode
    def encode_array(self, text: str) -> np.ndarray:
        """``encode`` as an int64 array, vectorised (millions of characters per second)."""
        cps = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
        cps = cps.astype(np.int64)
        if self._codepoints.size == 0:
            return np.full(cps.shape, self.unk_id, np.int64)
        pos = np.minimum(np.searchsorted(self._codepoints, cps), self._codepoints.size - 1)
        found = self._codepoints[pos] == cps
        return np.where(found, pos + self._first_char_id, self.unk_id).astype(np.int64)

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``; characters outside the vocabulary become ``<UNK>`` with one warning per
        call naming them (``encode_array``, the corpus path, stays silent and fast)."""
        ids = self.encode_array(text)
        unknown = np.flatnonzero(ids == self.unk_id)
        if unknown.size:
            chars = list(dict.fromkeys(text[i] for i in unknown.tolist()))
            shown = ", ".join(repr(c) for c in chars[:_UNKNOWN_SHOWN])
            more = f" and {len(chars) - _UNKNOWN_SHOWN} more" if len(chars) > _UNKNOWN_SHOWN else ""
            warnings.warn(f"char tokenizer: {len(chars)} character(s) not in the vocabulary encoded as "
                          f"<UNK>: {shown}{more}", UserWarning, stacklevel=2)
        return ids.tolist()

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode_array(t) for t in texts]

    def decode(self, ids: Sequence[int] | np.ndarray, *, skip_special_tokens: bool = False) -> str:
        ids = np.asarray(ids).reshape(-1).tolist()
        check_ids(ids, self.vocab_size)
        n_special = self._first_char_id
        if skip_special_tokens:
            return "".join(self._vocab[i] for i in ids if i >= n_special)
        return "".join(self._vocab[i] for i in ids)

    # ------------------------------------------------------------------ files
    def to_json_dict(self) -> dict[str, Any]:
        return {"type": self.type, "special_tokens": list(self.special_tokens), "vocab": self._vocab}

    @classmethod
    def from_json_dict(cls, data: dict[str, Any], *, where: str = "tokenizer") -> SimpleCharacterTokenizer:
        vocab, specials = data.get("vocab"), data.get("special_tokens", list(SPECIAL_TOKENS))
        if not isinstance(vocab, list) or not isinstance(specials, list):
            raise TokenizerError(f"{where}: corrupt char tokenizer ('vocab' and 'special_tokens' "
                                 "must be lists)")
        try:
            return cls.from_vocab(vocab, specials, where=where)
        except TokenizerError as e:
            raise TokenizerError(f"corrupt char tokenizer: {e}") from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SimpleCharacterTokenizer) and self._vocab == other._vocab

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"SimpleCharacterTokenizer(vocab_size={self.vocab_size})"
