"""Data modules that produce numpy batches for either backend.

* ``TextDataModule`` -- a text corpus (``stdlib``, a file, a directory, a glob) tokenized once into
  a cached memmap; int64 ``(inputs, targets)`` windows.
* ``TokenFileDataModule`` -- pre-tokenized files (nanoGPT / llm.c ``.bin``, ``.npy``), memory-mapped
  as they lie; the vocabulary is ``model.vocab_size``.
* ``SyntheticDataModule`` -- seeded random tokens (LM) or a regression set.
* ``build_datamodule(config, rank=, world_size=)`` -- the one a run config's ``data`` asks for.

Every module shares ``BaseDataModule``'s sampler: deterministic for a seed, resumable from
``state_dict()``, and sharded so data-parallel ranks get disjoint slices of the global batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llm.data.base import BATCH_FIELDS, BaseDataModule, Batch, DataError, batch_shard
from llm.data.synthetic import SyntheticDataModule
from llm.data.text import TextDataModule
from llm.data.tokens import TokenFileDataModule, is_token_source

__all__ = ["BATCH_FIELDS", "Batch", "BaseDataModule", "DataError", "SyntheticDataModule", "TextDataModule",
           "TokenFileDataModule", "batch_shard", "build_datamodule"]


def build_datamodule(config: Any, *, rank: int = 0, world_size: int = 1, tokenizer: Any = None) -> BaseDataModule:
    """The data module of a ``llm.config.Config``'s ``data`` section (not yet set up):
    ``data.source=synthetic`` gives a SyntheticDataModule of token windows, token files
    (``llm.data.tokens.is_token_source``) a TokenFileDataModule, anything else a TextDataModule.
    ``tokenizer`` (an object, e.g. the ``training.init_from`` checkpoint's) is used as given;
    without it, ``data.tokenizer_file`` is loaded when set. A task that wants other data builds its
    own (``llm.loop.tasks``)."""
    d = config.data
    if d.source == "synthetic":
        return SyntheticDataModule.from_config(config, rank=rank, world_size=world_size)
    if tokenizer is None and d.tokenizer_file is not None:
        from llm.tokenization import load_tokenizer

        tokenizer = load_tokenizer(Path(d.tokenizer_file).expanduser())
    if is_token_source(d.source):
        return TokenFileDataModule.from_config(config, rank=rank, world_size=world_size, tokenizer=tokenizer)
    return TextDataModule.from_config(config, rank=rank, world_size=world_size, tokenizer=tokenizer)
