"""Data modules that produce numpy batches for either backend.

* ``TextDataModule`` -- a text corpus (``stdlib``, a file, a directory, a glob) tokenized once into
  a cached memmap; int64 ``(inputs, targets)`` windows.
* ``SyntheticDataModule`` -- seeded random tokens (LM) or a regression set.
* ``build_datamodule(config, rank=, world_size=)`` -- the one a run config's ``data`` asks for.

Every module shares ``BaseDataModule``'s sampler: deterministic for a seed, resumable from
``state_dict()``, and sharded so data-parallel ranks get disjoint slices of the global batch.
"""

from __future__ import annotations

from typing import Any

from llm.data.base import BATCH_FIELDS, BaseDataModule, Batch, DataError
from llm.data.synthetic import SyntheticDataModule
from llm.data.text import TextDataModule

__all__ = ["BATCH_FIELDS", "Batch", "BaseDataModule", "DataError", "SyntheticDataModule", "TextDataModule",
           "build_datamodule"]


def build_datamodule(config: Any, *, rank: int = 0, world_size: int = 1) -> BaseDataModule:
    """The data module of a ``llm.config.Config``'s ``data`` section (not yet set up):
    ``data.source=synthetic`` gives a SyntheticDataModule of token windows, anything else a
    TextDataModule. A task that wants other data builds its own (``llm.loop.tasks``)."""
    if config.data.source == "synthetic":
        return SyntheticDataModule.from_config(config, rank=rank, world_size=world_size)
    return TextDataModule.from_config(config, rank=rank, world_size=world_size)
