"""Error measures and float32 targets of the parity comparison (numpy; frameworks only in
``configure_numerics``).

Errors: relative error is ``||a - b|| / ||b||`` with the PyTorch side as ``b``. A gradient that is
exactly zero in theory (an expert no token reached, an unused position row) is float noise in both
backends (e.g. q/k gradients when every value vector is equal), so gradient denominators are
floored at ``GRAD_FLOOR`` (1e-2) times the largest parameter gradient norm of the model. Such a
tensor is then held to an absolute bound instead: its error must stay under 1e-6 of the largest
gradient norm (``grad_rel * GRAD_FLOOR``). Measured noise on exactly-zero gradients (q/k under a
one-token sliding window) is ~1e-7 of it -- float32 epsilon at the scale of the terms that
cancel -- so this leaves 10x headroom while a real mismatch (a wrong transpose, sign or mask)
gives errors of order one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["GRAD_FLOOR", "Tolerances", "configure_numerics", "max_abs_err", "mean_kl", "rel_err"]

GRAD_FLOOR = 1e-2


@dataclass(frozen=True)
class Tolerances:
    """Float32 parity targets (DESIGN.md). Both backends do the same float32 operations in
    possibly different orders; after a few layers reassociation error is ~1e-7 relative per op,
    so 1e-5 on logits leaves two orders of headroom for depth while still catching any real
    mismatch (a wrong mask, scale or transpose shows up at 1e-2 or above). Gradients pass through
    twice as many ops and a softmax Jacobian, hence 1e-4."""

    logits_rel: float = 1e-5
    loss_abs: float = 1e-5
    aux_abs: float = 1e-6
    grad_rel: float = 1e-4
    kl: float = 1e-8
    hidden_rel: float = 1e-5
    trajectory_rel: float = 1e-4


def configure_numerics() -> None:
    """float32 everywhere, no TF32 on either side."""
    import jax
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    jax.config.update("jax_default_matmul_precision", "highest")


# ---------------------------------------------------------------------- error measures
def rel_err(a: np.ndarray, b: np.ndarray, floor: float = 0.0) -> float:
    """``||a - b|| / max(||b||, floor)`` in float64; 0 when both are exactly equal."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    diff = float(np.linalg.norm((a64 - b64).ravel()))
    if diff == 0.0:
        return 0.0
    denom = max(float(np.linalg.norm(b64.ravel())), floor)
    return diff / denom if denom > 0 else math.inf


def max_abs_err(a: np.ndarray, b: np.ndarray) -> float:
    if np.size(a) == 0:
        return 0.0
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def mean_kl(logits_p: np.ndarray, logits_q: np.ndarray) -> float:
    """Mean over positions of KL(softmax(p) || softmax(q)), in float64."""
    p = np.asarray(logits_p, np.float64).reshape(-1, logits_p.shape[-1])
    q = np.asarray(logits_q, np.float64).reshape(-1, logits_q.shape[-1])
    logp = p - _logsumexp(p)
    logq = q - _logsumexp(q)
    kl = np.sum(np.exp(logp) * (logp - logq), axis=-1)
    return float(max(kl.mean(), 0.0))


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(-1, keepdims=True))
