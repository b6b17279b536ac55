"""The worst error seen per quantity across the parity session, printed at the end of the run."""

from __future__ import annotations

import math

WORST: dict[str, tuple[float, str, float | None]] = {}
EXAMPLES: dict[str, int] = {}


def record(quantity: str, value: float, context: str = "", tolerance: float | None = None) -> None:
    """Keep the worst ``value`` seen for ``quantity`` (NaN counts as the worst): the largest, or with
    a ``tolerance`` (the bound that example was held to, which may differ per example) the largest
    ratio to it, so the summary never shows a number that reads as a failure without its bound."""
    old = WORST.get(quantity)

    def badness(v: float, tol: float | None) -> float:
        return v / tol if tol else v

    if old is None or math.isnan(value) or badness(value, tolerance) > badness(old[0], old[2]):
        WORST[quantity] = (value, context, tolerance)


def count(test: str) -> None:
    EXAMPLES[test] = EXAMPLES.get(test, 0) + 1
