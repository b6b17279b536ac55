"""Callbacks that steer a training run from a test, for ``tests/`` and ``parity_tests/`` alike.

Both trees import it as a top-level module (the repository root is on ``sys.path``: pytest puts the
root ``conftest.py``'s folder there, and ``python -m pytest`` runs from it). Its name does not match
``test_*.py``, so pytest collects nothing here. No torch or jax.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llm.loop.callbacks import Callback


class StopAt(Callback):
    """Requests a stop after step ``at`` (what an interrupted run looks like, deterministically)."""

    def __init__(self, at: int):
        self.at = at

    def on_step_end(self, trainer, metrics):
        if metrics["step"] == self.at:
            trainer.request_stop()


class PoisonAt(Callback):
    """Calls ``poison(trainer)`` after step ``at`` (the backend's way to put a NaN in the weights)."""

    def __init__(self, at: int, poison: Callable[[Any], None]):
        self.at, self.poison = at, poison

    def on_step_end(self, trainer, metrics):
        if metrics["step"] == self.at:
            self.poison(trainer)
