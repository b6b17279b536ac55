"""The JAX training engine: Flax NNX model, torch-exact AdamW (optax), jit, one data-parallel Mesh.

``TrainingEngine(config).fit()`` trains ``config.task`` and returns a ``llm.run.TrainResult``, like
``backends.torch.engine.TrainingEngine`` and with the same surface (``fit``, ``evaluate``,
``save_checkpoint``, ``sample``, ``request_stop``, the trainer attributes callbacks read). Both
engines drive the same backend-agnostic pieces -- task, DataModule, callbacks, ``llm.schedule``,
``llm.run`` (run directory, canonical training state) and ``llm.checkpoint`` -- and write the same
checkpoint, so a run started on one backend resumes on the other (moments, step, schedule position,
data cursor, loss scale and callback state all carry over).

One optimiser step is one call of a jitted function (params, optimiser state and the device-side
flags donated, so XLA updates them in place)::

    lr = lr_at(step)                                     host float, passed in (no recompile)
    scan over the grad_accum_steps micro-batches:        stacked (accum, B, ...) on the host
        dropout keys = fold_in(fold_in(key(seed'), micro_step), stream)     pure function of the position
        grads += grad(objective / accum  [* loss scale])
    [float16: unscale, skip the update on inf/nan, update the scale]        torch.amp.GradScaler
    torch clip_grad_norm_ -> torch AdamW                 backends/flax/optim.py

The math is torch's operation by operation (see ``backends/flax/optim.py``): decoupled decay
``p *= 1 - lr*wd`` before the Adam step, on the names ``spec.param_table()`` marks; bias-corrected
moments with ``eps`` outside ``sqrt(v)/sqrt(1-b2^t)``; clipping by ``max_norm / (norm + 1e-6)``
clamped to 1; accumulation as the sum of the gradients of ``objective / accum``.

Precision: ``optimization.dtype`` is the flax modules' compute dtype; parameters (the master
weights) and moments stay float32. ``bfloat16`` needs nothing else; ``float16`` adds torch's dynamic
loss scale. ``optimization.compile`` means nothing here: XLA always compiles the step (a log line
says so when it is set).

Data parallel: one ``jax.sharding.Mesh`` over all devices with the axis ``data``; batches are
sharded on it (the global batch ``training.batch_size`` must divide by the device count),
parameters and optimiser state are replicated, and XLA inserts the gradient all-reduce. With
several processes (``jax.distributed.initialize()`` is called when ``JAX_COORDINATOR_ADDRESS`` is
set; ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` or the cluster's own variables give the rest) each
process reads its rows of the global batch (``rank = jax.process_index()``) and
``jax.make_array_from_process_local_data`` assembles the global array; only process 0 writes files.
Dropout masks are drawn for the global batch from one key, so they do not depend on the number of
devices either: 1 and N devices see the same losses up to float reassociation.

Host syncs: the loss is read only on steps a callback asks for (``needs_metrics``) and at the last
step; a device-side non-finite flag is read then and before every checkpoint, so a NaN never
reaches disk. The first step of ``fit()`` is waited for once: it includes XLA's compilation, which
is logged and left out of the run's ``tokens_per_s`` (``compile_seconds``). Ctrl-C / SIGTERM
finishes the step, saves and returns ``stop_reason="interrupted"``.

Verified beyond the test suite: two processes of one CPU device each (``JAX_COORDINATOR_ADDRESS`` on
localhost, gloo collectives) train bit-identically to one process with two devices.

This module never imports torch.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from backends.flax.convert import is_linear_weight
from backends.flax.optim import AdamWState, LossScale, build_optimizer, global_norm_torch, update_loss_scale
from llm.callbacks import DEFAULT_CALLBACKS, Callback, CallbackList, build_callbacks
from llm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from llm.config import Config, ConfigError, DType
from llm.run import (
    MOMENTS,
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

__all__ = ["TrainingEngine", "initialize_distributed", "train"]

log = logging.getLogger("llm.train")

BACKEND = "jax"
STATE_VERSION = 1
RNG_SCHEME = ("jax: dropout stream i of micro-batch s uses fold_in(fold_in(key(SeedSequence([seed, 0xF1A8])), s), i) "
              "for the global batch (independent of the device count)")
COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"


def initialize_distributed() -> bool:
    """``jax.distributed.initialize()`` when ``JAX_COORDINATOR_ADDRESS`` is set (once); True if
    this is a multi-process run. ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` are passed when set;
    otherwise JAX reads them from the cluster (SLURM, Open MPI, ...)."""
    if not os.environ.get(COORDINATOR_ENV):
        return False
    if not jax.distributed.is_initialized():
        kwargs = {}
        if os.environ.get("JAX_NUM_PROCESSES"):
            kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
        if os.environ.get("JAX_PROCESS_ID"):
            kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
        jax.distributed.initialize(**kwargs)
    return True


def _dropout_seed(seed: int) -> int:
    """A 31-bit root for the dropout keys (any ``training.seed`` >= 0 fits)."""
    return int(np.random.SeedSequence([seed, 0xF1A8]).generate_state(1)[0]) % (2 ** 31)


# ---------------------------------------------------------------------- the jitted functions
@dataclasses.dataclass(frozen=True)
class _Layout:
    """How flat arrays become the model again inside a traced function (a static jit argument).

    ``params`` travel as ``{name: array}`` (dotted ``nnx.Param`` paths = canonical names for the
    decoder); the remaining state (position tables, dropout RNG streams) as a leaf list in which
    the RNG keys are placeholders: the step derives fresh keys from the micro-batch position.
    """

    graphdef: Any
    param_def: Any
    names: tuple[str, ...]
    rest_def: Any
    key_slots: tuple[int, ...]

    def model(self, params: dict[str, jax.Array], rest: list[jax.Array], key: jax.Array | None = None):
        state = jax.tree.unflatten(self.param_def, [params[n] for n in self.names])
        leaves = list(rest)
        for i, slot in enumerate(self.key_slots):
            leaves[slot] = jax.random.key(0) if key is None else jax.random.fold_in(key, i)
        return nnx.merge(self.graphdef, state, jax.tree.unflatten(self.rest_def, leaves))


@dataclasses.dataclass(frozen=True)
class _StepConfig:
    """Everything the step's program depends on besides array shapes (a static jit argument)."""

    accum: int
    grad_clip: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decay: frozenset[str]
    loss_scaling: bool
    dropout_seed: int
    replicated: NamedSharding

    def optimizer(self, names: tuple[str, ...]) -> optax.GradientTransformationExtraArgs:
        return build_optimizer(grad_clip=self.grad_clip, b1=self.beta1, b2=self.beta2, eps=self.eps,
                               weight_decay=self.weight_decay, mask={n: n in self.decay for n in names})


def _adam(opt_state: tuple) -> tuple[int, AdamWState]:
    for i, s in enumerate(opt_state):
        if isinstance(s, AdamWState):
            return i, s
    raise TypeError("optimizer state without an AdamWState")


@partial(jax.jit, static_argnames=("impl", "layout", "cfg"), donate_argnames=("params", "opt_state", "carry"))
def _train_step(impl, layout: _Layout, cfg: _StepConfig, params, opt_state, carry, rest, inputs, targets,
                lr, micro_step):
    """One optimiser step over ``inputs``/``targets`` (accum, B, ...). Returns the new params,
    optimiser state and carry (non-finite flag, loss scale) and ``out`` (summed loss parts, grad norm)."""
    root = jax.random.key(cfg.dropout_seed)
    scale = carry["loss_scale"].scale

    def micro(grads, xs):
        x, y, i = xs
        key = jax.random.fold_in(root, micro_step + i)

        def objective(p):
            obj, parts = impl.loss(layout.model(p, rest, key), (x, y), deterministic=False)
            obj = obj / cfg.accum  # torch: (objective / accum).backward(), summed over micro-batches
            if cfg.loss_scaling:
                obj = obj * scale
            return obj, {k: v.astype(jnp.float32) for k, v in parts.items()}

        (_, parts), g = jax.value_and_grad(objective, has_aux=True)(params)
        return jax.tree.map(jnp.add, grads, g), parts

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, parts = jax.lax.scan(micro, zeros, (inputs, targets, jnp.arange(cfg.accum, dtype=jnp.int32)))
    sums = {k: jnp.sum(v, axis=0) for k, v in parts.items()}

    found_inf = jnp.zeros((), jnp.bool_)
    if cfg.loss_scaling:
        inv = (1.0 / scale).astype(jnp.float32)
        grads = jax.tree.map(lambda g: g * inv, grads)
        found_inf = ~jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
    out = {"parts": sums}
    if cfg.grad_clip > 0:
        out["grad_norm"] = global_norm_torch(grads)
    tx = cfg.optimizer(layout.names)
    updates, new_opt = tx.update(grads, opt_state, params, learning_rate=lr)
    new_params = optax.apply_updates(params, updates)
    if cfg.loss_scaling:  # GradScaler.step: skip the whole update (Adam's count too) on inf/nan
        keep = partial(jax.tree.map, lambda new, old: jnp.where(found_inf, old, new))
        new_params, new_opt = keep(new_params, params), keep(new_opt, opt_state)
    new_carry = {"nonfinite": carry["nonfinite"] | ~jnp.isfinite(sums["loss"]),
                 "loss_scale": update_loss_scale(carry["loss_scale"], found_inf) if cfg.loss_scaling
                 else carry["loss_scale"]}
    pin = partial(jax.lax.with_sharding_constraint, shardings=cfg.replicated)
    return pin(new_params), pin(new_opt), pin(new_carry), out


@partial(jax.jit, static_argnames=("impl", "layout"))
def _eval_loss(impl, layout: _Layout, params, rest, inputs, targets):
    _, parts = impl.loss(layout.model(params, rest), (inputs, targets), deterministic=True)
    return parts["loss"].astype(jnp.float32)


def _local(x: Any) -> Any:
    """A process-local view of a replicated array (the array itself on one process)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return x.addressable_data(0)
    return x


def _host(tree: Any) -> Any:
    """Numpy copies of a pytree of replicated arrays (a host sync)."""
    return jax.tree.map(lambda x: np.asarray(_local(x)), tree)


class TrainingEngine:
    """Trains ``config.task`` (or ``task``) with JAX. See the module docstring for one step.

    Args:
        config: the resolved run config (``llm.config.Config``).
        run_dir: where files go (default: ``config.logging.run_dir`` or ``runs/<timestamp>``).
        resume: False; True = continue from the newest valid checkpoint of the run dir (corrupt
            newer ones are reported and skipped; none at all = start fresh with a warning); or the
            path of one checkpoint directory -- written by either backend.
        task: a registered task name or a ``TrainingTask`` (default ``config.task``).
        callbacks: extra ``Callback`` instances, added to the built-ins.
        callback_names: registered callbacks built from the config (default: all built-ins that the
            config enables).
        datamodule: a DataModule to use instead of the task's (not yet set up).
        devices: the devices of the data mesh (default: ``jax.devices()``, all of them).
    """

    def __init__(self, config: Config, *, run_dir: str | os.PathLike | None = None,
                 resume: bool | str | os.PathLike = False, task: str | TrainingTask | None = None,
                 callbacks: list[Callback] | None = None,
                 callback_names: tuple[str, ...] | list[str] = DEFAULT_CALLBACKS,
                 datamodule: Any = None, devices: list[Any] | None = None):
        initialize_distributed()
        self.config = config
        self.task = get_task(task if task is not None else config.task)
        self.impl = self.task.backend(BACKEND)
        self.rank, self.world_size = jax.process_index(), jax.process_count()
        self.is_main = self.rank == 0
        # callbacks first: a config they reject (e.g. tensorboard not installed) fails before any work
        self.callbacks = CallbackList(build_callbacks(config, callback_names, checkpoints=self.task.canonical)
                                      + list(callbacks or []), is_main=self.is_main)
        t = config.training
        self.devices = list(devices) if devices is not None else jax.devices()
        if t.batch_size % len(self.devices):
            raise ConfigError(f"training.batch_size={t.batch_size} (the global batch) must be divisible by "
                              f"the {len(self.devices)} JAX devices it is sharded over", "training.batch_size")
        self.mesh = Mesh(np.array(self.devices), ("data",))
        self._replicated = NamedSharding(self.mesh, P())
        if config.optimization.compile:
            log.info("optimization.compile has no effect on the JAX backend: XLA always compiles the step")

        # ---- data
        self.datamodule = datamodule if datamodule is not None else self.task.build_datamodule(
            config, rank=self.rank, world_size=self.world_size)
        if self.is_main:
            self.datamodule.prepare_data()
        self._barrier("prepare_data")
        if not self.is_main:
            self.datamodule.prepare_data()
        self.datamodule.setup()
        self.task.validate(config, self.datamodule)
        self.baselines = self.task.baselines(self.datamodule)
        self.total_steps = t.total_steps(self.datamodule.steps_per_epoch)
        self.lr_of = schedule_for(t, self.total_steps)

        # ---- model, optimiser, device state
        self._model = self.impl.build_model(config, self.datamodule)
        graphdef, param_state, rest = nnx.split(self._model, nnx.Param, ...)
        names = tuple(".".join(str(k) for k in path) for path, _ in nnx.to_flat_state(param_state))
        rest_leaves, rest_def = jax.tree.flatten(rest)
        key_slots = tuple(i for i, x in enumerate(rest_leaves) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key))
        self._layout = _Layout(graphdef, jax.tree.structure(param_state), names, rest_def, key_slots)
        no_decay = self.impl.no_decay_names(config, self._model)
        unknown = no_decay - set(names)
        if unknown:
            raise TaskError(f"task {self.task.name!r}: no-decay names that are not parameters of the "
                            f"model: {sorted(unknown)[:5]}")
        self.decay_names = [n for n in names if n not in no_decay]
        self.no_decay_names = [n for n in names if n in no_decay]
        self._cfg = _StepConfig(
            accum=t.grad_accum_steps, grad_clip=t.grad_clip, beta1=t.beta1, beta2=t.beta2, eps=t.eps,
            weight_decay=t.weight_decay, decay=frozenset(self.decay_names),
            loss_scaling=config.optimization.dtype is DType.FLOAT16, dropout_seed=_dropout_seed(t.seed),
            replicated=self._replicated)
        leaves = jax.tree.leaves(param_state)
        self.params: dict[str, jax.Array] = self._replicate(dict(zip(names, leaves, strict=True)))
        self.rest = self._replicate([np.zeros((), np.uint32) if i in key_slots else x
                                     for i, x in enumerate(rest_leaves)])
        # zeros built on the host: no tiny per-shape programs to compile
        shapes = jax.eval_shape(self._cfg.optimizer(names).init, self.params)
        self.opt_state = self._replicate(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes))
        self._carry = self._replicate(self._fresh_carry())

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
        self.compile_seconds: float | None = None  # the first step of fit(), XLA compilation included

        # ---- run directory and resume (process 0 decides, everyone follows)
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

    # ------------------------------------------------------------------ devices and processes
    @staticmethod
    def _fresh_carry(scale: float = 2.0 ** 16, growth_tracker: int = 0) -> dict[str, Any]:
        """The device-side flags: no nan/inf seen yet; GradScaler's initial scale (float16 only)."""
        return {"nonfinite": np.zeros((), np.bool_),
                "loss_scale": LossScale(np.asarray(scale, np.float32), np.asarray(growth_tracker, np.int32))}

    def _replicate(self, tree: Any) -> Any:
        """``tree`` placed on every device of the mesh (a global array on every process)."""
        if self.world_size == 1:
            return jax.device_put(tree, self._replicated)

        def put(x):
            x = np.asarray(_local(x))
            return jax.make_array_from_callback(x.shape, self._replicated, lambda idx: x[idx])

        return jax.tree.map(put, tree)

    def _shard(self, local: np.ndarray, axis: int) -> jax.Array:
        """This process's rows (``axis`` = the batch axis) as its part of the global batch array."""
        if np.issubdtype(local.dtype, np.integer):
            local = local.astype(np.int32)
        elif local.dtype == np.float64:
            local = local.astype(np.float32)
        spec = P(*([None] * axis), "data")
        sharding = NamedSharding(self.mesh, spec)
        if self.world_size == 1:
            return jax.device_put(local, sharding)
        global_shape = list(local.shape)
        global_shape[axis] *= self.world_size
        return jax.make_array_from_process_local_data(sharding, local, tuple(global_shape))

    def _barrier(self, name: str) -> None:
        if self.world_size > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(name)

    def _broadcast(self, text: str | None) -> str | None:
        """Process 0's ``text`` on every process."""
        if self.world_size == 1:
            return text
        from jax.experimental import multihost_utils

        data = np.zeros(4096, np.uint8)
        if text is not None:
            raw = text.encode()[:4095]
            data[0] = 1
            data[1:1 + len(raw)] = np.frombuffer(raw, np.uint8)
        data = np.asarray(multihost_utils.broadcast_one_to_all(data))
        if not data[0]:
            return None
        return bytes(data[1:]).rstrip(b"\0").decode()

    def _any_process(self, flag: bool) -> bool:
        if self.world_size == 1:
            return flag
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))

    # ------------------------------------------------------------------ the model
    @property
    def model(self) -> nnx.Module:
        """The flax module holding the current parameters (synced on every access; the training
        step donates its buffers, so take it again after training rather than keeping it)."""
        state = jax.tree.unflatten(self._layout.param_def,
                                   [_local(self.params[n]) for n in self._layout.names])
        nnx.update(self._model, state)
        return self._model

    def moments(self) -> dict[str, np.ndarray]:
        """The AdamW moments in canonical names and layout (``llm.run.moment_name``), float32."""
        adam = _host(_adam(self.opt_state)[1])
        out = {}
        for name in self._layout.names:
            for moment, tree in zip(MOMENTS, (adam.exp_avg, adam.exp_avg_sq), strict=True):
                value = np.asarray(tree[name], np.float32)
                out[moment_name(moment, name)] = np.ascontiguousarray(
                    np.swapaxes(value, -1, -2) if is_linear_weight(name) else value)
        return out

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
        """Restore params, AdamW moments, data cursor, counters, loss scale and callback state from
        ``path`` (a checkpoint of either backend)."""
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
        model = self._model
        self.impl.load_canonical(model, ckpt.params)
        param_state = nnx.state(model, nnx.Param)
        self.datamodule.load_state_dict(meta["data"])
        step = int(meta["step"])
        moments: dict[str, dict[str, np.ndarray]] = {}
        for key, value in ckpt.state_tensors.items():
            moment, name = split_moment_name(key)
            moments.setdefault(name, {})[moment] = value
        names = self._layout.names
        missing = sorted(set(names) - set(moments)) if step > 0 else []
        if missing:
            raise CheckpointError(f"{path}: state.safetensors has no AdamW moments for {missing[:5]}")
        unknown = sorted(set(moments) - set(names))
        if unknown:
            raise CheckpointError(f"{path}: state.safetensors has moments of unknown parameters {unknown[:5]}")
        adam_at, adam = _adam(_host(self.opt_state))
        new = {m: dict(getattr(adam, m)) for m in MOMENTS}
        for name in moments:
            for moment in MOMENTS:
                value = np.asarray(moments[name][moment], np.float32)
                value = np.swapaxes(value, -1, -2) if is_linear_weight(name) else value
                if value.shape != new[moment][name].shape:
                    raise CheckpointError(f"{path}: {moment_name(moment, name)} has shape {value.shape}, "
                                          f"the parameter {tuple(np.swapaxes(new[moment][name], -1, -2).shape)}")
                new[moment][name] = value
        opt_state = list(_host(self.opt_state))
        opt_state[adam_at] = AdamWState(count=np.asarray(step, np.int32), exp_avg=new["exp_avg"],
                                        exp_avg_sq=new["exp_avg_sq"])
        self.opt_state = self._replicate(tuple(opt_state))
        self.params = self._replicate(dict(zip(names, jax.tree.leaves(param_state), strict=True)))
        scaler = meta.get("grad_scaler") if self._cfg.loss_scaling else None
        self._carry = self._replicate(self._fresh_carry(**({} if not scaler else
                                                           {"scale": float(scaler["scale"]),
                                                            "growth_tracker": int(scaler["growth_tracker"])})))
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

    def evaluate(self, num_batches: int | None = None) -> dict[str, float]:
        """Mean val loss over ``training.eval_batches`` global batches, its perplexity; fires
        ``on_eval_end``."""
        started = time.perf_counter()
        n = num_batches or self.config.training.eval_batches
        losses = [_eval_loss(self.impl, self._layout, self.params, self.rest, self._shard(x, 0), self._shard(y, 0))
                  for x, y in self.datamodule.val_dataloader(n)]
        values = [float(v) for v in _host(losses)]
        val = float(np.sum(np.asarray(values, np.float64)) / max(1, len(values)))
        metrics = {"step": self.step, "val_loss": val, "val_ppl": math.exp(val) if val < 700 else math.inf}
        if math.isfinite(val) and (self.best_val_loss is None or val < self.best_val_loss):
            self.best_val_loss = val
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
        """The checkpoint's ``state.json`` (keys: ``llm.run.STATE_KEYS``), as the torch engine writes it."""
        t = self.config.training
        scaler = None
        if self._cfg.loss_scaling:
            ls = _host(self._carry["loss_scale"])
            scaler = {"scale": float(ls.scale), "growth_tracker": int(ls.growth_tracker)}
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
            "grad_scaler": scaler,
            "tokens_seen": self.tokens_seen,
            "best_val_loss": self.best_val_loss,
            "callbacks": self.callbacks.state_dict(),
            "world_size": self.world_size,
            "reason": reason,
        }

    # ------------------------------------------------------------------ the loop
    def _check_finite(self, when: str, loss: float | None = None) -> None:
        """Raise NonFiniteLossError if a nan/inf loss was seen (a host sync; the flag is global)."""
        flag = bool(_host(self._carry["nonfinite"]))
        if not flag and (loss is None or math.isfinite(loss)):
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
        old_signals = self._install_signals()
        metrics: dict[str, Any] = {}
        started = time.perf_counter()
        try:
            self.callbacks.call("on_train_start", self)
            if self.is_main:
                self._log_start()
            data = self.datamodule.train_dataloader()
            win_start, win_tokens, self._paused = time.perf_counter(), 0, 0.0
            self._run_tokens = 0  # this process's run, without the resumed-from part and the first (compiling) step
            self._run_steps = 0
            while self.step < self.total_steps and self._stop is None:
                lr = self.lr_of(self.step)
                micro_step = self.datamodule.step
                batches = [next(data) for _ in range(accum)]
                items = sum(self.task.items_per_batch(b) for b in batches) * self.world_size
                win_tokens += items
                self.tokens_seen += items
                self._run_tokens += items
                inputs = self._shard(np.stack([b[0] for b in batches]), 1)  # (accum, B, ...)
                targets = self._shard(np.stack([b[1] for b in batches]), 1)
                first = time.perf_counter() if not self._run_steps else None
                self.params, self.opt_state, self._carry, out = _train_step(
                    self.impl, self._layout, self._cfg, self.params, self.opt_state, self._carry, self.rest,
                    inputs, targets, np.float32(lr), np.int32(micro_step))
                self.step += 1
                self._run_steps += 1
                if first is not None:  # XLA compiles on the first call: left out of the run's tokens/s
                    jax.block_until_ready(self.params)
                    self.compile_seconds = time.perf_counter() - first
                    self._paused_total += self.compile_seconds
                    self._run_tokens -= items
                    if self.is_main:
                        log.info("first step (XLA compilation included) took %.1fs; the run's tokens/s "
                                 "leaves it out", self.compile_seconds)

                metrics = {"step": self.step, "epoch": round(self.datamodule.step / self.datamodule.steps_per_epoch, 4),
                           "lr": lr}
                if self.world_size == 1 and self._interrupted:
                    self.request_stop("interrupted")
                if self.callbacks.needs_metrics(self.step) or self.step == self.total_steps or self._stop:
                    measured = self._measure(out, accum)
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

    def _measure(self, out: dict[str, Any], accum: int) -> dict[str, float]:
        """The host sync: the step's mean loss parts, the grad norm, and (several processes) whether
        any was interrupted. Raises NonFiniteLossError on a nan/inf loss."""
        values, nonfinite = _host((out, self._carry["nonfinite"]))
        result = {k: float(v) / accum for k, v in sorted(values["parts"].items())}  # mean over micro-batches
        if "grad_norm" in values:
            result["grad_norm"] = float(values["grad_norm"])
        if self.world_size > 1 and self._any_process(self._interrupted):
            self.request_stop("interrupted")
        if bool(nonfinite) or not all(math.isfinite(result[k]) for k in values["parts"]):
            self._check_finite("in the logged loss", result.get("loss", math.nan))
        return result

    def _log_start(self) -> None:
        c, dm = self.config, self.datamodule
        n = sum(int(np.prod(p.shape)) for p in self.params.values())
        where = f"{self.devices[0].platform} x {len(self.devices)} device{'s' if len(self.devices) > 1 else ''}"
        if self.world_size > 1:
            where += f" in {self.world_size} processes"
        log.info("task %s on %s (jax %s): %s parameters, %d steps (%d micro-batches/epoch, global batch %d x "
                 "accum %d), run dir %s", self.task.name, where, jax.__version__, f"{n:,}", self.total_steps,
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
        """Nothing to tear down (the distributed client lives as long as the process)."""

    def __enter__(self) -> TrainingEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def train(config: Config, **kwargs: Any) -> TrainResult:
    """``TrainingEngine(config, **kwargs).fit()``, closing the engine afterwards."""
    with TrainingEngine(config, **kwargs) as engine:
        return engine.fit()
