"""The one sharding rule table both backends place parameters from.

Every canonical parameter has a logical axis name per dimension (``ParamInfo.axes`` in
``llm.spec``: ``vocab, embed`` for the embedding, ``heads, embed`` for ``q_proj``, ``experts, mlp,
embed`` for stacked expert weights ...). ``RULES`` maps each logical axis to a mesh axis of the one
mesh vocabulary, ``MESH_AXES = ("data", "fsdp", "tensor")``:

==========  ========  ==============================================================
logical     mesh      why
==========  ========  ==============================================================
vocab       tensor    the embedding rows and the output projection split by vocabulary
                      (the loss runs vocab-parallel)
embed       fsdp      every matrix's model-width dimension: FSDP's shard dimension
heads       tensor    q (and o's input) split by attention head (Megatron column/row)
kv_heads    tensor    k and v split by kv head
mlp         tensor    the MLP's intermediate dimension (column for gate/up, row for down)
experts     --        stacked experts stay whole per device (no expert parallelism yet)
positions   --        the learned position table is small
q_lora      --        MLA's compressed query: small, every head reads all of it
kv_lora     --        MLA's compressed key/value latent (and the shared rope key): the same
head_dim    --        the per-head q/k norm scales (qk_norm): one small vector every head uses
==========  ========  ==============================================================

``placement(info, mesh)`` applies the table to one parameter: a dimension takes its logical axis's
mesh axis when that axis has more than one device and divides the dimension; ``fsdp``, if no
dimension took it (a bias of ``q_proj``), goes to the first other dimension it divides, as FSDP2
shards a parameter on some dimension whatever it is. What no dimension can take stays replicated
over that axis. The torch backend turns a placement into DTensor ``Shard``/``Replicate`` placements
(FSDP2's ``shard_placement_fn`` and the tensor-parallel plan), the JAX backend into a
``NamedSharding``; both read only this module, so a tensor is split the same way in both.

This module must not import torch or jax.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llm.spec import ModelSpec, ParamInfo

__all__ = ["BATCH_AXES", "MESH_AXES", "RULES", "MeshError", "MeshShape", "check_divisible", "describe",
           "local_shape", "param_placements", "placement"]

MESH_AXES = ("data", "fsdp", "tensor")
# The batch dimension of every input splits over both data-parallel kinds of axis.
BATCH_AXES = ("data", "fsdp")

RULES: dict[str, str | None] = {
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "experts": None,
    "positions": None,
    "q_lora": None,
    "kv_lora": None,
    "head_dim": None,
}


class MeshError(ValueError):
    """A mesh that cannot be built from ``distributed.*`` and the device count; names the keys."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class MeshShape:
    """Sizes of the three mesh axes; ``data * fsdp * tensor`` is the device count."""

    data: int = 1
    fsdp: int = 1
    tensor: int = 1

    @classmethod
    def resolve(cls, devices: int, fsdp: int = 1, tensor: int = 1) -> MeshShape:
        """The mesh for ``devices`` devices from ``distributed.fsdp`` (-1 = every device the tensor
        axis leaves) and ``distributed.tensor``; data parallel takes the rest."""
        if devices < 1:
            raise MeshError(f"devices={devices}: need at least one device")
        if tensor < 1:
            raise MeshError(f"distributed.tensor={tensor} must be >= 1 (for {devices} devices)", "distributed.tensor")
        if devices % tensor:
            raise MeshError(f"distributed.tensor={tensor} does not divide the {devices} devices",
                            "distributed.tensor")
        if fsdp == -1:
            fsdp = devices // tensor
        if fsdp < 1:
            raise MeshError(f"distributed.fsdp={fsdp} must be >= 1 or -1 (all {devices} devices)", "distributed.fsdp")
        if devices % (fsdp * tensor):
            raise MeshError(f"distributed.fsdp={fsdp} x distributed.tensor={tensor} = {fsdp * tensor} "
                            f"does not divide the {devices} devices", "distributed.fsdp")
        return cls(devices // (fsdp * tensor), fsdp, tensor)

    @property
    def devices(self) -> int:
        return self.data * self.fsdp * self.tensor

    @property
    def shape(self) -> tuple[int, int, int]:
        """Sizes in ``MESH_AXES`` order."""
        return (self.data, self.fsdp, self.tensor)

    @property
    def batch_shards(self) -> int:
        """How many ways the global batch splits (``data * fsdp``)."""
        return self.data * self.fsdp

    @property
    def is_sharded(self) -> bool:
        """Whether any parameter is split (FSDP or tensor parallel), i.e. not plain data parallel."""
        return self.fsdp > 1 or self.tensor > 1

    def size(self, axis: str) -> int:
        return dict(zip(MESH_AXES, self.shape, strict=True))[axis]

    def to_dict(self) -> dict[str, int]:
        return dict(zip(MESH_AXES, self.shape, strict=True))


def placement(info: ParamInfo, mesh: MeshShape) -> tuple[str | None, ...]:
    """The mesh axis each dimension of ``info`` is split over (None = whole on every device)."""
    if len(info.axes) != len(info.shape):
        raise ValueError(f"{info.name}: {len(info.axes)} logical axes for a {len(info.shape)}-d shape")
    out: list[str | None] = [None] * len(info.shape)
    for dim, logical in enumerate(info.axes):
        if logical not in RULES:
            raise ValueError(f"{info.name}: logical axis {logical!r} has no rule; known: {sorted(RULES)}")
        axis = RULES[logical]
        if axis is not None and axis not in out and mesh.size(axis) > 1 and info.shape[dim] % mesh.size(axis) == 0:
            out[dim] = axis
    if mesh.fsdp > 1 and "fsdp" not in out:
        for dim, size in enumerate(info.shape):
            if out[dim] is None and size % mesh.fsdp == 0:
                out[dim] = "fsdp"
                break
    return tuple(out)


def param_placements(spec: ModelSpec, mesh: MeshShape) -> dict[str, tuple[str | None, ...]]:
    """``placement`` of every canonical parameter, in parameter-table order."""
    return {info.name: placement(info, mesh) for info in spec.param_table()}


def local_shape(shape: tuple[int, ...], where: tuple[str | None, ...], mesh: MeshShape) -> tuple[int, ...]:
    """The shape of one device's shard of a tensor of ``shape`` placed as ``where``."""
    return tuple(n // mesh.size(axis) if axis else n for n, axis in zip(shape, where, strict=True))


def check_divisible(spec: ModelSpec, tensor: int) -> list[tuple[str, str]]:
    """(key, message) for each spec size the tensor-parallel degree must divide and does not."""
    bad: list[tuple[str, str]] = []
    if tensor <= 1:
        return bad
    for key, value in (("model.num_heads", spec.num_heads), ("model.num_kv_heads", spec.kv_heads),
                       ("model.intermediate_size", spec.ffn_size)):
        if value % tensor:
            bad.append((key, f"{key}={value} is not divisible by distributed.tensor={tensor}"))
    return bad


def describe(placements: dict[str, tuple[str | None, ...]]) -> dict[str, Any]:
    """JSON-safe form of ``param_placements`` (for logs and ``llm.plan --json``)."""
    return {name: [axis or "-" for axis in where] for name, where in placements.items()}
