"""The PyTorch training engine: AdamW + warmup/cosine, clipping, accumulation, AMP, compile, DDP,
FSDP2 and tensor parallel.

``TrainingEngine(config).fit()`` trains ``config.task`` and returns a ``llm.run.TrainResult``. The
backend-agnostic pieces it drives are shared with the JAX engine: the loop, evaluation, checkpoints,
resume and signal handling (``llm.loop.engine``), the task (``llm.loop.tasks``), the callbacks
(``llm.loop.callbacks``), the schedule (``llm.schedule``), the run directory and the canonical training
state (``llm.run``), the checkpoint format (``llm.checkpoint``). This module holds what is torch's:
devices and DDP, the model and AdamW, AMP, ``torch.compile`` and the step below.

One optimiser step::

    lr = lr_at(step)                                   pure function of the step (exact resume)
    for each of grad_accum_steps micro-batches:        DDP.no_sync() / FSDP2 gradient sync off on all but the last
        torch.manual_seed(f(seed, micro_step, dp_rank)) dropout is a function of the position too
        with autocast(dtype): objective, parts = task.loss(model, batch)
        (scaler.scale(objective / accum)).backward()
    unscale (fp16) -> clip_grad_norm_ -> AdamW step -> scaler.update()
    selection biases += u * sign(mean load - load)     the micro-batches' expert loads, all-reduced
                                                       (``router_bias_update_rate`` = u > 0 only)

A task half's own optimiser (``TorchTask.build_optimizer``) takes AdamW's place in that step, its
rate left to its own scheduler (``build_scheduler``, stepped once after the optimiser step, and the
rate metrics log); its ``state_dict()`` goes into checkpoints (``_encode_state``).

Reading the loss is a host sync, so the loop does it only on steps that need it (evaluation, a
callback's ``needs_metrics``, the last step); a device-side "saw a non-finite loss" flag is checked
then and before every checkpoint, so a NaN never reaches disk. The first step of ``fit()`` (with
``torch.compile``: the compilation) is waited for and timed on its own (``compile_seconds``), and
left out of the run's ``tokens_per_s``. DDP: launched by ``torchrun`` (``WORLD_SIZE``/``RANK``/
``LOCAL_RANK``), gloo on CPU, NCCL on GPU; each rank reads its slice of the global batch and only
rank 0 writes files.

Sharded (``distributed.fsdp`` or ``distributed.tensor`` > 1; ``backends.torch.parallel``): a
``DeviceMesh`` ("data", "fsdp", "tensor") shaped by ``distributed.mesh(world_size)``, tensor
parallel (DTensor) and FSDP2 placed from ``llm.sharding``, ``torch.compile`` per block. Each
data-parallel rank (its index over data x fsdp; the tensor ranks of a group share a batch) reads
its slice; gradients are clipped over every mesh at once (``parallel.clip_grad_norm``); a
checkpoint holds whole canonical tensors, so it resumes on any mesh (and on the other backend):
every rank takes part in gathering each tensor (``DTensor.full_tensor``, one at a time, the same
order everywhere) and keeps only those of the files the plan gives it to write; a resume reads each
rank's local shards alone (``TensorSlices`` at the DTensor's offsets) into ``DTensor.from_local``. fsdp = tensor = 1 keeps the DDP path. ``training.activation_checkpointing``
works on every path. Ctrl-C (SIGINT) or SIGTERM finishes the current step, saves a checkpoint and
returns with ``stop_reason="interrupted"``; a second Ctrl-C aborts at once.

This module never imports jax or flax.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel

from backends.torch import parallel
from backends.torch.convert import moments_from_canonical, moments_to_canonical
from backends.torch.ddp import bucket_cap_mb
from backends.torch.model import DecoderModel, MoE, balanced_selection_bias, set_moe_impl
from llm.checkpoint import CheckpointError, ShardFile, TensorSlices
from llm.config import Config, DType
from llm.loop.callbacks import DEFAULT_CALLBACKS, Callback, TensorBoard
from llm.loop.engine import EXPERT_LOAD, TASK, TASK_OPTIMIZER_PREFIX, BaseTrainingEngine, StepReadout
from llm.loop.tasks import TaskError, TrainingTask
from llm.moe_dispatch import resolve_moe_impl
from llm.run import MOMENTS, TrainResult, moment_name, size_after
from llm.spec import SpecError, check_names

__all__ = ["TrainingEngine", "train"]


_SDPA_PRIORITY = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                  SDPBackend.MATH]


def _dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the torchrun environment; (0, 1, 0) without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def _micro_seed(seed: int, micro_step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, 0xD409, micro_step, rank]).generate_state(1)[0])


def _torch_summary_writer() -> Any:
    from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

    return SummaryWriter


TensorBoard.backend_writers.append(_torch_summary_writer)


def _qualname(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _encode_state(obj: Any, name: str, tensors: dict[str, np.ndarray] | None) -> Any:
    """A ``state_dict()`` as JSON: every tensor becomes ``{"tensor": name, "dtype", "shape"}`` (its array
    goes to ``tensors`` unless that is None), dicts ``{"dict": [[key, value], ...]}`` (optimiser
    state is keyed by int), tuples ``{"tuple": [...]}``, so ``_decode_state`` gives it back exactly."""
    if isinstance(obj, torch.Tensor):
        if tensors is not None:  # numpy has no bfloat16: such a tensor travels as float32 (exact)
            held = obj.detach().cpu()
            tensors[name] = (held.float() if held.dtype is torch.bfloat16 else held).numpy()
        return {"tensor": name, "dtype": str(obj.dtype).removeprefix("torch."), "shape": list(obj.shape)}
    if isinstance(obj, dict):
        return {"dict": [[k, _encode_state(v, f"{name}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [_encode_state(v, f"{name}.{i}", tensors) for i, v in enumerate(obj)]
        return {"tuple": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TaskError(f"the task optimiser's state {name} is a {type(obj).__name__}, which a checkpoint "
                    "cannot hold (tensors, numbers, strings, lists and dicts only)")


def _decode_state(obj: Any, tensors: dict[str, np.ndarray]) -> Any:
    """Inverse of ``_encode_state``; a missing array is a KeyError naming it."""
    if isinstance(obj, list):
        return [_decode_state(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "tensor" in obj:
        if obj["tensor"] not in tensors:
            raise KeyError(f"state.safetensors lacks {TASK_OPTIMIZER_PREFIX}{obj['tensor']}")
        held = np.array(tensors[obj["tensor"]]).reshape(obj["shape"])  # the writer stores 0-d as (1,)
        return torch.from_numpy(held).to(getattr(torch, obj["dtype"]))
    if "tuple" in obj:
        return tuple(_decode_state(v, tensors) for v in obj["tuple"])
    return {k: _decode_state(v, tensors) for k, v in obj["dict"]}


class _OptimizerRate:
    """``lr_of`` for a task's own optimiser: the rate its first group holds, which is the one the
    next step uses (its scheduler, not ``llm.schedule``, moves it; its state is the scheduler's)."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def __call__(self, step: int) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def observe(self, val_loss: float) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TrainingEngine(BaseTrainingEngine):
    """Trains ``config.task`` (or ``task``) with PyTorch. See the module docstring for one step.

    Args:
        device: a torch device (default: ``cuda:LOCAL_RANK`` when CUDA is available, else CPU).
        The others: see ``llm.loop.engine.BaseTrainingEngine``.
    """

    backend = "torch"
    rng_scheme = ("torch.manual_seed(SeedSequence([seed, 0xD409, micro_step, rank]).generate_state(1)[0]) "
                  "before every micro-batch")

    def __init__(self, config: Config, *, run_dir: str | os.PathLike | None = None,
                 resume: bool | str | os.PathLike = False, task: str | TrainingTask | None = None,
                 callbacks: list[Callback] | None = None,
                 callback_names: tuple[str, ...] | list[str] = DEFAULT_CALLBACKS,
                 datamodule: Any = None, device: str | torch.device | None = None):
        rank, world_size, self.local_rank = _dist_env()
        self._owns_process_group = False
        super().__init__(config, rank=rank, world_size=world_size, task=task, callbacks=callbacks,
                         callback_names=callback_names)
        if device is None:
            device = f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.mesh_shape = config.distributed.mesh(self.world_size)
        if self.world_size > 1:
            self._init_process_group()
        self.mesh = (parallel.build_mesh(self.mesh_shape, self.device.type) if self.mesh_shape.is_sharded
                     else None)
        self.data_rank = self.rank
        if self.mesh is not None:
            self.data_rank, self.data_shards = parallel.data_shard(self.mesh)
            if datamodule is None:
                datamodule = self.task.build_datamodule(config, rank=self.data_rank, world_size=self.data_shards)
        torch.manual_seed(config.training.seed)
        self._setup_data(datamodule)

        # ---- model and optimiser
        self.model = self.impl.build_model(config, self.datamodule).to(self.device)  # the raw module
        set_moe_impl(self.model, resolve_moe_impl(config.optimization.moe_impl, "torch", self.device.type,
                                                  config.optimization.dtype.value))
        parallel.apply_activation_checkpointing(self.model, config.training.activation_checkpointing)
        if self.mesh is not None:
            self._shard_model()
        self.optimizer, self.scheduler = self._build_optimizer()
        self._trainable = [p for p in self.model.parameters() if p.requires_grad]
        dtype = config.optimization.dtype
        self.amp_dtype = {DType.BFLOAT16: torch.bfloat16, DType.FLOAT16: torch.float16}.get(dtype)
        self.scaler = torch.amp.GradScaler(self.device.type) if dtype is DType.FLOAT16 else None
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)

        self._open_run(run_dir, resume)

        # ---- wrappers: compile, then DDP (sharded: the blocks are compiled and FSDP is in place)
        self.train_model: torch.nn.Module = self.model
        if config.optimization.compile and self.mesh is None:
            self.train_model = torch.compile(self.model, mode=config.optimization.compile_mode.value)
        if self.world_size > 1 and self.mesh is None:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(
                self.train_model, device_ids=ids, gradient_as_bucket_view=True,
                bucket_cap_mb=bucket_cap_mb(config.distributed.bucket_mb, self.model.parameters()))

    # ------------------------------------------------------------------ devices and processes
    def _init_process_group(self) -> None:
        if not dist.is_initialized():
            backend = self.config.distributed.resolve_backend(self.device.type == "cuda")
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group(backend=backend)
            self._owns_process_group = True

    def _shard_model(self) -> None:
        """Tensor parallel, then FSDP2, then ``torch.compile`` per block (``backends.torch.parallel``)."""
        o, shape = self.config.optimization, self.mesh_shape
        if not isinstance(self.model, DecoderModel):
            raise TaskError(f"task {self.task.name!r}: distributed.fsdp / distributed.tensor shard a "
                            "ModelSpec decoder only; this task's model is a "
                            f"{type(self.model).__name__} (use distributed.fsdp=1 distributed.tensor=1)")
        if o.dtype is DType.FLOAT16:
            raise TaskError("optimization.dtype=float16 needs a loss scaler the sharded torch path does "
                            "not have; use bfloat16 (or distributed.fsdp=1 distributed.tensor=1)")
        if shape.tensor > 1:
            parallel.apply_tensor_parallel(self.model, shape, self.mesh)
        if shape.batch_shards > 1:
            parallel.apply_fsdp(self.model, shape, self.mesh, o.dtype)
        if o.compile:
            parallel.compile_blocks(self.model, o.compile_mode.value)

    def _barrier(self, name: str) -> None:
        if self.world_size > 1:
            dist.barrier()

    def _broadcast(self, text: str | None) -> str | None:
        if self.world_size == 1:
            return text
        box = [text]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _placement(self) -> str:
        mesh = "" if self.mesh is None else f" (mesh {self.mesh_shape.to_dict()})"
        return f"{self.device}{f' x {self.world_size} ranks' if self.world_size > 1 else ''}{mesh}"

    def _device_memory(self) -> int | None:
        if self.device.type != "cuda":
            return None
        return torch.cuda.get_device_properties(self.device).total_memory

    def _on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def close(self) -> None:
        """Wait for a checkpoint write in flight, then tear down the process group this engine created (DDP)."""
        super().close()
        if self._owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_process_group = False

    # ------------------------------------------------------------------ model, optimiser, state
    def _build_optimizer(self) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
        """The task half's own optimiser and scheduler (``TorchTask.build_optimizer``), or the
        engine's AdamW in two weight-decay groups, its rate set from ``llm.schedule`` every step."""
        t = self.config.training
        named = list(self.model.named_parameters())
        self._setup_weight_decay([n for n, _ in named], self.impl.no_decay_names(self.config, self.model),
                                 frozen=frozenset(n for n, p in named if not p.requires_grad))
        own = self.impl.build_optimizer(self.config, self.model)
        self.task_optimizer = own is not None
        if own is None:
            params = dict(named)
            groups = [{"params": [params[n] for n in self.decay_names], "weight_decay": t.weight_decay},
                      {"params": [params[n] for n in self.no_decay_names], "weight_decay": 0.0}]
            fused = self.device.type == "cuda"
            # Sharded parameters live on two meshes (FSDP's alone, FSDP x tensor), which one foreach
            # kernel over all of them cannot mix; fused groups by itself.
            foreach = None if self.mesh is None or fused else False
            own = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, fused=fused,
                                    foreach=foreach)
        elif not isinstance(own, torch.optim.Optimizer):
            raise TaskError(f"task {self.task.name!r}: build_optimizer returned a {type(own).__name__}, "
                            "not a torch.optim.Optimizer")
        scheduler = self.impl.build_scheduler(self.config, own)
        if scheduler is not None and not self.task_optimizer:
            raise TaskError(f"task {self.task.name!r}: build_scheduler needs build_optimizer too (the "
                            "engine's AdamW follows training.lr_schedule)")
        if scheduler is not None and not isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
            raise TaskError(f"task {self.task.name!r}: build_scheduler returned a "
                            f"{type(scheduler).__name__}, not a torch.optim.lr_scheduler.LRScheduler")
        if self.task_optimizer:
            self.lr_of = _OptimizerRate(own)
        return own, scheduler

    def _optimizer_meta(self) -> dict[str, Any]:
        if not self.task_optimizer:
            return super()._optimizer_meta()
        return {"name": TASK, "backend": self.backend, "class": _qualname(self.optimizer),
                "scheduler": _qualname(self.scheduler) if self.scheduler is not None else None,
                "step": self.step, "state": _encode_state(self.optimizer.state_dict(), "optimizer", None),
                "scheduler_state": (_encode_state(self.scheduler.state_dict(), "scheduler", None)
                                    if self.scheduler is not None else None)}

    def _optimizer_tensors(self) -> dict[str, np.ndarray]:
        if not self.task_optimizer:
            return super()._optimizer_tensors()
        tensors: dict[str, np.ndarray] = {}
        _encode_state(self.optimizer.state_dict(), "optimizer", tensors)
        if self.scheduler is not None:
            _encode_state(self.scheduler.state_dict(), "scheduler", tensors)
        return {TASK_OPTIMIZER_PREFIX + name: value for name, value in tensors.items()}

    def _restore_task_optimizer(self, path: Path, tensors: dict[str, np.ndarray],
                                saved: dict[str, Any]) -> None:
        try:
            self.optimizer.load_state_dict(_decode_state(saved["state"], tensors))
            if self.scheduler is not None:
                self.scheduler.load_state_dict(_decode_state(saved["scheduler_state"], tensors))
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: the task optimiser's state does not load: {err}") from None

    def _param_names(self) -> list[str]:
        return [n for n, _ in self.model.named_parameters()]

    def _num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def moments(self) -> dict[str, np.ndarray]:
        """The AdamW moments by canonical name, float32 (zeros before the first step); none with a
        task's own optimiser (its state is ``optimizer.state_dict()``). Sharded: whole tensors,
        gathered (a collective: every rank calls it)."""
        out = {}
        if self.task_optimizer:
            return out
        for moment in MOMENTS:
            held = {name: _whole(self.optimizer.state.get(p, {}).get(moment))
                    for name, p in self.model.named_parameters()}
            out.update((moment_name(moment, name), value)
                       for name, value in moments_to_canonical(self.model, held).items())
        return out

    @property
    def _sharded_checkpoints(self) -> bool:
        return self.mesh is not None and not self.task_optimizer

    def _canonical_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(t.shape) for name, t in self.model.state_dict().items()}  # a DTensor's: global

    def _checkpoint_shards(self, plan: tuple[ShardFile, ...]) -> dict[str, np.ndarray]:
        """The tensors of this rank's files of ``plan``. Each parameter and moment is gathered whole
        in turn on every rank (a collective, the same order everywhere); the host copy is kept only
        where this rank writes it: its peak host memory is its files, not the model."""
        wanted = {name for f in plan if f.writer == self.rank for name in f.tensors}
        sources = [(name, t, t) for name, t in self.model.state_dict().items()]
        sources += [(moment_name(moment, name), self.optimizer.state.get(p, {}).get(moment), p)
                    for moment in MOMENTS for name, p in self.model.named_parameters()]
        out = {}
        with torch.no_grad():
            for name, value, like in sources:
                whole = _whole(value)
                if name in wanted:  # a copy: the array outlives this step's updates (async writes)
                    out[name] = (np.zeros(tuple(like.shape), np.float32) if whole is None
                                 else whole.detach().to("cpu", torch.float32, copy=True).numpy())
        return out

    def _checkpoint_arrays(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Sharded with a task's own optimiser: every rank gathers (``get_model_state_dict`` full,
        offloaded to process 0's CPU), process 0 writes. Unsharded with ``async_save`` and the
        engine's AdamW: ``_staged_snapshot``."""
        if self.mesh is None:
            if self.is_main and self._async_save and not self.task_optimizer:
                return self._staged_snapshot()
            return super()._checkpoint_arrays()
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        state = self.moments() if not self.task_optimizer else self._optimizer_tensors()
        if not self.is_main:
            return {}, {}
        return {name: t.to(torch.float32).numpy().copy() for name, t in full.items()}, state

    def _staged_snapshot(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Weights and AdamW moments copied into host buffers kept for the run (pinned on CUDA, so
        the copies run at PCIe speed without a pageable bounce) with one synchronisation at the
        end: the stall of an asynchronous save. The numpy views handed to the writer alias the
        buffers; ``_checkpoint`` waits for the previous write before the next snapshot refills them."""
        tensors = {name: t for name, t in self.model.state_dict().items()}
        state: dict[str, torch.Tensor] = {}
        for moment in MOMENTS:
            for name, p in self.model.named_parameters():
                value = self.optimizer.state.get(p, {}).get(moment)
                state[moment_name(moment, name)] = torch.zeros_like(p) if value is None else value
        pin = self.device.type == "cuda"
        staging = self.__dict__.setdefault("_staging", {})
        views: dict[str, np.ndarray] = {}
        with torch.no_grad():
            for name, t in (*tensors.items(), *state.items()):
                buf = staging.get(name)
                if buf is None or buf.shape != t.shape:
                    buf = staging[name] = torch.empty(t.shape, dtype=torch.float32, pin_memory=pin)
                buf.copy_(t.detach(), non_blocking=pin)
                views[name] = buf.numpy()
        if pin:
            torch.cuda.synchronize(self.device)
        return {k: views[k] for k in tensors}, {k: views[k] for k in state}

    def _restore(self, path: Path, params: dict[str, np.ndarray], moments: dict[str, dict[str, np.ndarray]],
                 step: int, grad_scaler: dict[str, Any] | None) -> None:
        if self.mesh is None:
            self.impl.load_canonical(self.model, params)
        else:
            check_names(self._canonical_shapes(), params, where=f"parameters for {type(self.model).__name__}")
        if self._sharded_checkpoints:  # each rank reads the slices of its own shards: no communication
            set_model_state_dict(self.model, {n: _local_part(params[n], t) for n, t in self.model.state_dict().items()})
        elif self.mesh is not None:  # a task's own optimiser: the whole tensors were read
            set_model_state_dict(self.model, {n: torch.from_numpy(np.asarray(a, np.float32)) for n, a in params.items()},
                                 options=StateDictOptions(full_state_dict=True))
        on_device = self.device.type == "cuda"  # fused AdamW keeps its step count on the device
        new = {}
        for moment in MOMENTS if moments else ():  # none saved (a step-0 checkpoint): the state stays fresh
            given = {name: held[moment] for name, held in moments.items() if moment in held}
            if self._sharded_checkpoints:  # names and shapes checked by the loop; read below
                new[moment] = given
                continue
            try:
                new[moment] = moments_from_canonical(self.model, given)
            except SpecError as err:
                raise CheckpointError(f"{path}: {moment}: {err}") from None
        for name, p in self.model.named_parameters() if new else ():
            state = self.optimizer.state[p]
            state["step"] = torch.tensor(float(step), dtype=torch.float32, device=p.device if on_device else "cpu")
            for moment in MOMENTS:
                held = new[moment][name]
                state[moment] = _local_part(held, p) if isinstance(held, TensorSlices) else held
        if self.scaler is not None and grad_scaler:
            sd = self.scaler.state_dict()
            sd.update(scale=float(grad_scaler["scale"]), _growth_tracker=int(grad_scaler["growth_tracker"]))
            self.scaler.load_state_dict(sd)

    def _grad_scaler_state(self) -> dict[str, Any] | None:
        if self.scaler is None:
            return None
        return {"scale": float(self.scaler.get_scale()),
                "growth_tracker": int(self.scaler.state_dict().get("_growth_tracker", 0))}

    # ------------------------------------------------------------------ the step
    def _attention_kernels(self) -> contextlib.AbstractContextManager:
        """On CUDA, cuDNN's fused attention first among SDPA kernels. The training step holds it over
        the backward too: activation checkpointing recomputes attention there, and a recompute that
        picked another kernel would not match what the forward saved."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        # On an H100, GPT-2 shape, fwd+bwd per layer: cuDNN 0.79 ms, flash 1.18 ms
        # (benchmarks/NOTES.md, change 3); the other kernels stay behind it for shapes it refuses.
        return sdpa_kernel(_SDPA_PRIORITY, set_priority=True)

    def _autocast(self) -> contextlib.ExitStack:
        """Autocast to the compute dtype, inside ``_attention_kernels``."""
        stack = contextlib.ExitStack()
        stack.enter_context(self._attention_kernels())
        if self.amp_dtype is not None:
            stack.enter_context(torch.autocast(device_type=self.device.type, dtype=self.amp_dtype))
        return stack

    def _to_device(self, batch: tuple[np.ndarray, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        nb = self.device.type == "cuda"
        return tuple(torch.from_numpy(np.ascontiguousarray(a)).to(self.device, non_blocking=nb)
                     for a in batch)  # type: ignore[return-value]

    def _optimizer_step(self, batches: list[tuple[np.ndarray, np.ndarray]], lr: float, micro_step: int
                        ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Returns the loss parts summed over the micro-batches and the grad norm (None without clipping)."""
        t = self.config.training
        accum = len(batches)
        for group in self.optimizer.param_groups if not self.task_optimizer else ():
            group["lr"] = lr  # the engine's AdamW; a task's optimiser has its own scheduler
        sums: dict[str, torch.Tensor] = {}
        loads: torch.Tensor | None = None  # (MoE layers, E) summed over the micro-batches
        for micro, batch in enumerate(batches):
            torch.manual_seed(_micro_seed(t.seed, micro_step + micro, self.data_rank))
            last = micro == accum - 1
            no_sync = self._no_sync() if not last else contextlib.nullcontext()
            with no_sync, self._attention_kernels(), parallel.vocab_split_loss(self.model):
                with self._autocast():
                    objective, parts = self.impl.loss(self.train_model, self._to_device(batch))
                objective = objective / accum
                (self.scaler.scale(objective) if self.scaler else objective).backward()
            load = parts.pop(EXPERT_LOAD, None)
            if load is not None:
                loads = load.detach() if loads is None else loads + load.detach()
            for k, v in parts.items():
                v = v.detach().float()
                sums[k] = sums[k] + v if k in sums else v
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        clip = torch.nn.utils.clip_grad_norm_ if self.mesh is None else parallel.clip_grad_norm
        grad_norm = clip(self._trainable, t.grad_clip) if t.grad_clip > 0 else None
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        if loads is not None:
            self._balance_selection_biases(loads)
        self.optimizer.zero_grad(set_to_none=True)
        self._nonfinite |= ~torch.isfinite(sums["loss"])
        return sums, grad_norm

    @torch.no_grad()
    def _balance_selection_biases(self, loads: torch.Tensor) -> None:
        """Each MoE layer's selection bias moved by its step's load (``llm.loop.engine.EXPERT_LOAD``)
        over the global batch: every rank sums all ranks' counts (the tensor ranks of a group count
        their shared batch again, a common factor the sign ignores) and applies the same update."""
        if self.world_size > 1:
            dist.all_reduce(loads)
        routers = [m.router for m in self.model.modules() if isinstance(m, MoE)]
        rate = self.config.model.router_bias_update_rate
        for router, load in zip(routers, loads, strict=True):
            router.selection_bias.copy_(balanced_selection_bias(router.selection_bias, load, rate))

    def _no_sync(self) -> contextlib.AbstractContextManager:
        """Gradient sync off for a micro-batch that is not the last (DDP's ``no_sync``, FSDP2's
        ``set_requires_gradient_sync``)."""
        if self.mesh is not None and self.mesh_shape.batch_shards > 1:
            return _fsdp_sync_off(self.model)
        if self.world_size > 1 and self.mesh is None:
            return self.train_model.no_sync()
        return contextlib.nullcontext()

    def _out_of_memory(self, exc: BaseException) -> tuple[int | None, int | None] | None:
        if not isinstance(exc, torch.OutOfMemoryError):
            return None
        text = str(exc)  # "Tried to allocate 2.00 GiB. GPU 0 has a total capacity of ... of which 1.50 GiB is free"
        free = size_after(text, "of which")
        if free is None and self.device.type == "cuda":
            free = torch.cuda.mem_get_info(self.device)[0]
        return size_after(text, "Tried to allocate"), free

    def _wait_for_step(self, out: tuple[dict[str, torch.Tensor], torch.Tensor | None]) -> None:
        """CUDA runs the step asynchronously; on the CPU it is done when ``_optimizer_step`` returns."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _read_step(self, out: tuple[dict[str, torch.Tensor], torch.Tensor | None]) -> StepReadout:
        """One host sync (DDP: one all_reduce) for the mean loss parts, the grad norm and the flags."""
        sums, grad_norm = out
        accum = self.config.training.grad_accum_steps
        keys = sorted(sums)
        vec = [sums[k] / accum for k in keys]  # mean over micro-batches
        norm = grad_norm.detach().float() if grad_norm is not None else torch.zeros((), device=self.device)
        flags = [self._nonfinite.float(), torch.tensor(float(self._interrupted), device=self.device)]
        stacked = torch.stack([*vec, norm, *flags])
        if self.world_size > 1:
            dist.all_reduce(stacked)
            stacked[: len(keys) + 1] /= self.world_size  # means; the flags stay sums (> 0 = any rank)
        values = stacked.tolist()
        parts = dict(zip(keys, values[: len(keys)], strict=True))
        nonfinite = values[-2] > 0 or not all(math.isfinite(v) for v in parts.values())
        if nonfinite:
            self._nonfinite.fill_(True)  # a later save_checkpoint refuses too
        return StepReadout(parts, values[len(keys)] if grad_norm is not None else None, nonfinite,
                           values[-1] > 0)

    def _nonfinite_seen(self) -> bool:
        """The device-side flag of every rank (DDP: a collective)."""
        flag = self._nonfinite.to(torch.float32)
        if self.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag > 0)

    @torch.no_grad()
    def _val_loss(self, num_batches: int) -> float:
        self.model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        for batch in self.datamodule.val_dataloader(num_batches):
            with self._autocast():
                _, parts = self.impl.loss(self.model, self._to_device(batch))
            total += parts["loss"].double()
            count += 1
        self.model.train()
        stats = torch.stack([total, torch.tensor(float(count), dtype=torch.float64, device=self.device)])
        if self.world_size > 1:
            dist.all_reduce(stats)
        return float(stats[0] / stats[1].clamp(min=1))


def _whole(t: torch.Tensor | None) -> torch.Tensor | None:
    """A DTensor gathered whole (a collective); any other value as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def _local_part(source: TensorSlices, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of the checkpoint tensor ``source``, placed as ``like``: a DTensor's local
    shard read alone (its offsets over the mesh; an uneven split's smaller or empty shard too) into
    ``DTensor.from_local``; a tensor this rank holds whole, read whole."""
    if not isinstance(like, DTensor):
        return torch.from_numpy(np.array(source.read(), np.float32)).to(like.device, like.dtype)
    shape, offset = compute_local_shape_and_global_offset(like.shape, like.device_mesh, like.placements)
    index = tuple(slice(start, start + size) for start, size in zip(offset, shape, strict=True))
    local = torch.from_numpy(np.array(source.read(index), np.float32)).to(like.device, like.dtype)
    return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                              stride=like.stride())


@contextlib.contextmanager
def _fsdp_sync_off(model: torch.nn.Module):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def train(config: Config, **kwargs: Any) -> TrainResult:
    """``TrainingEngine(config, **kwargs).fit()``, closing the engine afterwards."""
    with TrainingEngine(config, **kwargs) as engine:
        return engine.fit()
