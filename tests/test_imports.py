"""Import boundaries from DESIGN.md: llm is backend-agnostic; a backend never imports the other."""

import subprocess
import sys

import pytest


def _modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


@pytest.mark.parametrize("module", ["llm", "llm.spec", "llm.config", "llm.checkpoint", "llm.data",
                                    "llm.tokenization", "llm.loop.engine"])
def test_llm_imports_no_framework(module):
    loaded = _modules_after(f"import {module}")
    assert not loaded & {"torch", "jax", "jaxlib", "flax", "optax"}, module


def test_torch_backend_never_imports_jax():
    loaded = _modules_after("import backends.torch.model, backends.torch.convert")
    assert "torch" in loaded
    assert not loaded & {"jax", "jaxlib", "flax", "optax"}


def test_flax_backend_never_imports_torch():
    loaded = _modules_after("import backends.flax.model, backends.flax.convert")
    assert "flax" in loaded
    assert "torch" not in loaded
