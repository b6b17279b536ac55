"""Parity-suite set-up: float32 numerics, hypothesis profiles, and the worst-error summary.

Profiles (``HYPOTHESIS_PROFILE``): ``ci`` (default; derandomized so CI is reproducible, sized to
keep ``make parity`` to a few minutes on a 2-core CPU) and ``thorough`` (many more examples,
random seeds; ``make parity-thorough``).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

from parity_tests.recording import EXAMPLES, WORST

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                                      HealthCheck.data_too_large], print_blob=True)
settings.register_profile("ci", max_examples=12, derandomize=True, **_COMMON)
settings.register_profile("thorough", max_examples=150, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config):
    from llm.parity import configure_numerics

    configure_numerics()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not WORST:
        return
    tr = terminalreporter
    tr.write_sep("=", f"parity: worst errors seen (profile {settings().max_examples} examples/test max)")
    for quantity in sorted(WORST):
        value, context = WORST[quantity]
        tr.write_line(f"{quantity:<34} {value:.3e}   {context}")
    tr.write_line(f"examples run: {sum(EXAMPLES.values())} "
                  f"({', '.join(f'{k}={v}' for k, v in sorted(EXAMPLES.items()))})")
