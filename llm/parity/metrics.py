"""Error measures and float32 targets of the parity comparison (numpy; frameworks only in
``configure_numerics``).

Errors: relative error is ``||a - b|| / ||b||`` with the PyTorch side as ``b``.

Gradients (``grad_bound``): a float32 gradient is accurate to float32 epsilon at the scale of the
terms that cancel in it, and those are of the size of the model's largest gradients, not of the
tensor's own. So a parameter gradient ``g`` is held to ``||g_jax - g_torch|| <= grad_rel *
max(||g||, floor_abs)`` with ``floor_abs = GRAD_FLOOR * top`` and ``top`` the model's largest
parameter gradient norm: relative for every tensor whose gradient norm is above ``floor_abs``, and
an absolute bound of ``grad_rel * GRAD_FLOOR`` of the top norm below it. ``GRAD_FLOOR`` comes from
the measured noise (see its comment); a tensor whose gradient is exactly zero in both backends
(``diff == 0``) needs no bound at all. Each tensor the floor is applied to is an exception, listed
with its bound by ``llm.parity.report.compare``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["GRAD_FLOOR", "Tolerances", "configure_numerics", "grad_bound", "max_abs_err", "mean_kl", "rel_err"]

# The absolute floor of a gradient's bound, as a fraction of the model's largest gradient norm.
# Measured (CPU, one forward + backward, 16 drawn specs plus 18 targeted: q/k under a one-token
# window, key biases with and without RoPE): gradients that are zero in exact arithmetic come out
# as float noise of up to 1.2e-7 of the largest norm (|g_jax - g_torch| the same size), while real
# gradients down to 1e-5 of the largest agree to ~3e-7 of their *own* norm and never need the
# floor. grad_rel * GRAD_FLOOR = 5e-7 of the largest norm is 4x the worst noise measured.
GRAD_FLOOR = 5e-3


def grad_bound(norm: float, top: float, grad_rel: float) -> tuple[float, bool]:
    """The allowed ``||g_jax - g_torch||`` of a gradient of norm ``norm`` when the model's largest is
    ``top``, and whether the absolute floor (not ``grad_rel * norm``) set it."""
    floor_abs = GRAD_FLOOR * top
    return grad_rel * max(norm, floor_abs), norm < floor_abs


@dataclass(frozen=True)
class Tolerances:
    """Float32 parity targets (``docs/architecture.md``). Both backends do the same float32 operations in
    possibly different orders; after a few layers reassociation error is ~1e-7 relative per op,
    so 1e-5 on logits leaves two orders of headroom for depth while still catching any real
    mismatch (a wrong mask, scale or transpose shows up at 1e-2 or above). Gradients pass through
    twice as many ops and a softmax Jacobian, hence 1e-4 (and an absolute floor, ``grad_bound``).
    ``trajectory_rel`` bounds the per-step loss of 20 AdamW steps (``llm.parity.trajectory``):
    measured at most ~1e-6 relative over the thorough profile's drawn specs (typically 1e-7, a
    float32 ulp of the loss), so 1e-5 is 10x the worst observed; a real mismatch (a wrong decay
    group, schedule or clip) shows up at 1e-3 or above within a few steps."""

    logits_rel: float = 1e-5
    loss_abs: float = 1e-5
    aux_abs: float = 1e-6
    grad_rel: float = 1e-4
    kl: float = 1e-8
    hidden_rel: float = 1e-5
    trajectory_rel: float = 1e-5


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
