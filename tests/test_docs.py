"""The docs' code runs: every ```python block of docs/tutorial.md, in order, in one namespace.

* The Simplified Chinese edition must carry exactly the same python blocks (a translation may not
  drift from the code the test runs).
* A block preceded by ``<!-- skip-test: reason -->`` is not run (the reason is mandatory).
* Every ``--flag`` that a shell block passes to ``python -m llm.<cli>`` (or ``llm-train`` /
  ``torchrun -m llm.train``) must exist in that CLI's ``--help``; ``--print-config`` is run for real.

The blocks run in a subprocess from the repository root so that their imports (torch, jax) and
registrations (callbacks, tasks) do not leak into the rest of the test session.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TUTORIAL = DOCS / "tutorial.md"
TUTORIAL_ZH = DOCS / "tutorial.zh-CN.md"
DOC_FILES = [TUTORIAL, TUTORIAL_ZH, DOCS / "troubleshooting.md", DOCS / "training.md",
             DOCS / "hf_interop.md"]

_FENCE = re.compile(r"^```(\w[\w+-]*)?[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
_SKIP = re.compile(r"<!--\s*skip-test:\s*(\S.*?)\s*-->\s*$")
_CLIS = {"llm.train": "llm.train", "llm-train": "llm.train", "llm.parity": "llm.parity",
         "llm.generate": "llm.generate", "llm.hf": "llm.hf"}


def blocks(path: Path, lang: str) -> list[tuple[str, str | None]]:
    """``(code, skip_reason)`` for every fenced block of ``lang`` in ``path``, in order."""
    text = path.read_text(encoding="utf-8")
    out = []
    for m in _FENCE.finditer(text):
        if (m.group(1) or "") != lang:
            continue
        before = text[:m.start()].rstrip("\n").splitlines()
        skip = _SKIP.search(before[-1]) if before else None
        out.append((m.group(2), skip.group(1) if skip else None))
    return out


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg", TQDM_DISABLE="1")
    env.setdefault("OMP_NUM_THREADS", "1")  # small CPUs: torch and XLA threads otherwise fight
    env.setdefault("JAX_PLATFORMS", "cpu")
    for key in [k for k in env if k.startswith("LLM_")]:
        del env[key]  # the blocks must not see a developer's config overrides
    return env


def test_tutorial_python_blocks_run(tmp_path):
    found = blocks(TUTORIAL, "python")
    assert len(found) >= 10, "the tutorial lost its examples"
    run = [code for code, skip in found if skip is None]
    script = "\n\n".join(f"# ---- block {i}\n{code}" for i, code in enumerate(run))
    path = tmp_path / "tutorial_blocks.py"
    path.write_text(script, encoding="utf-8")
    env = _env()
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    env["TMPDIR"] = str(tmp_path)  # the tutorial's tempfile.mkdtemp() scratch space
    proc = subprocess.run([sys.executable, str(path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"tutorial code failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def test_chinese_edition_has_the_same_code():
    en = [code for code, _ in blocks(TUTORIAL, "python")]
    zh = [code for code, _ in blocks(TUTORIAL_ZH, "python")]
    assert zh == en
    en_skips = [skip is not None for _, skip in blocks(TUTORIAL, "python")]
    zh_skips = [skip is not None for _, skip in blocks(TUTORIAL_ZH, "python")]
    assert zh_skips == en_skips
    assert [c for c, _ in blocks(TUTORIAL_ZH, "bash")] == [c for c, _ in blocks(TUTORIAL, "bash")]


def test_chinese_edition_has_the_same_chapters():
    def chapters(path: Path) -> list[str]:
        return re.findall(r"^## (\d+)\.", path.read_text(encoding="utf-8"), re.M)

    assert chapters(TUTORIAL) == [str(i) for i in range(1, 9)]
    assert chapters(TUTORIAL_ZH) == chapters(TUTORIAL)


@cache
def _help(module: str) -> str:
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"python -m {module} --help failed: {proc.stderr[-2000:]}"
    return proc.stdout


def _hf_help(sub: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "llm.hf", sub, "--help"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def shell_commands(path: Path) -> list[tuple[str, list[str]]]:
    """``(cli module, argv after it)`` for every llm command line in the shell blocks of ``path``."""
    out = []
    for lang in ("bash", ""):
        for code, _ in blocks(path, lang):
            code = code.replace("\\\n", " ")
            for line in code.splitlines():
                line = line.split("#", 1)[0] if " #" in line or line.startswith("#") else line
                try:
                    words = shlex.split(line)
                except ValueError:
                    continue
                for i, word in enumerate(words):
                    name = words[i + 1] if word == "-m" and i + 1 < len(words) else word
                    if name in _CLIS and (word == "-m" or word == "llm-train"):
                        start = i + 2 if word == "-m" else i + 1
                        out.append((_CLIS[name], words[start:]))
                        break
    return out


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: p.name)
def test_cli_flags_in_docs_exist(path):
    if not path.exists():
        pytest.skip(f"{path.name} not written")
    commands = shell_commands(path)
    if path in (TUTORIAL, TUTORIAL_ZH):
        assert {m for m, _ in commands} >= {"llm.train", "llm.parity", "llm.generate"}
    for module, argv in commands:
        if module == "llm.hf" and argv and argv[0] in ("import", "export"):
            text = _hf_help(argv[0])
        else:
            text = _help(module)
        for flag in (a.split("=", 1)[0] for a in argv if a.startswith("--")):
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), (
                f"{path.name}: `{module} {' '.join(argv)}` uses {flag}, not in `python -m {module} --help`")


def test_print_config_block_runs():
    proc = subprocess.run([sys.executable, "-m", "llm.train", "--print-config", "--config",
                           "configs/tiny.yaml", "--set", "training.lr=2e-3"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "lr: 0.002" in proc.stdout and "hidden_size: 64" in proc.stdout


def test_skip_markers_have_reasons():
    for path in (TUTORIAL, TUTORIAL_ZH):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"<!--\s*skip-test\s*:?\s*-->", text), f"{path.name}: skip-test without a reason"
