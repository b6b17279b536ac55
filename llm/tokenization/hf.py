"""A tokenizer from any Hugging Face ``tokenizers``-library file (an imported model's tokenizer).

``HFTokenizer`` wraps a ``tokenizers.Tokenizer`` exactly as the model was trained with it: its
normaliser, pre-tokeniser, model, post-processor and decoder all come from the file, so ids match
what ``transformers``' fast tokenizer produces. Differences from ``BPETokenizer``, on purpose:

* ``encode`` applies the file's post-processor (``add_special_tokens=True``, the transformers
  default), so a Llama-style tokenizer prefixes ``<s>``/``<|begin_of_text|>`` as the model expects;
  the text data module then appends ``eos`` after each document (``<s> doc </s>``).
* special-token text inside the input is parsed as special tokens (the library default).
* the special ids are whatever the source names (``bos``/``eos``/``pad``/``unk`` tokens from its
  ``tokenizer_config.json``), not ``0..3``; any of them may be None.

File format (JSON, never pickle)::

    {"type": "hf", "format_version": 1, "tokenizer": <the tokenizers library's JSON>,
     "special_tokens": {"bos": "<s>", "eos": "</s>", "pad": null, "unk": "<unk>"},
     "add_special_tokens": true}
"""

from __future__ import annotations

import json
from typing import Any

from tokenizers import Tokenizer

from llm.tokenization.char import TokenizerError
from llm.tokenization.library import LibraryTokenizer

__all__ = ["HFTokenizer", "SPECIAL_ROLES"]

SPECIAL_ROLES = ("bos", "eos", "pad", "unk")


class HFTokenizer(LibraryTokenizer):
    """A ``tokenizers``-library tokenizer plus the names of its special tokens."""

    type = "hf"

    def __init__(self, tokenizer: Tokenizer, special_tokens: dict[str, str | None] | None = None, *,
                 add_special_tokens: bool = True):
        self._tok = tokenizer
        roles = dict(special_tokens or {})
        unknown = set(roles) - set(SPECIAL_ROLES)
        if unknown:
            raise TokenizerError(f"special_tokens has unknown role(s) {sorted(unknown)}; "
                                 f"expected some of {list(SPECIAL_ROLES)}")
        for role, token in roles.items():
            if token is not None and tokenizer.token_to_id(token) is None:
                raise TokenizerError(f"special token {role}={token!r} is not in the tokenizer's vocabulary")
        self._roles = {role: roles.get(role) for role in SPECIAL_ROLES}
        self.add_special_tokens = bool(add_special_tokens)

    @classmethod
    def from_str(cls, tokenizer_json: str, special_tokens: dict[str, str | None] | None = None, *,
                 add_special_tokens: bool = True, where: str = "tokenizer") -> HFTokenizer:
        """From the text of a ``tokenizer.json`` written by the ``tokenizers`` library."""
        try:
            tok = Tokenizer.from_str(tokenizer_json)
        except Exception as e:  # the library raises a bare Exception on malformed files
            raise TokenizerError(f"{where}: not a tokenizers-library tokenizer.json ({e})") from None
        return cls(tok, special_tokens, add_special_tokens=add_special_tokens)

    @property
    def special_token_names(self) -> dict[str, str | None]:
        """Role -> token text (``{"bos": "<s>", "eos": "</s>", "pad": None, "unk": "<unk>"}``)."""
        return dict(self._roles)

    # ------------------------------------------------------------------ files
    def to_json_dict(self) -> dict[str, Any]:
        return {"type": self.type, "tokenizer": json.loads(self._tok.to_str()),
                "special_tokens": dict(self._roles), "add_special_tokens": self.add_special_tokens}

    @classmethod
    def from_json_dict(cls, data: dict[str, Any], *, where: str = "tokenizer") -> HFTokenizer:
        inner, roles = data.get("tokenizer"), data.get("special_tokens", {})
        if not isinstance(inner, dict) or not isinstance(roles, dict):
            raise TokenizerError(f"{where}: corrupt hf tokenizer ('tokenizer' and 'special_tokens' must be "
                                 "JSON objects)")
        add = data.get("add_special_tokens", True)
        if not isinstance(add, bool):
            raise TokenizerError(f"{where}: corrupt hf tokenizer (add_special_tokens={add!r} is not a bool)")
        try:
            return cls.from_str(json.dumps(inner), roles, add_special_tokens=add, where=where)
        except TokenizerError as e:
            raise TokenizerError(f"corrupt hf tokenizer: {e}") from None
