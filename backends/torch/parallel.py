"""Sharded training for the torch engine: the device mesh, tensor parallel, FSDP2, compile per block
and activation checkpointing.

Every placement comes from ``llm.sharding`` (``placement`` of each canonical parameter); this
module only turns those mesh-axis names into DTensor ``Shard`` / ``Replicate`` placements.

``build_mesh``: one ``DeviceMesh`` with dims ``("data", "fsdp", "tensor")`` sized by
``distributed.mesh(world_size)``; ranks are laid out row-major, so the ``tensor`` ranks of one group
are neighbours (one host) and share a batch: a rank reads the data slice of its index over
``("data", "fsdp")`` (``data_shard``).

``apply_tensor_parallel``: a ``DecoderModel``'s ``nn.Linear`` whose weight has its out dim on
``tensor`` gets ``ColwiseParallel`` (q/k/v, gate/up, the untied lm_head, whose logits stay a
vocab-split DTensor), one with its in dim on ``tensor`` ``RowwiseParallel`` (o, down); the token
table's vocab rows on ``tensor`` become a ``Shard(0)`` DTensor, which ``backends.torch.model``
looks up (and, tied, projects onto) in DTensor; the stacked MoE experts (``ExpertLinear``) become
DTensors split on their ``mlp`` dim: the dense dispatch computes in DTensor (the ``down``
projection's partial sums are reduced at the end of ``Experts.forward``), the blocked and grouped
ones on each rank's local slice (``Experts.local``). A module the table leaves whole (a dim not
divisible) is left alone. Attention then holds ``heads / tensor`` local heads and reads that count
from its projections' output; the per-head q/k norms (``qk_norm``) keep whole, replicated weights
whose gradients (each rank's a partial sum over its heads) are summed over the tensor mesh in the
backward (``RMSNorm.heads_split_over``). Every parameter's TP placement is checked against the
table afterwards: a parameter with no plan fails loudly.

``vocab_split_loss``: ``loss_parallel()`` while the head is vocab-split: the cross entropy runs on
the logits' shards (the vocab-wise max, sum and target logit are all-reduced; no rank holds the
whole (tokens, V) logits), and the training step holds it over the backward, where torch needs it.
Returned logits (``return_logits=True``) are gathered whole.

``apply_fsdp``: ``fully_shard`` on each ``TransformerBlock`` and then on the root, over the
``fsdp`` dim (``("data", "fsdp")`` when data > 1: HSDP, replicated over ``data``).
``shard_placement_fn`` returns ``Shard(d)`` for the dimension ``d`` the table puts on ``fsdp``, so
torch splits the same dimension JAX does; a parameter the table leaves whole over ``fsdp`` (no
dimension divisible) keeps FSDP's default ``Shard(0)``, unevenly padded. Mixed precision: bf16
parameters for compute and fp32 gradient reduction when ``optimization.dtype`` is bfloat16, float32
master weights always.

``apply_activation_checkpointing``: sets each block's ``recompute`` (``torch.utils.checkpoint``,
non-reentrant); ``selective`` saves matmul (``mm``/``addmm``/``bmm``) and attention
(``scaled_dot_product_*``) outputs and recomputes the rest. It works on every path (one device,
DDP, sharded) because it changes the block, not the wrapper.

``clip_grad_norm``: the global gradient norm over parameters that live on different meshes (FSDP's
1-D mesh for a replicated-over-tensor norm, the 2-D one for a TP weight), and the clipping.

This module never imports jax or flax.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.experimental import implicit_replication
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    loss_parallel,
    parallelize_module,
)
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from backends.torch.model import (
    DecoderModel,
    EmbeddingLayer,
    ExpertLinear,
    MultiHeadAttention,
    TransformerBlock,
)
from llm.config import ActivationCheckpointing, DType
from llm.sharding import MESH_AXES, MeshShape, param_placements

__all__ = ["apply_activation_checkpointing", "apply_fsdp", "apply_tensor_parallel", "build_mesh",
           "clip_grad_norm", "compile_blocks", "data_shard", "dtensor_placements", "mesh_placements",
           "vocab_split_loss"]


def build_mesh(shape: MeshShape, device_type: str) -> DeviceMesh:
    """The ``("data", "fsdp", "tensor")`` mesh over every process of the group."""
    return init_device_mesh(device_type, shape.shape, mesh_dim_names=MESH_AXES)


def data_shard(mesh: DeviceMesh) -> tuple[int, int]:
    """(index, count) of this rank's data-parallel slice: its place on ``("data", "fsdp")``."""
    fsdp = mesh.size(MESH_AXES.index("fsdp"))
    index = mesh.get_local_rank("data") * fsdp + mesh.get_local_rank("fsdp")
    return index, mesh.size(MESH_AXES.index("data")) * fsdp


def _tensor_dim(where: tuple[str | None, ...]) -> int | None:
    return where.index("tensor") if "tensor" in where else None


def apply_tensor_parallel(model: DecoderModel, shape: MeshShape, mesh: DeviceMesh) -> None:
    """Split ``model`` over the ``tensor`` dim as ``llm.sharding`` places each parameter (in place)."""
    tp_mesh = mesh["tensor"]
    where = param_placements(model.spec, shape)
    plan = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        dim = _tensor_dim(where[f"{name}.weight"])
        if dim == 0:  # (out, in) with out on tensor
            # the head's logits stay a vocab-split DTensor: the loss runs on the shards (loss_parallel)
            plan[name] = ColwiseParallel(use_local_output=False) if name == "lm_head" else ColwiseParallel()
        elif dim == 1:
            plan[name] = RowwiseParallel()
    parallelize_module(model, tp_mesh, plan)
    for module in model.modules():
        if isinstance(module, MultiHeadAttention) and model.spec.qk_norm:
            # the per-head norms see this rank's heads only: their weights' gradients are summed over tensor
            module.q_norm.heads_split_over = module.k_norm.heads_split_over = tp_mesh
    # The token table and the stacked experts compute in DTensor (the model's tensor-parallel
    # boundaries); an expert tensor the table leaves whole is a replicated DTensor beside them.
    dtensor_modules = [(name, m) for name, m in model.named_modules() if isinstance(m, ExpertLinear)]
    if _tensor_dim(where["embed.weight"]) == 0:
        dtensor_modules.append(("embed", model.embed))
    for prefix, module in dtensor_modules:
        for leaf, p in list(module.named_parameters(recurse=False)):
            name = f"{prefix}.{leaf}"
            if isinstance(module, EmbeddingLayer) and leaf != "weight":
                continue
            dim = _tensor_dim(where[name])
            placed = distribute_tensor(p.detach(), tp_mesh, [Replicate() if dim is None else Shard(dim)])
            setattr(module, leaf, nn.Parameter(placed, requires_grad=p.requires_grad))
    wrong = {name: (got, where[name]) for name, got in tensor_placements(model).items()
             if got != _tensor_dim(where[name])}
    if wrong:
        raise NotImplementedError(
            "tensor parallel in the torch backend cannot place " + ", ".join(
                f"{n} (llm.sharding: dim {w[1]} on tensor, got {w[0]})" for n, w in sorted(wrong.items())[:4])
            + ": no plan for that module; use distributed.tensor=1")


def vocab_split_loss(model: nn.Module) -> contextlib.AbstractContextManager:
    """``loss_parallel()`` when tensor parallel split a ``DecoderModel``'s output projection over the
    vocabulary (its weight a DTensor), else (any other model too) a null context. The training step
    holds it over the forward and the backward: torch computes the sharded cross entropy's gradient
    only inside it."""
    if isinstance(model, DecoderModel):
        head = model.embed.weight if model.lm_head is None else model.lm_head.weight
        if isinstance(head, DTensor):
            return loss_parallel()
    return contextlib.nullcontext()


def tensor_placements(model: nn.Module) -> dict[str, int | None]:
    """Canonical name -> the dimension split over the TP mesh (None: whole), before FSDP."""
    out = {}
    for name, p in model.named_parameters():
        dims = [pl.dim for pl in p.placements if isinstance(pl, Shard)] if isinstance(p, DTensor) else []
        out[name] = dims[0] if dims else None
    return out


def apply_fsdp(model: DecoderModel, shape: MeshShape, mesh: DeviceMesh, dtype: DType) -> None:
    """``fully_shard`` every block, then the root (in place); see the module docstring."""
    where = param_placements(model.spec, shape)
    name_of = {p: name for name, p in model.named_parameters()}

    def shard_placement(p: nn.Parameter) -> Shard | None:
        axes = where[name_of[p]]
        return Shard(axes.index("fsdp")) if "fsdp" in axes else None  # None: FSDP's Shard(0)

    dp_mesh = mesh["data", "fsdp"] if shape.data > 1 else mesh["fsdp"]
    compute = torch.bfloat16 if dtype is DType.BFLOAT16 else torch.float32
    kwargs = dict(mesh=dp_mesh, shard_placement_fn=shard_placement,
                  mp_policy=MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32))
    for block in model.layers:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)


def mesh_placements(p: torch.Tensor) -> tuple[str | None, ...]:
    """The mesh axis each dimension of a (sharded) parameter is split over, in ``llm.sharding``'s
    vocabulary: what the tests compare with ``llm.sharding.placement``."""
    out: list[str | None] = [None] * p.dim()
    if isinstance(p, DTensor):
        for axis, pl in zip(p.device_mesh.mesh_dim_names, p.placements, strict=True):
            if isinstance(pl, Shard) and p.device_mesh.size(p.device_mesh.mesh_dim_names.index(axis)) > 1:
                out[pl.dim] = axis
    return tuple(out)


def dtensor_placements(p: torch.Tensor) -> dict[str, str]:
    """``{mesh axis: "Shard(d)" | "Replicate()"}`` of a DTensor parameter (for logs)."""
    return {axis: str(pl) for axis, pl in zip(p.device_mesh.mesh_dim_names, p.placements, strict=True)}


def compile_blocks(model: DecoderModel, mode: str) -> None:
    """``torch.compile`` each block in place (``nn.Module.compile``: the parameter names stay)."""
    for block in model.layers:
        block.compile(mode=mode)


def _saved_ops() -> frozenset:
    aten = torch.ops.aten
    names = ("mm", "addmm", "bmm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu")
    return frozenset(getattr(aten, n).default for n in names if hasattr(aten, n))


def _selective_policy(saved: frozenset, ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: DecoderModel, mode: ActivationCheckpointing) -> None:
    """Set every block's ``recompute`` for ``training.activation_checkpointing`` (none: unset)."""
    if mode is ActivationCheckpointing.NONE:
        recompute = None
    elif mode is ActivationCheckpointing.FULL:
        recompute = functools.partial(checkpoint, use_reentrant=False)
    else:
        context = functools.partial(create_selective_checkpoint_contexts,
                                    functools.partial(_selective_policy, _saved_ops()))
        recompute = functools.partial(checkpoint, use_reentrant=False, context_fn=context)
    for block in model.modules():
        if isinstance(block, TransformerBlock):
            block.recompute = recompute


@torch.no_grad()
def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale the gradients of ``params`` so their global 2-norm is at most ``max_norm``; returns the
    norm before clipping (a plain 0-d tensor, the same on every rank), as ``clip_grad_norm_`` does.

    Gradients on one mesh are normed together (``torch._foreach_norm`` on DTensors: a partial
    norm per shard, reduced over the mesh by ``full_tensor``); the meshes' norms then combine."""
    groups: dict[object, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            key = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
            groups.setdefault(key, []).append(p.grad)
    squares = []
    for grads in groups.values():
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        squares.append((norm.full_tensor() if isinstance(norm, DTensor) else norm).float().square())
    if not squares:
        return torch.zeros(())
    total = torch.stack(squares).sum().sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    with implicit_replication():  # coef is the same number on every rank
        for grads in groups.values():
            torch._foreach_mul_(grads, coef.to(grads[0].dtype))
    return total

