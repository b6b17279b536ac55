"""``llm.load`` gives the same logits in both backends for one canonical checkpoint (float32).

The checkpoint carries a char tokenizer, so both loads also bring it back; ``tests/test_torch_generate.py``
and ``tests/test_flax_generate.py`` test each backend's loaded model on its own.
"""

from __future__ import annotations

import numpy as np
import pytest

import llm
from llm.checkpoint import save_checkpoint
from llm.spec import ModelSpec, init_params
from llm.tokenization import build_tokenizer

SPEC = ModelSpec(vocab_size=48, max_seq_len=40, hidden_size=16, num_layers=2, num_heads=4, init_std=0.3,
                 num_kv_heads=2, norm_type="rmsnorm", use_glu=True, activation="silu")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_load_logits_match_across_backends(tmp_path):
    build_tokenizer("char", ["the quick brown fox jumps over the lazy dog."]).save(tmp_path / "tok.json")
    save_checkpoint(tmp_path / "ckpt", init_params(SPEC, 2), {"model": SPEC.to_dict()},
                    extra_files={"tokenizer.json": tmp_path / "tok.json"})
    ids = np.random.default_rng(6).integers(4, 48, (3, 9))
    out = {}
    for backend in ("torch", "jax"):
        model = llm.load(tmp_path / "ckpt", backend=backend)
        assert model.backend == backend and model.spec == SPEC
        assert model.tokenizer is not None and model.tokenizer.vocab_size < 48
        out[backend] = model.logits(ids)
        assert out[backend].shape == (3, 9, 48) and out[backend].dtype == np.float32
        one = model.logits(ids[0])  # 1-D = a batch of 1
        assert one.shape == (1, 9, 48)
        np.testing.assert_allclose(one, out[backend][:1], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(model.logits(ids[0].tolist()), one)
    rel = np.linalg.norm(out["jax"] - out["torch"]) / np.linalg.norm(out["torch"])
    assert rel <= 1e-5, rel
    assert llm.load(tmp_path / "ckpt", backend="flax").backend == "jax"
