"""What both training engines share: setup, the loop, evaluation, checkpoints, resume, signals.

``backends.torch.engine.TrainingEngine`` and ``backends.flax.engine.TrainingEngine`` subclass
``BaseTrainingEngine``, so the trainer surface that callbacks, ``llm.train`` and the tests rely on
(``fit``, ``evaluate``, ``save_checkpoint``, ``state_meta``, ``request_stop``, ``sample``, the
counters) is one piece of code, and both write the same ``state.json`` and resume the same way. A
backend supplies only what differs between frameworks:

    _optimizer_step(batches, lr, micro_step) -> out      one optimiser step on the device, no host sync
    _read_step(out) -> StepReadout                       the host sync of a logged step (all processes)
    _val_loss(num_batches) -> float                      mean val loss over all processes
    _nonfinite_seen() -> bool                            the device-side nan/inf flag of any process
    moments(), _param_names(), _num_parameters()         AdamW moments (canonical), parameter names
    _restore(path, params, moments, step, grad_scaler)   a checkpoint's numbers into the device state
    _grad_scaler_state() -> dict | None                  the float16 loss scale for ``state.json``
    _barrier(name), _broadcast(text), _placement()       processes and devices

A subclass's ``__init__`` tells the setup order: ``BaseTrainingEngine.__init__`` (task, callbacks,
counters), its devices, ``_setup_data``, its model, ``_setup_weight_decay`` and its optimiser, then
``_open_run`` (run directory and resume, which needs the optimiser state to fill).

This module never imports torch or jax.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, TypeVar

import numpy as np

from llm.loop.callbacks import DEFAULT_CALLBACKS, Callback, CallbackList, build_callbacks
from llm.checkpoint import Checkpoint, CheckpointError, list_checkpoints, load_checkpoint, save_checkpoint
from llm.config import Config, DType
from llm.run import (
    STATE_FORMAT,
    NonFiniteLossError,
    RunDir,
    TrainResult,
    split_moment_name,
    write_json_atomic,
)
from llm.schedule import schedule_for
from llm.loop.tasks import TaskError, TrainingTask, get_task

__all__ = ["STATE_VERSION", "BaseTrainingEngine", "StepReadout"]

log = logging.getLogger("llm.train")

STATE_VERSION = 1

_Engine = TypeVar("_Engine", bound="BaseTrainingEngine")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# state.json keys a resume reads, and what each must hold
_STATE_RULES: dict[str, tuple[str, Any]] = {
    "step": ("an integer >= 0", _is_count),
    "tokens_seen": ("an integer >= 0", _is_count),
    "data": ("an object (the data cursor)", lambda v: isinstance(v, dict)),
    "callbacks": ("an object", lambda v: isinstance(v, dict)),
    "best_val_loss": ("a number or null", lambda v: v is None or (isinstance(v, (int, float))
                                                                  and not isinstance(v, bool))),
}


def _check_state_meta(path: Path, meta: dict[str, Any]) -> None:
    """A corrupt ``state.json`` behind a valid manifest is a ``CheckpointError`` naming the key."""
    for key, (rule, ok) in _STATE_RULES.items():
        if key in meta and not ok(meta[key]):
            raise CheckpointError(f"{path}: state.json {key}={meta[key]!r} must be {rule}; the training "
                                  "state is corrupt")
    if "step" not in meta or "data" not in meta:
        raise CheckpointError(f"{path}: state.json lacks 'step' or 'data'; the training state is corrupt")


class StepReadout(NamedTuple):
    """One logged optimiser step, read to the host and reduced over processes."""

    parts: dict[str, float]  # the task's loss parts, mean over micro-batches and processes
    grad_norm: float | None  # before clipping; None when training.grad_clip is 0
    nonfinite: bool  # some process has seen a nan/inf loss
    interrupted: bool  # some process received SIGINT/SIGTERM


class BaseTrainingEngine:
    """Trains ``config.task`` (or ``task``); a backend subclass runs the steps on its framework.

    Args (of every subclass):
        config: the resolved run config (``llm.config.Config``).
        run_dir: where files go (default: ``config.logging.run_dir`` or ``runs/<timestamp>``).
        resume: False; True = continue from the newest valid checkpoint of the run dir (corrupt
            newer ones are reported, skipped and renamed ``step_<N>.corrupt``; none valid, or no
            run dir, is a ``CheckpointError`` and nothing is changed); ``"auto"`` = the same, but a
            run without any checkpoint starts afresh; or the path of one checkpoint directory --
            written by either backend.
        task: a registered task name or a ``TrainingTask`` (default ``config.task``).
        callbacks: extra ``Callback`` instances, added to the built-ins.
        callback_names: registered callbacks built from the config (default: all built-ins that the
            config enables).
        datamodule: a DataModule to use instead of the task's (not yet set up).
    """

    backend: ClassVar[str]  # "torch" | "jax": picks the task half and is written to state.json
    rng_scheme: ClassVar[str]  # how dropout randomness derives from the seed (state.json's rng.scheme)
    model: Any  # the framework's module holding the current parameters

    def __init__(self, config: Config, *, rank: int, world_size: int, task: str | TrainingTask | None,
                 callbacks: list[Callback] | None,
                 callback_names: tuple[str, ...] | list[str] = DEFAULT_CALLBACKS):
        self.task = get_task(task if task is not None else config.task)
        named = config.task.rpartition(":")[2]
        if task is not None and self.task.name and self.task.name != named:
            # The run's config.json (and every checkpoint's) must name the task that really ran, so
            # that a resume from it trains the same one.
            config = config.replace(task=self.task.name)
        self.config = config
        self.impl = self.task.backend(self.backend)
        self.rank, self.world_size = rank, world_size
        self.is_main = rank == 0
        # callbacks first: a config they reject (e.g. tensorboard not installed) fails before any work
        self.callbacks = CallbackList(build_callbacks(config, callback_names, checkpoints=self.task.canonical)
                                      + list(callbacks or []), is_main=self.is_main)

        # ---- counters (restored by resume)
        self.step = 0  # optimiser steps done
        self.tokens_seen = 0
        self.best_val_loss: float | None = None
        self.last_val: dict[str, float] = {}
        self.last_checkpoint: Path | None = None
        self._stop: tuple[str, str] | None = None
        self._interrupted = False
        self._paused = 0.0  # seconds in eval/checkpoints since the last measurement (not training time)
        self._paused_total = 0.0

    # ------------------------------------------------------------------ setup phases
    def _setup_data(self, datamodule: Any) -> None:
        """The DataModule (process 0 prepares first: downloads and caches are written once), the
        baselines, the step count and the schedule."""
        t = self.config.training
        self.datamodule = datamodule if datamodule is not None else self.task.build_datamodule(
            self.config, rank=self.rank, world_size=self.world_size)
        if self.is_main:
            self.datamodule.prepare_data()
        self._barrier("prepare_data")
        if not self.is_main:
            self.datamodule.prepare_data()
        self.datamodule.setup()
        self.task.validate(self.config, self.datamodule)
        self.baselines = self.task.baselines(self.datamodule)
        self.total_steps = t.total_steps(self.datamodule.steps_per_epoch)
        self.lr_of = schedule_for(t, self.total_steps)

    def _setup_weight_decay(self, names: Sequence[str], no_decay: set[str],
                            frozen: frozenset[str] = frozenset()) -> None:
        """``decay_names`` / ``no_decay_names``, the two AdamW groups (``frozen`` names in neither);
        a no-decay name the model lacks is a task bug, so it fails here."""
        unknown = no_decay - set(names)
        if unknown:
            raise TaskError(f"task {self.task.name!r}: no-decay names that are not parameters of the "
                            f"model: {sorted(unknown)[:5]}")
        self.decay_names = [n for n in names if n not in no_decay and n not in frozen]
        self.no_decay_names = [n for n in names if n in no_decay and n not in frozen]

    def _open_run(self, run_dir: str | os.PathLike | None, resume: bool | str | os.PathLike) -> None:
        """The run directory and resume: process 0 decides, every process follows. A resume is
        loaded (and so checked against this config) before anything in the run dir is written, so
        a refused resume leaves the run as it was."""
        self.run = RunDir.from_config(self.config, run_dir) if self.is_main else None
        root = self._broadcast(str(self.run.root) if self.run else None)
        ckpt_dir = self._broadcast(str(self.run.checkpoints) if self.run else None)
        if self.run is None:
            self.run = RunDir(Path(root), Path(ckpt_dir))
        self.artifacts = self.task.artifacts(self.datamodule)
        resume_from, skipped = (self._find_resume(resume) if self.is_main else (None, []))
        resume_from = self._broadcast(None if resume_from is None else str(resume_from))
        if resume_from is not None:
            self._load(Path(resume_from))
        if self.is_main:
            self.run.create(self.config, resume=bool(resume))
            self.run.write_artifacts(self.artifacts)
            self.run.set_aside(skipped)

    # ------------------------------------------------------------------ resume
    def _find_resume(self, resume: bool | str | os.PathLike) -> tuple[Path | None, list[tuple[Path, str]]]:
        """The checkpoint to resume from and the corrupt ones skipped on the way. ``True``: the
        newest valid one of the run dir, an error when there is none; ``"auto"``: the same, but a
        run dir without any checkpoint starts afresh; a path: that checkpoint."""
        if resume is False or resume is None:
            return None, []
        if resume == "auto" and not list_checkpoints(self.run.checkpoints):
            log.info("resume=auto: no checkpoint under %s; starting a new run", self.run.checkpoints)
            return None, []
        if resume is True or resume == "auto":
            return self.run.find_resume()
        return Path(resume), []

    def _load(self, path: Path) -> None:
        """Restore params, AdamW moments, data cursor, counters, loss scale and callback state from
        ``path`` (a checkpoint of either backend)."""
        ckpt = self._read_resumable(path)
        meta = ckpt.state_meta
        self.datamodule.load_state_dict(meta["data"])
        step = int(meta["step"])
        moments: dict[str, dict[str, np.ndarray]] = {}
        for key, value in ckpt.state_tensors.items():
            moment, name = split_moment_name(key)
            moments.setdefault(name, {})[moment] = value
        names = self._param_names()
        missing = sorted(set(names) - set(moments)) if step > 0 else []
        if missing:
            raise CheckpointError(f"{path}: state.safetensors has no AdamW moments for {missing[:5]}")
        unknown = sorted(set(moments) - set(names))
        if unknown:
            raise CheckpointError(f"{path}: state.safetensors has moments of unknown parameters {unknown[:5]}")
        self._restore(path, ckpt.params, moments, step, meta.get("grad_scaler"))
        self.step = step
        self.tokens_seen = int(meta.get("tokens_seen", 0))
        self.best_val_loss = meta.get("best_val_loss")
        self.lr_of.load_state_dict(meta.get("schedule", {}).get("state") or {})
        self.last_checkpoint = path
        self.callbacks.load_state_dict(meta.get("callbacks", {}))
        log.info("resumed from %s (step %d of %d, written by the %s backend)", path, step,
                 self.total_steps, meta.get("backend", "?"))

    def _read_resumable(self, path: Path) -> Checkpoint:
        """The checkpoint at ``path`` if this run can continue from it: a canonical task, the same
        model spec, and a training state besides the weights."""
        if not self.task.canonical:
            raise CheckpointError(f"task {self.task.name!r} has no canonical parameters; it cannot resume")
        ckpt = load_checkpoint(path)
        if ckpt.spec != self.config.model:
            diff = ckpt.spec.diff(self.config.model)
            raise CheckpointError(f"{path} was trained with a different model spec (model.{', model.'.join(diff)}); "
                                  "resume with the checkpoint's config")
        if ckpt.state_meta.get("format") != STATE_FORMAT:
            raise CheckpointError(f"{path}: no training state ({STATE_FORMAT} state.json); it holds weights "
                                  "only and cannot be resumed")
        _check_state_meta(path, ckpt.state_meta)
        return ckpt

    # ------------------------------------------------------------------ the trainer API for callbacks
    def request_stop(self, reason: str = "requested", message: str = "") -> None:
        """Stop after the current step (a checkpoint is still written)."""
        if self._stop is None:
            self._stop = (reason, message)
            if message:
                log.info(message)

    def evaluate(self, num_batches: int | None = None) -> dict[str, float]:
        """Mean val loss over ``training.eval_batches`` global batches (all processes), its perplexity;
        fires ``on_eval_end``."""
        started = time.perf_counter()
        val = self._val_loss(num_batches or self.config.training.eval_batches)
        metrics = {"step": self.step, "val_loss": val, "val_ppl": math.exp(val) if val < 700 else math.inf}
        if math.isfinite(val) and (self.best_val_loss is None or val < self.best_val_loss):
            self.best_val_loss = val
        self.lr_of.observe(val)  # training.lr_schedule=plateau listens to every evaluation
        self.last_val = metrics
        self._paused += time.perf_counter() - started
        self.callbacks.call("on_eval_end", self, dict(metrics))
        return {"val_loss": metrics["val_loss"], "val_ppl": metrics["val_ppl"]}

    def save_checkpoint(self, reason: str = "periodic") -> Path | None:
        """Write ``checkpoints/step_<N>`` (process 0) with the canonical training state; never a
        non-finite state (raises ``NonFiniteLossError`` instead). Returns the path."""
        self._check_finite("before saving a checkpoint")
        if not self.task.canonical:
            return None
        started = time.perf_counter()
        path = self.run.checkpoint_path(self.step)
        if self.is_main:
            params = self.impl.to_canonical(self.model)
            save_checkpoint(path, params, self.config.to_dict(), state_tensors=self.moments(),
                            state_meta=self.state_meta(reason), extra_files=self.artifacts, overwrite=True)
            log.info("saved checkpoint %s (%s)", path, reason)
        self._barrier(f"checkpoint-{self.step}")
        self.last_checkpoint = path
        self._paused += time.perf_counter() - started
        self.callbacks.call("on_checkpoint", self, path)
        return path

    def state_meta(self, reason: str) -> dict[str, Any]:
        """The checkpoint's ``state.json`` (keys: ``llm.run.STATE_KEYS``), the same from either backend."""
        t = self.config.training
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "backend": self.backend,
            "step": self.step,
            "micro_step": self.datamodule.step,
            "epoch": self.datamodule.epoch,
            "data": self.datamodule.state_dict(),
            "rng": {"seed": t.seed, "scheme": self.rng_scheme},
            "schedule": {"name": t.lr_schedule.value, "lr": t.lr, "warmup_steps": t.warmup_steps,
                         "total_steps": self.total_steps, "final_lr": t.final_lr,
                         "next_lr": self.lr_of(self.step), "state": self.lr_of.state_dict()},
            "optimizer": {"name": "adamw", "beta1": t.beta1, "beta2": t.beta2, "eps": t.eps,
                          "weight_decay": t.weight_decay, "step": self.step},
            "grad_scaler": self._grad_scaler_state(),
            "tokens_seen": self.tokens_seen,
            "best_val_loss": self.best_val_loss,
            "callbacks": self.callbacks.state_dict(),
            "world_size": self.world_size,
            "reason": reason,
        }

    # ------------------------------------------------------------------ the loop
    def _check_finite(self, when: str, loss: float | None = None) -> None:
        """Raise NonFiniteLossError if any process has seen a nan/inf loss (a host sync)."""
        if not self._nonfinite_seen() and (loss is None or math.isfinite(loss)):
            return
        t, o = self.config.training, self.config.optimization
        if loss is not None and not math.isfinite(loss):
            what = f"the loss is {loss} at step {self.step}"
        else:
            what = f"a nan/inf loss was seen by step {self.step} ({when})"
        last = (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                else "no checkpoint was written")
        hints = [f"a lower training.lr (now {t.lr:g})"]
        if t.grad_clip == 0:
            hints.append("training.grad_clip=1.0")
        if o.dtype is not DType.FLOAT32:
            hints.append("optimization.dtype=float32")
        raise NonFiniteLossError(f"{what}; stopped without saving this state -- {last}. "
                                 f"Try {' or '.join(hints)}")

    def _install_signals(self) -> dict[int, Any]:
        """SIGINT/SIGTERM finish the step and stop; the previous handlers come back for a second one."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            self._interrupted = True
            signal.signal(signum, old[signum])  # a second signal acts at once
            log.warning("%s received: finishing step %d, saving a checkpoint and stopping "
                        "(press Ctrl-C again to abort without saving)", signal.Signals(signum).name,
                        self.step + 1)

        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in old:
            signal.signal(s, handler)
        return old

    def fit(self) -> TrainResult:
        """Train to ``total_steps`` (or an early stop / interrupt); return the result."""
        accum = self.config.training.grad_accum_steps
        old_signals = self._install_signals()
        metrics: dict[str, Any] = {}
        started = time.perf_counter()
        try:
            self.callbacks.call("on_train_start", self)
            if self.is_main:
                self._log_start()
            data = self.datamodule.train_dataloader()
            win_start, win_tokens, self._paused = time.perf_counter(), 0, 0.0
            self._run_tokens = 0  # this process's run, without the resumed-from part
            self._run_steps = 0
            while self.step < self.total_steps and self._stop is None:
                lr = self.lr_of(self.step)
                micro_step = self.datamodule.step
                batches = [next(data) for _ in range(accum)]
                items = sum(self.task.items_per_batch(b) for b in batches) * self.world_size
                win_tokens += items
                self.tokens_seen += items
                self._run_tokens += items
                out = self._optimizer_step(batches, lr, micro_step)
                self.step += 1
                self._run_steps += 1

                metrics = {"step": self.step, "epoch": round(self.datamodule.step / self.datamodule.steps_per_epoch, 4),
                           "lr": lr}
                if self.world_size == 1 and self._interrupted:
                    self.request_stop("interrupted")
                if self.callbacks.needs_metrics(self.step) or self.step == self.total_steps or self._stop:
                    measured = self._measure(out)
                    now = time.perf_counter()
                    measured["tokens_per_s"] = win_tokens / max(1e-9, now - win_start - self._paused)
                    self._paused_total += self._paused
                    win_start, win_tokens, self._paused = now, 0, 0.0
                    metrics.update(measured)
                metrics["tokens"] = self.tokens_seen
                metrics["elapsed_s"] = round(time.perf_counter() - started, 3)
                self.callbacks.call("on_step_end", self, metrics)

            reason = self._stop[0] if self._stop else "completed"
            end = {"step": self.step, "total_steps": self.total_steps, "stop_reason": reason}
            end.update({k: metrics[k] for k in ("loss", "val_loss", "val_ppl") if k in metrics})
            self.callbacks.call("on_train_end", self, end)
        except BaseException as exc:
            for cb in self.callbacks:
                try:
                    cb.on_exception(self, exc)
                except Exception as e:  # never mask the original failure
                    log.debug("callback %s failed in on_exception: %s", type(cb).__name__, e)
            raise
        finally:
            for s, h in old_signals.items():
                signal.signal(s, h)

        elapsed = time.perf_counter() - started
        train_seconds = max(1e-9, elapsed - self._paused_total - self._paused)
        result = TrainResult(
            run_dir=self.run.root if self.run else None, step=self.step, total_steps=self.total_steps,
            stop_reason=reason, train_loss=metrics.get("loss"),
            val_loss=end.get("val_loss", self.last_val.get("val_loss")), best_val_loss=self.best_val_loss,
            tokens_per_s=self._run_tokens / train_seconds if self._run_tokens else None,
            train_seconds=elapsed, tokens_seen=self.tokens_seen,
            baselines=dict(self.baselines), last_checkpoint=self.last_checkpoint)
        if self.is_main:
            write_json_atomic(self.run.summary_path, result.to_dict())
        return result

    def _measure(self, out: Any) -> dict[str, float]:
        """The step's mean loss parts and grad norm (a host sync); stops on an interrupt of any
        process and raises NonFiniteLossError on a nan/inf loss."""
        readout = self._read_step(out)
        result = dict(readout.parts)
        if readout.grad_norm is not None:
            result["grad_norm"] = readout.grad_norm
        if readout.interrupted:
            self.request_stop("interrupted")
        if readout.nonfinite or not all(math.isfinite(v) for v in readout.parts.values()):
            self._check_finite("in the logged loss", result.get("loss", math.nan))
        return result

    def _log_start(self) -> None:
        c, dm = self.config, self.datamodule
        log.info("task %s on %s: %s parameters, %d steps (%d micro-batches/epoch, global batch %d x "
                 "accum %d), run dir %s", self.task.name, self._placement(), f"{self._num_parameters():,}",
                 self.total_steps, dm.steps_per_epoch, c.training.batch_size, c.training.grad_accum_steps,
                 self.run.root)
        meta = getattr(dm, "meta", None) or {}
        if "tokens" in meta:
            log.info("data: %s -> %s tokens (%d files, %.1f MB, %s tokenizer, vocab %d)", meta.get("source"),
                     f"{meta['tokens']:,}", meta.get("files", 0), meta.get("bytes", 0) / 1e6,
                     meta.get("tokenizer"), meta.get("vocab_size", 0))
        if "unigram_entropy" in self.baselines:
            log.info("unigram baseline: entropy of the training tokens = %.4f nats/token",
                     self.baselines["unigram_entropy"])

    # ------------------------------------------------------------------ after training
    def sample(self, **kwargs: Any) -> str | None:
        """A text sample from the model (LM tasks), e.g. ``sample(prompt="def ", temperature=0.8)``."""
        return self.impl.sample(self.model, self.datamodule, **kwargs)

    def close(self) -> None:
        """Tear down what the engine set up; nothing by default (JAX's distributed client lives as
        long as the process)."""

    def __enter__(self: _Engine) -> _Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ what a backend supplies
    def _optimizer_step(self, batches: list[tuple[np.ndarray, np.ndarray]], lr: float, micro_step: int) -> Any:
        """One optimiser step over the ``grad_accum_steps`` micro-batches ``batches`` (this
        process's rows), the first of which is micro-batch ``micro_step`` of the run. Returns the
        device-side outputs for ``_read_step``, without waiting for them: most steps are not read."""
        raise NotImplementedError

    def _read_step(self, out: Any) -> StepReadout:
        """``_optimizer_step``'s outputs on the host, reduced over processes."""
        raise NotImplementedError

    def _val_loss(self, num_batches: int) -> float:
        """Mean val loss over ``num_batches`` global batches, all processes."""
        raise NotImplementedError

    def _nonfinite_seen(self) -> bool:
        """Whether any process has seen a nan/inf loss (the device-side flag; a host sync)."""
        raise NotImplementedError

    def moments(self) -> dict[str, np.ndarray]:
        """The AdamW moments in canonical names and layout (``llm.run.moment_name``), float32 numpy."""
        raise NotImplementedError

    def _param_names(self) -> list[str]:
        """The canonical names of the model's parameters (the keys ``moments`` covers)."""
        raise NotImplementedError

    def _num_parameters(self) -> int:
        raise NotImplementedError

    def _restore(self, path: Path, params: dict[str, np.ndarray], moments: dict[str, dict[str, np.ndarray]], step: int,
                 grad_scaler: dict[str, Any] | None) -> None:
        """Load canonical ``params`` and ``moments`` (``{name: {moment: array}}``, canonical layout)
        into the model and optimiser at Adam step ``step``, and the float16 loss scale if saved."""
        raise NotImplementedError

    def _grad_scaler_state(self) -> dict[str, Any] | None:
        """``{"scale", "growth_tracker"}`` of the float16 loss scale, None without one."""
        raise NotImplementedError

    def _barrier(self, name: str) -> None:
        """Wait for every process (a no-op on one)."""
        raise NotImplementedError

    def _broadcast(self, text: str | None) -> str | None:
        """Process 0's ``text`` on every process."""
        raise NotImplementedError

    def _placement(self) -> str:
        """Where the run trains, for the start log line (e.g. ``cpu``, ``gpu x 8 devices``)."""
        raise NotImplementedError
