"""Per-device memory of a training run, estimated from its config: the numbers of ``python -m llm.plan``
and of the engines' start-up check.

Every figure is bytes on one device of the mesh ``config.distributed.mesh(devices)``
(``llm.sharding``). With ``n`` = local elements of the parameters (each canonical tensor's
``local_shape`` under ``param_placements``, summed: exact per tensor, not a ratio), ``p`` = bytes
of the compute dtype (``optimization.dtype``: float32 4, bfloat16 / float16 2)::

    weights          4 n      float32 master weights (mixed precision keeps the parameters float32)
    compute_copy              the weights as the matmuls read them:
                     p g      with FSDP (fsdp > 1): the two largest FSDP units (each block; the root =
                              embeddings, final norm, lm_head) gathered over fsdp (tensor shards kept),
                              g = their elements: the unit computing and the one prefetched
                     p n      without FSDP, in bfloat16 / float16: the cast copy of the local weights
                              (torch autocast's cast cache, XLA's converted parameters)
                     0        without FSDP, in float32
    gradients        4 n      float32, sharded as the weights
    optimizer        8 n      AdamW: two float32 moments (exp_avg, exp_avg_sq), sharded as the weights
    activations      p N A    kept for the backward (below), N = b * T tokens per device
    logits           N V' (p + 8)   the LM head output in the compute dtype, its float32
                              log-softmax kept for the backward and the float32 gradient of the logits

``b`` = ``training.batch_size / mesh.batch_shards`` (the micro-batch of one data-parallel shard;
``grad_accum_steps`` micro-batches run one after another, so it does not multiply), ``T`` =
``data.seq_len``, ``V'`` = the vocabulary rows of the output projection on one device (split over
``tensor`` when the placement splits it: the loss runs vocab-parallel).

Activations per token of one block, in elements, with ``D`` = hidden, ``H`` / ``KV`` = heads / kv
heads, ``hd`` = head size, ``F`` = MLP size, ``t`` = tensor degree (it divides the head and MLP
tensors; the residual stream and the norm outputs are whole on every device: no sequence
parallelism), ``k`` = experts a token uses (1 for a dense MLP)::

    none       4 D + (H + 2 KV) hd / t + H hd / t + k m_none F / t     m_none = 4 GLU, 2 plain
    selective  2 D + (H + 2 KV) hd / t + H hd / t + k m_sel F / t      m_sel  = 2 GLU, 1 plain

``none`` keeps the block input, its norm output, q / k / v, the attention output, the residual
after attention, the MLP norm output and the MLP's gate / up / activation / product (plain: up and
activation). ``selective`` keeps the block input, q / k / v, the attention output, the o_proj output
and the gate / up matmul outputs, and recomputes norms, activations and residual adds. Both add, in
bytes, the attention kernel's float32 log-sum-exp (``4 H / t``), for MoE the float32 router logits
and probabilities (``8 E``), and with ``model.dropout > 0`` (``none`` only) a one-byte mask per
residual dropout (``2 D``). Attention is counted as a fused kernel (torch SDPA, cuDNN): no
``T x T`` score matrix is kept. ``full`` keeps each block's input (``D`` per block) and, during the
backward, one block's ``none`` activations as it is recomputed. Every policy adds the final norm's
input and output (``2 D``). So for ``L`` blocks::

    none = L a_none + 2 D      selective = L a_sel + 2 D      full = L D + a_none + 2 D

This is a planning figure: it leaves out the framework's own memory (CUDA context, kernels'
workspaces, the allocator's fragmentation) and transient buffers of the backward, so a run close to
the limit can still run out. MoE counts the selected experts' work (the blocked dispatch); a task's
own optimiser is counted as AdamW.

This module must not import torch or jax.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from llm.config import ActivationCheckpointing, Config, DType
from llm.sharding import MeshShape, local_shape, param_placements, placement
from llm.spec import ModelSpec

__all__ = ["PARTS", "MemoryEstimate", "PlanError", "activation_bytes", "dtype_bytes", "estimate", "gib",
           "parse_bytes"]

# The parts of an estimate, in the order they are printed.
PARTS = ("weights", "compute_copy", "gradients", "optimizer", "activations", "logits")
LABELS = {"weights": "weights (float32 master)", "compute_copy": "compute copy of the weights",
          "gradients": "gradients (float32)", "optimizer": "optimizer (AdamW, 2 x float32)",
          "activations": "activations", "logits": "logits (+ float32 softmax / CE)"}

_DTYPE_BYTES = {DType.FLOAT32: 4, DType.BFLOAT16: 2, DType.FLOAT16: 2}
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")


class PlanError(ValueError):
    """A run the estimate cannot be made for; ``key`` names the config key at fault when there is one."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


def dtype_bytes(dtype: DType) -> int:
    return _DTYPE_BYTES[dtype]


def parse_bytes(text: str) -> int:
    """``"80GB"`` -> 80e9, ``"141 GiB"`` -> 141 * 2**30, ``"1000000"`` -> bytes; decimal units (KB, MB, GB,
    TB) are powers of 1000, binary ones (KiB ... TiB) powers of 1024; a PlanError on anything else."""
    m = _SIZE.fullmatch(text)
    unit = m.group(2).lower() if m else ""
    if m is None or (unit and unit not in _UNITS):
        raise PlanError(f"{text!r} is not a memory size; write a number and a unit, e.g. 80GB, 141GB or 96GiB "
                        "(units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    size = int(float(m.group(1)) * _UNITS[unit or "b"])
    if size <= 0:
        raise PlanError(f"{text!r}: the memory size must be > 0")
    return size


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device of each part of ``PARTS`` for one run on one mesh."""

    mesh: MeshShape
    micro_batch: int  # sequences per data-parallel shard
    seq_len: int
    dtype: DType
    activation_checkpointing: ActivationCheckpointing
    parts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def largest(self, count: int = 3) -> list[tuple[str, int]]:
        """The ``count`` largest non-zero parts, largest first."""
        ranked = sorted(((n, b) for n, b in self.parts.items() if b), key=lambda nb: (-nb[1], PARTS.index(nb[0])))
        return ranked[:count]

    def summary(self) -> str:
        """One line: the total per device and its largest parts."""
        parts = ", ".join(f"{name} {gib(size)}" for name, size in self.largest())
        return (f"{gib(self.total)} per device on mesh data={self.mesh.data} fsdp={self.mesh.fsdp} "
                f"tensor={self.mesh.tensor} ({parts})")

    def refusal(self, device_memory: int) -> str:
        """The one-line error of a run that does not fit in ``device_memory`` bytes."""
        knobs = [f"training.batch_size={self.micro_batch * self.mesh.batch_shards}",
                 f"data.seq_len={self.seq_len}"]
        if self.activation_checkpointing is not ActivationCheckpointing.FULL:
            knobs.append("training.activation_checkpointing=full")
        knobs.append(f"distributed.fsdp={self.mesh.fsdp} (raise it)")
        if self.dtype is DType.FLOAT32:
            knobs.append("optimization.dtype=bfloat16")
        return (f"the memory estimate, {self.summary()}, exceeds the device's {gib(device_memory)}; "
                f"lower it with {', '.join(knobs)}, or more devices (python -m llm.plan shows each part)")

    def to_dict(self) -> dict[str, object]:
        return {"mesh": self.mesh.to_dict(), "devices": self.mesh.devices, "micro_batch": self.micro_batch,
                "seq_len": self.seq_len, "dtype": self.dtype.value,
                "activation_checkpointing": self.activation_checkpointing.value,
                "bytes": dict(self.parts), "total": self.total}


def _local_elements(spec: ModelSpec, mesh: MeshShape) -> tuple[int, int]:
    """Local elements per device of (one block, everything outside the blocks), read from the
    table of a one-block model: every block has the same shapes, so a huge ``num_layers`` costs
    nothing here."""
    block = root = 0
    for info, where in zip(spec.replace(num_layers=1).param_table(),
                           param_placements(spec.replace(num_layers=1), mesh).values(), strict=True):
        size = 1
        for n in local_shape(info.shape, where, mesh):
            size *= n
        if info.name.startswith("layers.0."):
            block += size
        else:
            root += size
    return block, root


def activation_bytes(spec: ModelSpec, policy: ActivationCheckpointing, tokens: int, dtype: DType,
                     tensor: int = 1) -> int:
    """Bytes of the activations kept for the backward of ``tokens`` tokens (the module docstring's
    formula; ``tensor`` divides the head and MLP tensors)."""
    p, t = dtype_bytes(dtype), tensor
    d, h, kv, hd, f = spec.hidden_size, spec.num_heads, spec.kv_heads, spec.dim_head, spec.ffn_size
    k = spec.num_experts_per_token if spec.use_moe else 1
    attn = (h + 2 * kv) * hd // t + h * hd // t
    extra = 4 * h // t + (8 * spec.num_experts if spec.use_moe else 0)  # bytes: log-sum-exp, router
    masks = 2 * d if spec.dropout > 0 else 0  # bytes, policy none only
    glu = spec.use_glu
    per_none = p * (4 * d + attn + k * (4 if glu else 2) * f // t) + extra + masks
    per_sel = p * (2 * d + attn + k * (2 if glu else 1) * f // t) + extra
    final = p * 2 * d
    layers = spec.num_layers
    per_token = {ActivationCheckpointing.NONE: layers * per_none,
                 ActivationCheckpointing.SELECTIVE: layers * per_sel,
                 ActivationCheckpointing.FULL: layers * p * d + per_none}[policy] + final
    return tokens * per_token


def estimate(config: Config, devices: int) -> MemoryEstimate:
    """The per-device estimate of training ``config`` on ``devices`` devices (the module docstring).

    A mesh the degrees cannot make is the ``ConfigError`` of ``config.distributed.mesh``; a global
    batch that does not split over the data-parallel shards is a ``PlanError`` naming
    ``training.batch_size``."""
    mesh = config.distributed.mesh(devices)
    spec, t = config.model, config.training
    if t.batch_size % mesh.batch_shards:
        raise PlanError(f"training.batch_size={t.batch_size} does not split over the {mesh.batch_shards} "
                        f"data-parallel shards (data={mesh.data} x fsdp={mesh.fsdp})", "training.batch_size")
    micro_batch = t.batch_size // mesh.batch_shards
    dtype = config.optimization.dtype
    p = dtype_bytes(dtype)
    block, root = _local_elements(spec, mesh)
    local = spec.num_layers * block + root
    if mesh.fsdp > 1:
        gathered_block, gathered_root = _local_elements(spec, MeshShape(mesh.data * mesh.fsdp, 1, mesh.tensor))
        units = sorted([gathered_root] + [gathered_block] * min(spec.num_layers, 2), reverse=True)
        compute_copy = p * sum(units[:2])
    else:
        compute_copy = p * local if dtype.is_half else 0
    head_name = "embed.weight" if spec.tie_embeddings else "lm_head.weight"
    head = next(i for i in spec.replace(num_layers=1).param_table() if i.name == head_name)
    vocab_rows = local_shape(head.shape, placement(head, mesh), mesh)[0]
    tokens = micro_batch * config.data.seq_len
    policy = t.activation_checkpointing
    parts = {
        "weights": 4 * local,
        "compute_copy": compute_copy,
        "gradients": 4 * local,
        "optimizer": 8 * local,
        "activations": activation_bytes(spec, policy, tokens, dtype, mesh.tensor),
        "logits": tokens * vocab_rows * (p + 8),
    }
    return MemoryEstimate(mesh, micro_batch, config.data.seq_len, dtype, policy, parts)
