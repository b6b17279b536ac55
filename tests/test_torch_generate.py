"""Generation with the torch backend: the shared cases of ``tests/generate_cases.py``, and
``llm.load`` / ``llm.api`` models on torch (the default backend).

The flax half is ``tests/test_flax_generate.py``; what needs no framework (sampling rules, the
``llm.generate`` CLI, ``llm.load``'s errors) is ``tests/test_generate.py``.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from generate_cases import *  # noqa: F403 -- the shared cases, collected here for torch
from generate_cases import CORPUS, SPECS, Backend

import backends.torch.inference as torch_gen
import llm
from backends.torch.convert import from_canonical
from llm.api import from_params
from llm.checkpoint import save_checkpoint
from llm.spec import init_params

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def backend() -> Backend:
    return Backend(torch_gen, from_canonical)


def test_loaded_model_generates_text_and_ids(checkpoint):
    model = llm.load(checkpoint / "with_tok", backend="torch")
    text = model.generate_text("the fox", 12, temperature=1.0, seed=3)
    assert isinstance(text, str) and 0 < len(text) <= 12
    assert text == model.generate_text("the fox", 12, temperature=1.0, seed=3)
    assert set(text) <= set(CORPUS)
    ids = model.generate([5, 6, 7], 4)
    assert ids.shape == (1, 7)
    np.testing.assert_array_equal(ids, torch_gen.generate(model.model, [[5, 6, 7]], 4))
    texts = model.generate_texts("the", 10, num_samples=3, temperature=1.0, seed=1)
    assert len(texts) == 3 and len(set(texts)) > 1
    with pytest.raises(ValueError, match="empty prompt"):
        model.generate_text("", 5)
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.load(checkpoint / "no_tok").generate_text("the", 5)
    with pytest.raises(ValueError, match="same length"):
        model.logits([[1, 2], [3]])


def test_from_params_names_a_missing_weight():
    spec = SPECS["rope_gqa"]
    params = init_params(spec, 0)
    params.pop("final_norm.weight")
    with pytest.raises(ValueError, match="final_norm.weight"):
        from_params(spec, params, "torch")


def test_load_picks_newest_valid_step(tmp_path):
    spec = SPECS["rope_gqa"]
    for step, seed in ((10, 0), (20, 1)):
        save_checkpoint(tmp_path / f"step_{step}", init_params(spec, seed), {"model": spec.to_dict()})
    (tmp_path / "step_30").mkdir()  # torn: no manifest
    model = llm.load(tmp_path)
    assert model.path == tmp_path / "step_20"


def test_cli_greedy_ids_are_llm_loads(checkpoint):
    """``--greedy --num-samples 2`` prints the ids ``llm.load(...).generate`` gives, twice."""
    args = ["--checkpoint", str(checkpoint / "no_tok"), "--prompt-ids", "1,2,3", "--greedy",
            "--max-new-tokens", "4", "--num-samples", "2"]
    done = subprocess.run([sys.executable, "-m", "llm.generate", *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = [[int(t) for t in line.split(",")] for line in done.stdout.split()]
    expected = llm.load(checkpoint / "no_tok").generate([1, 2, 3], 4)[0].tolist()
    assert rows == [expected, expected]
