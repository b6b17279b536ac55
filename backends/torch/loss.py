"""The language-model loss without the logits: a chunked linear + cross-entropy.

``chunked_cross_entropy(hidden, weight, bias, targets, chunk_tokens)`` is the number
``F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, ignore_index=-100)`` computes
(the mean float32 cross-entropy over targets != -100; 0 when none is valid), and the same
gradients, but the (N, V) logits never exist at once: the tokens are taken ``chunk_tokens`` at a
time, each chunk's logits are computed in the compute dtype, reduced to a float32 log-sum-exp and
the target's logit, and dropped. Only the per-token log-sum-exp (N,) float32 is kept for the
backward, which recomputes each chunk's logits, forms ``softmax - onehot`` and accumulates the
gradients of the hidden states, the weight and the bias. Peak memory of the loss is then
O(chunk_tokens * V) instead of O(N * V); the price is a fourth (N, D) x (D, V) matmul (the
logits again, in the backward) and per-chunk kernels: +35-50% of the head's time on an H200
(``benchmarks/loss_bench.py``, ``benchmarks/NOTES.md``).

Shapes: N tokens, D hidden, V vocab. ``weight`` (V, D) is ``nn.Linear``'s layout (the tied case
passes ``embed.weight``: its gradient adds to the embedding lookup's through autograd).

Precision: under ``torch.autocast`` the compute dtype is the autocast dtype (as ``F.linear`` would
use), otherwise ``hidden``'s dtype; the log-sum-exp, the softmax and the accumulators of the weight
and bias gradients are float32; gradients come back in the inputs' dtypes.

This module must never import jax or flax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["IGNORE_INDEX", "ChunkedLinearCrossEntropy", "chunked_cross_entropy"]

IGNORE_INDEX = -100


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear`` would compute the logits in here: autocast's, else ``hidden``'s."""
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """``mean_valid(CE(hidden @ weight.T + bias, targets))`` over chunks of ``chunk_tokens`` rows.

    forward(hidden (N, D), weight (V, D), bias (V,) or None, targets (N,) int, chunk_tokens) -> () fp32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_tokens):
        dtype = _compute_dtype(hidden)
        valid = targets != IGNORE_INDEX
        safe = targets.masked_fill(~valid, 0)  # any in-range index; its term is zeroed
        with torch.autocast(hidden.device.type, enabled=False):  # the dtypes below are explicit
            h, w = hidden.to(dtype), weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            lses, nll = [], torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, h.shape[0], chunk_tokens):
                rows = slice(start, start + chunk_tokens)
                logits = F.linear(h[rows], w, b)  # (n, V) compute dtype
                lse = torch.logsumexp(logits.float(), dim=-1)  # (n,) float32
                picked = logits.gather(1, safe[rows, None])[:, 0].float()
                nll = nll + torch.where(valid[rows], lse - picked, 0.0).sum()
                lses.append(lse)
            loss = nll / valid.sum().clamp(min=1)  # 0, not nan, when nothing is valid
        # the cast weight is kept, as autocast's F.linear keeps it, rather than cast again
        ctx.save_for_backward(hidden, w, b, safe, valid, torch.cat(lses))
        ctx.chunk_tokens, ctx.weight_dtype = chunk_tokens, weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, w, b, safe, valid, lse = ctx.saved_tensors
        chunk_tokens = ctx.chunk_tokens
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        # d loss / d logit = grad_loss * (softmax - onehot) / n_valid on valid rows, 0 elsewhere
        row_scale = valid.float() * (grad_loss.float() / valid.sum().clamp(min=1))  # (N,)
        with torch.autocast(hidden.device.type, enabled=False):
            h = hidden.to(w.dtype)
            grad_h = []
            grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
            grad_b = torch.zeros(w.shape[:1], dtype=torch.float32, device=w.device) if need_b else None
            for start in range(0, h.shape[0], chunk_tokens):
                rows = slice(start, start + chunk_tokens)
                logits = F.linear(h[rows], w, b)  # (n, V), recomputed
                d = torch.sub(logits, lse[rows, None]).exp_()  # softmax (n, V) float32 (type promotion)
                d.scatter_add_(1, safe[rows, None], torch.full_like(d[:, :1], -1.0))  # - onehot
                d = d.mul_(row_scale[rows, None]).to(w.dtype)
                if need_h:
                    grad_h.append(d @ w)  # (n, D)
                if need_w:  # in place: the (V, D) product in the compute dtype, summed in float32
                    grad_w.add_(torch.einsum("nv,nd->vd", d, h[rows]))
                if need_b:
                    grad_b.add_(d.sum(0, dtype=torch.float32))
        return (torch.cat(grad_h).to(hidden.dtype) if need_h else None,
                grad_w.to(ctx.weight_dtype) if need_w else None,
                grad_b.to(ctx.bias_dtype) if need_b else None, None, None)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          targets: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """Mean float32 cross-entropy of ``F.linear(hidden, weight, bias)`` against ``targets`` over
    targets != -100 (0 when none is valid), ``chunk_tokens`` rows of logits at a time (the module
    docstring). ``hidden`` (..., D), ``targets`` (...) the same leading shape, ``weight`` (V, D)."""
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be an int >= 1, got {chunk_tokens!r}")
    D = weight.shape[1]
    if hidden.shape[-1] != D or tuple(hidden.shape[:-1]) != tuple(targets.shape):
        raise ValueError(f"hidden (..., {D}) and targets (...) must share the leading shape, got "
                         f"hidden {tuple(hidden.shape)}, targets {tuple(targets.shape)}")
    return ChunkedLinearCrossEntropy.apply(hidden.reshape(-1, D), weight, bias, targets.reshape(-1),
                                           chunk_tokens)
