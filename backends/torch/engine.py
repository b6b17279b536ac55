"""The PyTorch training engine: AdamW + warmup/cosine, clipping, accumulation, AMP, compile, DDP.

``TrainingEngine(config).fit()`` trains ``config.task`` and returns a ``llm.run.TrainResult``. The
backend-agnostic pieces it drives are shared with the JAX engine: the task (``llm.tasks``), the
callbacks (``llm.callbacks``), the schedule (``llm.schedule``), the run directory and the canonical
training state (``llm.run``), the checkpoint format (``llm.checkpoint``).

One optimiser step::

    lr = lr_at(step)                                   pure function of the step (exact resume)
    for each of grad_accum_steps micro-batches:        DDP.no_sync() on all but the last
        torch.manual_seed(f(seed, micro_step, rank))    dropout is a function of the position too
        with autocast(dtype): objective, parts = task.loss(model, batch)
        (scaler.scale(objective / accum)).backward()
    unscale (fp16) -> clip_grad_norm_ -> AdamW step -> scaler.update()

Reading the loss is a host sync, so it happens only on steps a callback asks for (``needs_metrics``)
and at the last step; a device-side "saw a non-finite loss" flag is checked then and before every
checkpoint, so a NaN never reaches disk. DDP: launched by ``torchrun`` (``WORLD_SIZE``/``RANK``/
``LOCAL_RANK``), gloo on CPU, NCCL on GPU; each rank reads its slice of the global batch and only
rank 0 writes files. Ctrl-C (SIGINT) or SIGTERM finishes the current step, saves a checkpoint and
returns with ``stop_reason="interrupted"``; a second Ctrl-C aborts at once.

This module never imports jax or flax.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from llm.callbacks import DEFAULT_CALLBACKS, Callback, CallbackList, build_callbacks
from llm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from llm.config import Config, DType
from llm.run import (
    STATE_FORMAT,
    NonFiniteLossError,
    RunDir,
    TrainResult,
    moment_name,
    split_moment_name,
    write_json_atomic,
)
from llm.schedule import schedule_for
from llm.tasks import TaskError, TrainingTask, get_task

__all__ = ["TrainingEngine", "train"]

log = logging.getLogger("llm.train")

BACKEND = "torch"
STATE_VERSION = 1
RNG_SCHEME = "torch.manual_seed(SeedSequence([seed, 0xD409, micro_step, rank]).generate_state(1)[0]) " \
             "before every micro-batch"


def _dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the torchrun environment; (0, 1, 0) without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def _micro_seed(seed: int, micro_step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, 0xD409, micro_step, rank]).generate_state(1)[0])


class TrainingEngine:
    """Trains ``config.task`` (or ``task``) with PyTorch. See the module docstring for one step.

    Args:
        config: the resolved run config (``llm.config.Config``).
        run_dir: where files go (default: ``config.logging.run_dir`` or ``runs/<timestamp>``).
        resume: False; True = continue from the newest valid checkpoint of the run dir (corrupt
            newer ones are reported and skipped; none at all = start fresh with a warning); or the
            path of one checkpoint directory.
        task: a registered task name or a ``TrainingTask`` (default ``config.task``).
        callbacks: extra ``Callback`` instances, added to the built-ins.
        callback_names: registered callbacks built from the config (default: all built-ins that the
            config enables).
        datamodule: a DataModule to use instead of the task's (not yet set up).
        device: a torch device (default: ``cuda:LOCAL_RANK`` when CUDA is available, else CPU).
    """

    def __init__(self, config: Config, *, run_dir: str | os.PathLike | None = None,
                 resume: bool | str | os.PathLike = False, task: str | TrainingTask | None = None,
                 callbacks: list[Callback] | None = None,
                 callback_names: tuple[str, ...] | list[str] = DEFAULT_CALLBACKS,
                 datamodule: Any = None, device: str | torch.device | None = None):
        self.config = config
        self.task = get_task(task if task is not None else config.task)
        self.impl = self.task.backend(BACKEND)
        self.rank, self.world_size, self.local_rank = _dist_env()
        self.is_main = self.rank == 0
        self._owns_process_group = False
        # callbacks first: a config they reject (e.g. tensorboard not installed) fails before any work
        self.callbacks = CallbackList(build_callbacks(config, callback_names, checkpoints=self.task.canonical)
                                      + list(callbacks or []), is_main=self.is_main)
        if device is None:
            device = f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.world_size > 1:
            self._init_process_group()

        t = config.training
        torch.manual_seed(t.seed)
        # ---- data
        self.datamodule = datamodule if datamodule is not None else self.task.build_datamodule(
            config, rank=self.rank, world_size=self.world_size)
        if self.is_main:
            self.datamodule.prepare_data()
        self._barrier()
        if not self.is_main:
            self.datamodule.prepare_data()
        self.datamodule.setup()
        self.task.validate(config, self.datamodule)
        self.baselines = self.task.baselines(self.datamodule)
        self.total_steps = t.total_steps(self.datamodule.steps_per_epoch)
        self.lr_of = schedule_for(t, self.total_steps)

        # ---- model and optimiser
        self.model = self.impl.build_model(config, self.datamodule).to(self.device)  # the raw module
        self.optimizer = self._build_optimizer()
        dtype = config.optimization.dtype
        self.amp_dtype = {DType.BFLOAT16: torch.bfloat16, DType.FLOAT16: torch.float16}.get(dtype)
        self.scaler = torch.amp.GradScaler(self.device.type) if dtype is DType.FLOAT16 else None

        # ---- counters (restored by resume)
        self.step = 0  # optimiser steps done
        self.tokens_seen = 0
        self.best_val_loss: float | None = None
        self.last_val: dict[str, float] = {}
        self.last_checkpoint: Path | None = None
        self._stop: tuple[str, str] | None = None
        self._interrupted = False
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        self._paused = 0.0  # seconds in eval/checkpoints since the last measurement (not training time)
        self._paused_total = 0.0

        # ---- run directory and resume (rank 0 decides, everyone follows)
        self.run = RunDir.from_config(config, run_dir) if self.is_main else None
        root = self._broadcast(str(self.run.root) if self.run else None)
        ckpt_dir = self._broadcast(str(self.run.checkpoints) if self.run else None)
        if self.run is None:
            self.run = RunDir(Path(root), Path(ckpt_dir))
        self.artifacts = self.task.artifacts(self.datamodule)
        if self.is_main:
            self.run.create(config, resume=bool(resume))
            self.run.write_artifacts(self.artifacts)
        resume_from = self._find_resume(resume) if self.is_main else None
        resume_from = self._broadcast(None if resume_from is None else str(resume_from))
        if resume_from is not None:
            self._load(Path(resume_from))

        # ---- wrappers: compile, then DDP
        self.train_model: torch.nn.Module = self.model
        if config.optimization.compile:
            self.train_model = torch.compile(self.model, mode=config.optimization.compile_mode.value)
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.train_model, device_ids=ids)

    # ------------------------------------------------------------------ setup helpers
    def _init_process_group(self) -> None:
        if not dist.is_initialized():
            backend = self.config.distributed.resolve_backend(self.device.type == "cuda")
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group(backend=backend)
            self._owns_process_group = True

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def _broadcast(self, obj: Any) -> Any:
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _build_optimizer(self) -> torch.optim.Optimizer:
        t = self.config.training
        no_decay = self.impl.no_decay_names(self.config, self.model)
        named = list(self.model.named_parameters())
        unknown = no_decay - {n for n, _ in named}
        if unknown:
            raise TaskError(f"task {self.task.name!r}: no-decay names that are not parameters of the "
                            f"model: {sorted(unknown)[:5]}")
        self.decay_names = [n for n, p in named if n not in no_decay and p.requires_grad]
        self.no_decay_names = [n for n, p in named if n in no_decay and p.requires_grad]
        params = dict(named)
        groups = [{"params": [params[n] for n in self.decay_names], "weight_decay": t.weight_decay},
                  {"params": [params[n] for n in self.no_decay_names], "weight_decay": 0.0}]
        fused = self.device.type == "cuda"
        return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, fused=fused)

    # ------------------------------------------------------------------ resume
    def _find_resume(self, resume: bool | str | os.PathLike) -> Path | None:
        if resume is False or resume is None:
            return None
        if resume is True or resume == "auto":
            path = self.run.find_resume()
            if path is None:
                log.warning("--resume: no valid checkpoint under %s; starting from scratch",
                            self.run.checkpoints)
            return path
        return Path(resume)

    def _load(self, path: Path) -> None:
        """Restore params, AdamW moments, data cursor, counters and callback state from ``path``."""
        if not self.task.canonical:
            raise CheckpointError(f"task {self.task.name!r} has no canonical parameters; it cannot resume")
        ckpt = load_checkpoint(path)
        if ckpt.spec != self.config.model:
            diff = [k for k, v in ckpt.spec.to_dict().items() if self.config.model.to_dict()[k] != v]
            raise CheckpointError(f"{path} was trained with a different model spec (model.{', model.'.join(diff)}); "
                                  "resume with the checkpoint's config")
        meta = ckpt.state_meta
        if meta.get("format") != STATE_FORMAT:
            raise CheckpointError(f"{path}: no training state ({STATE_FORMAT} state.json); it holds weights "
                                  "only and cannot be resumed")
        self.impl.load_canonical(self.model, ckpt.params)
        self.datamodule.load_state_dict(meta["data"])
        step = int(meta["step"])
        moments: dict[str, dict[str, np.ndarray]] = {}
        for key, value in ckpt.state_tensors.items():
            moment, name = split_moment_name(key)
            moments.setdefault(name, {})[moment] = value
        params = dict(self.model.named_parameters())
        missing = sorted(set(params) - set(moments)) if step > 0 else []
        if missing:
            raise CheckpointError(f"{path}: state.safetensors has no AdamW moments for {missing[:5]}")
        for name, p in params.items():
            if name not in moments:
                continue
            state = self.optimizer.state[p]
            on_device = self.device.type == "cuda"  # fused AdamW keeps its step count on the device
            state["step"] = torch.tensor(float(step), dtype=torch.float32,
                                         device=p.device if on_device else "cpu")
            for moment in ("exp_avg", "exp_avg_sq"):
                state[moment] = torch.from_numpy(np.array(moments[name][moment])).to(p.device, p.dtype)
        if self.scaler is not None and meta.get("grad_scaler"):
            sd = self.scaler.state_dict()
            sd.update(scale=float(meta["grad_scaler"]["scale"]),
                      _growth_tracker=int(meta["grad_scaler"]["growth_tracker"]))
            self.scaler.load_state_dict(sd)
        self.step = step
        self.tokens_seen = int(meta.get("tokens_seen", 0))
        self.best_val_loss = meta.get("best_val_loss")
        self.last_checkpoint = path
        self.callbacks.load_state_dict(meta.get("callbacks", {}))
        log.info("resumed from %s (step %d of %d, written by the %s backend)", path, step,
                 self.total_steps, meta.get("backend", "?"))

    # ------------------------------------------------------------------ the trainer API for callbacks
    def request_stop(self, reason: str = "requested", message: str = "") -> None:
        """Stop after the current step (a checkpoint is still written)."""
        if self._stop is None:
            self._stop = (reason, message)
            if message:
                log.info(message)

    @torch.no_grad()
    def evaluate(self, num_batches: int | None = None) -> dict[str, float]:
        """Mean val loss over ``training.eval_batches`` batches (all ranks), its perplexity; fires
        ``on_eval_end``."""
        started = time.perf_counter()
        n = num_batches or self.config.training.eval_batches
        self.model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        for inputs, targets in self.datamodule.val_dataloader(n):
            with self._autocast():
                _, parts = self.impl.loss(self.model, self._to_device((inputs, targets)))
            total += parts["loss"].double()
            count += 1
        self.model.train()
        stats = torch.stack([total, torch.tensor(float(count), dtype=torch.float64, device=self.device)])
        if self.world_size > 1:
            dist.all_reduce(stats)
        val = float(stats[0] / stats[1].clamp(min=1))
        metrics = {"step": self.step, "val_loss": val, "val_ppl": math.exp(val) if val < 700 else math.inf}
        if math.isfinite(val) and (self.best_val_loss is None or val < self.best_val_loss):
            self.best_val_loss = val
        self.last_val = metrics
        self._paused += time.perf_counter() - started
        self.callbacks.call("on_eval_end", self, dict(metrics))
        return {"val_loss": metrics["val_loss"], "val_ppl": metrics["val_ppl"]}

    def save_checkpoint(self, reason: str = "periodic") -> Path | None:
        """Write ``checkpoints/step_<N>`` (rank 0) with the canonical training state; never a
        non-finite state (raises ``NonFiniteLossError`` instead). Returns the path."""
        self._check_finite("before saving a checkpoint")
        if not self.task.canonical:
            return None
        started = time.perf_counter()
        path = self.run.checkpoint_path(self.step)
        if self.is_main:
            params = self.impl.to_canonical(self.model)
            save_checkpoint(path, params, self.config.to_dict(), state_tensors=self._moments(),
                            state_meta=self.state_meta(reason), extra_files=self.artifacts, overwrite=True)
            log.info("saved checkpoint %s (%s)", path, reason)
        self._barrier()
        self.last_checkpoint = path
        self._paused += time.perf_counter() - started
        self.callbacks.call("on_checkpoint", self, path)
        return path

    def _moments(self) -> dict[str, np.ndarray]:
        out = {}
        for name, p in self.model.named_parameters():
            state = self.optimizer.state.get(p, {})
            for moment in ("exp_avg", "exp_avg_sq"):
                value = state.get(moment)
                out[moment_name(moment, name)] = (np.zeros(tuple(p.shape), np.float32) if value is None
                                                  else value.detach().to("cpu", torch.float32).numpy())
        return out

    def state_meta(self, reason: str) -> dict[str, Any]:
        """The checkpoint's ``state.json`` (keys: ``llm.run.STATE_KEYS``)."""
        t = self.config.training
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "backend": BACKEND,
            "step": self.step,
            "micro_step": self.datamodule.step,
            "epoch": self.datamodule.epoch,
            "data": self.datamodule.state_dict(),
            "rng": {"seed": t.seed, "scheme": RNG_SCHEME},
            "schedule": {"name": t.lr_schedule.value, "lr": t.lr, "warmup_steps": t.warmup_steps,
                         "total_steps": self.total_steps, "final_lr": t.final_lr,
                         "next_lr": self.lr_of(self.step)},
            "optimizer": {"name": "adamw", "beta1": t.beta1, "beta2": t.beta2, "eps": t.eps,
                          "weight_decay": t.weight_decay, "step": self.step},
            "grad_scaler": (None if self.scaler is None else
                            {"scale": float(self.scaler.get_scale()),
                             "growth_tracker": int(self.scaler.state_dict().get("_growth_tracker", 0))}),
            "tokens_seen": self.tokens_seen,
            "best_val_loss": self.best_val_loss,
            "callbacks": self.callbacks.state_dict(),
            "world_size": self.world_size,
            "reason": reason,
        }

    # ------------------------------------------------------------------ the loop
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _to_device(self, batch: tuple[np.ndarray, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        nb = self.device.type == "cuda"
        return tuple(torch.from_numpy(np.ascontiguousarray(a)).to(self.device, non_blocking=nb)
                     for a in batch)  # type: ignore[return-value]

    def _check_finite(self, when: str, loss: float | None = None) -> None:
        """Raise NonFiniteLossError if any rank has seen a nan/inf loss (a host sync; DDP: collective)."""
        flag = self._nonfinite.to(torch.float32)
        if self.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not bool(flag > 0) and (loss is None or math.isfinite(loss)):
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
        t = self.config.training
        accum = t.grad_accum_steps
        params = [p for p in self.model.parameters() if p.requires_grad]
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
            sums: dict[str, torch.Tensor] = {}
            while self.step < self.total_steps and self._stop is None:
                lr = self.lr_of(self.step)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                sums.clear()
                for micro in range(accum):
                    torch.manual_seed(_micro_seed(t.seed, self.datamodule.step, self.rank))
                    batch = next(data)
                    items = self.task.items_per_batch(batch) * self.world_size
                    win_tokens += items
                    self.tokens_seen += items
                    self._run_tokens += items
                    last = micro == accum - 1
                    no_sync = (self.train_model.no_sync() if self.world_size > 1 and not last
                               else contextlib.nullcontext())
                    with no_sync:
                        with self._autocast():
                            objective, parts = self.impl.loss(self.train_model, self._to_device(batch))
                        objective = objective / accum
                        (self.scaler.scale(objective) if self.scaler else objective).backward()
                    for k, v in parts.items():
                        v = v.detach().float()
                        sums[k] = sums[k] + v if k in sums else v
                if self.scaler is not None:
                    self.scaler.unscale_(self.optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip) if t.grad_clip > 0 else None
                if self.scaler is not None:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                self._nonfinite |= ~torch.isfinite(sums["loss"])

                metrics = {"step": self.step, "epoch": round(self.datamodule.step / self.datamodule.steps_per_epoch, 4),
                           "lr": lr}
                if self.world_size == 1 and self._interrupted:
                    self.request_stop("interrupted")
                if self.callbacks.needs_metrics(self.step) or self.step == self.total_steps or self._stop:
                    measured = self._measure(sums, accum, grad_norm)
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

    def _measure(self, sums: dict[str, torch.Tensor], accum: int, grad_norm: torch.Tensor | None
                 ) -> dict[str, float]:
        """The host sync: the step's mean loss parts (averaged over ranks), the grad norm, and (DDP)
        whether any rank was interrupted. Raises NonFiniteLossError on a nan/inf loss."""
        keys = sorted(sums)
        vec = [sums[k] / accum for k in keys]  # mean over micro-batches
        norm = grad_norm.detach().float() if grad_norm is not None else torch.zeros((), device=self.device)
        flags = [self._nonfinite.float(), torch.tensor(float(self._interrupted), device=self.device)]
        stacked = torch.stack([*vec, norm, *flags])
        if self.world_size > 1:
            dist.all_reduce(stacked)
            stacked[: len(keys) + 1] /= self.world_size  # means; the flags stay sums (> 0 = any rank)
        values = stacked.tolist()
        out = dict(zip(keys, values[: len(keys)], strict=True))
        if grad_norm is not None:
            out["grad_norm"] = values[len(keys)]
        nonfinite, interrupted = values[-2:]
        if interrupted > 0:
            self.request_stop("interrupted")
        if nonfinite > 0 or not all(math.isfinite(out[k]) for k in keys):
            self._nonfinite.fill_(True)
            self._check_finite("in the logged loss", out.get("loss"))
        return out

    def _log_start(self) -> None:
        c, dm = self.config, self.datamodule
        n = sum(p.numel() for p in self.model.parameters())
        log.info("task %s on %s%s: %s parameters, %d steps (%d micro-batches/epoch, global batch %d x "
                 "accum %d), run dir %s", self.task.name, self.device,
                 f" x {self.world_size} ranks" if self.world_size > 1 else "", f"{n:,}", self.total_steps,
                 dm.steps_per_epoch, c.training.batch_size, c.training.grad_accum_steps, self.run.root)
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
        """Tear down the process group this engine created (DDP)."""
        if self._owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_process_group = False

    def __enter__(self) -> TrainingEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def train(config: Config, **kwargs: Any) -> TrainResult:
    """``TrainingEngine(config, **kwargs).fit()``, closing the engine afterwards."""
    with TrainingEngine(config, **kwargs) as engine:
        return engine.fit()
