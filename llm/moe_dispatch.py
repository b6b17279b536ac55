"""The sort-based ("blocked") MoE dispatch both backends implement as ``moe_impl="blocked"``.

The reference MoE (``docs/architecture.md``, MoE step 4) runs every expert on every token: E/k
times the FLOPs a top-k model needs. The blocked dispatch computes the same function (same values,
same gradients) on only the selected (token, expert) pairs, with static shapes and no Python loop
over experts, so it compiles under ``jax.jit`` and ``torch.compile``:

1. flatten the N*k assignments, stable-sort them by expert;
2. give each expert a run of rows padded up to a multiple of ``block`` rows, in one buffer of
   ``padded_rows(...)`` rows (a static bound: ``N*k + E*(block-1)`` rounded up to ``block``);
   scatter each assignment's token vector to its row, zeros elsewhere;
3. every block of ``block`` rows belongs to one expert, so the expert MLP is a batched matmul over
   blocks with each block's expert weights gathered: ``(nb, block, D) @ (nb, D, F)``;
4. gather each assignment's output row, scale it by its routing weight (0 when capacity dropped it)
   and scatter-add it to its token.

Padding rows are zeros and their outputs are never read, so they add nothing to values or
gradients. The block size trades padding (up to E*(block-1) extra rows) against the traffic of the
gathered weight copies (nb blocks of D x F): ``block_rows`` aims at about four blocks per expert.
This module is framework-free.
"""

from __future__ import annotations

__all__ = ["MOE_IMPLS", "block_rows", "padded_rows"]

MOE_IMPLS = ("dense", "blocked")


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
