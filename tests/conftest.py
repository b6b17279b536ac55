"""Fixtures shared by the test modules."""

from __future__ import annotations

from pathlib import Path

import pytest

CORPUS = "".join(f"def f{i % 7}(x):\n    return x * {i % 5} + {i % 3}\n\n" for i in range(400))


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A small Python-like text file: enough structure for a tiny LM to learn in a few steps."""
    path = tmp_path / "corpus.py"
    path.write_text(CORPUS)
    return path


@pytest.fixture(scope="module")
def module_corpus(tmp_path_factory) -> Path:
    """The ``corpus`` file once per module, for a module-scoped run that several tests read."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.py"
    path.write_text(CORPUS)
    return path
