"""The run directory, the training state of a checkpoint, and the run summary.

A run directory (``--run-dir``; default ``runs/<timestamp>``) holds::

    config.json          the full resolved config (Config.to_dict())
    tokenizer.json       the tokenizer (LM on text), also copied into every checkpoint
    metrics.jsonl        one JSON object per logged optimiser step (logging.every_steps)
    checkpoints/step_<N>/  checkpoints (llm.checkpoint: canonical, or named for a task that is not a
                         decoder), the newest checkpoint.keep_last kept
    loss.png             the loss curve, drawn at the end
    summary.json         final losses, baselines, throughput (in the task's units: TrainResult)

Only rank 0 writes. Everything here is backend-agnostic: the torch and JAX engines write the same
``state.json`` keys (``STATE_KEYS``) and the same ``state.safetensors`` names (``moment_name``), so a
run of a canonical task started on one backend resumes on the other (a named checkpoint's names are
the backend's own, so it resumes where they match). This module must not import torch or jax.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llm.checkpoint import (
    CheckpointError,
    latest_valid_checkpoint,
    list_checkpoints,
    recover_interrupted_writes,
)
from llm.io import (
    CONFIG_FILE,
    METRICS_FILE,
    PLOT_FILE,
    SUMMARY_FILE,
    TOKENIZER_FILE,
    write_bytes_atomic,
    write_json_atomic,
)

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "STATE_FORMAT",
    "STATE_KEYS",
    "DeviceOutOfMemoryError",
    "NonFiniteLossError",
    "RunDir",
    "TrainResult",
    "default_run_dir",
    "moment_name",
    "split_moment_name",
    "write_bytes_atomic",
    "write_json_atomic",
]

log = logging.getLogger("llm.run")

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"

STATE_FORMAT = "llm-train-state"
# state.json of a training checkpoint (JSON). Every engine writes all of them:
#   format, version         STATE_FORMAT, 1
#   backend                 "torch" | "jax": who wrote it (informational; either may resume)
#   step                    optimiser steps done; the next update uses lr_at(step)
#   micro_step              micro-batches consumed (= step * grad_accum_steps)
#   epoch                   data epoch of the next micro-batch
#   data                    the DataModule's state_dict() (cursor, seed, global batch, fingerprint)
#   rng                     {"seed", "scheme"}: dropout randomness is a pure function of (seed, micro_step, rank)
#   schedule                {"name", "lr", "warmup_steps", "total_steps", "final_lr", "next_lr"}
#   optimizer               {"name": "adamw", "beta1", "beta2", "eps", "weight_decay", "step"}
#   grad_scaler             {"scale", "growth_tracker"} for float16 loss scaling, else null
#   tokens_seen             training items consumed (the task's TrainingTask.items: tokens, rows), all ranks
#   best_val_loss           lowest val loss seen so far, or null
#   callbacks               {callback name: its state_dict()} (early stopping patience, ...)
#   world_size, reason      ranks of the run; why it was written (periodic, final, interrupt, early_stop)
STATE_KEYS = ("format", "version", "backend", "step", "micro_step", "epoch", "data", "rng", "schedule",
              "optimizer", "grad_scaler", "tokens_seen", "best_val_loss", "callbacks", "world_size",
              "reason")
# state.safetensors: f"{moment}.{param name}", fp32, the layout of model.safetensors (canonical or named)
MOMENTS = ("exp_avg", "exp_avg_sq")


def moment_name(moment: str, param: str) -> str:
    """The state.safetensors key of AdamW moment ``moment`` of parameter ``param`` (a canonical name,
    or a named checkpoint's own)."""
    if moment not in MOMENTS:
        raise ValueError(f"moment {moment!r}: expected one of {MOMENTS}")
    return f"{moment}.{param}"


def split_moment_name(key: str) -> tuple[str, str]:
    """Inverse of ``moment_name``: ``"exp_avg_sq.layers.0.attn.q_proj.weight"`` -> (moment, param)."""
    moment, _, param = key.partition(".")
    if moment not in MOMENTS or not param:
        raise CheckpointError(f"state tensor {key!r} is not '<{'|'.join(MOMENTS)}>.<canonical name>'")
    return moment, param


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the run stopped without writing a checkpoint of the bad state."""


class DeviceOutOfMemoryError(RuntimeError):
    """The accelerator ran out of memory; the message names the step, the sizes and the knobs."""


_UNITS = {"B": 1, "bytes": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def size_after(text: str, phrase: str) -> int | None:
    """The byte count written right after ``phrase`` in a framework's message ("Tried to allocate
    2.00 GiB" -> 2147483648), or None when the message does not say."""
    m = re.search(re.escape(phrase) + r"\s*([\d.]+)\s*(TiB|GiB|MiB|KiB|bytes|B)\b", text)
    return None if m is None else int(float(m.group(1)) * _UNITS[m.group(2)])


def default_run_dir(root: str | os.PathLike = "runs") -> Path:
    """``runs/<YYYYmmdd-HHMMSS>``, with a ``-<n>`` suffix if that name is taken."""
    base = Path(root) / time.strftime("%Y%m%d-%H%M%S")
    path, n = base, 1
    while path.exists():
        path, n = base.with_name(f"{base.name}-{n}"), n + 1
    return path


def newest_run_dir(root: str | os.PathLike = "runs") -> Path | None:
    """The most recently modified run under ``root`` that has a checkpoints folder (for bare --resume)."""
    root = Path(root)
    if not root.is_dir():
        return None
    runs = [p for p in root.iterdir() if (p / "checkpoints").is_dir()]
    return max(runs, key=lambda p: p.stat().st_mtime) if runs else None


@dataclass
class RunDir:
    """Paths of one run and the file operations on them (call the writers on rank 0 only)."""

    root: Path
    checkpoints: Path

    @classmethod
    def from_config(cls, config: Any, run_dir: str | os.PathLike | None = None) -> RunDir:
        root = Path(run_dir if run_dir is not None else (config.logging.run_dir or default_run_dir()))
        ckpt = Path(config.checkpoint.dir) if config.checkpoint.dir else root / "checkpoints"
        return cls(root, ckpt)

    # ------------------------------------------------------------------ paths
    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def metrics_path(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def tokenizer_path(self) -> Path:
        return self.root / TOKENIZER_FILE

    @property
    def plot_path(self) -> Path:
        return self.root / PLOT_FILE

    @property
    def summary_path(self) -> Path:
        return self.root / SUMMARY_FILE

    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoints / f"step_{step}"

    @property
    def best_path(self) -> Path:
        """``checkpoint.save_best``'s checkpoint (not a ``step_<N>``: never pruned, never resumed by
        a bare ``--resume``)."""
        return self.checkpoints / "best"

    # ------------------------------------------------------------------ writing
    def refuse_fresh_start(self) -> None:
        """A new run (no ``--resume``) never writes over an earlier run's files: checkpoints (valid,
        corrupt or set aside) or its record (config.json, metrics.jsonl, summary.json)."""
        held = [p.name for p in sorted(self.checkpoints.iterdir())] if self.checkpoints.is_dir() else []
        held = [n for n in held if n.startswith("step_")]
        record = [p.name for p in (self.config_path, self.metrics_path, self.summary_path) if p.exists()]
        if held or record:
            what = (f"checkpoints ({', '.join(held[:3])}{', ...' if len(held) > 3 else ''})" if held
                    else f"an earlier run ({', '.join(record)})")
            raise CheckpointError(f"{self.root} already holds {what}; pass --resume to continue "
                                  "that run or choose another --run-dir")

    def create(self, config: Any, *, resume: bool) -> None:
        """Make the directory and write config.json (after a resume has been accepted); refuse to
        start afresh over an earlier run."""
        if not resume:
            self.refuse_fresh_start()
        self.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.config_path, config.to_dict())

    def write_artifacts(self, files: dict[str, bytes]) -> None:
        for name, data in files.items():
            write_bytes_atomic(self.root / name, data)

    def prune(self, keep_last: int | None) -> list[Path]:
        """Delete all but the newest ``keep_last`` step checkpoints; return the deleted paths."""
        if keep_last is None:
            return []
        old = [path for _, path in list_checkpoints(self.checkpoints)[keep_last:]]
        for path in old:
            shutil.rmtree(path, ignore_errors=True)
        return old

    # ------------------------------------------------------------------ resuming
    def find_resume(self) -> tuple[Path, list[tuple[Path, str]]]:
        """The newest checkpoint that verifies and the newer corrupt ones skipped (logged); a
        ``CheckpointError`` naming what was tried when none verifies. Nothing on disk changes."""
        for message in recover_interrupted_writes(self.checkpoints):
            log.warning("%s", message)
        path, skipped = latest_valid_checkpoint(self.checkpoints)
        for bad, reason in skipped:
            log.warning("skipping corrupt checkpoint %s: %s", bad, reason)
        if path is None:
            if not self.root.is_dir():
                raise CheckpointError(f"--resume: the run directory {self.root} does not exist")
            tried = "; ".join(f"{p.name}: {why}" for p, why in skipped) or "there are none"
            raise CheckpointError(f"--resume: no valid checkpoint under {self.checkpoints} ({tried}); "
                                  "nothing was changed")
        return path, skipped

    @staticmethod
    def set_aside(skipped: list[tuple[Path, str]]) -> None:
        """Rename each skipped corrupt checkpoint ``step_<N>.corrupt`` so it is never picked (nor
        overwritten) again; called once the resume is accepted."""
        for bad, _ in skipped:
            target = bad.with_name(bad.name + ".corrupt")
            n = 1
            while target.exists():
                target, n = bad.with_name(f"{bad.name}.corrupt{n}"), n + 1
            try:
                os.rename(bad, target)
            except OSError as e:  # read-only checkpoints: leave it, it will be skipped again
                log.warning("could not move %s aside (%s)", bad, e)


@dataclass
class TrainResult:
    """What ``TrainingEngine.fit()`` returns (rank 0 has the full picture; other ranks the same numbers).

    Throughput is in the task's units: ``items`` names what it counts (``TrainingTask.items``:
    ``"tokens"`` for an LM, ``"rows"`` for regression), ``items_per_s`` / ``items_seen`` are the
    numbers, and ``loss_unit`` is what the losses are in. ``to_dict()`` (``summary.json``) also
    writes them under the named keys ``<items>_per_s`` and ``<items>_seen`` (``tokens_per_s`` for an
    LM, ``rows_per_s`` for regression).
    """

    run_dir: Path | None
    step: int
    total_steps: int
    stop_reason: str  # "completed", "early_stop", "interrupted", "requested"
    train_loss: float | None = None
    val_loss: float | None = None
    best_val_loss: float | None = None
    items_per_s: float | None = None  # steady state: after the first step, without eval/checkpoint time
    compile_seconds: float | None = None  # the first step (compilation and warm-up), timed on its own
    train_seconds: float = 0.0
    items_seen: int = 0
    baselines: dict[str, float] = field(default_factory=dict)
    last_checkpoint: Path | None = None
    sample: str | None = None
    items: str = "tokens"
    loss_unit: str = "nats/token"

    @property
    def tokens_per_s(self) -> float | None:
        """``items_per_s`` of a task that counts tokens, else None."""
        return self.items_per_s if self.items == "tokens" else None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("run_dir", "last_checkpoint"):
            out[key] = None if out[key] is None else str(out[key])
        out[f"{self.items}_per_s"], out[f"{self.items}_seen"] = self.items_per_s, self.items_seen
        return out

    def summary_lines(self) -> list[str]:
        """A short human summary (printed by ``python -m llm.train`` at the end), in the task's units."""
        def fmt(x: float | None) -> str:
            return "n/a" if x is None else f"{x:.4f}"

        lines = [f"stopped: {self.stop_reason} at step {self.step}/{self.total_steps} "
                 f"({self.train_seconds:.0f}s training, {self.items_seen:,} {self.items})",
                 f"final train loss {fmt(self.train_loss)} | val loss {fmt(self.val_loss)} "
                 f"| best val {fmt(self.best_val_loss)} ({self.loss_unit})"]
        if "unigram_entropy" in self.baselines:
            lines.append(f"unigram baseline (entropy of the train tokens) {self.baselines['unigram_entropy']:.4f} "
                         "nats/token")
        if self.items_per_s is not None:
            lines.append(f"throughput {self.items_per_s:,.0f} {self.items}/s")
        if self.compile_seconds is not None:
            lines.append(f"first step {self.compile_seconds:.1f}s (compilation and warm-up; not in the throughput)")
        if self.run_dir is not None:
            lines.append(f"run dir {self.run_dir}")
        if self.last_checkpoint is not None:
            lines.append(f"last checkpoint {self.last_checkpoint}")
        return lines
