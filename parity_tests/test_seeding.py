"""The CI profile's seeds: one per run from the commit (or PARITY_SEED), one per test derived from it."""

from __future__ import annotations

import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from parity_tests import conftest


def test_run_seed_comes_from_parity_seed_or_the_commit(monkeypatch):
    monkeypatch.setenv("PARITY_SEED", "1234")
    assert conftest.run_seed() == (1234, "PARITY_SEED")
    monkeypatch.setenv("PARITY_SEED", "x")
    with pytest.raises(pytest.UsageError, match="PARITY_SEED='x' must be an integer"):
        conftest.run_seed()
    monkeypatch.delenv("PARITY_SEED")
    monkeypatch.setattr(conftest, "PROFILE", "ci")
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                          cwd=conftest.Path(conftest.__file__).parent).stdout.strip()
    assert conftest.run_seed() == (int(head[:12], 16), f"commit {head[:12]}")

    def no_git(*args, **kwargs):
        raise OSError("git: not found")

    monkeypatch.setattr(conftest.subprocess, "run", no_git)
    assert conftest.run_seed() == (conftest.FIXED_SEED, "fixed (not a git checkout)")


def test_each_test_gets_its_own_reproducible_seed():
    a = conftest.seed_for_test(7, "parity_tests.test_x.test_a")
    assert a == conftest.seed_for_test(7, "parity_tests.test_x.test_a")
    assert a != conftest.seed_for_test(7, "parity_tests.test_x.test_b")
    assert a != conftest.seed_for_test(8, "parity_tests.test_x.test_a")


@given(st.integers())
def test_hypothesis_tests_are_seeded(_value):
    """hypothesis.seed(...) was applied at collection with this run's seed and this test's name."""
    if conftest.SEED is not None:
        expected = conftest.seed_for_test(conftest.SEED, f"{__name__}.test_hypothesis_tests_are_seeded")
        assert test_hypothesis_tests_are_seeded._hypothesis_internal_use_seed == expected
