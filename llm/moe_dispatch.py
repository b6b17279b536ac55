"""How an MoE layer runs its experts (``optimization.moe_impl``), and the static sizes both backends'
sparse dispatches share.

Every implementation computes the same function (``docs/architecture.md``, MoE step 4: the sum over
a token's selected experts of routing weight times expert output; capacity-dropped assignments weigh
0 and the token passes through the residual). They differ only in which FLOPs they spend:

* ``dense`` (the reference): every expert on every token, mixed by an (N, E) weight matrix that is
  zero off the selected experts. E/k times the expert FLOPs a top-k model needs.
* ``blocked``: the N*k assignments, stable-sorted by expert, each get a row of a padded buffer in
  which every block of ``block`` rows belongs to one expert (``padded_rows``: ``N*k + E*(block-1)``
  rounded up to ``block``; padding rows are zeros and their outputs are never read), and the experts
  run as one batched matmul over blocks with each block's expert weights gathered:
  ``(nb, block, D) @ (nb, D, F)``. Static shapes, no loop over experts: it compiles anywhere. The
  block size trades padding (up to E*(block-1) rows) against the traffic of the gathered weight
  copies: ``block_rows`` aims at about four blocks per expert.
* ``grouped``: the sorted assignments, unpadded, go through one grouped GEMM whose groups are the
  experts' runs (``torch._grouped_mm`` with the runs' end offsets; ``jax.lax.ragged_dot`` with the
  runs' sizes). No padding and no gathered weight copies; where the backend has no grouped kernel
  for the device and dtype (torch off Hopper-class CUDA in bf16) it multiplies run by run.

``auto`` is resolved once, when an engine builds its model, by ``resolve_moe_impl`` (a pure function
of the backend, device kind and compute dtype; the rule and the measurements behind it are in its
docstring). This module is framework-free.
"""

from __future__ import annotations

import enum

__all__ = ["MOE_IMPLS", "MoEImpl", "block_rows", "padded_rows", "resolve_moe_impl"]


class MoEImpl(str, enum.Enum):
    """``optimization.moe_impl`` values: ``auto`` or one of the implementations a model runs."""

    AUTO = "auto"
    DENSE = "dense"
    BLOCKED = "blocked"
    GROUPED = "grouped"


MOE_IMPLS = ("dense", "blocked", "grouped")  # what an MoE module's ``moe_impl`` may be (``auto`` resolved)


def resolve_moe_impl(requested: str | MoEImpl, backend: str, device_kind: str, dtype: str) -> str:
    """The implementation (one of ``MOE_IMPLS``) an engine builds for ``optimization.moe_impl``.

    ``backend`` is ``"torch"`` or ``"jax"``; ``device_kind`` the device platform (``"cuda"``,
    ``"gpu"``, ``"cpu"``, ``"tpu"``, ...); ``dtype`` the compute dtype's name (``"bfloat16"``...).
    Every impl runs under tensor parallel too (torch splits each expert's mlp dimension).
    An explicit impl is returned as it is. ``auto``:

    * torch and jax on CUDA GPUs and on CPU: ``blocked``. Measured on one H200 (torch 2.11, jax
      0.11.2; the ``moe`` preset, 8 experts top-2 dropless, 16 x 1024 tokens, bf16, one run:
      ``benchmarks/results/moe_H200_2026-12-02.md``): torch-compile blocked 408k tok/s (31.0% MFU on
      active parameters), grouped (``torch._grouped_mm``) 289k (21.9%); jax-jit blocked 447k
      (34.0%), grouped (``ragged_dot``) 135k (10.3%), dense 216k (16.4%). The grouped kernel alone is
      fast (432 TFLOP/s in torch); the sort and permutations around it are what lose.
    * jax on TPU: ``grouped`` (``ragged_dot`` lowers to the TPU's grouped-matmul kernel; not measured
      here).

    The CPU choices were measured on a shared 2-core CPU (one MoE layer, float32, D=256, F=512,
    top-2, forward + backward, best of 12 interleaved runs; the machine was loaded, so only the
    ordering is meant): 8 experts, 1024 tokens: torch dense 1340 ms, blocked 770, grouped 1430;
    jax dense 1370, blocked 460, grouped 1550. At 4 experts and 128 tokens all are within noise of
    dense (torch 244 / 267 / 377 ms; jax 76 / 172 / 106), so blocked is the CPU rule for both:
    much faster from modest sizes on, never wrong.
    """
    try:
        impl = MoEImpl(requested)
    except ValueError:
        raise ValueError(f"moe_impl={requested!r} is not one of: "
                         f"{', '.join(m.value for m in MoEImpl)}") from None
    if impl is not MoEImpl.AUTO:
        return impl.value
    if backend == "torch":
        return MoEImpl.BLOCKED.value
    if backend == "jax":
        return MoEImpl.GROUPED.value if device_kind == "tpu" else MoEImpl.BLOCKED.value
    raise ValueError(f"resolve_moe_impl: backend={backend!r} is not one of: torch, jax")


def block_rows(num_assignments: int, num_experts: int) -> int:
    """Rows per block: a power of two near ``num_assignments / (4 * num_experts)``, in [16, 2048]."""
    target = max(1, num_assignments // (4 * num_experts))
    rows = 16
    while rows * 2 <= target and rows < 2048:
        rows *= 2
    return rows


def padded_rows(num_assignments: int, num_experts: int, block: int) -> int:
    """Static size of the padded buffer: every expert's run rounded up to ``block`` rows."""
    worst = num_assignments + num_experts * (block - 1)
    return -(-worst // block) * block
