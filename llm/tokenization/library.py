"""What the two tokenizers on the ``tokenizers`` library share: ids, encode/decode, equality.

``BPETokenizer`` (trained here, specials ``<PAD> <UNK> <BOS> <EOS>`` at ``0..3``, no post-processor)
and ``HFTokenizer`` (an imported model's file, its own special tokens, its post-processor on) differ
only in how they are built, which token plays which special role, and whether ``encode`` applies
the file's post-processor; everything else is this class.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tokenizers import Tokenizer

from llm.tokenization.char import TokenizerFile, check_ids

__all__ = ["LibraryTokenizer"]


class LibraryTokenizer(TokenizerFile):
    """A ``tokenizers.Tokenizer`` (``self._tok``) with role -> token text (``self._roles``) and
    ``add_special_tokens`` (whether ``encode`` runs the file's post-processor)."""

    _tok: Tokenizer
    _roles: dict[str, str | None]
    add_special_tokens: bool = False

    # ------------------------------------------------------------------ ids
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens(self) -> tuple[str, ...]:
        return tuple(t.content for t in self._tok.get_added_tokens_decoder().values() if t.special)

    @property
    def backend_tokenizer(self) -> Tokenizer:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._tok

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, idx: int) -> str:
        check_ids([idx], self.vocab_size)
        return self._tok.id_to_token(idx)

    def _role_id(self, role: str) -> int | None:
        token = self._roles.get(role)
        return None if token is None else self._tok.token_to_id(token)

    @property
    def pad_id(self) -> int | None:
        return self._role_id("pad")

    @property
    def unk_id(self) -> int | None:
        return self._role_id("unk")

    @property
    def bos_id(self) -> int | None:
        return self._role_id("bos")

    @property
    def eos_id(self) -> int | None:
        return self._role_id("eos")

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=self.add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=self.add_special_tokens)]

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int64)

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Encode many texts in parallel (the library's thread pool), one int64 array each."""
        return [np.asarray(ids, dtype=np.int64) for ids in self.encode_batch(texts)]

    def decode(self, ids: Sequence[int] | np.ndarray, *, skip_special_tokens: bool = False) -> str:
        ids = np.asarray(ids).reshape(-1).tolist()
        check_ids(ids, self.vocab_size)  # the library silently drops unknown ids
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ identity
    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self.identity == other.identity  # type: ignore[attr-defined]

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"
