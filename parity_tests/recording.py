"""The worst error seen per quantity across the parity session, printed at the end of the run."""

from __future__ import annotations

import math

WORST: dict[str, tuple[float, str]] = {}
EXAMPLES: dict[str, int] = {}


def record(quantity: str, value: float, context: str = "") -> None:
    """Keep the largest ``value`` seen for ``quantity`` (NaN counts as the worst)."""
    old = WORST.get(quantity)
    if old is None or math.isnan(value) or value > old[0]:
        WORST[quantity] = (value, context)


def count(test: str) -> None:
    EXAMPLES[test] = EXAMPLES.get(test, 0) + 1
