"""Generation without a framework in this process: the sampling rules, ``llm.load``'s argument and
checkpoint errors, the ``python -m llm.generate`` CLI and the backend a load imports (both in
subprocesses).

Decoding itself is tested per backend: ``tests/generate_cases.py`` holds the cases,
``tests/test_torch_generate.py`` and ``tests/test_flax_generate.py`` run them; the cross-backend
checks are ``parity_tests/test_generation_parity.py`` and ``parity_tests/test_load_parity.py``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import generate_cases
import pytest
from generate_cases import SPECS

import llm
from llm.checkpoint import CheckpointError, save_checkpoint
from llm.generate import Sampling
from llm.spec import init_params

checkpoint = generate_cases.checkpoint  # the checkpoints fixture the per-backend files take too


def test_sampling_validation():
    for bad in (-0.1, float("nan"), float("inf"), "hot", True):
        with pytest.raises(ValueError, match="temperature"):
            Sampling.create(bad)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="top_k"):
            Sampling.create(1.0, top_k=bad)
    for bad in (0.0, -0.2, 1.01, float("nan")):
        with pytest.raises(ValueError, match="top_p"):
            Sampling.create(1.0, top_p=bad)
    assert Sampling.create(0.0, top_k=5, top_p=0.3) == Sampling(0.0)  # greedy ignores the filters
    assert Sampling.create(0.7, top_k=100, top_p=1.0, vocab_size=48) == Sampling(0.7)


def test_load_errors(checkpoint, tmp_path):
    """Each is refused before a backend is imported (a wrong weight name is the backend's:
    ``tests/test_torch_generate.py``)."""
    with pytest.raises(ValueError, match="choose one of: torch, jax"):
        llm.load(checkpoint / "with_tok", backend="tensorflow")
    with pytest.raises(ValueError, match="dtype"):
        llm.load(checkpoint / "with_tok", dtype="float64")
    with pytest.raises(CheckpointError, match="does not exist"):
        llm.load(tmp_path / "missing")
    corrupt = tmp_path / "corrupt"
    spec = SPECS["rope_gqa"]
    save_checkpoint(corrupt, init_params(spec, 0), {"model": spec.to_dict()})
    data = bytearray((corrupt / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (corrupt / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        llm.load(corrupt, backend="jax")


# ---------------------------------------------------------------------- subprocesses
def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True)


@pytest.mark.parametrize("backend,absent", [("torch", {"jax", "jaxlib", "flax"}), ("jax", {"torch"})])
def test_load_imports_only_the_chosen_backend(checkpoint, backend, absent):
    done = _run(f"""
        import sys
        import llm.api, llm.generate
        assert not {{"torch", "jax", "flax"}} & {{m.split(".")[0] for m in sys.modules}}
        import llm
        m = llm.load({str(checkpoint / "no_tok")!r}, backend={backend!r})
        m.generate([1, 2], 2)
        print(" ".join(sorted({{k.split(".")[0] for k in sys.modules}})))
    """)
    assert done.returncode == 0, done.stderr
    loaded = set(done.stdout.split())
    assert not loaded & absent and ("torch" if backend == "torch" else "jax") in loaded


def test_cli_prints_text_and_one_line_errors(checkpoint, tmp_path):
    """(``--greedy`` ids against ``llm.load``'s: ``tests/test_torch_generate.py``.)"""
    cli = [sys.executable, "-m", "llm.generate"]
    done = subprocess.run([*cli, "--checkpoint", str(checkpoint / "with_tok"), "--prompt", "the lazy",
                           "--max-new-tokens", "10", "--seed", "4"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("the lazy") and len(done.stdout.rstrip("\n")) > len("the lazy")
    for args, message in [
        (["--checkpoint", str(tmp_path / "nope"), "--prompt", "hi"], "does not exist"),
        (["--checkpoint", str(checkpoint / "no_tok"), "--prompt", "hi"], "--prompt-ids"),
        (["--checkpoint", str(checkpoint / "no_tok"), "--prompt-ids", "1,2", "--top-p", "3"], "top_p"),
        (["--checkpoint", str(checkpoint / "no_tok"), "--prompt-ids", "1,2", "--backend", "mx"], "torch, jax"),
    ]:
        done = subprocess.run([*cli, *args], capture_output=True, text=True)
        assert done.returncode == 2 and done.stdout == ""
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], done.stderr


    done = subprocess.run([*cli, "--checkpoint", str(checkpoint / "no_tok"), "--prompt-ids", "1,2,3",
                           "--greedy", "--max-new-tokens", "4", "--num-samples", "2"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = [[int(t) for t in line.split(",")] for line in done.stdout.split()]
    expected = llm.load(checkpoint / "no_tok").generate([1, 2, 3], 4)[0].tolist()
    assert rows == [expected, expected]
