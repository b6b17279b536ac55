"""Import boundaries (``docs/architecture.md``): llm is backend-agnostic; a backend never imports
the other; among the tests only ``parity_tests/`` loads both frameworks; only
``backends/flax/convert.py`` knows the transpose rule."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCH = {"torch"}
JAX = {"jax", "jaxlib", "flax", "optax"}


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


def _framework_of(module: str) -> str:
    """The top-level package that importing ``module`` loads, reading a backend package as its
    framework: ``backends.torch.inference`` -> ``torch``, ``backends.flax.convert`` -> ``flax``."""
    parts = module.split(".")
    if parts[0] == "backends" and len(parts) > 1 and parts[1] in ("torch", "flax"):
        return parts[1]
    return parts[0]


def _frameworks_imported(source: str) -> set[str]:
    """Top-level packages among TORCH | JAX that ``source`` imports anywhere (lazy imports inside
    functions, ``pytest.importorskip("...")`` and the ``backends.torch`` / ``backends.flax``
    packages included)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {_framework_of(a.name) for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(_framework_of(node.module))
            # ``from backends import torch`` names the package in the alias
            found |= {_framework_of(f"{node.module}.{a.name}") for a in node.names}
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "importorskip" and node.args and isinstance(node.args[0], ast.Constant)):
            found.add(_framework_of(str(node.args[0].value)))
    return found & (TORCH | JAX)


def test_no_test_module_outside_parity_tests_imports_both_frameworks():
    assert _frameworks_imported("import torch\ndef f():\n    from flax import nnx\n") == {"torch", "flax"}
    assert _frameworks_imported("import pytest\njax = pytest.importorskip('jax')\n") == {"jax"}
    assert _frameworks_imported("import backends.torch.inference as gen\n"
                                "from backends.flax.convert import from_canonical\n") == {"torch", "flax"}
    assert _frameworks_imported("from backends import flax\nimport backends.torch\nimport backends\n"
                                "from llm.api import load\n") == {"torch", "flax"}
    both = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        found = _frameworks_imported(path.read_text(encoding="utf-8"))
        if found & TORCH and found & JAX:
            both.append(f"{path.relative_to(ROOT)}: {sorted(found)}")
    assert not both, "only parity_tests/ may import both torch and jax/flax: " + "; ".join(both)


def _layout_transposes(source: str) -> list[str]:
    """Every transpose of an array's last axes and every use of the transpose rule in ``source``:
    ``.T``, ``.mT``, ``swapaxes``, ``np/jnp.transpose(...)``, ``is_linear_weight``, ``LINEAR_SUFFIXES``.
    (Torch's ``.transpose(1, 2)`` of activations and heads is compute, not layout, and not listed.)"""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in ("T", "mT", "swapaxes"):
            found.append(f"line {node.lineno}: .{node.attr}")
        elif (isinstance(node, ast.Attribute) and node.attr == "transpose" and isinstance(node.value, ast.Name)
              and node.value.id in ("np", "jnp", "numpy")):
            found.append(f"line {node.lineno}: {node.value.id}.transpose")
        elif isinstance(node, ast.Name) and node.id in ("is_linear_weight", "LINEAR_SUFFIXES", "swapaxes"):
            found.append(f"line {node.lineno}: {node.id}")
        elif isinstance(node, ast.alias) and node.name in ("is_linear_weight", "LINEAR_SUFFIXES", "swapaxes"):
            found.append(f"import of {node.name}")
    return found


def test_only_the_flax_convert_module_transposes_weights():
    sample = "import numpy as np\nfrom backends.flax.convert import is_linear_weight\ny = np.swapaxes(w, -1, -2) + w.T\n"
    assert len(_layout_transposes(sample)) == 3
    convert = ROOT / "backends" / "flax" / "convert.py"
    assert _layout_transposes(convert.read_text(encoding="utf-8"))  # the check sees the one real place
    bad = []
    for path in sorted((ROOT / "backends").rglob("*.py")):
        if path != convert:
            bad += [f"{path.relative_to(ROOT)} {hit}" for hit in _layout_transposes(path.read_text(encoding="utf-8"))]
    assert not bad, "layouts are backends/flax/convert.py's business: " + "; ".join(bad)
