"""Fixtures for both test trees (``tests/`` and ``parity_tests/``)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch intra-op thread for a test module.

    Tiny models gain nothing from a thread pool; on the shared 2-core machine a spinning pool, or
    one fighting XLA's in the same process, makes them ~100x slower. torch is imported here, not at
    the top, so modules that never ask for this stay torch-free.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``dist`` (multi-process / many-device sweeps) belong to ``make test-dist``
    (``LLM_TEST_DIST=1``): the default run deselects them (counted in pytest's summary line as
    deselected) instead of skipping them one by one."""
    import os

    if os.environ.get("LLM_TEST_DIST"):
        return
    chosen, dropped = [], []
    for item in items:
        (dropped if item.get_closest_marker("dist") else chosen).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = chosen
