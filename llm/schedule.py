"""The learning-rate schedule as a pure function of the optimiser step (both engines call it).

``lr_at(step, ...)`` is the rate used by update number ``step`` (0-based: the first update is step 0,
so a run that has done ``n`` updates uses ``lr_at(n)`` next). Linear warmup to the peak, then decay to
the floor by the last step::

    warmup   step < W:        lr * (step + 1) / W
    decay    W <= step:       p = min(1, (step - W) / max(1, total - 1 - W))
             cosine           floor + (lr - floor) * (1 + cos(pi * p)) / 2
             linear           floor + (lr - floor) * (1 - p)
             constant         lr

So the last update of a run (``step = total - 1``) uses exactly the floor. Being a pure function of
the step is what makes resuming exact: the schedule position in a checkpoint is just its step.
This module must not import torch or jax.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["lr_at", "schedule_for"]


def lr_at(step: int, *, lr: float, warmup_steps: int, total_steps: int, final_lr: float,
          schedule: str = "cosine") -> float:
    """The learning rate of update ``step`` (see the module docstring)."""
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    name = str(getattr(schedule, "value", schedule))
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if name == "constant":
        return lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps))
    if name == "cosine":
        return final_lr + (lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if name == "linear":
        return final_lr + (lr - final_lr) * (1.0 - progress)
    raise ValueError(f"training.lr_schedule={name!r}: expected 'cosine', 'linear' or 'constant'")


def schedule_for(training: Any, total_steps: int):
    """``step -> lr`` for a ``llm.config.TrainingConfig`` and the run's total optimiser steps."""

    def lr_of(step: int) -> float:
        return lr_at(step, lr=training.lr, warmup_steps=training.warmup_steps, total_steps=total_steps,
                     final_lr=training.final_lr, schedule=training.lr_schedule)

    return lr_of
