"""Parity-suite set-up: float32 numerics, hypothesis profiles and seeds, and the worst-error summary.

Profiles (``HYPOTHESIS_PROFILE``): ``ci`` (default; sized to keep ``make parity`` to a few minutes
on a 2-core CPU) and ``thorough`` (many more examples; ``make parity-thorough``).

Seeds: the ``ci`` profile is reproducible but explores. Each run is seeded from the commit
(``git rev-parse HEAD``; a fixed seed outside git), so a commit always draws the same examples and
the next commit draws new ones; ``PARITY_SEED=N`` sets the seed (to replay a run, or to explore on
purpose). Every hypothesis test gets its own seed derived from the run's and the test's name, so
tests with the same strategy still draw different examples. The seed is printed in the pytest
header. ``thorough`` draws fresh random seeds unless ``PARITY_SEED`` is set. No example database
is read or written: what a run draws depends on the seed alone.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, is_hypothesis_test, seed, settings

from parity_tests.recording import EXAMPLES, WORST

FIXED_SEED = 0  # outside a git checkout
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                                      HealthCheck.data_too_large], print_blob=True, database=None)
settings.register_profile("ci", max_examples=12, **_COMMON)
settings.register_profile("thorough", max_examples=150, **_COMMON)
settings.load_profile(PROFILE)


def run_seed() -> tuple[int | None, str]:
    """(seed, where it came from); seed None = hypothesis's own random seeds (thorough, unset)."""
    value = os.environ.get("PARITY_SEED")
    if value is not None:
        try:
            return int(value), "PARITY_SEED"
        except ValueError:
            raise pytest.UsageError(f"PARITY_SEED={value!r} must be an integer") from None
    if PROFILE != "ci":
        return None, f"profile {PROFILE}: random"
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, check=True, timeout=10).stdout.strip()
        return int(head[:12], 16), f"commit {head[:12]}"
    except (OSError, subprocess.SubprocessError, ValueError):
        return FIXED_SEED, "fixed (not a git checkout)"


SEED: int | None = None
SEED_SOURCE = ""


def seed_for_test(run: int, test_name: str) -> int:
    """The seed of one hypothesis test in a run seeded ``run``."""
    return int.from_bytes(hashlib.sha256(f"{run}:{test_name}".encode()).digest()[:8], "little")


def pytest_configure(config):
    from llm.parity import configure_numerics

    global SEED, SEED_SOURCE
    SEED, SEED_SOURCE = run_seed()
    configure_numerics()


def pytest_report_header(config):
    return (f"parity: hypothesis profile {PROFILE}, seed {SEED if SEED is not None else 'random'} ({SEED_SOURCE}); "
            "set PARITY_SEED=N to replay")


def pytest_collection_modifyitems(config, items):
    if SEED is None:
        return
    for item in items:
        function = getattr(item, "function", None)
        if function is not None and is_hypothesis_test(function):
            seed(seed_for_test(SEED, f"{item.module.__name__}.{function.__name__}"))(function)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not WORST:
        return
    tr = terminalreporter
    tr.write_sep("=", f"parity: worst errors seen (profile {settings().max_examples} examples/test max)")
    tr.write_line(f"{'quantity':<34} {'worst':>10} {'its bound':>10} {'ratio':>7}   where")
    for quantity in sorted(WORST):
        value, context, tolerance = WORST[quantity]
        bound = f"{tolerance:>10.3e} {value / tolerance:>7.3f}" if tolerance else f"{'-':>10} {'-':>7}"
        tr.write_line(f"{quantity:<34} {value:>10.3e} {bound}   {context}")
    tr.write_line(f"examples run: {sum(EXAMPLES.values())} "
                  f"({', '.join(f'{k}={v}' for k, v in sorted(EXAMPLES.items()))})")
