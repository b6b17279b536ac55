"""AdamW, gradient clipping and loss scaling with PyTorch's arithmetic, as optax transformations.

The JAX engine must follow the torch engine's optimiser step for step (a run moves between the
backends mid-way, and ``parity_tests`` compares 20-step trajectories to 1e-4), so this module
reproduces ``torch.optim.AdamW`` (the single-tensor CPU path), ``torch.nn.utils.clip_grad_norm_``
and ``torch.amp.GradScaler`` operation by operation rather than using the optax built-ins:

* ``adamw_torch`` -- per parameter, with ``t`` the step count after the increment::

      p   <- p * (1 - lr * wd)                      decoupled decay first, only where ``mask``
      m   <- m + (1 - b1) * (g - m)                 torch's ``lerp_`` (weight < 0.5 branch)
      v   <- v * b2 + (1 - b2) * g * g
      p   <- p - (lr / (1 - b1**t)) * m / (sqrt(v) / sqrt(1 - b2**t) + eps)

  ``optax.adamw`` differs in where ``eps`` sits (``sqrt(v_hat) + eps`` on the bias-corrected
  ``v``: the same value, other rounding) and adds the decay to the update instead of scaling the
  parameter first; both are rounding-level, but the order above is torch's. The learning rate is
  an extra argument of ``update`` (``learning_rate=``): the engine passes ``llm.schedule``'s value
  for the step, so the schedule is one pure function for both backends. Like any optax
  transformation ``update`` returns ``p_new - p``; ``optax.apply_updates`` adds it back, which is
  exact wherever the step is small against ``p`` (Sterbenz) and off by one rounding elsewhere.
* ``clip_by_global_norm_torch`` -- the global norm is the 2-norm of the per-tensor 2-norms, the
  factor ``min(1, max_norm / (norm + 1e-6))`` is always applied (optax's
  ``clip_by_global_norm`` uses ``max_norm / norm`` and only when ``norm > max_norm``).
* ``LossScale`` -- ``GradScaler``'s dynamic float16 loss scale: initial ``2**16``, halved (and the
  step skipped) when a gradient is inf/nan, doubled after 2000 clean steps.

A task half's own transformation (``FlaxTask.build_optimizer``) replaces ``adamw_torch``, chained
behind ``clip_by_global_norm_torch`` by the engine. The moments are kept in the parameters' own
layout and dtype (float32); the engine converts them to canonical names and layout for checkpoints
(``llm.run.moment_name``). This module never imports torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = ["AdamWState", "LossScale", "adamw_torch", "build_optimizer", "clip_by_global_norm_torch",
           "global_norm_torch", "update_loss_scale"]

CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_: max_norm / (total_norm + 1e-6)


class AdamWState(NamedTuple):
    """``count``: optimiser steps applied (int32); ``exp_avg`` / ``exp_avg_sq``: like the params."""

    count: jax.Array
    exp_avg: Any
    exp_avg_sq: Any


def global_norm_torch(tree: Any) -> jax.Array:
    """``clip_grad_norm_``'s total norm: the 2-norm of the stacked per-tensor 2-norms (float32)."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    norms = jnp.stack([jnp.linalg.norm(g.astype(jnp.float32).ravel()) for g in leaves])
    return jnp.linalg.norm(norms)


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
    """Scale every gradient by ``min(1, max_norm / (global_norm + 1e-6))``, as torch does."""

    def init(params: Any) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update(updates: Any, state: optax.EmptyState, params: Any = None) -> tuple[Any, optax.EmptyState]:
        del params
        coef = jnp.minimum(max_norm / (global_norm_torch(updates) + CLIP_EPS), 1.0)
        return jax.tree.map(lambda g: (g * coef).astype(g.dtype), updates), state

    return optax.GradientTransformation(init, update)


def adamw_torch(b1: float, b2: float, eps: float, weight_decay: float,
                mask: Any | Callable[[Any], Any] | None = None) -> optax.GradientTransformationExtraArgs:
    """``torch.optim.AdamW`` (see the module docstring); ``update(..., learning_rate=lr)``.

    ``mask``: a pytree of bools like the params (or a function of the params returning one):
    True = weight decay applies. None = decay everything.
    """

    def init(params: Any) -> AdamWState:
        zeros = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=jnp.float32), params)
        return AdamWState(count=jnp.zeros((), jnp.int32), exp_avg=zeros,
                          exp_avg_sq=jax.tree.map(jnp.copy, zeros))

    def update(updates: Any, state: AdamWState, params: Any = None, *, learning_rate: Any,
               **extra: Any) -> tuple[Any, AdamWState]:
        del extra
        if params is None:
            raise ValueError("adamw_torch needs the params (decoupled weight decay)")
        count = state.count + 1
        t = count.astype(jnp.float32)
        lr = jnp.asarray(learning_rate, jnp.float32)
        step_size = lr / (1.0 - jnp.float32(b1) ** t)
        bc2_sqrt = jnp.sqrt(1.0 - jnp.float32(b2) ** t)
        decay_mask = mask(params) if callable(mask) else mask
        if decay_mask is None:
            decay_mask = jax.tree.map(lambda _: True, params)

        def one(g, m, v, p, decays):
            g = g.astype(jnp.float32)
            m = m + (1.0 - b1) * (g - m)
            v = v * b2 + (1.0 - b2) * g * g
            p32 = p.astype(jnp.float32)
            decayed = p32 * (1.0 - lr * weight_decay) if (decays and weight_decay) else p32
            new_p = decayed - step_size * (m / (jnp.sqrt(v) / bc2_sqrt + eps))
            return (new_p - p32).astype(p.dtype), m, v

        out = jax.tree.map(one, updates, state.exp_avg, state.exp_avg_sq, params, decay_mask)
        treedef = jax.tree.structure(updates)
        triples = treedef.flatten_up_to(out)
        new_updates = treedef.unflatten([u for u, _, _ in triples])
        exp_avg = treedef.unflatten([m for _, m, _ in triples])
        exp_avg_sq = treedef.unflatten([v for _, _, v in triples])
        return new_updates, AdamWState(count=count, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)

    return optax.GradientTransformationExtraArgs(init, update)


def build_optimizer(*, grad_clip: float, b1: float, b2: float, eps: float, weight_decay: float,
                    mask: Any = None) -> optax.GradientTransformationExtraArgs:
    """The engine's optimiser: torch-style clipping (when ``grad_clip > 0``), then torch AdamW.

    The state is ``(clip state, AdamWState)``; ``update(grads, state, params, learning_rate=lr)``.
    """
    parts = []
    if grad_clip > 0:
        parts.append(clip_by_global_norm_torch(grad_clip))
    parts.append(adamw_torch(b1, b2, eps, weight_decay, mask))
    return optax.chain(*parts)


class LossScale(NamedTuple):
    """``torch.amp.GradScaler``'s state: the scale and the clean steps since it last changed."""

    scale: jax.Array  # float32 ()
    growth_tracker: jax.Array  # int32 ()

    @classmethod
    def create(cls, scale: float = 2.0 ** 16, growth_tracker: int = 0) -> LossScale:
        return cls(jnp.asarray(scale, jnp.float32), jnp.asarray(growth_tracker, jnp.int32))


def update_loss_scale(state: LossScale, found_inf: jax.Array, *, growth_factor: float = 2.0,
                      backoff_factor: float = 0.5, growth_interval: int = 2000) -> LossScale:
    """``GradScaler.update()``: back off on inf/nan, grow after ``growth_interval`` clean steps."""
    grown = state.growth_tracker + 1
    grow = (grown == growth_interval) & jnp.isfinite(state.scale * growth_factor)
    scale = jnp.where(found_inf, state.scale * backoff_factor,
                      jnp.where(grow, state.scale * growth_factor, state.scale))
    tracker = jnp.where(found_inf | (grown == growth_interval), 0, grown).astype(jnp.int32)
    return LossScale(scale.astype(jnp.float32), tracker)
