"""The JAX training engine: Flax NNX model, torch-exact AdamW (optax), jit, one (data, fsdp, tensor) Mesh.

``TrainingEngine(config).fit()`` trains ``config.task`` and returns a ``llm.run.TrainResult``, like
``backends.torch.engine.TrainingEngine`` and with the same surface (``fit``, ``evaluate``,
``save_checkpoint``, ``sample``, ``request_stop``, the trainer attributes callbacks read): both
subclass ``llm.loop.engine.BaseTrainingEngine``, which holds the loop, evaluation, checkpoints,
resume and signal handling. Both engines drive the same backend-agnostic pieces -- task, DataModule,
callbacks, ``llm.schedule``, ``llm.run`` (run directory, canonical training state) and
``llm.checkpoint`` -- and write the same checkpoint, so a run started on one backend resumes on the
other (moments, step, schedule position, data cursor, loss scale and callback state all carry over).

One optimiser step is one call of a jitted function (params, optimiser state and the device-side
flags donated, so XLA updates them in place)::

    lr = lr_at(step)                                     host float, passed in (no recompile)
    scan over the grad_accum_steps micro-batches:        stacked (accum, B, ...) on the host
        dropout keys = fold_in(fold_in(key(seed'), micro_step), stream)     pure function of the position
        grads += grad(objective / accum  [* loss scale])
    [float16: unscale, skip the update on inf/nan, update the scale]        torch.amp.GradScaler
    torch clip_grad_norm_ -> torch AdamW                 backends/flax/optim.py
                          (or the task's transformation: FlaxTask.build_optimizer, its schedule inside)
    selection biases += u * sign(mean load - load)       the micro-batches' expert loads (the global
                                                         batch; ``router_bias_update_rate`` = u > 0 only)

The math is torch's operation by operation (see ``backends/flax/optim.py``): decoupled decay
``p *= 1 - lr*wd`` before the Adam step, on the names ``spec.param_table()`` marks; bias-corrected
moments with ``eps`` outside ``sqrt(v)/sqrt(1-b2^t)``; clipping by ``max_norm / (norm + 1e-6)``
clamped to 1; accumulation as the sum of the gradients of ``objective / accum``.

Precision: ``optimization.dtype`` is the flax modules' compute dtype; parameters (the master
weights) and moments stay float32. ``bfloat16`` needs nothing else; ``float16`` adds torch's dynamic
loss scale. ``optimization.compile`` means nothing here: XLA always compiles the step (a log line
says so when it is set).

Parallelism: one ``jax.sharding.Mesh`` over all devices with the axes ``("data", "fsdp", "tensor")``
shaped by ``config.distributed.mesh`` (``docs/architecture.md``, "Sharding (JAX)"). Parameters get
``NamedSharding(mesh, P(*placement))`` from ``llm.sharding.placement`` (permuted to the flax layout by
``convert.flax_placement``); AdamW moments and the accumulated gradients are placed like their
parameter, everything else is replicated; batches split over ``data`` x ``fsdp`` (the global batch
``training.batch_size`` must divide by it). The step pins its outputs to these shardings and XLA's
SPMD partitioner inserts the collectives (gradient all-reduce, FSDP all-gathers and
reduce-scatters, tensor-parallel reductions). fsdp = tensor = 1 is plain data parallel: every
parameter replicated, no other constraint.

Several processes (``jax.distributed.initialize()`` is called when ``JAX_COORDINATOR_ADDRESS`` is
set; ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` or the cluster's own variables give the rest): the
mesh spans ``jax.devices()``, every process's devices, so parameters and moments are global
``jax.Array``s of which each process holds its devices' shards. Each process reads its rows of the
global batch (``rank = jax.process_index()``) and ``jax.make_array_from_process_local_data``
assembles the global array.

Checkpoints hold whole canonical tensors (the format's shard files hold whole tensors, so a tensor
split over processes is written by one of them). Unsharded, process 0 writes every file. Sharded,
every process writes the files ``llm.checkpoint.plan_shards`` assigns it (``_checkpoint_shards``):
a tensor its own devices hold entirely comes from its shards; a tensor split over several
processes' devices is gathered (``multihost_utils.process_allgather``, a collective every process
joins, one tensor at a time in the plan's order) and kept only by its writer. Then a barrier (or,
with ``checkpoint.async_save``, process 0's writer thread waiting for the others' files) and process
0 commits. A sharded resume builds each array with ``jax.make_array_from_callback``: every process
reads only its devices' slices of the checkpoint tensors, whatever mesh and process count wrote them.
A task's own optax state is written whole by process 0, so it is refused on a sharded mesh across
processes.

Dropout masks are drawn for the global batch from one key, so they do not depend on the number of
devices either: 1 and N devices see the same losses up to float reassociation.

Host syncs: the loop reads the loss only on steps that need it (evaluation, a callback's
``needs_metrics``, the last step); a device-side non-finite flag is read then and before every
checkpoint, so a NaN never reaches disk. The first step of ``fit()`` is waited for once: it
includes XLA's compilation, which the loop logs and leaves out of the run's ``tokens_per_s``
(``compile_seconds``). Ctrl-C / SIGTERM
finishes the step, saves and returns ``stop_reason="interrupted"``.

Tested on CPU (``tests/dist_flax_mp_worker.py``): two processes of four host devices each (gloo
collectives), fsdp 4 x tensor 2, train the losses of one process with eight devices, and a checkpoint
of either resumes in the other.

This module never imports torch.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
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

from backends.flax.convert import (
    flax_placement,
    moments_from_canonical,
    moments_to_canonical,
    read_flax_slice,
    to_canonical_array,
)
from backends.flax.model import SelectionBias, balanced_selection_bias, set_moe_impl
from backends.flax.optim import (
    AdamWState,
    LossScale,
    build_optimizer,
    clip_by_global_norm_torch,
    global_norm_torch,
    update_loss_scale,
)
from llm.checkpoint import CheckpointError, ShardFile, TensorSlices
from llm.config import ActivationCheckpointing, Config, ConfigError, DType
from llm.loop.callbacks import DEFAULT_CALLBACKS, Callback
from llm.loop.engine import EXPERT_LOAD, TASK, TASK_OPTIMIZER_PREFIX, BaseTrainingEngine, StepReadout
from llm.loop.tasks import TaskError, TrainingTask
from llm.moe_dispatch import resolve_moe_impl
from llm.run import MOMENTS, TrainResult, moment_name, size_after, split_moment_name
from llm.sharding import BATCH_AXES, MESH_AXES, placement
from llm.spec import ModelSpec, SpecError

__all__ = ["TrainingEngine", "initialize_distributed", "train"]

log = logging.getLogger("llm.train")

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
    decoder), the untrained ``SelectionBias`` state as ``biases`` the same way; the remaining state (position tables, dropout RNG streams) as a
    leaf list in which the RNG keys are placeholders: the step derives fresh keys from the
    micro-batch position.
    """

    graphdef: Any
    param_def: Any
    names: tuple[str, ...]
    bias_def: Any
    bias_names: tuple[str, ...]
    bias_rows: tuple[int, ...]  # each bias's row of EXPERT_LOAD
    rest_def: Any
    key_slots: tuple[int, ...]

    def model(self, params: dict[str, jax.Array], biases: dict[str, jax.Array], rest: list[jax.Array],
              key: jax.Array | None = None):
        state = jax.tree.unflatten(self.param_def, [params[n] for n in self.names])
        bias_state = jax.tree.unflatten(self.bias_def, [biases[n] for n in self.bias_names])
        leaves = list(rest)
        for i, slot in enumerate(self.key_slots):
            leaves[slot] = jax.random.key(0) if key is None else jax.random.fold_in(key, i)
        return nnx.merge(self.graphdef, state, bias_state, jax.tree.unflatten(self.rest_def, leaves))


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
    # (name, flax-layout shape, sharding) per parameter; empty on a plain data-parallel mesh
    placements: tuple[tuple[str, tuple[int, ...], NamedSharding], ...] = ()
    task_optimizer: optax.GradientTransformation | None = None  # FlaxTask.build_optimizer's, if any
    bias_update_rate: float = 0.0  # model.router_bias_update_rate (the selection biases' step)

    def shardings_like(self, tree: Any) -> Any:
        """A sharding per leaf of ``tree``: a leaf under a dict key naming a parameter, with that
        parameter's shape (the parameter itself, its gradient, an AdamW moment), is placed like the
        parameter; every other leaf (step counts, loss scale, flags, position tables) is replicated."""
        where = {name: (shape, sharding) for name, shape, sharding in self.placements}

        def pick(path: tuple[Any, ...], leaf: Any) -> NamedSharding:
            for key in reversed(path):
                if isinstance(key, jax.tree_util.DictKey) and key.key in where:
                    shape, sharding = where[key.key]
                    return sharding if tuple(leaf.shape) == shape else self.replicated
            return self.replicated

        return jax.tree_util.tree_map_with_path(pick, tree)

    def optimizer(self, names: tuple[str, ...]) -> optax.GradientTransformation:
        """The engine's torch AdamW (rate passed in per step), or the task's transformation after
        the engine's clipping; either way the state is a tuple with the clip state first when clipping."""
        if self.task_optimizer is None:
            return build_optimizer(grad_clip=self.grad_clip, b1=self.beta1, b2=self.beta2, eps=self.eps,
                                   weight_decay=self.weight_decay, mask={n: n in self.decay for n in names})
        clip = [clip_by_global_norm_torch(self.grad_clip)] if self.grad_clip > 0 else []
        return optax.chain(*clip, self.task_optimizer)


def _state_lr(opt_state: Any) -> jax.Array | None:
    """The ``learning_rate`` an ``optax.inject_hyperparams`` state holds (after an update: the rate
    that update used), None when the task's transformation keeps none."""
    return optax.tree_utils.tree_get(opt_state, "learning_rate", None,
                                     filtering=lambda _, v: hasattr(v, "dtype"))  # not the schedule's state


class _TransformationRate:
    """``lr_of`` for a task's optax transformation: its schedule lives on the device, so this is the
    rate last read from the optimiser state (exact in every logged row: ``_read_step`` reads the
    step's own rate); nan when the transformation keeps no ``learning_rate``."""

    def __init__(self, lr: float):
        self.last = lr

    def __call__(self, step: int) -> float:
        return self.last

    def observe(self, val_loss: float) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _adam(opt_state: tuple) -> tuple[int, AdamWState]:
    for i, s in enumerate(opt_state):
        if isinstance(s, AdamWState):
            return i, s
    raise TypeError("optimizer state without an AdamWState")


@partial(jax.jit, static_argnames=("impl", "layout", "cfg"),
         donate_argnames=("params", "biases", "opt_state", "carry"))
def _train_step(impl, layout: _Layout, cfg: _StepConfig, params, biases, opt_state, carry, rest, batch,
                lr, micro_step):
    """One optimiser step over ``batch``, a tuple of (accum, B, ...) arrays. Returns the new params,
    selection biases, optimiser state and carry (non-finite flag, loss scale) and ``out`` (summed
    loss parts, grad norm)."""
    root = jax.random.key(cfg.dropout_seed)
    scale = carry["loss_scale"].scale

    def micro(grads, xs):
        micro_batch, i = xs
        key = jax.random.fold_in(root, micro_step + i)

        def objective(p):
            obj, parts = impl.loss(layout.model(p, biases, rest, key), micro_batch, deterministic=False)
            obj = obj / cfg.accum  # torch: (objective / accum).backward(), summed over micro-batches
            if cfg.loss_scaling:
                obj = obj * scale
            return obj, {k: v.astype(jnp.float32) for k, v in parts.items()}

        (_, parts), g = jax.value_and_grad(objective, has_aux=True)(params)
        if cfg.placements:
            g = jax.lax.with_sharding_constraint(g, cfg.shardings_like(g))
        return jax.tree.map(jnp.add, grads, g), parts

    zeros = jax.tree.map(jnp.zeros_like, params)
    if cfg.placements:  # the accumulated gradients live sharded like the parameters (a reduce-scatter)
        zeros = jax.lax.with_sharding_constraint(zeros, cfg.shardings_like(zeros))
    grads, parts = jax.lax.scan(micro, zeros, (tuple(batch), jnp.arange(cfg.accum, dtype=jnp.int32)))
    sums = {k: jnp.sum(v, axis=0) for k, v in parts.items()}
    loads = sums.pop(EXPERT_LOAD, None)  # (MoE layers, E) over the global batch
    new_biases = biases if loads is None else {
        name: balanced_selection_bias(biases[name], loads[row], cfg.bias_update_rate)
        for name, row in zip(layout.bias_names, layout.bias_rows, strict=True)}

    found_inf = jnp.zeros((), jnp.bool_)
    if cfg.loss_scaling:
        inv = (1.0 / scale).astype(jnp.float32)
        grads = jax.tree.map(lambda g: g * inv, grads)
        found_inf = ~jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
    out = {"parts": sums}
    if cfg.grad_clip > 0:
        out["grad_norm"] = global_norm_torch(grads)
    tx = cfg.optimizer(layout.names)
    rate = {"learning_rate": lr} if cfg.task_optimizer is None else {}  # a task's schedule is inside its tx
    updates, new_opt = tx.update(grads, opt_state, params, **rate)
    new_params = optax.apply_updates(params, updates)
    if cfg.loss_scaling:  # GradScaler.step: skip the whole update (Adam's count too) on inf/nan
        keep = partial(jax.tree.map, lambda new, old: jnp.where(found_inf, old, new))
        new_params, new_opt = keep(new_params, params), keep(new_opt, opt_state)
    if cfg.task_optimizer is not None and _state_lr(new_opt) is not None:
        out["lr"] = _state_lr(new_opt).astype(jnp.float32)
    new_carry = {"nonfinite": carry["nonfinite"] | ~jnp.isfinite(sums["loss"]),
                 "loss_scale": update_loss_scale(carry["loss_scale"], found_inf) if cfg.loss_scaling
                 else carry["loss_scale"]}

    def pin(tree):
        return jax.lax.with_sharding_constraint(tree, cfg.shardings_like(tree))

    return pin(new_params), pin(new_biases), pin(new_opt), pin(new_carry), out


@partial(jax.jit, static_argnames=("impl", "layout"))
def _eval_loss(impl, layout: _Layout, params, biases, rest, batch):
    _, parts = impl.loss(layout.model(params, biases, rest), tuple(batch), deterministic=True)
    return parts["loss"].astype(jnp.float32)


def _flat_names(state: nnx.State) -> tuple[str, ...]:
    """The dotted paths of ``state``'s variables, in its leaf order (canonical names for the decoder)."""
    return tuple(".".join(str(k) for k in path) for path, _ in nnx.to_flat_state(state))


def _local(x: Any) -> Any:
    """A process-local view of a replicated array (the array itself on one process)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return x.addressable_data(0)
    return x


def _host(tree: Any) -> Any:
    """Numpy copies of a pytree of replicated arrays (a host sync)."""
    return jax.tree.map(lambda x: np.asarray(_local(x)), tree)


def _needs_gather(x: Any) -> bool:
    """Whether some process's devices do not hold all of ``x`` (from the global sharding: the same
    answer on every process, so every process knows which gathers to join)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.sharding.is_fully_replicated:
        return False
    held: dict[int, set[tuple[tuple[int, int], ...]]] = {}
    for device, index in x.sharding.devices_indices_map(x.shape).items():
        box = tuple(s.indices(n)[:2] for s, n in zip(index, x.shape, strict=True))
        held.setdefault(device.process_index, set()).add(box)
    # the distinct shards of a NamedSharding tile the array: they cover it iff their sizes add up
    return any(sum(math.prod(stop - start for start, stop in box) for box in boxes) != x.size
               for boxes in held.values())


def _whole(x: Any) -> Any:
    """All of ``x`` on this process: ``x`` itself when fully addressable; from this process's shards
    when they hold it; otherwise gathered (``process_allgather``: a collective, which every process
    must call for the same arrays in the same order)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return x
    if _needs_gather(x):
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    if x.sharding.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    out = np.empty(x.shape, x.dtype)
    for shard in x.addressable_shards:
        out[shard.index] = np.asarray(shard.data)
    return out


class TrainingEngine(BaseTrainingEngine):
    """Trains ``config.task`` (or ``task``) with JAX. See the module docstring for one step.

    Args:
        devices: the devices of the data mesh (default: ``jax.devices()``, all of them).
        The others: see ``llm.loop.engine.BaseTrainingEngine``.
    """

    backend = "jax"
    rng_scheme = ("jax: dropout stream i of micro-batch s uses fold_in(fold_in(key(SeedSequence([seed, 0xF1A8])), s), i) "
                  "for the global batch (independent of the device count)")

    def __init__(self, config: Config, *, run_dir: str | os.PathLike | None = None,
                 resume: bool | str | os.PathLike = False, task: str | TrainingTask | None = None,
                 callbacks: list[Callback] | None = None,
                 callback_names: tuple[str, ...] | list[str] = DEFAULT_CALLBACKS,
                 datamodule: Any = None, devices: list[Any] | None = None):
        initialize_distributed()
        super().__init__(config, rank=jax.process_index(), world_size=jax.process_count(), task=task,
                         callbacks=callbacks, callback_names=callback_names)
        t = config.training
        self.devices = list(devices) if devices is not None else jax.devices()
        self.mesh_shape = config.distributed.mesh(len(self.devices))
        if t.batch_size % self.mesh_shape.batch_shards:
            raise ConfigError(f"training.batch_size={t.batch_size} (the global batch) must be divisible by "
                              f"data x fsdp = {self.mesh_shape.batch_shards}, the ways the "
                              f"{len(self.devices)} JAX devices' {self._mesh_text(devices=False)} split it",
                              "training.batch_size")
        # tensor innermost: a tensor-parallel group is adjacent devices (one host, the fastest links)
        self.mesh = Mesh(np.array(self.devices).reshape(self.mesh_shape.shape), MESH_AXES)
        self._replicated = NamedSharding(self.mesh, P())
        batch_axes = tuple(axis for axis in BATCH_AXES if self.mesh_shape.size(axis) > 1)
        self._batch_axes = batch_axes[0] if len(batch_axes) == 1 else batch_axes or None
        if config.optimization.compile:
            log.info("optimization.compile has no effect on the JAX backend: XLA always compiles the step")
        self._setup_data(datamodule)

        # ---- model, optimiser, device state
        self._model = self.impl.build_model(config, self.datamodule)
        set_moe_impl(self._model, resolve_moe_impl(config.optimization.moe_impl, "jax", self.devices[0].platform,
                                                   config.optimization.dtype.value))
        self._set_activation_checkpointing()
        graphdef, param_state, bias_state, rest = nnx.split(self._model, nnx.Param, SelectionBias, ...)
        names, bias_names = _flat_names(param_state), _flat_names(bias_state)
        # each bias's row of EXPERT_LOAD: the MoE layers in order, as the parameter table lists them
        table = [p.name for p in self._model.spec.param_table() if not p.trainable] if bias_names else []
        rest_leaves, rest_def = jax.tree.flatten(rest)
        key_slots = tuple(i for i, x in enumerate(rest_leaves) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key))
        self._layout = _Layout(graphdef, jax.tree.structure(param_state), names, jax.tree.structure(bias_state),
                               bias_names, tuple(table.index(n) for n in bias_names), rest_def, key_slots)
        self._setup_weight_decay(names, self.impl.no_decay_names(config, self._model))
        task_optimizer = self._task_optimizer()
        if task_optimizer is not None and self.world_size > 1 and self.mesh_shape.is_sharded:
            raise ConfigError(f"distributed.fsdp={config.distributed.fsdp} / distributed.tensor="
                              f"{config.distributed.tensor}: task {self.task.name!r} brings its own optax "
                              f"optimiser, whose state process 0 saves whole; across {self.world_size} JAX "
                              "processes only the engine's AdamW trains sharded (set fsdp = tensor = 1)",
                              "distributed.fsdp")
        self._cfg = _StepConfig(
            accum=t.grad_accum_steps, grad_clip=t.grad_clip, beta1=t.beta1, beta2=t.beta2, eps=t.eps,
            weight_decay=t.weight_decay, decay=frozenset(self.decay_names),
            loss_scaling=config.optimization.dtype is DType.FLOAT16, dropout_seed=_dropout_seed(t.seed),
            replicated=self._replicated,
            placements=self._param_placements(names + bias_names, jax.tree.leaves(param_state) + jax.tree.leaves(bias_state)),
            task_optimizer=task_optimizer,
            bias_update_rate=config.model.router_bias_update_rate if bias_names else 0.0)
        leaves = jax.tree.leaves(param_state)
        self.params: dict[str, jax.Array] = self._place(dict(zip(names, leaves, strict=True)))
        # the untrained state (``SelectionBias``), placed by the table like a parameter; no moments
        self.biases: dict[str, jax.Array] = self._place(dict(zip(bias_names, jax.tree.leaves(bias_state), strict=True)))
        self.rest = self._place([np.zeros((), np.uint32) if i in key_slots else x
                                 for i, x in enumerate(rest_leaves)])
        # zeros built on the host: no tiny per-shape programs to compile
        shapes = jax.eval_shape(self._cfg.optimizer(names).init, self.params)
        if task_optimizer is None:
            self.opt_state = self._place(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes))
        else:  # a task's state need not start at zero (a schedule's first rate, a preconditioner)
            self.opt_state = self._place(_host(self._cfg.optimizer(names).init(self.params)))
            lr = _state_lr(self.opt_state)
            self.lr_of = _TransformationRate(float("nan") if lr is None else float(_local(lr)))
        self._carry = self._place(self._fresh_carry())

        self._open_run(run_dir, resume)

    def _set_activation_checkpointing(self) -> None:
        """``training.activation_checkpointing`` onto the model (``DecoderModel.remat``) before the
        split, so it is part of the traced program."""
        mode = self.config.training.activation_checkpointing
        if mode is ActivationCheckpointing.NONE:
            return
        if not hasattr(self._model, "remat"):
            raise ConfigError(f"training.activation_checkpointing={mode.value}: task {self.task.name!r} builds a "
                              f"{type(self._model).__name__}, which has no blocks to recompute (set it to none)",
                              "training.activation_checkpointing")
        self._model.remat = mode.value

    def _param_placements(self, names: tuple[str, ...], leaves: list[Any]
                          ) -> tuple[tuple[str, tuple[int, ...], NamedSharding], ...]:
        """``llm.sharding.placement`` of each parameter, in its flax layout, as a ``NamedSharding``;
        none on a plain data-parallel mesh (everything replicated, as before sharding existed)."""
        if not self.mesh_shape.is_sharded:
            return ()
        spec = getattr(self._model, "spec", None)
        table = {info.name: info for info in spec.param_table()} if isinstance(spec, ModelSpec) else {}
        shapes = {name: tuple(leaf.shape) for name, leaf in zip(names, leaves, strict=True)}
        unmapped = [name for name in names if name not in table
                    or flax_placement(name, table[name].shape) != shapes[name]]
        if unmapped:
            raise ConfigError(f"distributed.fsdp={self.config.distributed.fsdp} / distributed.tensor="
                              f"{self.config.distributed.tensor}: task {self.task.name!r} has parameters the "
                              f"spec's parameter table does not place: {unmapped[:5]}", "distributed.fsdp")
        return tuple((name, shapes[name],
                      NamedSharding(self.mesh, P(*flax_placement(name, placement(table[name], self.mesh_shape)))))
                     for name in names)

    def _task_optimizer(self) -> optax.GradientTransformation | None:
        """``FlaxTask.build_optimizer``'s transformation, checked; None: the engine's AdamW."""
        own = self.impl.build_optimizer(self.config, self._model)
        if own is not None and not isinstance(own, optax.GradientTransformation):
            raise TaskError(f"task {self.task.name!r}: build_optimizer returned a {type(own).__name__}, "
                            "not an optax.GradientTransformation")
        if self.impl.build_scheduler(self.config, own) is not None:
            raise TaskError(f"task {self.task.name!r}: build_scheduler is not used on the JAX backend; "
                            "put the schedule inside the optax transformation build_optimizer returns")
        self.task_optimizer = own is not None
        return own

    def _optimizer_meta(self) -> dict[str, Any]:
        if not self.task_optimizer:
            return super()._optimizer_meta()
        return {"name": TASK, "backend": self.backend, "class": f"{type(self.impl).__module__}."
                f"{type(self.impl).__qualname__}.build_optimizer", "scheduler": None, "step": self.step}

    def _named_opt_state(self) -> tuple[list[tuple[str, Any]], Any]:
        """The optax state as ``(name, leaf)`` pairs (``jax.tree_util.keystr`` paths) and its treedef."""
        leaves, treedef = jax.tree_util.tree_flatten_with_path(self.opt_state)
        return [(jax.tree_util.keystr(path), leaf) for path, leaf in leaves], treedef

    def _optimizer_tensors(self) -> dict[str, np.ndarray]:
        if not self.task_optimizer:
            return super()._optimizer_tensors()
        named, _ = self._named_opt_state()
        return {TASK_OPTIMIZER_PREFIX + name: value for name, value in _host(dict(named)).items()}

    def _restore_task_optimizer(self, path: Path, tensors: dict[str, np.ndarray],
                                saved: dict[str, Any]) -> None:
        named, treedef = self._named_opt_state()
        unknown = sorted(set(tensors) - {name for name, _ in named})
        if unknown:
            raise CheckpointError(f"{path}: the task optimiser's state has arrays this one lacks: "
                                  f"{unknown[:5]}")
        leaves = []
        for name, leaf in named:
            held = tensors.get(name)
            if held is not None and leaf.shape == () and held.shape == (1,):
                held = held.reshape(())  # the checkpoint writer stores a 0-d array as (1,)
            if held is None or held.shape != leaf.shape or held.dtype != leaf.dtype:
                found = "missing" if held is None else f"{held.dtype}{list(held.shape)}"
                raise CheckpointError(f"{path}: task optimiser state {name}: {found}, this optimiser holds "
                                      f"{leaf.dtype}{list(leaf.shape)}")
            leaves.append(held)
        self.opt_state = self._place(jax.tree.unflatten(treedef, leaves))
        lr = _state_lr(self.opt_state)
        self.lr_of = _TransformationRate(float("nan") if lr is None else float(_local(lr)))

    # ------------------------------------------------------------------ devices and processes
    @staticmethod
    def _fresh_carry(scale: float = 2.0 ** 16, growth_tracker: int = 0) -> dict[str, Any]:
        """The device-side flags: no nan/inf seen yet; GradScaler's initial scale (float16 only)."""
        return {"nonfinite": np.zeros((), np.bool_),
                "loss_scale": LossScale(np.asarray(scale, np.float32), np.asarray(growth_tracker, np.int32))}

    def _place(self, tree: Any) -> Any:
        """``tree`` on the mesh (a global array on every process): parameters and what mirrors them
        (moments) split as ``llm.sharding`` places them, everything else replicated."""
        shardings = self._cfg.shardings_like(tree)
        if self.world_size == 1:
            return jax.device_put(tree, shardings)

        def put(x, sharding):
            x = np.asarray(_local(x))
            return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

        return jax.tree.map(put, tree, shardings)

    def _shard(self, local: np.ndarray, axis: int) -> jax.Array:
        """This process's rows (``axis`` = the batch axis) as its part of the global batch array."""
        if np.issubdtype(local.dtype, np.integer):
            local = local.astype(np.int32)
        elif local.dtype == np.float64:
            local = local.astype(np.float32)
        spec = P(*([None] * axis), self._batch_axes)
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

    def _on_gpu(self) -> bool:
        return self.devices[0].platform == "gpu"

    def _mesh_text(self, devices: bool = True) -> str:
        """``mesh data=2 fsdp=2 tensor=2 over 8 cpu devices`` (without ``over ...``: ``devices=False``)."""
        n = len(self.devices)
        sizes = " ".join(f"{axis}={size}" for axis, size in self.mesh_shape.to_dict().items())
        where = f" over {n} {self.devices[0].platform} device{'s' if n > 1 else ''}" if devices else ""
        return f"mesh {sizes}{where}"

    def _placement(self) -> str:
        where = self._mesh_text()
        if self.world_size > 1:
            where += f" in {self.world_size} processes"
        return f"{where} (jax {jax.__version__})"

    def _device_memory(self) -> int | None:
        if self.devices[0].platform != "gpu":
            return None
        return (self.devices[0].memory_stats() or {}).get("bytes_limit")

    def _device_count(self) -> int:
        return len(self.devices)

    # ------------------------------------------------------------------ the model and its state
    @property
    def model(self) -> nnx.Module:
        """The flax module holding the current parameters (synced on every access; the training
        step donates its buffers, so take it again after training rather than keeping it). With
        parameters split over processes every process must read it together (``_whole`` gathers)."""
        layout = self._layout
        state = jax.tree.unflatten(layout.param_def, [_whole(self.params[n]) for n in layout.names])
        biases = jax.tree.unflatten(layout.bias_def, [_whole(self.biases[n]) for n in layout.bias_names])
        nnx.update(self._model, state, biases)
        return self._model

    def _param_names(self) -> list[str]:
        return list(self._layout.names)

    def _num_parameters(self) -> int:
        return sum(int(np.prod(p.shape)) for p in self.params.values())

    def moments(self) -> dict[str, np.ndarray]:
        """The AdamW moments in canonical names and layout (``llm.run.moment_name``), float32; none
        with a task's own optimiser (its state is the optax pytree)."""
        out = {}
        if self.task_optimizer:
            return out
        adam = jax.tree.map(lambda x: np.asarray(_whole(x)), _adam(self.opt_state)[1])
        for moment in MOMENTS:
            out.update((moment_name(moment, name), value)
                       for name, value in moments_to_canonical(self._model, getattr(adam, moment)).items())
        return out

    @property
    def _sharded_checkpoints(self) -> bool:
        return self.mesh_shape.is_sharded and not self.task_optimizer

    def _canonical_shapes(self) -> dict[str, tuple[int, ...]]:
        weights = {**self.params, **self.biases}
        return {name: flax_placement(name, tuple(weights[name].shape)) for name in weights}

    def _checkpoint_shards(self, plan: tuple[ShardFile, ...]) -> dict[str, np.ndarray]:
        """The tensors of this process's files of ``plan``, each brought to the host on its own, never
        the whole tree in one transfer. Every process walks the whole plan in the same order: a
        tensor split over processes is gathered by all (``_whole``) and kept by its writer only; the
        others come from this process's own shards, no collective."""
        adam = _adam(self.opt_state)[1]
        weights = {**self.params, **self.biases}
        mine = {name for f in plan if f.writer == self.rank for name in f.tensors}
        out = {}
        for name in (name for f in plan for name in f.tensors):
            moment, param = split_moment_name(name) if name not in weights else (None, name)
            value = weights[param] if moment is None else getattr(adam, moment)[param]
            if name in mine:
                out[name] = to_canonical_array(param, _whole(value))
            elif _needs_gather(value):
                _whole(value)  # this process's part of the writer's gather; the copy is dropped
        return out

    def _from_slices(self, name: str, source: TensorSlices) -> jax.Array:
        """Parameter ``name`` (or a moment of it) placed as this run places it, each device's shard
        read from its slice of the checkpoint tensor ``source``."""
        shape, sharding = next((shape, sharding) for n, shape, sharding in self._cfg.placements if n == name)
        return jax.make_array_from_callback(shape, sharding, lambda index: read_flax_slice(source.read, name, index))

    def _restore(self, path: Path, params: dict[str, np.ndarray], moments: dict[str, dict[str, np.ndarray]],
                 step: int, grad_scaler: dict[str, Any] | None) -> None:
        model = self._model
        if self._sharded_checkpoints:  # the module syncs from self.params when read (``model``)
            self.params = {name: self._from_slices(name, params[name]) for name in self._layout.names}
            self.biases = {name: self._from_slices(name, params[name]) for name in self._layout.bias_names}
        else:
            self.impl.load_canonical(model, params)
            param_state, bias_state = nnx.state(model, nnx.Param, SelectionBias)
            self.params = self._place(dict(zip(self._layout.names, jax.tree.leaves(param_state), strict=True)))
            self.biases = self._place(dict(zip(self._layout.bias_names, jax.tree.leaves(bias_state), strict=True)))
        scaler = grad_scaler if self._cfg.loss_scaling else None
        self._carry = self._place(self._fresh_carry(**({} if not scaler else
                                                           {"scale": float(scaler["scale"]),
                                                            "growth_tracker": int(scaler["growth_tracker"])})))
        if self.task_optimizer:
            return  # its state: _restore_task_optimizer
        if self._sharded_checkpoints:
            adam_at, adam = _adam(self.opt_state)
            placed = {m: dict(getattr(adam, m)) for m in MOMENTS}  # the fresh zeros when none were saved
            for moment in MOMENTS if moments else ():
                placed[moment] = {name: self._from_slices(name, held[moment]) for name, held in moments.items()}
            opt_state = list(self.opt_state)
            opt_state[adam_at] = AdamWState(count=jax.device_put(np.asarray(step, np.int32), self._replicated),
                                            exp_avg=placed["exp_avg"], exp_avg_sq=placed["exp_avg_sq"])
            self.opt_state = tuple(opt_state)
            return
        adam_at, adam = _adam(_host(self.opt_state))
        new = {m: dict(getattr(adam, m)) for m in MOMENTS}
        for moment in MOMENTS if moments else ():  # none saved (a step-0 checkpoint): the fresh zeros stay
            given = {name: held[moment] for name, held in moments.items() if moment in held}
            try:
                new[moment] = moments_from_canonical(model, given)
            except SpecError as err:
                raise CheckpointError(f"{path}: {moment}: {err}") from None
        opt_state = list(_host(self.opt_state))
        opt_state[adam_at] = AdamWState(count=np.asarray(step, np.int32), exp_avg=new["exp_avg"],
                                        exp_avg_sq=new["exp_avg_sq"])
        self.opt_state = self._place(tuple(opt_state))

    def _grad_scaler_state(self) -> dict[str, Any] | None:
        if not self._cfg.loss_scaling:
            return None
        ls = _host(self._carry["loss_scale"])
        return {"scale": float(ls.scale), "growth_tracker": int(ls.growth_tracker)}

    # ------------------------------------------------------------------ the step
    def _optimizer_step(self, batches: list[tuple[np.ndarray, np.ndarray]], lr: float, micro_step: int
                        ) -> dict[str, Any]:
        """Returns the loss parts summed over the micro-batches and the grad norm (``_train_step``'s
        ``out``)."""
        stacked = tuple(self._shard(np.stack([b[j] for b in batches]), 1)  # (accum, B, ...) per field
                        for j in range(len(batches[0])))
        self.params, self.biases, self.opt_state, self._carry, out = _train_step(
            self.impl, self._layout, self._cfg, self.params, self.biases, self.opt_state, self._carry, self.rest,
            stacked, np.float32(lr), np.int32(micro_step))
        return out

    def _out_of_memory(self, exc: BaseException) -> tuple[int | None, int | None] | None:
        text = str(exc)
        if not isinstance(exc, jax.errors.JaxRuntimeError) or "RESOURCE_EXHAUSTED" not in text:
            return None
        requested = size_after(text, "trying to allocate") or size_after(text, "allocating")
        stats = self.devices[0].memory_stats() or {}
        free = stats["bytes_limit"] - stats["bytes_in_use"] if "bytes_limit" in stats else None
        return requested, free

    def _wait_for_step(self, out: dict[str, Any]) -> None:
        """JAX dispatches asynchronously; the first call also compiles the step with XLA."""
        jax.block_until_ready((self.params, self.opt_state, out))

    def _read_step(self, out: dict[str, Any]) -> StepReadout:
        values, nonfinite = _host((out, self._carry["nonfinite"]))
        accum = self.config.training.grad_accum_steps
        parts = {k: float(v) / accum for k, v in sorted(values["parts"].items())}  # mean over micro-batches
        grad_norm = float(values["grad_norm"]) if "grad_norm" in values else None
        lr = float(values["lr"]) if "lr" in values else None  # a task's optax schedule, read with the loss
        if lr is not None:
            self.lr_of.last = lr
        return StepReadout(parts, grad_norm, bool(nonfinite), self._any_process(self._interrupted), lr)

    def _nonfinite_seen(self) -> bool:
        """The device-side flag (global: the step's loss is the global batch's)."""
        return bool(_host(self._carry["nonfinite"]))

    def _val_loss(self, num_batches: int) -> float:
        losses = [_eval_loss(self.impl, self._layout, self.params, self.biases, self.rest,
                             tuple(self._shard(a, 0) for a in batch))
                  for batch in self.datamodule.val_dataloader(num_batches)]
        values = [float(v) for v in _host(losses)]
        return float(np.sum(np.asarray(values, np.float64)) / max(1, len(values)))


def train(config: Config, **kwargs: Any) -> TrainResult:
    """``TrainingEngine(config, **kwargs).fit()``, closing the engine afterwards."""
    with TrainingEngine(config, **kwargs) as engine:
        return engine.fit()
