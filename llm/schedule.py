"""The learning-rate schedule both engines follow, written once.

``lr_at(step, ...)`` is the rate used by update number ``step`` (0-based: the first update is step 0,
so a run that has done ``n`` updates uses ``lr_at(n)`` next). Linear warmup to the peak, then::

    warmup   step < W:        lr * (step + 1) / W
    decay    W <= step:       p = min(1, (step - W) / max(1, total - 1 - W))
             cosine           floor + (lr - floor) * (1 + cos(pi * p)) / 2
             linear           floor + (lr - floor) * (1 - p)
             constant         lr
             step             max(floor, lr * gamma ** ((step - W) // step_size))
             plateau          max(floor, lr * factor ** r), r = reductions so far (below)

So the last update of a cosine or linear run (``step = total - 1``) uses exactly the floor. Every
schedule but ``plateau`` is a pure function of the step, which is what makes resuming exact: the
schedule position in a checkpoint is just its step. ``plateau`` also depends on the validation
losses seen: after ``lr_patience`` evaluations in a row without a new best val loss, ``r`` grows by
one (and the count restarts); ``Schedule.observe(val_loss)`` takes each evaluation, and
``state_dict()`` (best, bad evaluations, reductions) goes into the checkpoint so a resume continues
the same sequence.

This module must not import torch or jax.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["Schedule", "lr_at", "schedule_for"]


def lr_at(step: int, *, lr: float, warmup_steps: int, total_steps: int, final_lr: float,
          schedule: str = "cosine", step_size: int = 1000, gamma: float = 0.1, factor: float = 0.5,
          reductions: int = 0) -> float:
    """The learning rate of update ``step`` (see the module docstring)."""
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    name = str(getattr(schedule, "value", schedule))
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if name == "constant":
        return lr
    if name == "step":
        return max(final_lr, lr * gamma ** ((step - warmup_steps) // step_size))
    if name == "plateau":
        return max(final_lr, lr * factor ** reductions)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps))
    if name == "cosine":
        return final_lr + (lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if name == "linear":
        return final_lr + (lr - final_lr) * (1.0 - progress)
    raise ValueError(f"training.lr_schedule={name!r}: expected 'cosine', 'linear', 'constant', 'step' or "
                     "'plateau'")


class Schedule:
    """``step -> lr`` for a ``llm.config.TrainingConfig``; ``observe`` feeds ``plateau`` its
    evaluations (a no-op for the other schedules)."""

    def __init__(self, training: Any, total_steps: int):
        self.training = training
        self.total_steps = total_steps
        self.name = str(getattr(training.lr_schedule, "value", training.lr_schedule))
        self.best: float | None = None
        self.bad_evals = 0
        self.reductions = 0

    def __call__(self, step: int) -> float:
        t = self.training
        return lr_at(step, lr=t.lr, warmup_steps=t.warmup_steps, total_steps=self.total_steps,
                     final_lr=t.final_lr, schedule=self.name, step_size=t.lr_step_size, gamma=t.lr_gamma,
                     factor=t.lr_factor, reductions=self.reductions)

    def observe(self, val_loss: float) -> None:
        """One evaluation's val loss; ``plateau`` reduces after ``lr_patience`` without a new best."""
        if self.name != "plateau" or not math.isfinite(val_loss):
            return
        if self.best is None or val_loss < self.best:
            self.best, self.bad_evals = val_loss, 0
            return
        self.bad_evals += 1
        if self.bad_evals >= self.training.lr_patience:
            self.reductions += 1
            self.bad_evals = 0

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_evals": self.bad_evals, "reductions": self.reductions}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state.get("best")
        self.bad_evals = int(state.get("bad_evals", 0))
        self.reductions = int(state.get("reductions", 0))


def schedule_for(training: Any, total_steps: int) -> Schedule:
    """The ``Schedule`` of a ``llm.config.TrainingConfig`` and the run's total optimiser steps."""
    return Schedule(training, total_steps)
