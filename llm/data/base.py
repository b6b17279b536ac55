"""The data-module contract and the deterministic, resumable, rank-sharded batch sampler.

A data module holds a train and a val split, each a list of ``num_items`` fixed-size items (token
windows, synthetic sequences, regression rows), and serves numpy batches:

* lifecycle: ``prepare_data()`` (once per machine; may write caches) -> ``setup()`` (every rank)
  -> ``train_dataloader()`` / ``val_dataloader()``.
* train order: epoch ``e`` visits every item once in the order of a permutation seeded by
  ``(seed, e)``; micro-batch ``s`` of the run is global rows ``[k*B, (k+1)*B)`` of epoch
  ``s // steps_per_epoch``'s permutation, ``k = s % steps_per_epoch`` (a partial last batch is
  dropped). So a batch is a pure function of ``(seed, s)``: resuming is setting the cursor ``s``.
* sharding: rank ``r`` of ``W`` takes rows ``[r*B/W, (r+1)*B/W)`` of the global batch, so ranks
  are disjoint and together see exactly the single-process batch, whatever ``W`` is -- a run may
  resume on a different number of ranks and still see the same global batches. On a device mesh
  (``llm.sharding``) the batch splits over ``BATCH_AXES`` only: ``batch_shard(mesh, device)`` gives
  a device its ``(r, W)``, shared by its tensor-parallel group.
* the cursor counts micro-batches handed out by ``train_dataloader()``; ``state_dict()`` saves it
  (JSON-safe) and ``load_state_dict()`` restores it after checking the data is the same.
* val: the val split in its natural order, the same batches on every call; asked for ``n`` of its
  ``N`` batches, batch ``k`` is the split's batch ``k * N // n`` (spread over the whole split).
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from typing import Any

import numpy as np

__all__ = ["BATCH_FIELDS", "Batch", "BaseDataModule", "DataError", "batch_shard"]

# (inputs, targets), leading axis = this rank's batch rows; packed LM batches append segment_ids
# and, with data.reset_positions, positions (all (B, T)): the names of BATCH_FIELDS, in order.
Batch = tuple[np.ndarray, ...]
BATCH_FIELDS = ("inputs", "targets", "segment_ids", "positions")

_STREAM_TAG = 0xDA7A  # keeps data RNG streams apart from weight-init streams of the same seed


class DataError(ValueError):
    """A bad data source or data setting; the message names the path or the value."""


def batch_shard(mesh: Any, device: int) -> tuple[int, int]:
    """``(rank, world_size)`` of the data module on device ``device`` of ``mesh`` (an
    ``llm.sharding.MeshShape``, devices numbered row-major over ``MESH_AXES``, tensor innermost):
    the global batch splits ``mesh.batch_shards`` (= data * fsdp) ways and the ``mesh.tensor``
    devices of a tensor-parallel group read the same rows."""
    if not 0 <= device < mesh.devices:
        raise DataError(f"device={device}: the mesh {mesh.to_dict()} has {mesh.devices} devices")
    return device // mesh.tensor, mesh.batch_shards


class BaseDataModule(abc.ABC):
    """Batches for one rank. Subclasses implement ``setup``, ``_num_items`` and ``_gather``."""

    tokenizer: Any = None  # text modules expose their tokenizer here

    def __init__(self, *, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise DataError(f"training.batch_size={batch_size} must be >= 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size")
        if batch_size % world_size:
            raise DataError(f"training.batch_size={batch_size} (the global batch) must be divisible by "
                            f"world_size={world_size}")
        if seed < 0:
            raise DataError(f"training.seed={seed} must be >= 0")
        self.batch_size = batch_size  # global, over all ranks
        self.local_batch_size = batch_size // world_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self._step = 0
        self._is_setup = False
        self._perm_cache: tuple[int, np.ndarray] | None = None

    # ------------------------------------------------------------------ subclass contract
    def prepare_data(self) -> None:
        """Work done once per machine before ``setup`` (download, tokenize, write caches)."""
        return None  # nothing to prepare by default

    @abc.abstractmethod
    def setup(self) -> None:
        """Load the splits; must end with ``self._is_setup = True``."""

    @abc.abstractmethod
    def _num_items(self, split: str) -> int:
        """Number of items of ``split`` ("train" or "val")."""

    @abc.abstractmethod
    def _gather(self, split: str, indices: np.ndarray, epoch: int) -> Batch:
        """The batch of items ``indices`` of ``split`` (``epoch`` lets a module vary train items)."""

    @property
    def fingerprint(self) -> str:
        """Identifies the data (corpus, tokenizer, sizes); resuming onto other data is an error."""
        return ""

    # ------------------------------------------------------------------ sampling
    def _require_setup(self) -> None:
        if not self._is_setup:
            raise DataError(f"{type(self).__name__}: call setup() before asking for batches")

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _STREAM_TAG, *key])

    @property
    def steps_per_epoch(self) -> int:
        """Micro-batches per pass over the train split (the partial last batch is dropped)."""
        self._require_setup()
        return self._num_items("train") // self.batch_size

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            self._perm_cache = (epoch, self._rng(0, epoch).permutation(self._num_items("train")))
        return self._perm_cache[1]

    def batch_indices(self, step: int) -> np.ndarray:
        """The train items of micro-batch ``step`` that belong to this rank, shape ``(B/W,)``."""
        self._require_setup()
        if step < 0:
            raise DataError(f"step={step} must be >= 0")
        epoch, k = divmod(step, self.steps_per_epoch)
        rows = self._permutation(epoch)[k * self.batch_size:(k + 1) * self.batch_size]
        lo = self.rank * self.local_batch_size
        return rows[lo:lo + self.local_batch_size]

    def batch_at(self, step: int) -> Batch:
        """Micro-batch ``step`` of the run for this rank; does not move the cursor."""
        return self._gather("train", self.batch_indices(step), step // self.steps_per_epoch)

    def train_dataloader(self) -> Iterator[Batch]:
        """Endless micro-batches from the cursor on; each one handed out advances the cursor.

        The training loop decides when to stop (``training.total_steps``). Iterators share the
        module's cursor.
        """
        self._require_setup()

        def batches() -> Iterator[Batch]:
            while True:
                batch = self.batch_at(self._step)
                self._step += 1
                yield batch

        return batches()

    @property
    def num_val_batches(self) -> int:
        self._require_setup()
        return self._num_items("val") // self.batch_size

    def val_dataloader(self, num_batches: int | None = None) -> Iterator[Batch]:
        """The val split in order, at most ``num_batches`` batches spread over it; identical on every call."""
        self._require_setup()
        if self._num_items("val") == 0:
            raise DataError(f"{type(self).__name__}: there is no validation split "
                            "(data.val_fraction=0)")
        total = self.num_val_batches
        count = total if num_batches is None else min(num_batches, total)
        lo = self.rank * self.local_batch_size
        for k in range(count):
            # Fewer batches than the split holds are spread evenly over it, so a partial eval
            # samples the whole val set rather than its first documents.
            start = (k * total // count) * self.batch_size + lo
            yield self._gather("val", np.arange(start, start + self.local_batch_size), 0)

    # ------------------------------------------------------------------ cursor
    @property
    def step(self) -> int:
        """Micro-batches handed out so far (the cursor)."""
        return self._step

    @property
    def epoch(self) -> int:
        return self._step // self.steps_per_epoch

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe cursor state for the checkpoint's ``state.json``."""
        return {"step": self._step, "seed": self.seed, "batch_size": self.batch_size,
                "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the cursor; the seed, global batch size and data must match the saved run."""
        missing = {"step", "seed", "batch_size", "fingerprint"} - set(state)
        if missing:
            raise DataError(f"data state is missing {sorted(missing)}")
        for key, mine in (("seed", self.seed), ("batch_size", self.batch_size),
                          ("fingerprint", self.fingerprint)):
            if state[key] != mine:
                raise DataError(f"cannot resume: the saved data state has {key}={state[key]!r} but "
                                f"this run has {key}={mine!r}; the batch order would differ")
        step = state["step"]
        if not isinstance(step, int) or step < 0:
            raise DataError(f"data state step={step!r} must be an int >= 0")
        self._step = step
