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
    logits           N V' (p + 8)   torch: the LM head output in the compute dtype, its float32
                              log-softmax kept for the backward and the float32 gradient of the logits;
                     N V' p   jax (the lean cross-entropy: the compute-dtype logits only)

``b`` = ``training.batch_size / mesh.batch_shards`` (the micro-batch of one data-parallel shard;
``grad_accum_steps`` micro-batches run one after another, so it does not multiply), ``T`` =
``data.seq_len``, ``V'`` = the vocabulary rows of the output projection on one device (split over
``tensor`` when the placement splits it: the loss runs vocab-parallel).

Activations per token of one block, in elements, with ``D`` = hidden, ``t`` = tensor degree (it
divides the head and MLP tensors; the residual stream and the norm outputs are whole on every
device: no sequence parallelism), ``a`` = the attention's and ``m`` = the MLP's::

    none       4 D + a_none + m_none          selective  2 D + a_sel + m_sel

Attention, ``H`` / ``KV`` = heads / kv heads, ``hd`` = head size: ``a_none = a_sel = (H + 2 KV) hd
/ t + H hd / t`` (q / k / v and the attention output). MLA (``attention: mla``; ``n`` / ``p`` /
``dv`` = ``qk_nope_head_dim`` / ``qk_rope_head_dim`` / ``v_head_dim``, ``r`` = ``kv_lora_rank``,
``q_r`` = ``q_lora_rank`` or 0): ``a_sel = q_r + H (n + p) / t + (r + p) + H (n + dv) / t + H dv /
t`` (the query projections, the latent with the rope key, its expansion, the attention output: the
matmul outputs), ``a_none = a_sel + q_r + r + 2 H (n + p) / t`` (the latent norms' outputs and the
rotated query and key the kernel reads).

MLP: ``m_none = 4 W / t`` with GLU (gate / up / activation / product), ``2 W / t`` plain (up and
activation); ``m_sel = 2 W / t`` with GLU, ``W / t`` plain (the gate / up matmul outputs). ``W`` is
the width a token runs through: ``F`` (``intermediate_size``) in a dense block (the
``first_dense_layers`` too); in an MoE block ``k`` routed experts of ``moe_intermediate_size`` plus
the shared experts' one MLP (``num_shared_experts`` times its size; 0 without).

``none`` keeps the block input, its norm output, the attention's tensors, the residual after
attention, the MLP norm output and the MLP's. ``selective`` keeps the block input, the matmul
outputs and the attention output, the o_proj output, and recomputes norms, activations and
residual adds. Both add, in bytes, the attention kernel's float32 log-sum-exp (``4 H / t``), for an
MoE block the float32 router logits and probabilities (``8 E``), and with ``model.dropout > 0``
(``none`` only) a one-byte mask per residual dropout (``2 D``). Attention is counted as a fused
kernel (torch SDPA, cuDNN): no ``T x T`` score matrix is kept. ``full`` keeps each block's input
(``D`` per block) and, during the backward, one block's ``none`` activations (the larger kind's) as
it is recomputed. Every policy adds the final norm's input and output (``2 D``). So for ``L``
blocks, ``L_d`` dense and ``L_m`` MoE::

    none = L_d a_none(dense) + L_m a_none(moe) + 2 D        (selective alike)
    full = L D + max(a_none(dense), a_none(moe)) + 2 D

The weights count every canonical tensor of ``param_table()`` (a dense and an MoE block read once
each, times their counts): with one device, the weights' elements are ``spec.num_params()``.

The total depends on the backend's buffer lifetimes (``estimate(..., backend=)``):

    torch   the sum of the parts (eager autograd keeps the float32 log-softmax of the logits and
            the logits' float32 gradient: ``logits`` as above).
    jax     weights + optimizer + max(gradients, compute_copy + activations + logits), with
            ``logits`` = ``N V' p`` (the lean cross-entropy reads the compute-dtype logits and writes
            its gradient in their place): XLA allocates each gradient as the backward produces it
            and frees the saved activations as it goes, so the two peaks do not add. Measured on an
            H200 (``benchmarks/results/engine_memory_H200_2026-12-02.md``, llama_3b at 4 x 2048):
            this rule gives 0.97 (none), 1.00 (full) and 1.00 (selective) of the measured peaks;
            the torch sum 0.94 / 1.13 / 1.08 of torch's.

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
BACKENDS = ("torch", "jax")
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
    backend: str = "torch"  # whose buffer lifetimes ``total`` follows (the module docstring)

    @property
    def total(self) -> int:
        if self.backend == "jax":
            b = self.parts
            transient = b["compute_copy"] + b["activations"] + b["logits"]
            return b["weights"] + b["optimizer"] + max(b["gradients"], transient)
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
                "backend": self.backend, "bytes": dict(self.parts), "total": self.total}


def _short(spec: ModelSpec) -> ModelSpec:
    """``spec`` cut to its first ``first_dense_layers + 1`` blocks: one of each kind it has."""
    return spec.replace(num_layers=min(spec.num_layers, spec.first_dense_layers + 1))


def _local_elements(spec: ModelSpec, mesh: MeshShape) -> tuple[int, int, int]:
    """Local elements per device of (one dense block, one MoE block, everything outside the blocks),
    read from the table of a model of at most ``first_dense_layers + 1`` blocks: blocks of one kind
    have the same shapes, so a huge ``num_layers`` costs nothing here. A kind the spec has no block
    of counts 0."""
    short = _short(spec)
    dense_prefix, moe_prefix = "layers.0.", f"layers.{short.num_layers - 1}."
    dense = moe = root = 0
    for info, where in zip(short.param_table(), param_placements(short, mesh).values(), strict=True):
        if not info.trainable:  # untrained state (the router's E-float selection bias): no gradient, no moments
            continue
        size = 1
        for n in local_shape(info.shape, where, mesh):
            size *= n
        if not info.name.startswith("layers."):
            root += size
        elif info.name.startswith(moe_prefix) and short.is_moe_layer(short.num_layers - 1):
            moe += size
        elif info.name.startswith(dense_prefix) and not short.is_moe_layer(0):
            dense += size
    return dense, moe, root


def _attention_elements(spec: ModelSpec, t: int) -> tuple[int, int]:
    """Elements per token the attention keeps, (none, selective), ``t`` dividing what is split by head.

    MHA / GQA (both policies): q, k, v and the attention output, ``(H + 2 KV) hd / t + H hd / t``.
    MLA (n, p, dv, r, q_r: ``llm.spec``'s head and rank sizes): selective keeps the matmul outputs,
    the query ``H (n + p) / t`` (and its compressed ``q_r`` with ``q_lora_rank``), the latent with
    the rope key ``r + p``, its expansion ``H (n + dv) / t`` and the attention output ``H dv / t``;
    none adds the latent norms' outputs (``r``, and ``q_r``) and the rotated, concatenated query
    and key the kernel reads (``2 H (n + p) / t``)."""
    h = spec.num_heads
    if not spec.is_mla:
        both = (h + 2 * spec.kv_heads) * spec.dim_head // t + h * spec.dim_head // t
        return both, both
    qk, dv, r, p = spec.qk_head_dim, spec.v_head_dim, spec.kv_lora_rank, spec.qk_rope_head_dim
    q_r = spec.q_lora_rank or 0
    selective = q_r + h * qk // t + (r + p) + h * (spec.qk_nope_head_dim + dv) // t + h * dv // t
    return selective + q_r + r + 2 * h * qk // t, selective


def _mlp_elements(spec: ModelSpec, moe: bool, t: int) -> tuple[int, int]:
    """Elements per token one block's MLP keeps, (none, selective): ``m F / t`` per MLP a token runs
    (m = 4 / 2 with GLU, 2 / 1 plain), where an MoE block runs its ``k`` routed experts of
    ``expert_ffn_size`` and the shared experts' one MLP of ``shared_ffn_size``; a dense block one MLP
    of ``intermediate_size``."""
    m_none, m_sel = (4, 2) if spec.use_glu else (2, 1)
    width = (spec.num_experts_per_token * spec.expert_ffn_size + spec.shared_ffn_size) if moe else spec.ffn_size
    return m_none * width // t, m_sel * width // t


def activation_bytes(spec: ModelSpec, policy: ActivationCheckpointing, tokens: int, dtype: DType,
                     tensor: int = 1) -> int:
    """Bytes of the activations kept for the backward of ``tokens`` tokens (the module docstring's
    formula; ``tensor`` divides the head and MLP tensors)."""
    p, t = dtype_bytes(dtype), tensor
    d, h = spec.hidden_size, spec.num_heads
    attn_none, attn_sel = _attention_elements(spec, t)
    masks = 2 * d if spec.dropout > 0 else 0  # bytes, policy none only

    def per_block(moe: bool) -> tuple[int, int]:
        mlp_none, mlp_sel = _mlp_elements(spec, moe, t)
        extra = 4 * h // t + (8 * spec.num_experts if moe else 0)  # bytes: log-sum-exp, router
        return (p * (4 * d + attn_none + mlp_none) + extra + masks, p * (2 * d + attn_sel + mlp_sel) + extra)

    kinds = [(spec.num_layers - spec.num_moe_layers, per_block(False)), (spec.num_moe_layers, per_block(True))]
    kinds = [(count, block) for count, block in kinds if count]
    final = p * 2 * d
    if policy is ActivationCheckpointing.NONE:
        per_token = sum(count * none for count, (none, _) in kinds)
    elif policy is ActivationCheckpointing.SELECTIVE:
        per_token = sum(count * sel for count, (_, sel) in kinds)
    else:  # the block inputs, and the largest block recomputed
        per_token = spec.num_layers * p * d + max(none for _, (none, _) in kinds)
    return tokens * (per_token + final)


def estimate(config: Config, devices: int, backend: str = "torch") -> MemoryEstimate:
    """The per-device estimate of training ``config`` on ``devices`` devices with ``backend``
    (``"torch"`` or ``"jax"``; the module docstring).

    A mesh the degrees cannot make is the ``ConfigError`` of ``config.distributed.mesh``; a global
    batch that does not split over the data-parallel shards is a ``PlanError`` naming
    ``training.batch_size``."""
    if backend not in BACKENDS:
        raise PlanError(f"backend={backend!r} is not one of: {', '.join(BACKENDS)}")
    mesh = config.distributed.mesh(devices)
    spec, t = config.model, config.training
    if t.batch_size % mesh.batch_shards:
        raise PlanError(f"training.batch_size={t.batch_size} does not split over the {mesh.batch_shards} "
                        f"data-parallel shards (data={mesh.data} x fsdp={mesh.fsdp})", "training.batch_size")
    micro_batch = t.batch_size // mesh.batch_shards
    dtype = config.optimization.dtype
    p = dtype_bytes(dtype)
    dense_layers, moe_layers = spec.num_layers - spec.num_moe_layers, spec.num_moe_layers
    dense, moe, root = _local_elements(spec, mesh)
    local = dense_layers * dense + moe_layers * moe + root
    if mesh.fsdp > 1:
        g_dense, g_moe, g_root = _local_elements(spec, MeshShape(mesh.data * mesh.fsdp, 1, mesh.tensor))
        units = sorted([g_root] + [g_dense] * min(dense_layers, 2) + [g_moe] * min(moe_layers, 2), reverse=True)
        compute_copy = p * sum(units[:2])
    else:
        compute_copy = p * local if dtype.is_half else 0
    head_name = "embed.weight" if spec.tie_embeddings else "lm_head.weight"
    head = next(i for i in _short(spec).param_table() if i.name == head_name)
    vocab_rows = local_shape(head.shape, placement(head, mesh), mesh)[0]
    tokens = micro_batch * config.data.seq_len
    policy = t.activation_checkpointing
    parts = {
        "weights": 4 * local,
        "compute_copy": compute_copy,
        "gradients": 4 * local,
        "optimizer": 8 * local,
        "activations": activation_bytes(spec, policy, tokens, dtype, mesh.tensor),
        "logits": tokens * vocab_rows * (p + 8 if backend == "torch" else p),
    }
    return MemoryEstimate(mesh, micro_batch, config.data.seq_len, dtype, policy, parts, backend)
