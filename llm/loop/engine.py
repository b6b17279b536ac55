"""What both training engines share: setup, the loop, evaluation, checkpoints, resume, signals.

``backends.torch.engine.TrainingEngine`` and ``backends.flax.engine.TrainingEngine`` subclass
``BaseTrainingEngine``, so the trainer surface that callbacks, ``llm.train`` and the tests rely on
(``fit``, ``evaluate``, ``save_checkpoint``, ``state_meta``, ``request_stop``, ``sample``, the
counters) is one piece of code, and both write the same ``state.json`` and resume the same way.

The loop owns what happens when; ``fit()`` reads top to bottom. Each optimiser step:

    1. the train step                ``_train_step``; the loss is read (a host sync) only on steps
                                     that need it: evaluation, the last step, a stop, a callback's
                                     ``needs_metrics(step)``
    2. evaluation                    every ``training.eval_every`` steps and at the last step
    3. a checkpoint                  every ``checkpoint.every_steps`` steps (canonical or named:
                                     the task's ``canonical``), the newest ``checkpoint.keep_last`` kept;
                                     with ``checkpoint.async_save`` the loop waits only for the host
                                     copy (``_CheckpointWriter``)
    4. early stopping                after ``training.early_stopping_patience`` evaluations without
                                     a val-loss improvement (``EarlyStopping``)
    5. the observers                 ``on_step_end`` of the callbacks (``llm.loop.callbacks``), which
                                     see the step's ``val_loss``

and when the loop ends: one more evaluation (unless interrupted or just done), one more checkpoint
(unless just written), ``on_train_end``. Every cadence is ``llm.loop.cadence.every``. Throughput:
the first step of a ``fit()`` (compilation, warm-up) is waited for and timed on its own
(``compile_seconds``); ``items_per_s`` in the result is the steady state after it, without the
time spent in evaluation and checkpoints. Metrics are in the task's units (``TrainingTask.items``,
``loss_unit``, ``perplexity``): a logged row has ``<items>_per_s`` and the running ``<items>`` count
(``tokens_per_s`` / ``tokens`` for an LM, ``rows_per_s`` / ``rows`` for regression), and
``val_ppl`` only when the task's loss has a perplexity.

A backend supplies only what differs between frameworks:

    _optimizer_step(batches, lr, micro_step) -> out      one optimiser step on the device, no host sync
    _wait_for_step(out)                                  block until that step's device work is done
    _read_step(out) -> StepReadout                       the host sync of a logged step (all processes)
    _val_loss(num_batches) -> float                      mean val loss over all processes
    _nonfinite_seen() -> bool                            the device-side nan/inf flag of any process
    moments(), _param_names(), _num_parameters()         AdamW moments (the checkpoint's names), parameter names
    _restore(path, params, moments, step, grad_scaler)   a checkpoint's numbers into the device state
    _sharded_checkpoints, _canonical_shapes(),           sharded state: each process writes its files of the
    _checkpoint_shards(plan)                             plan and a resume reads slices (``TensorSlices``)
    _grad_scaler_state() -> dict | None                  the float16 loss scale for ``state.json``
    _on_gpu() -> bool                                    whether ``checkpoint.async_save`` null means on
    _barrier(name), _broadcast(text), _placement()       processes and devices
    _device_memory(), _device_count()                    bytes of one device (None: unknown), mesh size

A subclass's ``__init__`` tells the setup order: ``BaseTrainingEngine.__init__`` (task, callbacks,
counters), its devices, ``_setup_data``, its model, ``_setup_weight_decay`` and its optimiser, then
``_open_run`` (run directory and resume, which needs the optimiser state to fill).

This module never imports torch or jax.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, TypeVar

import numpy as np

from llm.checkpoint import (
    MAX_SHARD_BYTES,
    Checkpoint,
    CheckpointError,
    ShardFile,
    TensorSlices,
    begin_checkpoint,
    commit,
    list_checkpoints,
    load_checkpoint,
    plan_shards,
    save_checkpoint,
    wait_for_shards,
    write_shard,
)
from llm.config import Config, DType
from llm.loop.cadence import every
from llm.loop.callbacks import DEFAULT_CALLBACKS, Callback, CallbackList, build_callbacks
from llm.loop.tasks import TaskError, TrainingTask, get_task
from llm.memory import estimate
from llm.run import (
    MOMENTS,
    STATE_FORMAT,
    DeviceOutOfMemoryError,
    NonFiniteLossError,
    RunDir,
    TrainResult,
    moment_name,
    split_moment_name,
    write_json_atomic,
)
from llm.schedule import schedule_for
from llm.spec import SpecError, check_names

__all__ = ["ADAMW", "EXPERT_LOAD", "STATE_VERSION", "TASK_OPTIMIZER_PREFIX", "BaseTrainingEngine", "EarlyStopping",
           "StepReadout"]

log = logging.getLogger("llm.train")

STATE_VERSION = 1
ADAMW = "adamw"  # state.json optimizer.name of the engine's own AdamW (moments under llm.run.moment_name)
TASK = "task"  # ... of a task's own optimiser (build_optimizer of its backend half)
# state.safetensors prefix of a task optimiser's arrays: never a moment name (llm.run.MOMENTS)
TASK_OPTIMIZER_PREFIX = "task_optimizer."
_OPTIMIZER_KIND = ("name", "backend", "class", "scheduler")  # what a resume must find unchanged
# The loss part an LM task half adds when ``model.router_bias_update_rate`` > 0: the micro-batch's
# (MoE layers, E) tokens per expert. The engines take it out of the logged parts, sum it over the
# micro-batches and the data-parallel ranks (the global batch) and, after the optimiser step, move
# each MoE layer's selection bias by the backend's ``balanced_selection_bias`` (DeepSeek-V3's
# aux-loss-free balancing): no gradient, no second forward.
EXPERT_LOAD = "expert_load"


def _describe_optimizer(meta: dict[str, Any]) -> str:
    if meta.get("name") == ADAMW:
        return "the engine's AdamW"
    scheduler = f" with the scheduler {meta['scheduler']}" if meta.get("scheduler") else ""
    return f"the {meta.get('backend')} task optimiser {meta.get('class')}{scheduler}"

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
    lr: float | None = None  # the step's rate when only the device knows it (a task's optax schedule)


class _CheckpointWriter:
    """The checkpoint write running in a background thread (``checkpoint.async_save``): at most one.

    ``start`` waits for the previous write, then runs ``job`` (write, hash, rename, prune) in a
    thread; ``wait`` blocks until it is done and raises its failure as a one-line ``CheckpointError``
    (never swallowed). The thread is not a daemon: a normal exit, even by an exception, lets the
    write finish; a kill leaves its ``.step_N.tmp-*`` directory, which ``recover_interrupted_writes``
    removes, and the previous checkpoint valid.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._path: Path | None = None
        self._error: BaseException | None = None

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, path: Path, job: Callable[[], None]) -> None:
        self.wait()

        def run() -> None:
            try:
                job()
            except BaseException as e:  # re-raised by wait() in the loop's thread
                self._error = e

        self._path = path
        self._thread = threading.Thread(target=run, name=f"checkpoint-write-{path.name}")
        self._thread.start()

    def wait(self) -> None:
        """Block until the write in flight (if any) has finished; raise its failure."""
        if self._thread is None:
            return
        self._thread.join()
        self._thread = None
        error, self._error = self._error, None
        if isinstance(error, CheckpointError):
            raise CheckpointError(" ".join(str(error).split())) from None
        if error is not None:
            raise CheckpointError(f"the background write of checkpoint {self._path} failed: "
                                  f"{type(error).__name__}: {' '.join(str(error).split())}") from None

    def wait_quietly(self) -> None:
        """``wait`` for a path that is already failing: the write's own failure is logged, not raised."""
        try:
            self.wait()
        except CheckpointError as e:
            log.error("%s", e)


def _owned(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``arrays`` that no device buffer or framework tensor shares memory with: a background write
    must not see the next step's updates (a view is copied; an array that owns its data is kept)."""
    return {k: v if isinstance(v, np.ndarray) and v.flags.owndata else np.array(v, copy=True)
            for k, v in arrays.items()}


class EarlyStopping:
    """Patience on the val loss: ``exhausted`` once ``patience`` evaluations in a row have not
    improved on the best by more than ``min_delta``. Its state is part of the checkpoint
    (``state.json``'s ``callbacks.early_stopping``), so a resumed run counts on."""

    state_key: ClassVar[str] = "early_stopping"

    def __init__(self, patience: int, min_delta: float = 0.0):
        if patience < 1:
            raise ValueError(f"early stopping patience={patience} must be >= 1")
        self.patience = patience
        self.min_delta = min_delta
        self.best = math.inf
        self.bad_evals = 0

    @classmethod
    def from_config(cls, config: Config) -> EarlyStopping | None:
        """The config's early stopping, None when ``training.early_stopping_patience`` is 0."""
        t = config.training
        return cls(t.early_stopping_patience, t.early_stopping_min_delta) if t.early_stopping_patience else None

    def update(self, val_loss: float) -> None:
        """Count one evaluation."""
        if val_loss < self.best - self.min_delta:
            self.best, self.bad_evals = val_loss, 0
        else:
            self.bad_evals += 1

    @property
    def exhausted(self) -> bool:
        return self.bad_evals >= self.patience

    def message(self) -> str:
        return (f"early stopping: val loss has not improved on {self.best:.4f} for {self.bad_evals} "
                "evaluations")

    def state_dict(self) -> dict[str, Any]:
        return {"best": None if math.isinf(self.best) else self.best, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = math.inf if state.get("best") is None else float(state["best"])
        self.bad_evals = int(state.get("bad_evals", 0))


class _Throughput:
    """Items per second within one ``fit()``, on ``clock``, without the ``paused()`` seconds
    (evaluation, checkpoints: a running total).

    The first step is timed on its own (``compile_seconds``: compilation and warm-up) and left out
    of ``rate()``, the run's steady state. ``window_rate()`` covers the steps since the previous
    call (a logged row); a row of the first step alone gets that step's rate.
    """

    def __init__(self, clock: Callable[[], float], paused: Callable[[], float]):
        self.clock, self.paused = clock, paused
        self.started = clock()
        self.compile_seconds: float | None = None
        self.items = 0  # steady-state items: after the first step
        self._steady = (clock(), paused())  # (time, paused seconds) when the steady state began
        self._window = (clock(), paused(), 0)  # (start, paused seconds then, items since)
        self._first_window = False  # the window holds the first step only

    def first_step(self, started: float, paused_before: float, items: int) -> None:
        now = self.clock()
        self.compile_seconds = now - started
        self._steady = (now, self.paused())
        self._window, self._first_window = (started, paused_before, items), True

    def add(self, items: int) -> None:
        if self._first_window:  # the first step was not logged: the next window starts after it
            self._window, self._first_window = (*self._steady, 0), False
        start, paused, n = self._window
        self._window = (start, paused, n + items)
        self.items += items

    def window_rate(self) -> float:
        start, paused, n = self._window
        now, paused_now = self.clock(), self.paused()
        self._window, self._first_window = (now, paused_now, 0), False
        return n / max(1e-9, now - start - (paused_now - paused))

    def rate(self) -> float | None:
        if not self.items:
            return None
        start, paused = self._steady
        return self.items / max(1e-9, self.clock() - start - (self.paused() - paused))


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
        callbacks: extra ``Callback`` instances (observers), called after the built-ins.
        callback_names: registered callbacks built from the config (default: the built-in writers
            that the config enables). Evaluation, checkpoints and early stopping are the loop's and
            follow the config whatever the callbacks are.
        datamodule: a DataModule to use instead of the task's (not yet set up).
    """

    backend: ClassVar[str]  # "torch" | "jax": picks the task half and is written to state.json
    rng_scheme: ClassVar[str]  # how dropout randomness derives from the seed (state.json's rng.scheme)
    model: Any  # the framework's module holding the current parameters
    clock: ClassVar[Callable[[], float]] = staticmethod(time.perf_counter)  # seconds, for throughput
    max_shard_bytes: ClassVar[int] = MAX_SHARD_BYTES  # a checkpoint file's tensor bytes at most (llm.checkpoint)
    shard_writers_timeout_s: ClassVar[float] = 3600.0  # how long process 0 waits for the other writers' files

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
        self.data_shards = world_size  # processes reading distinct batches (a tensor-parallel group shares one)
        self.is_main = rank == 0
        # callbacks first: a config they reject (e.g. tensorboard not installed) fails before any work
        self.callbacks = CallbackList(build_callbacks(config, callback_names) + list(callbacks or []),
                                      is_main=self.is_main)
        self.early_stopping = EarlyStopping.from_config(config)

        # ---- counters (restored by resume)
        self.step = 0  # optimiser steps done
        self.tokens_seen = 0
        self.best_val_loss: float | None = None
        self.last_val: dict[str, float] = {}
        self.last_checkpoint: Path | None = None  # the newest checkpoint written (committed)
        self._checkpoints = _CheckpointWriter()
        self._stop: tuple[str, str] | None = None
        self._interrupted = False
        self._paused_seconds = 0.0  # in evaluation and checkpoints (not training time), running total
        self.compile_seconds: float | None = None  # the first step of the last fit(), waited for

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
        self._check_memory()

    def _check_memory(self) -> None:
        """``llm.memory``'s per-device estimate of a canonical model (for the start log line); a run
        it says exceeds the device's memory (``_device_memory``, when known) is refused before the
        model is allocated."""
        self.memory_estimate = estimate(self.config, self._device_count(), self.backend) if self.task.canonical else None
        limit = self._device_memory()
        if self.memory_estimate is not None and limit is not None and self.memory_estimate.total > limit:
            raise DeviceOutOfMemoryError(self.memory_estimate.refusal(limit))

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
        lazy = self._sharded_checkpoints
        ckpt = self._read_resumable(path, lazy=lazy)
        meta = ckpt.state_meta
        self.datamodule.load_state_dict(meta["data"])
        step = int(meta["step"])
        saved_optimizer = self._check_optimizer(path, meta.get("optimizer"))
        tensors = dict(ckpt.state_tensors)
        own = {key[len(TASK_OPTIMIZER_PREFIX):]: tensors.pop(key) for key in list(tensors)
               if key.startswith(TASK_OPTIMIZER_PREFIX)}
        own = {key: value.read() if isinstance(value, TensorSlices) else value for key, value in own.items()}
        moments: dict[str, dict[str, np.ndarray]] = {}
        for key, value in tensors.items():
            moment, name = split_moment_name(key)
            moments.setdefault(name, {})[moment] = value
        names = self._param_names()
        missing = sorted(set(names) - set(moments)) if step > 0 and saved_optimizer["name"] == ADAMW else []
        if missing:
            raise CheckpointError(f"{path}: state.safetensors has no AdamW moments for {missing[:5]}")
        unknown = sorted(set(moments) - set(names))
        if unknown:
            raise CheckpointError(f"{path}: state.safetensors has moments of unknown parameters {unknown[:5]}")
        if lazy:  # whole arrays are checked by the backend's converters; slices only here
            misshaped = sorted(f"{moment}.{name}" for name, held in moments.items() for moment, value in held.items()
                               if tuple(value.shape) != tuple(ckpt.params[name].shape))
            if misshaped:
                raise CheckpointError(f"{path}: state.safetensors moments shaped unlike their parameters: "
                                      f"{misshaped[:5]}")
        self._restore(path, ckpt.params, moments, step, meta.get("grad_scaler"))
        if saved_optimizer["name"] != ADAMW:
            self._restore_task_optimizer(path, own, saved_optimizer)
        self.step = step
        self.tokens_seen = int(meta.get("tokens_seen", 0))
        self.best_val_loss = meta.get("best_val_loss")
        self.lr_of.load_state_dict(meta.get("schedule", {}).get("state") or {})
        self.last_checkpoint = path
        saved = meta.get("callbacks", {})
        if self.early_stopping is not None and EarlyStopping.state_key in saved:
            self.early_stopping.load_state_dict(saved[EarlyStopping.state_key])
        self.callbacks.load_state_dict(saved)
        log.info("resumed from %s (step %d of %d, written by the %s backend)", path, step,
                 self.total_steps, meta.get("backend", "?"))

    @property
    def _checkpoint_kind(self) -> str:
        """``llm.checkpoint``'s kind for this task: canonical for a ModelSpec decoder, else named."""
        return "canonical" if self.task.canonical else "named"

    def _read_resumable(self, path: Path, *, lazy: bool = False) -> Checkpoint:
        """The checkpoint at ``path`` if this run can continue from it: the task's kind of checkpoint,
        the same model spec (canonical) or the same parameter names and shapes (named), and a
        training state besides the weights. ``lazy``: its tensors as ``TensorSlices`` (none read)."""
        ckpt = load_checkpoint(path, allow_named=True, lazy=lazy)
        if ckpt.kind != self._checkpoint_kind:
            raise CheckpointError(f"{path} is a {ckpt.kind} checkpoint (task {ckpt.config.get('task', '?')!r}); "
                                  f"task {self.task.name!r} resumes only from {self._checkpoint_kind} ones")
        if ckpt.spec is not None and ckpt.spec != self.config.model:
            diff = ckpt.spec.diff(self.config.model)
            raise CheckpointError(f"{path} was trained with a different model spec (model.{', model.'.join(diff)}); "
                                  "resume with the checkpoint's config")
        if ckpt.state_meta.get("format") != STATE_FORMAT:
            raise CheckpointError(f"{path}: no training state ({STATE_FORMAT} state.json); it holds weights "
                                  "only and cannot be resumed")
        _check_state_meta(path, ckpt.state_meta)
        if ckpt.spec is None:
            self._check_named_params(path, ckpt)
        return ckpt

    def _check_named_params(self, path: Path, ckpt: Checkpoint) -> None:
        """A named checkpoint holds the task half's own parameter names (torch ``state_dict`` keys,
        flax NNX paths), so it resumes only on a model with the same names and shapes: a resume on
        the other backend is refused here, before anything is loaded."""
        expected = {name: value.shape for name, value in self.impl.to_canonical(self.model).items()}
        try:
            check_names(expected, ckpt.params, where=f"{path}: the named parameters")
        except SpecError as e:
            writer = ckpt.state_meta.get("backend", "?")
            raise CheckpointError(f"{e}; it was written by the {writer} backend and this {self.backend} model of "
                                  f"task {self.task.name!r} names its parameters differently: resume a named "
                                  "checkpoint on the backend and task that wrote it") from None

    # ------------------------------------------------------------------ the optimiser in checkpoints
    def _check_optimizer(self, path: Path, saved: dict[str, Any] | None) -> dict[str, Any]:
        """The checkpoint's ``state.json`` ``optimizer`` (none saved: the engine's AdamW) if it is this
        run's kind of optimiser, else a ``CheckpointError``."""
        saved = saved if isinstance(saved, dict) else {"name": ADAMW}
        ours = self._optimizer_meta()
        if any(saved.get(k) != ours.get(k) for k in _OPTIMIZER_KIND):
            raise CheckpointError(f"{path} was trained with {_describe_optimizer(saved)}, this run uses "
                                  f"{_describe_optimizer(ours)}; resume with the task (and backend) that "
                                  "wrote it: only the engine's AdamW resumes across backends")
        return saved

    def _optimizer_meta(self) -> dict[str, Any]:
        """``state.json``'s ``optimizer``: the engine's AdamW and its hyperparameters. A backend whose
        task brings its own optimiser returns ``{"name": "task", "backend", "class", "scheduler", ...}``."""
        t = self.config.training
        return {"name": ADAMW, "beta1": t.beta1, "beta2": t.beta2, "eps": t.eps,
                "weight_decay": t.weight_decay, "step": self.step}

    def _optimizer_tensors(self) -> dict[str, np.ndarray]:
        """``state.safetensors``: the AdamW moments; a task optimiser's arrays under
        ``TASK_OPTIMIZER_PREFIX`` instead."""
        return self.moments()

    def _restore_task_optimizer(self, path: Path, tensors: dict[str, np.ndarray],
                                saved: dict[str, Any]) -> None:
        """A task optimiser's state back from ``tensors`` (prefix removed) and ``saved`` (its
        ``state.json`` ``optimizer``, already checked to be this run's kind)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the trainer API for callbacks
    def request_stop(self, reason: str = "requested", message: str = "") -> None:
        """Stop after the current step (a checkpoint is still written)."""
        if self._stop is None:
            self._stop = (reason, message)
            if message:
                log.info(message)

    def evaluate(self, num_batches: int | None = None) -> dict[str, float]:
        """Mean val loss over ``training.eval_batches`` global batches (all processes), its perplexity
        when the task has one (``TrainingTask.perplexity``); counts for the best val loss and early
        stopping; fires ``on_eval_end``."""
        started = self.clock()
        self.callbacks.call("on_validation_start", self)
        val = self._val_loss(num_batches or self.config.training.eval_batches)
        metrics = {"step": self.step, "val_loss": val}
        if self.task.perplexity:
            metrics["val_ppl"] = math.exp(val) if val < 700 else math.inf
        improved = math.isfinite(val) and (self.best_val_loss is None or val < self.best_val_loss)
        if improved:
            self.best_val_loss = val
        self.lr_of.observe(val)  # training.lr_schedule=plateau listens to every evaluation
        if self.early_stopping is not None:
            self.early_stopping.update(val)
        self.last_val = metrics
        self._paused_seconds += self.clock() - started
        self.callbacks.call("on_eval_end", self, dict(metrics))
        if improved and self.config.checkpoint.save_best:
            self.save_checkpoint("best", path=self.run.best_path)
        return {k: v for k, v in metrics.items() if k != "step"}

    def save_checkpoint(self, reason: str = "periodic", *, path: Path | None = None) -> Path | None:
        """Write ``checkpoints/step_<N>`` (or ``path``; process 0) with the training state: a
        canonical checkpoint, or a named one for a task that is not a decoder (``llm.checkpoint``);
        never a non-finite state (raises ``NonFiniteLossError`` instead). Returns the path.

        With ``checkpoint.async_save`` (null: on a GPU) this waits only for the previous write and
        the host copy of the state; the write itself runs in the background (``wait_for_checkpoint``
        blocks until it has landed; ``last_checkpoint`` is set then)."""
        return self._checkpoint(reason, path, prune=False)

    def _save(self, reason: str) -> None:
        """The loop's checkpoint: ``save_checkpoint(reason)``, then, once it is written, only the
        newest ``checkpoint.keep_last`` kept."""
        self._checkpoint(reason, None, prune=True)

    def wait_for_checkpoint(self) -> None:
        """Block until a background checkpoint write has landed; its failure is raised here as a
        one-line ``CheckpointError``. The next save, the end of ``fit`` and ``close`` call it."""
        self._checkpoints.wait()

    @property
    def _async_save(self) -> bool:
        chosen = self.config.checkpoint.async_save
        return self._on_gpu() if chosen is None else chosen

    def _checkpoint(self, reason: str, path: Path | None, *, prune: bool) -> Path:
        self._check_finite("before saving a checkpoint")
        started = self.clock()
        path = self.run.checkpoint_path(self.step) if path is None else path
        self._checkpoints.wait()  # one write at a time, in order (and snapshot buffers free again)
        if self._sharded_checkpoints:
            self._write_shards(path, reason, prune)
        else:
            self._write_whole(path, reason, prune)
        self._barrier(f"checkpoint-{self.step}")
        self._paused_seconds += self.clock() - started
        self.callbacks.call("on_checkpoint", self, path)
        return path

    def _finish_write(self, path: Path, reason: str, prune: bool) -> None:
        """After the rename (process 0): the newest checkpoint, and the older ones pruned."""
        self.last_checkpoint = path
        log.info("saved checkpoint %s (%s)", path, reason)
        if prune and self.run is not None:
            keep_last = self.config.checkpoint.keep_last
            for old in self.run.prune(keep_last):
                log.debug("removed old checkpoint %s (checkpoint.keep_last=%s)", old, keep_last)

    def _write_whole(self, path: Path, reason: str, prune: bool) -> None:
        """Process 0 holds every tensor (``_checkpoint_arrays``) and writes the checkpoint alone."""
        # the device-to-host snapshot: all the loop waits for when the write is asynchronous
        params, state = self._checkpoint_arrays()
        if self.is_main:
            meta = json.loads(json.dumps(self.state_meta(reason)))  # frozen: the loop moves on
            config = self.config.to_dict()

            def write() -> None:
                save_checkpoint(path, params, config, state_tensors=state, state_meta=meta,
                                extra_files=self.artifacts, overwrite=True, kind=self._checkpoint_kind,
                                max_shard_bytes=self.max_shard_bytes)
                self._finish_write(path, reason, prune)

            if self._async_save:
                self._checkpoints.start(path, write)
            else:
                write()
        else:
            self.last_checkpoint = path

    def _write_shards(self, path: Path, reason: str, prune: bool) -> None:
        """Every process writes its files of the plan (``_checkpoint_plan``) into one temporary
        directory; process 0 commits once all are there. The snapshot is ``_checkpoint_shards``
        (a collective: each process keeps only its files' host copies); with ``async_save`` each
        process writes in the background and process 0's writer waits for the others' files
        (``wait_for_shards``) before the commit; synchronously, a barrier does."""
        plan = self._checkpoint_plan()
        tmp = Path(self._broadcast(str(begin_checkpoint(path)) if self.is_main else None))
        mine = tuple(f for f in plan if f.writer == self.rank)
        tensors = self._checkpoint_shards(plan)
        meta = json.loads(json.dumps(self.state_meta(reason))) if self.is_main else None
        config = self.config.to_dict()

        def write_mine() -> None:
            for file in mine:
                write_shard(tmp, file, {n: tensors[n] for n in file.tensors})

        def finish() -> None:
            try:
                commit(tmp, path, plan, config, state_meta=meta, extra_files=self.artifacts, overwrite=True,
                       kind=self._checkpoint_kind)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)  # already gone after the rename
            self._finish_write(path, reason, prune)

        if self._async_save:
            def job() -> None:
                write_mine()
                if self.is_main:
                    wait_for_shards(tmp, plan, timeout_s=self.shard_writers_timeout_s)
                    finish()

            self._checkpoints.start(path, job)
        else:
            write_mine()
            self._barrier(f"checkpoint-shards-{self.step}")
            if self.is_main:
                finish()
        if not self.is_main:
            self.last_checkpoint = path

    def _checkpoint_plan(self) -> tuple[ShardFile, ...]:
        """The files of a sharded checkpoint (``llm.checkpoint.plan_shards`` over this run's
        processes): the parameters and both AdamW moments, float32, from their shapes alone."""
        sizes = {name: 4 * math.prod(shape) for name, shape in self._canonical_shapes().items()}
        # moments of the trained parameters only (untrained state such as a selection bias has none)
        state = {moment_name(moment, name): sizes[name] for moment in MOMENTS for name in self._param_names()}
        return plan_shards(sizes, self.world_size, state_sizes=state, max_shard_bytes=self.max_shard_bytes)

    def _checkpoint_arrays(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The checkpoint's weights and ``state.safetensors`` arrays. Called on every process (a
        sharded model gathers its whole tensors here, a collective); process 0's are written. The
        arrays are the snapshot a background write reads: nothing may change them until that write
        has landed (the next save waits for it before asking for new ones)."""
        if not self.is_main:
            return {}, {}
        return _owned(self.impl.to_canonical(self.model)), _owned(self._optimizer_tensors())

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
            "optimizer": self._optimizer_meta(),
            "grad_scaler": self._grad_scaler_state(),
            "tokens_seen": self.tokens_seen,
            "best_val_loss": self.best_val_loss,
            "callbacks": self._observer_state(),
            "world_size": self.world_size,
            "reason": reason,
        }

    def _observer_state(self) -> dict[str, Any]:
        """``state.json``'s ``callbacks``: each callback's state by name, and early stopping's."""
        state = self.callbacks.state_dict()
        if self.early_stopping is not None:
            state[EarlyStopping.state_key] = self.early_stopping.state_dict()
        return state

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
        """SIGINT/SIGTERM finish the step and stop (the save waits for the write in flight); a second
        one waits only for the checkpoint write in flight and then acts as the previous handler."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        received: list[int] = []

        def handler(signum, frame):
            if received:  # the second: let a background write land, then act at once
                signal.signal(signum, old[signum])
                if self._checkpoints.busy:
                    log.warning("%s received again: waiting for the checkpoint write in flight, then "
                                "stopping without saving", signal.Signals(signum).name)
                self._checkpoints.wait_quietly()
                signal.raise_signal(signum)
                return
            received.append(signum)
            self._interrupted = True
            log.warning("%s received: finishing step %d, saving a checkpoint and stopping "
                        "(press Ctrl-C again to abort without saving)", signal.Signals(signum).name,
                        self.step + 1)

        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in old:
            signal.signal(s, handler)
        return old

    def fit(self) -> TrainResult:
        """Train to ``total_steps`` (or an early stop / interrupt); return the result. The loop is
        the module docstring's, in this order."""
        t = self.config.training
        evaluating = t.eval_every > 0
        eval_due = every(t.eval_every)
        save_due = every(self.config.checkpoint.every_steps)
        items = self.task.items
        old_signals = self._install_signals()
        metrics: dict[str, Any] = {}
        meter = _Throughput(self.clock, lambda: self._paused_seconds)
        saved_at = self.step  # a resumed run starts from a saved step
        try:
            self.callbacks.call("on_train_start", self)
            if self.is_main:
                self._log_start()
            data = self.datamodule.train_dataloader()
            epoch = None
            while self.step < self.total_steps and self._stop is None:
                if epoch != self.datamodule.epoch:
                    epoch = self.datamodule.epoch
                    self.callbacks.call("on_epoch_start", self, epoch)
                self.callbacks.call("on_batch_start", self, self.step + 1)
                out, metrics = self._train_step(data, meter)  # 1. the train step
                last = self.step == self.total_steps
                if last or self._stop or eval_due(self.step) or self.callbacks.needs_metrics(self.step):
                    metrics.update(self._measure(out))
                    metrics[f"{items}_per_s"] = meter.window_rate()
                metrics.update({items: self.tokens_seen, "elapsed_s": round(self.clock() - meter.started, 3)})

                evaluated = evaluating and (eval_due(self.step) or last)
                if evaluated:  # 2. evaluation (counts for early stopping before the checkpoint saves it)
                    metrics.update(self.evaluate())
                if save_due(self.step):  # 3. a checkpoint
                    self._save("periodic")
                    saved_at = self.step
                if evaluated and self.early_stopping is not None and self.early_stopping.exhausted:
                    self.request_stop("early_stop", self.early_stopping.message())  # 4. early stopping
                self.callbacks.call("on_step_end", self, metrics)  # 5. the observers
                if self.datamodule.epoch != epoch:
                    self.callbacks.call("on_epoch_end", self, epoch)

            if epoch is not None and self.datamodule.epoch == epoch:  # stopped inside an epoch
                self.callbacks.call("on_epoch_end", self, epoch)
            items_per_s = meter.rate()  # the loop's steady state, before the end-of-run work
            reason = self._stop[0] if self._stop else "completed"
            end = {"step": self.step, "total_steps": self.total_steps, "stop_reason": reason}
            end.update({k: metrics[k] for k in ("loss", "val_loss", "val_ppl") if k in metrics})
            if evaluating and reason != "interrupted" and self.last_val.get("step") != self.step:
                end.update(self.evaluate(), evaluated_at_end=True)
            if saved_at != self.step:
                self._save({"completed": "final", "interrupted": "interrupt"}.get(reason, reason))
            self.wait_for_checkpoint()
            self.callbacks.call("on_train_end", self, end)
        except BaseException as exc:
            self._checkpoints.wait_quietly()  # the write in flight lands; this failure is the one raised
            for cb in self.callbacks:
                try:
                    cb.on_exception(self, exc)
                except Exception as e:  # never mask the original failure
                    log.debug("callback %s failed in on_exception: %s", type(cb).__name__, e)
            sizes = self._out_of_memory(exc)
            if sizes is not None:
                raise DeviceOutOfMemoryError(self._out_of_memory_message(*sizes)) from None
            raise
        finally:
            for s, h in old_signals.items():
                signal.signal(s, h)

        result = TrainResult(
            run_dir=self.run.root if self.run else None, step=self.step, total_steps=self.total_steps,
            stop_reason=reason, train_loss=metrics.get("loss"),
            val_loss=end.get("val_loss", self.last_val.get("val_loss")), best_val_loss=self.best_val_loss,
            items_per_s=items_per_s, compile_seconds=self.compile_seconds,
            train_seconds=self.clock() - meter.started, items_seen=self.tokens_seen,
            baselines=dict(self.baselines), last_checkpoint=self.last_checkpoint, items=items,
            loss_unit=self.task.loss_unit)
        if self.is_main:
            write_json_atomic(self.run.summary_path, result.to_dict())
        return result

    def _train_step(self, data: Iterator[Any], meter: _Throughput) -> tuple[Any, dict[str, Any]]:
        """One optimiser step on the next ``grad_accum_steps`` micro-batches; its device outputs
        (not read yet) and its metrics so far. The first step of a ``fit()`` is waited for and timed
        on its own."""
        lr, micro_step = self.lr_of(self.step), self.datamodule.step
        batches = [next(data) for _ in range(self.config.training.grad_accum_steps)]
        items = sum(self.task.items_per_batch(b) for b in batches) * self.data_shards
        self.tokens_seen += items
        first = meter.compile_seconds is None
        started, paused = self.clock(), self._paused_seconds
        out = self._optimizer_step(batches, lr, micro_step)
        if first:
            self._wait_for_step(out)
            meter.first_step(started, paused, items)
            self.compile_seconds = meter.compile_seconds
            if self.is_main:
                log.info("first step (compilation and warm-up included) took %.1fs; the run's %s/s "
                         "leaves it out", self.compile_seconds, self.task.items)
        else:
            meter.add(items)
        self.step += 1
        if self.world_size == 1 and self._interrupted:
            self.request_stop("interrupted")
        epoch = round(self.datamodule.step / self.datamodule.steps_per_epoch, 4)
        return out, {"step": self.step, "epoch": epoch, "lr": lr}

    def _out_of_memory_message(self, requested: int | None, available: int | None) -> str:
        """One line: the step, what was asked for and what was left, and the knobs that lower it."""
        t, d, o = self.config.training, self.config.data, self.config.optimization

        def gib(n: int | None) -> str:
            return "an unknown amount" if n is None else f"{n / 2**30:.2f} GiB"

        knobs = [f"training.batch_size={t.batch_size} (lower it; raise training.grad_accum_steps="
                 f"{t.grad_accum_steps} to keep the tokens per step)", f"data.seq_len={d.seq_len}"]
        if o.dtype is DType.FLOAT32:
            knobs.append("optimization.dtype=bfloat16")
        knobs.append("a smaller model")
        return (f"the device ran out of memory at step {self.step + 1} ({self._placement()}): it asked "
                f"for {gib(requested)} with {gib(available)} free. Lower the memory per step: "
                + ", ".join(knobs) + "; the last checkpoint is "
                + (str(self.last_checkpoint) if self.last_checkpoint else "none (nothing was saved)"))

    def _measure(self, out: Any) -> dict[str, float]:
        """The step's mean loss parts and grad norm (a host sync); stops on an interrupt of any
        process and raises NonFiniteLossError on a nan/inf loss."""
        readout = self._read_step(out)
        result = dict(readout.parts)
        if readout.grad_norm is not None:
            result["grad_norm"] = readout.grad_norm
        if readout.lr is not None:
            result["lr"] = readout.lr
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
        if self.memory_estimate is not None:
            log.info("memory estimate: %s", self.memory_estimate.summary())
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
        """Wait for a background checkpoint write (its failure raised); a backend then tears down
        what it set up (JAX's distributed client lives as long as the process)."""
        self.wait_for_checkpoint()

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

    def _out_of_memory(self, exc: BaseException) -> tuple[int | None, int | None] | None:
        """``(requested bytes, free bytes)`` (either None when unknown) when ``exc`` is the
        framework's device out-of-memory error, else None."""
        return None

    def _wait_for_step(self, out: Any) -> None:
        """Block until the device has finished the step that returned ``out`` (the first step of a
        ``fit()`` is timed on its own this way)."""
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
        into the model and optimiser at Adam step ``step``, and the float16 loss scale if saved.
        With ``_sharded_checkpoints`` the values are ``TensorSlices``: read each device's slice only."""
        raise NotImplementedError

    @property
    def _sharded_checkpoints(self) -> bool:
        """Whether the state is split over devices (a sharded mesh, the engine's AdamW): checkpoints
        are then written by every process (``_checkpoint_shards``) and resumed from slices."""
        return False

    def _canonical_shapes(self) -> dict[str, tuple[int, ...]]:
        """Canonical name -> the whole (global) canonical shape of every weight a checkpoint holds
        (the parameters and any untrained state, such as the routers' selection biases)."""
        raise NotImplementedError

    def _checkpoint_shards(self, files: tuple[ShardFile, ...]) -> dict[str, np.ndarray]:
        """Host copies (float32, canonical layout, owned) of the tensors of ``files`` (this process's
        files of the plan: parameters and ``moment_name`` moments). Called on every process, in the
        same order (a sharded tensor is gathered whole by a collective); the arrays are the snapshot
        a background write reads."""
        raise NotImplementedError

    def _grad_scaler_state(self) -> dict[str, Any] | None:
        """``{"scale", "growth_tracker"}`` of the float16 loss scale, None without one."""
        raise NotImplementedError

    def _on_gpu(self) -> bool:
        """Whether the engine trains on a GPU (where ``checkpoint.async_save`` null means on)."""
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

    def _device_memory(self) -> int | None:
        """Bytes of memory of one training device when the backend knows them (a GPU); None (a CPU,
        whose memory the host shares) skips the start-up refusal."""
        return None

    def _device_count(self) -> int:
        """Devices of the mesh (one per process unless the backend drives several)."""
        return self.world_size
