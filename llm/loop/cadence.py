"""When something recurring is due: the one cadence rule of the training loop and its writers.

``every(n)(step)`` is true on optimiser steps ``n, 2n, 3n, ...``; ``every(0)`` is never due (the
config's "0 = off", e.g. ``training.eval_every=0``). The loop (``llm.loop.engine``) uses it for
evaluation and checkpoints, the writers (``llm.loop.callbacks``) for their rows and lines.

This module never imports torch or jax.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Every", "every"]


@dataclass(frozen=True)
class Every:
    """Due on the steps that are positive multiples of ``n``; never when ``n`` is 0."""

    n: int

    def __post_init__(self):
        if self.n < 0:
            raise ValueError(f"every(n={self.n}): n must be >= 0 (0 = never)")

    def __call__(self, step: int) -> bool:
        return self.n > 0 and step > 0 and step % self.n == 0


def every(n: int) -> Every:
    """The cadence "every ``n`` steps" (``n`` = 0: never)."""
    return Every(n)
