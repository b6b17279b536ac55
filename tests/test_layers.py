"""The layer rule of ``docs/architecture.md``, read from the source (every import, also the lazy
ones inside functions): core < loop < backends < apps, each importing only the layers below it
and its own; a backend never imports the other one; core and loop never import a framework; no
import cycles; both backends expose the whole surface ``llm.backend.SURFACE`` with the same
signatures."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = {"torch", "jax", "jaxlib", "flax", "optax"}
LAYERS = ("core", "loop", "backends", "apps")
APPS = {"llm", "llm.api", "llm.train", "llm.generate", "llm.hf", "llm.plan", "llm.tasks", "llm.callbacks"}  # + llm.parity.*


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _project_modules() -> dict[str, Path]:
    files = [*ROOT.glob("llm/**/*.py"), *ROOT.glob("backends/**/*.py")]
    return {_module_name(p): p for p in sorted(files)}


MODULES = _project_modules()


def layer_of(module: str) -> str:
    if module in APPS or module == "llm.parity" or module.startswith("llm.parity."):
        return "apps"
    if module.startswith("llm.loop"):
        return "loop"
    if module.startswith("backends"):
        return "backends"
    return "core"


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every imported module name (project modules resolved to the deepest existing one)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.append((sub if sub in MODULES else node.module, node.lineno))
    return found


def _project_target(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def test_every_module_has_a_layer_and_the_layers_exist():
    layers = {layer_of(m) for m in MODULES}
    assert layers == set(LAYERS)
    assert (ROOT / "llm" / "loop").is_dir() and (ROOT / "backends" / "torch").is_dir()


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_the_layers(module):
    mine = LAYERS.index(layer_of(module))
    bad = []
    for name, line in _imports(MODULES[module]):
        top = name.split(".")[0]
        if top in FRAMEWORKS and layer_of(module) in ("core", "loop"):
            bad.append(f"line {line}: imports the framework {name} (core and loop are framework-free)")
        target = _project_target(name)
        if target is None or target == module:
            continue
        theirs = LAYERS.index(layer_of(target))
        if theirs > mine:
            bad.append(f"line {line}: {layer_of(module)} module imports {target} ({layer_of(target)}), a layer above")
        for a, b in (("backends.torch", "backends.flax"), ("backends.flax", "backends.torch")):
            if module.startswith(a) and target.startswith(b):
                bad.append(f"line {line}: {a} imports the other backend ({target})")
    assert not bad, f"{module}: " + "; ".join(bad)


def test_no_import_cycles():
    graph = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for name, _ in _imports(path):
            target = _project_target(name)
            # a package's __init__ importing its own submodules is how packages re-export; a
            # submodule importing its package's __init__ is the cycle that matters
            if target and target != module and not target.startswith(module + "."):
                graph[module].add(target)
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(cycles)


def test_the_layer_test_sees_a_violation(tmp_path, monkeypatch):
    """The rule is not vacuous: a core module importing the loop, or a backend importing the other, fails."""
    bad_core = tmp_path / "core_mod.py"
    bad_core.write_text("def f():\n    from llm.loop.engine import BaseTrainingEngine\n")
    assert ("llm.loop.engine", 2) in _imports(bad_core)
    assert LAYERS.index(layer_of("llm.loop.engine")) > LAYERS.index(layer_of("llm.spec"))
    assert layer_of("llm.parity.report") == "apps" and layer_of("backends.flax.model") == "backends"


def test_both_backends_expose_the_same_surface():
    from llm.backend import SURFACE, backend

    torch_b, flax_b = backend("torch"), backend("jax")
    for name in SURFACE:
        a, b = getattr(torch_b, name), getattr(flax_b, name)
        if inspect.isclass(a):
            assert inspect.isclass(b), name
            if name == "TrainingEngine":
                # The one intended difference: the placement argument. A torch process drives one
                # device (torchrun starts one per device), a JAX process a list of them.
                pa = [p for p in inspect.signature(a.__init__).parameters if p != "device"]
                pb = [p for p in inspect.signature(b.__init__).parameters if p != "devices"]
                assert pa == pb, f"{name}.__init__: {pa} vs {pb}"
            continue
        pa, pb = inspect.signature(a).parameters, inspect.signature(b).parameters
        # the same leading parameters in the same order; a backend may add keyword-only extras (dtype)
        lead_a = [p for p, v in pa.items() if v.kind is not v.KEYWORD_ONLY]
        lead_b = [p for p, v in pb.items() if v.kind is not v.KEYWORD_ONLY]
        assert lead_a == lead_b, f"{name}: {lead_a} vs {lead_b}"
        shared_kw = {p for p, v in pa.items() if v.kind is v.KEYWORD_ONLY} & {p for p, v in pb.items()
                                                                              if v.kind is v.KEYWORD_ONLY}
        for p in shared_kw:
            assert pa[p].kind is pb[p].kind, f"{name}({p})"
    assert set(SURFACE) <= set(torch_b.__all__) and set(SURFACE) <= set(flax_b.__all__)


def test_backend_lookup_errors_name_the_choices():
    from llm.backend import BackendError, canonical_name

    assert canonical_name("FLAX") == "jax" and canonical_name("torch") == "torch"
    with pytest.raises(BackendError, match="unknown backend 'tf'; choose one of: torch, jax"):
        canonical_name("tf")
