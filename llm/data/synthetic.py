"""Seeded synthetic data: random token sequences (LM) and a linear regression set.

* ``task="lm"``: item ``i`` of a split is ``seq_len + 1`` token ids drawn uniformly from
  ``[0, vocab_size)`` by a generator seeded with ``(seed, split, i)``; nothing is stored, so any
  ``seq_len``/``num_samples`` costs no memory. Uniform tokens cannot be predicted: a model's loss
  should settle at ``ln(vocab_size)`` -- a useful check of the loss and of throughput, not of
  learning.
* ``task="regression"``: ``x ~ N(0, 1)`` of shape ``(num_samples, in_features)``, a fixed
  ``weight ~ N(0, 1/in_features)`` of shape ``(in_features, out_features)``, ``y = x @ weight +
  noise_std * N(0, 1)``; batches are float32 ``(x, y)``. A model can reach MSE ``noise_std**2``.

Both split ``num_samples`` into train and a trailing ``val_fraction`` and use the shared sampler
(``llm.data.base``): seeded epochs, resumable cursor, disjoint rank shards.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from llm.data.base import BaseDataModule, Batch, DataError

__all__ = ["SyntheticDataModule"]


class SyntheticDataModule(BaseDataModule):
    """Random LM token windows or a regression set (see the module docstring)."""

    def __init__(self, *, batch_size: int, task: str = "lm", seq_len: int = 128, vocab_size: int = 256,
                 num_samples: int = 8192, val_fraction: float = 0.1, in_features: int = 16,
                 out_features: int = 1, noise_std: float = 0.01, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        super().__init__(batch_size=batch_size, seed=seed, rank=rank, world_size=world_size)
        self.task = str(getattr(task, "value", task))
        if self.task not in ("lm", "regression"):
            raise DataError(f"task={task!r} must be 'lm' or 'regression'")
        for name, value in (("data.seq_len", seq_len), ("model.vocab_size", vocab_size),
                            ("data.synthetic_size", num_samples), ("in_features", in_features),
                            ("out_features", out_features)):
            if value < 1:
                raise DataError(f"{name}={value} must be >= 1")
        if not 0 <= val_fraction < 1:
            raise DataError(f"data.val_fraction={val_fraction} must be in [0, 1)")
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self.num_samples = num_samples
        self.val_fraction = val_fraction
        self.in_features = in_features
        self.out_features = out_features
        self.noise_std = noise_std
        self.num_val = int(num_samples * val_fraction)
        self.num_train = num_samples - self.num_val
        self.weight: np.ndarray | None = None  # the true regression weight, after setup()

    @classmethod
    def from_config(cls, config: Any, *, task: str = "lm", rank: int = 0, world_size: int = 1
                    ) -> SyntheticDataModule:
        """The module of a run config's ``data``, ``training`` and ``model.vocab_size``; ``task`` is the
        kind of data ("lm" token windows or the "regression" set), not the run's task."""
        d, t = config.data, config.training
        return cls(batch_size=t.batch_size, task=task, seq_len=d.seq_len,
                   vocab_size=config.model.vocab_size, num_samples=d.synthetic_size,
                   val_fraction=d.val_fraction, seed=t.seed, rank=rank, world_size=world_size)

    def setup(self) -> None:
        B = self.batch_size
        if self.num_train < B:
            raise DataError(f"training.batch_size={B} is larger than the {self.num_train} synthetic train "
                            "samples; raise data.synthetic_size")
        if self.num_val and self.num_val < B:
            raise DataError(f"data.val_fraction={self.val_fraction} leaves {self.num_val} synthetic val "
                            f"samples, fewer than training.batch_size={B}")
        if self.task == "regression":
            rng = self._rng(2)
            x = rng.standard_normal((self.num_samples, self.in_features))
            self.weight = (rng.standard_normal((self.in_features, self.out_features))
                           / np.sqrt(self.in_features)).astype(np.float32)
            y = x @ self.weight + self.noise_std * rng.standard_normal((self.num_samples, self.out_features))
            self._x, self._y = x.astype(np.float32), y.astype(np.float32)
        self._is_setup = True

    @property
    def fingerprint(self) -> str:
        if self.task == "regression":
            return (f"synthetic:regression:n={self.num_samples}:val={self.val_fraction}:"
                    f"in={self.in_features}:out={self.out_features}:noise={self.noise_std}")
        return f"synthetic:lm:n={self.num_samples}:val={self.val_fraction}:T={self.seq_len}:V={self.vocab_size}"

    def _num_items(self, split: str) -> int:
        return self.num_train if split == "train" else self.num_val

    def _gather(self, split: str, indices: np.ndarray, epoch: int) -> Batch:
        rows = np.asarray(indices, np.int64) + (0 if split == "train" else self.num_train)
        if self.task == "regression":
            return self._x[rows], self._y[rows]
        seqs = np.stack([self._rng(3, int(r)).integers(0, self.vocab_size, self.seq_len + 1)
                         for r in rows])  # (B, T+1)
        return np.ascontiguousarray(seqs[:, :-1]), np.ascontiguousarray(seqs[:, 1:])
