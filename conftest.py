"""Fixtures for both test trees (``tests/`` and ``parity_tests/``)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import pytest

# XLA's persistent compilation cache, for this session only: the tests build many engines whose
# jitted steps lower to the same programs (one tiny spec, one set of optimiser settings), and a
# new engine's jit compiles again; with the cache each distinct program is compiled once and read
# back after. Set as environment variables (read when jax is imported, here and in the test
# subprocesses) so that modules which never import jax stay jax-free. The key is the program, the
# XLA flags and the jax version, so a hit is the same executable a compile would give.
_JAX_CACHE_ENV = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                  "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES")
_jax_cache_dir: str | None = None


def pytest_configure(config):
    global _jax_cache_dir
    if "jax" in sys.modules or any(k in os.environ for k in _JAX_CACHE_ENV):
        return  # jax already configured (a caller's own cache settings are theirs)
    _jax_cache_dir = tempfile.mkdtemp(prefix="llm-test-xla-cache-")
    os.environ.update({"JAX_COMPILATION_CACHE_DIR": _jax_cache_dir,
                       "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                       "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"})


def pytest_unconfigure(config):
    if _jax_cache_dir is not None:
        for key in _JAX_CACHE_ENV:
            os.environ.pop(key, None)
        shutil.rmtree(_jax_cache_dir, ignore_errors=True)


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


# marker -> the environment variable that selects it (and the make target that sets it)
OPT_IN = {"dist": "LLM_TEST_DIST",  # make test-dist
          "slow": "LLM_TEST_SLOW"}  # make test-slow, make parity


def pytest_collection_modifyitems(config, items):
    """Tests marked ``dist`` (multi-process / many-device sweeps) belong to ``make test-dist``
    (``LLM_TEST_DIST=1``), tests marked ``slow`` (a heavy case whose property a smaller test of
    ``make test`` also holds) to ``make test-slow`` and ``make parity`` (``LLM_TEST_SLOW=1``): the
    default run deselects them (counted in pytest's summary line as deselected) instead of
    skipping them one by one."""
    off = [marker for marker, variable in OPT_IN.items() if not os.environ.get(variable)]
    if not off:
        return
    chosen, dropped = [], []
    for item in items:
        (dropped if any(item.get_closest_marker(m) for m in off) else chosen).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = chosen
