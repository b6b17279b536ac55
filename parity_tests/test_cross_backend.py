"""A run moves between the backends mid-way: started with torch, resumed with JAX, and the reverse.

The checkpoint format is shared (``llm.run``: canonical params and AdamW moments, step, data cursor,
schedule position, callback state), so the resumed engine must (1) hold exactly the checkpoint's
numbers before it trains -- parameters, both moments (canonical layout, transposed for the flax
linears), the Adam step count, the data cursor, tokens seen, best val loss, early stopping's state
-- and (2) continue the trajectory the first backend would have followed: the losses after the
switch match the first backend's uninterrupted run within float32 cross-backend tolerance (1e-5
relative; the backends agree to ~1e-7 per step, see test_trajectory_parity.py).

Gradient accumulation 2, a text corpus (so the tokenizer travels in the checkpoint), evaluation
and early stopping state are all on; dropout is 0 because the backends draw different masks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from callbacks_for_tests import StopAt
from llm.checkpoint import load_checkpoint
from llm.config import load_config

torch = pytest.importorskip("torch")

from backends.flax.engine import TrainingEngine as JaxEngine  # noqa: E402
from backends.torch.engine import TrainingEngine as TorchEngine  # noqa: E402

ENGINES = {"torch": TorchEngine, "jax": JaxEngine}
CORPUS = "".join(f"def g{i % 5}(y):\n    return y - {i % 7} * {i % 3}\n\n" for i in range(300))
TINY = ["model.vocab_size=64", "model.max_seq_len=32", "model.hidden_size=32", "model.num_layers=1",
        "model.num_heads=4", "model.num_kv_heads=2", "model.norm_type=rmsnorm", "model.use_glu=true",
        "model.activation=silu", "data.seq_len=16", "data.max_bytes=null", "training.batch_size=4",
        "training.grad_accum_steps=2", "training.max_steps=6", "training.warmup_steps=2", "training.lr=1e-2",
        "training.eval_every=3", "training.eval_batches=2", "training.early_stopping_patience=5",
        "training.log_every=1", "logging.every_steps=1", "logging.progress=false",
        "checkpoint.every_steps=0", "checkpoint.keep_last=null"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def held_state(engine) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]:
    """(canonical params, canonical moments, Adam step count) as the engine holds them."""
    params = engine.impl.to_canonical(engine.model)
    if isinstance(engine, JaxEngine):
        return params, engine.moments(), int(engine.opt_state[-1].count)
    named = dict(engine.model.named_parameters())
    moments = {f"{m}.{n}": engine.optimizer.state[p][m].numpy() for n, p in named.items()
               for m in ("exp_avg", "exp_avg_sq")}
    steps = {int(engine.optimizer.state[p]["step"]) for p in named.values()}
    assert len(steps) == 1
    return params, moments, steps.pop()


@pytest.mark.parametrize("first,second", [("torch", "jax"), ("jax", "torch")])
def test_a_checkpoint_moves_between_backends_mid_run(tmp_path, first, second):
    (tmp_path / "corpus.py").write_text(CORPUS)
    config = load_config(None, [*TINY, f"data.source={tmp_path / 'corpus.py'}",
                                f"data.cache_dir={tmp_path / 'cache'}"], env={})
    with ENGINES[first](config, run_dir=tmp_path / "full") as engine:
        engine.fit()
    with ENGINES[first](config, run_dir=tmp_path / "moved", callbacks=[StopAt(4)]) as engine:
        engine.fit()
    ckpt = load_checkpoint(tmp_path / "moved" / "checkpoints" / "step_4")
    meta = ckpt.state_meta
    assert (meta["backend"], meta["step"], meta["micro_step"]) == (first, 4, 8)
    assert meta["callbacks"]["early_stopping"]["bad_evals"] in (0, 1) and meta["best_val_loss"] is not None

    with ENGINES[second](config, run_dir=tmp_path / "moved", resume=True) as engine:
        params, moments, adam_step = held_state(engine)
        for name, value in ckpt.params.items():
            np.testing.assert_array_equal(params[name], value, err_msg=name)
        assert moments.keys() == ckpt.state_tensors.keys()
        for key, value in ckpt.state_tensors.items():
            np.testing.assert_array_equal(moments[key], value, err_msg=key)
        assert adam_step == 4 and engine.step == 4 and engine.datamodule.step == 8
        assert engine.tokens_seen == meta["tokens_seen"] == 4 * 2 * 4 * 16
        assert engine.best_val_loss == meta["best_val_loss"]
        assert engine.lr_of(engine.step) == meta["schedule"]["next_lr"]
        early = engine.early_stopping  # the loop's, restored from state.json's callbacks.early_stopping
        assert early.state_dict() == meta["callbacks"]["early_stopping"]
        result = engine.fit()
    assert result.step == 6 and load_checkpoint(result.last_checkpoint).state_meta["backend"] == second

    full, moved = losses(tmp_path / "full"), losses(tmp_path / "moved")
    assert sorted(moved) == list(range(1, 7))
    assert [moved[s] for s in range(1, 5)] == [full[s] for s in range(1, 5)]  # the first backend's own steps
    np.testing.assert_allclose([moved[s] for s in (5, 6)], [full[s] for s in (5, 6)], rtol=1e-5)
    end_full = load_checkpoint(tmp_path / "full" / "checkpoints" / "step_6")
    end_moved = load_checkpoint(tmp_path / "moved" / "checkpoints" / "step_6")
    for name, value in end_full.params.items():
        np.testing.assert_allclose(end_moved.params[name], value, rtol=1e-4, atol=1e-6, err_msg=name)
