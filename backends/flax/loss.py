"""The language-model loss without the logits: a chunked linear + cross-entropy (JAX).

Mirrors ``backends/torch/loss.py``. ``chunked_cross_entropy(hidden, weight, bias, targets,
chunk_tokens, weight_layout=...)`` is the number ``cross_entropy(hidden @ weight + bias, targets)``
computes (the mean float32 cross-entropy over targets != -100; 0 when none is valid), and the same
gradients, but the (N, V) logits never exist at once: a ``lax.scan`` takes the tokens
``chunk_tokens`` at a time, computes each chunk's logits in the compute dtype, reduces them to a
float32 log-sum-exp and the target's logit, and drops them. A ``jax.custom_vjp`` keeps only the
per-token log-sum-exp (N,) float32 for the backward, a second scan that recomputes each chunk's
logits, forms ``softmax - onehot`` and accumulates the weight and bias gradients in float32 carries
(a plain ``jax.checkpoint`` of the scan body would accumulate the cotangent of the cast weight in the
compute dtype). Peak memory of the loss is O(chunk_tokens * V) instead of O(N * V).

Shapes: N tokens, D hidden, V vocab. ``weight_layout`` names the weight's axes as stored: ``"DV"``
for the untied ``lm_head`` (flax ``Linear`` is (in, out)), ``"VD"`` for the tied embedding table;
the einsums read either layout as it is, so nothing is transposed. A token count that
``chunk_tokens`` does not divide is padded with ignored rows (their terms are zero).

Precision: the compute dtype is ``hidden``'s (the model's compute dtype; the weight is cast to it);
the log-sum-exp, the softmax and the gradient accumulators are float32; gradients come back in the
inputs' dtypes.

This module never imports torch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["IGNORE_INDEX", "WEIGHT_LAYOUTS", "chunked_cross_entropy"]

IGNORE_INDEX = -100
WEIGHT_LAYOUTS = ("DV", "VD")


def _chunk_logits(h: jax.Array, w: jax.Array, b: jax.Array | None, layout: str) -> jax.Array:
    """(n, D) x weight -> (n, V) logits in ``h``'s dtype."""
    logits = jnp.einsum(f"nd,{layout.lower()}->nv", h, w)
    return logits if b is None else logits + b


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked_loss(hidden, weight, bias, targets, layout):
    return _chunked_loss_fwd(hidden, weight, bias, targets, layout)[0]


def _chunked_loss_fwd(hidden, weight, bias, targets, layout):
    # hidden (C, n, D) compute dtype; targets (C, n); C chunks of n tokens
    dtype = hidden.dtype
    w = weight.astype(dtype)
    b = None if bias is None else bias.astype(dtype)
    valid = targets != IGNORE_INDEX
    safe = jnp.where(valid, targets, 0)  # any in-range index; its term is zeroed

    def chunk(nll, xs):
        h, t, ok = xs
        logits = _chunk_logits(h, w, b, layout)  # (n, V)
        lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)  # (n,) float32
        picked = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0].astype(jnp.float32)
        return nll + jnp.sum(jnp.where(ok, lse - picked, 0.0)), lse

    nll, lse = jax.lax.scan(chunk, jnp.zeros((), jnp.float32), (hidden, safe, valid))
    loss = nll / jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)  # 0, not nan, when nothing is valid
    return loss, (hidden, weight, bias, safe, valid, lse)


def _chunked_loss_bwd(layout, res, grad_loss):
    hidden, weight, bias, safe, valid, lse = res
    dtype = hidden.dtype
    w = weight.astype(dtype)
    b = None if bias is None else bias.astype(dtype)
    # d loss / d logit = grad_loss * (softmax - onehot) / n_valid on valid rows, 0 elsewhere
    row_scale = valid.astype(jnp.float32) * (grad_loss / jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32))
    vocab = weight.shape[layout.index("V")]
    w_spec = layout.lower()

    def chunk(carry, xs):
        grad_w, grad_b = carry
        h, t, lse_c, scale = xs
        logits = _chunk_logits(h, w, b, layout)  # (n, V), recomputed
        probs = jnp.exp(logits.astype(jnp.float32) - lse_c[:, None])
        onehot = jnp.arange(vocab) == t[:, None]
        d = ((probs - onehot) * scale[:, None]).astype(dtype)  # (n, V)
        grad_h = jnp.einsum(f"nv,{w_spec}->nd", d, w, preferred_element_type=jnp.float32).astype(dtype)
        grad_w = grad_w + jnp.einsum(f"nd,nv->{w_spec}", h, d, preferred_element_type=jnp.float32)
        if grad_b is not None:
            grad_b = grad_b + jnp.sum(d.astype(jnp.float32), axis=0)
        return (grad_w, grad_b), grad_h

    init = (jnp.zeros(weight.shape, jnp.float32), None if bias is None else jnp.zeros(bias.shape, jnp.float32))
    (grad_w, grad_b), grad_h = jax.lax.scan(chunk, init, (hidden, safe, lse, row_scale))
    return (grad_h.astype(hidden.dtype), grad_w.astype(weight.dtype),
            None if bias is None else grad_b.astype(bias.dtype), None)


_chunked_loss.defvjp(_chunked_loss_fwd, _chunked_loss_bwd)


def chunked_cross_entropy(hidden: jax.Array, weight: jax.Array, bias: jax.Array | None, targets: jax.Array,
                          chunk_tokens: int, *, weight_layout: str = "DV") -> jax.Array:
    """Mean float32 cross-entropy of ``hidden @ weight + bias`` against ``targets`` over targets
    != -100 (0 when none is valid), ``chunk_tokens`` rows of logits at a time (the module
    docstring). ``hidden`` (..., D), ``targets`` (...) the same leading shape, ``weight`` (D, V)
    with ``weight_layout="DV"`` or (V, D) with ``"VD"``."""
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be an int >= 1, got {chunk_tokens!r}")
    if weight_layout not in WEIGHT_LAYOUTS:
        raise ValueError(f"weight_layout={weight_layout!r} is not one of: {', '.join(WEIGHT_LAYOUTS)}")
    D = weight.shape[weight_layout.index("D")]
    if hidden.shape[-1] != D or tuple(hidden.shape[:-1]) != tuple(targets.shape):
        raise ValueError(f"hidden (..., {D}) and targets (...) must share the leading shape, got "
                         f"hidden {tuple(hidden.shape)}, targets {tuple(targets.shape)}")
    hidden, targets = hidden.reshape(-1, D), targets.reshape(-1)
    n = min(chunk_tokens, max(hidden.shape[0], 1))
    pad = -hidden.shape[0] % n  # ignored rows up to a whole number of chunks
    if pad:
        hidden = jnp.pad(hidden, ((0, pad), (0, 0)))
        targets = jnp.pad(targets, (0, pad), constant_values=IGNORE_INDEX)
    return _chunked_loss(hidden.reshape(-1, n, D), weight, bias, targets.reshape(-1, n), weight_layout)
