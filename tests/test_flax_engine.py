"""The JAX TrainingEngine: learning, the torch-exact optimiser math, schedule, accumulation,
checkpoints, exact resume, NaN handling, mixed precision, tasks, callbacks, and 2-device data
parallelism (in a subprocess with XLA_FLAGS, which also checks that torch is never imported). One tiny spec and one set of optimiser settings
throughout, so most tests reuse the compiled step. Never imports torch (cross-backend checks live
in ``parity_tests/test_cross_backend.py``)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from backends.flax.engine import TrainingEngine  # noqa: E402
from backends.flax.optim import (  # noqa: E402
    LossScale,
    adamw_torch,
    clip_by_global_norm_torch,
    global_norm_torch,
    update_loss_scale,
)
from backends.flax.tasks import FlaxTask  # noqa: E402
from llm.callbacks import Callback  # noqa: E402
from llm.checkpoint import latest_valid_checkpoint, load_checkpoint  # noqa: E402
from llm.config import Config, load_config  # noqa: E402
from llm.data import SyntheticDataModule  # noqa: E402
from llm.run import STATE_KEYS, NonFiniteLossError  # noqa: E402
from llm.schedule import lr_at  # noqa: E402
from llm.tasks import TrainingTask, register_task  # noqa: E402
from llm.train import main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CORPUS = "".join(f"def f{i % 7}(x):\n    return x * {i % 5} + {i % 3}\n\n" for i in range(400))

TINY = ["model.vocab_size=64", "model.max_seq_len=32", "model.hidden_size=32", "model.num_layers=1",
        "model.num_heads=4", "model.num_kv_heads=2", "model.norm_type=rmsnorm", "model.use_glu=true",
        "model.activation=silu", "data.seq_len=16", "data.max_bytes=null", "training.batch_size=8",
        "training.max_steps=6", "training.warmup_steps=2", "training.lr=1e-2", "training.eval_every=0",
        "training.log_every=1", "logging.every_steps=1", "logging.progress=false",
        "checkpoint.every_steps=0", "checkpoint.keep_last=null"]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.py"
    path.write_text(CORPUS)
    return path


def tiny(tmp_path: Path, *overrides: str, source: str | Path = "synthetic") -> Config:
    return load_config(None, [*TINY, f"data.source={source}", f"data.cache_dir={tmp_path / 'cache'}",
                              *overrides], env={})


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows(run_dir) if "loss" in r}


def fit(config: Config, run_dir: Path, **kwargs):
    with TrainingEngine(config, run_dir=run_dir, **kwargs) as engine:
        return engine, engine.fit()


class StopAt(Callback):
    def __init__(self, at: int):
        self.at = at

    def on_step_end(self, trainer, metrics):
        if metrics["step"] == self.at:
            trainer.request_stop()


# ---------------------------------------------------------------------- the optimiser math
def torch_adamw_reference(p, grads, lrs, b1=0.9, b2=0.95, eps=1e-8, wd=0.1):
    """``torch.optim.AdamW``'s documented update, in float64 numpy."""
    p, m, v = p.astype(np.float64), np.zeros_like(p, np.float64), np.zeros_like(p, np.float64)
    for t, (g, lr) in enumerate(zip(grads, lrs, strict=True), start=1):
        p = p * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr / (1 - b1 ** t) * m / (np.sqrt(v) / math.sqrt(1 - b2 ** t) + eps)
    return p, m, v


def test_adamw_torch_matches_the_torch_formula_and_masks_decay():
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((3, 4)).astype(np.float32), "b": rng.standard_normal(4).astype(np.float32)}
    grads = [{k: rng.standard_normal(v.shape).astype(np.float32) * 10.0 ** -s for k, v in params.items()}
             for s in range(3)]  # shrinking gradients: the bias correction and eps both matter
    lrs = [1e-2, 3e-3, 1e-3]
    tx = adamw_torch(0.9, 0.95, 1e-8, 0.1, mask={"w": True, "b": False})
    state, p = tx.init(params), {k: jnp.asarray(v) for k, v in params.items()}
    for g, lr in zip(grads, lrs, strict=True):
        updates, state = tx.update({k: jnp.asarray(v) for k, v in g.items()}, state, p, learning_rate=lr)
        p = {k: p[k] + updates[k] for k in p}
    want_w, m_w, v_w = torch_adamw_reference(params["w"], [g["w"] for g in grads], lrs)
    want_b, _, _ = torch_adamw_reference(params["b"], [g["b"] for g in grads], lrs, wd=0.0)
    np.testing.assert_allclose(p["w"], want_w, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(p["b"], want_b, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(state.exp_avg["w"], m_w, rtol=1e-6)
    np.testing.assert_allclose(state.exp_avg_sq["w"], v_w, rtol=1e-6)
    assert int(state.count) == 3
    # and the decay really is masked: without it "b" moves differently
    assert not np.allclose(torch_adamw_reference(params["b"], [g["b"] for g in grads], lrs)[0], want_b, rtol=1e-7)


def test_clip_is_torchs_norm_of_norms_with_the_1e6_epsilon():
    grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([[12.0]])}  # norms 5 and 12 -> total 13
    assert float(global_norm_torch(grads)) == pytest.approx(13.0)
    clipped, _ = clip_by_global_norm_torch(1.0).update(grads, None)
    np.testing.assert_allclose(clipped["a"], np.array([3.0, 4.0]) / (13.0 + 1e-6), rtol=1e-7)
    same, _ = clip_by_global_norm_torch(100.0).update(grads, None)  # factor clamped to 1
    np.testing.assert_array_equal(same["b"], grads["b"])


def test_loss_scale_backs_off_on_inf_and_grows_after_the_interval():
    s = LossScale.create()
    s = update_loss_scale(s, jnp.array(True))
    assert (float(s.scale), int(s.growth_tracker)) == (2.0 ** 15, 0)
    s = update_loss_scale(LossScale.create(8.0, 1), jnp.array(False), growth_interval=2)
    assert (float(s.scale), int(s.growth_tracker)) == (16.0, 0)
    s = update_loss_scale(s, jnp.array(False), growth_interval=2)
    assert (float(s.scale), int(s.growth_tracker)) == (16.0, 1)


# ---------------------------------------------------------------------- learning
def test_loss_falls_on_a_tiny_corpus_below_the_unigram_baseline(tmp_path, corpus):
    config = tiny(tmp_path, "training.max_steps=40", "training.eval_every=20", source=corpus)
    engine, result = fit(config, tmp_path / "run")
    steps = losses(tmp_path / "run")
    assert len(steps) == 40 and result.stop_reason == "completed"
    assert np.mean([steps[s] for s in range(36, 41)]) < 0.5 * np.mean([steps[s] for s in range(1, 6)])
    unigram = result.baselines["unigram_entropy"]
    assert result.val_loss < 0.6 * unigram
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["val_loss"] == pytest.approx(result.val_loss) and summary["tokens_per_s"] > 0
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    assert all(r["grad_norm"] > 0 for r in rows(tmp_path / "run") if "loss" in r)
    assert engine.sample(max_new_tokens=20, temperature=0).startswith("def ")
    assert engine.model.embed.weight[...].dtype == jnp.float32


def test_weight_decay_groups_follow_the_spec_and_the_schedule_is_llm_schedule(tmp_path):
    config = tiny(tmp_path, "training.max_steps=5", "training.min_lr_ratio=0.1")
    engine, _ = fit(config, tmp_path / "run")
    assert set(engine.no_decay_names) == config.model.no_decay_names()
    assert set(engine.decay_names) == {p.name for p in config.model.param_table() if p.weight_decay}
    logged = [r["lr"] for r in rows(tmp_path / "run")]
    assert logged == [lr_at(s, lr=0.01, warmup_steps=2, total_steps=5, final_lr=0.001) for s in range(5)]


def test_grad_accumulation_equals_the_big_batch(tmp_path, corpus):
    e_big, _ = fit(tiny(tmp_path, "training.max_steps=3", source=corpus), tmp_path / "big")
    e_small, _ = fit(tiny(tmp_path, "training.max_steps=3", "training.batch_size=4", "training.grad_accum_steps=2",
                          source=corpus), tmp_path / "small")
    a, b = losses(tmp_path / "big"), losses(tmp_path / "small")
    assert a.keys() == b.keys() == {1, 2, 3}
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-6, abs=1e-6)
    for name in e_big.params:
        np.testing.assert_allclose(e_small.params[name], e_big.params[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert e_small.datamodule.step == 6 and e_big.datamodule.step == 3


# ---------------------------------------------------------------------- checkpoints and resume
def test_checkpoint_holds_the_canonical_training_state(tmp_path, corpus):
    config = tiny(tmp_path, "training.max_steps=2", source=corpus)
    engine, result = fit(config, tmp_path / "run")
    ckpt = load_checkpoint(result.last_checkpoint)
    assert set(ckpt.state_meta) == set(STATE_KEYS)
    meta = ckpt.state_meta
    assert (meta["step"], meta["micro_step"], meta["backend"], meta["reason"]) == (2, 2, "jax", "final")
    assert meta["data"] == engine.datamodule.state_dict() and meta["grad_scaler"] is None
    assert meta["optimizer"]["step"] == 2 and meta["schedule"]["total_steps"] == 2
    names = [p.name for p in config.model.param_table()]
    assert set(ckpt.state_tensors) == {f"{m}.{n}" for m in ("exp_avg", "exp_avg_sq") for n in names}
    # canonical layout: the flax (in, out) moment of a linear is stored transposed, like its weight
    adam = engine.opt_state[-1]
    q = "layers.0.attn.q_proj.weight"
    np.testing.assert_array_equal(ckpt.state_tensors[f"exp_avg_sq.{q}"], np.asarray(adam.exp_avg_sq[q]).T)
    np.testing.assert_array_equal(ckpt.params[q], np.asarray(engine.params[q]).T)
    assert int(adam.count) == 2
    assert (result.last_checkpoint / "tokenizer.json").is_file()


def test_resume_reproduces_the_uninterrupted_losses_exactly(tmp_path, corpus):
    # dropout and accumulation on purpose: the dropout keys and the data cursor must both resume exactly
    over = ("training.max_steps=8", "training.grad_accum_steps=2", "training.batch_size=4",
            "model.dropout=0.1", "training.eval_every=4", "training.early_stopping_patience=5")
    fit(tiny(tmp_path, *over, source=corpus), tmp_path / "full")
    _, first = fit(tiny(tmp_path, *over, source=corpus), tmp_path / "cut", callbacks=[StopAt(3)])
    assert first.stop_reason == "requested" and first.last_checkpoint.name == "step_3"
    assert main(["--backend", "jax", "--run-dir", str(tmp_path / "cut"), "--resume", "--sample-tokens", "0"]) == 0
    full, cut = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert sorted(cut) == list(range(1, 9))
    assert [cut[s] for s in range(4, 9)] == [full[s] for s in range(4, 9)]  # bit-exact in fp32 on CPU
    val_full = {r["step"]: r["val_loss"] for r in rows(tmp_path / "full") if "val_loss" in r}
    val_cut = {r["step"]: r["val_loss"] for r in rows(tmp_path / "cut") if "val_loss" in r and r["step"] > 3}
    assert val_cut == val_full == {4: val_full[4], 8: val_full[8]}
    a = load_checkpoint(tmp_path / "cut" / "checkpoints" / "step_8")
    b = load_checkpoint(tmp_path / "full" / "checkpoints" / "step_8")
    assert a.state_meta["callbacks"] == b.state_meta["callbacks"]
    for key in b.state_tensors:
        np.testing.assert_array_equal(a.state_tensors[key], b.state_tensors[key], err_msg=key)


def test_dropout_is_on_in_training_and_off_in_eval(tmp_path):
    e0, _ = fit(tiny(tmp_path, "training.max_steps=1"), tmp_path / "a")
    e1, _ = fit(tiny(tmp_path, "training.max_steps=1", "model.dropout=0.3"), tmp_path / "b")
    assert losses(tmp_path / "a")[1] != losses(tmp_path / "b")[1]  # same weights and batch, masks differ
    # evaluation is deterministic: the same params give the same val loss with and without dropout
    e1.params = dict(e0.params)
    assert e1.evaluate(2)["val_loss"] == e0.evaluate(2)["val_loss"]


class NaNAt(Callback):
    def __init__(self, at: int):
        self.at = at

    def on_step_end(self, trainer, metrics):
        if metrics["step"] == self.at:
            trainer.params = {k: v * jnp.nan if k == "embed.weight" else v for k, v in trainer.params.items()}


@pytest.mark.parametrize("log_every", [1, 4])
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, log_every):
    # log_every=4: the NaN at step 4 is not read as a metric before the step-4 checkpoint; the
    # device-side flag must still stop the save
    config = tiny(tmp_path, "training.max_steps=10", "checkpoint.every_steps=2",
                  f"logging.every_steps={log_every}", f"training.log_every={log_every}")
    with pytest.raises(NonFiniteLossError, match=r"nan.*last good checkpoint is .*step_2"):
        fit(config, tmp_path / "run", callbacks=[NaNAt(3)])
    path, skipped = latest_valid_checkpoint(tmp_path / "run" / "checkpoints")
    assert path.name == "step_2" and not skipped
    assert all(np.isfinite(a).all() for a in load_checkpoint(path).params.values())


# ---------------------------------------------------------------------- precision
def test_bf16_computes_in_bf16_with_fp32_master_weights(tmp_path):
    fit(tiny(tmp_path, "training.max_steps=3"), tmp_path / "fp32")
    engine, _ = fit(tiny(tmp_path, "training.max_steps=3", "optimization.dtype=bfloat16"), tmp_path / "bf16")
    assert engine.model.dtype == jnp.bfloat16
    assert all(p.dtype == jnp.float32 for p in engine.params.values())
    assert all(m.dtype == jnp.float32 for m in jax.tree.leaves(engine.opt_state[-1].exp_avg))
    a, b = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert all(abs(a[s] - b[s]) < 0.05 for s in a) and a != b  # bf16 differs, but only a little


def test_fp16_loss_scale_is_checkpointed_and_an_overflow_skips_the_step(tmp_path):
    _, result = fit(tiny(tmp_path, "training.max_steps=2", "optimization.dtype=float16"), tmp_path / "run")
    scaler = load_checkpoint(result.last_checkpoint).state_meta["grad_scaler"]
    assert scaler == {"scale": 65536.0, "growth_tracker": 2}
    assert all(math.isfinite(v) for v in losses(tmp_path / "run").values())
    # a scale so large that the scaled gradients overflow float16: the update is skipped, the scale halves
    config = tiny(tmp_path, "training.max_steps=3", "optimization.dtype=float16")
    with TrainingEngine(config, run_dir=tmp_path / "inf", callback_names=()) as engine:
        engine._carry = engine._replicate(engine._fresh_carry(scale=2.0 ** 126))
        before = {k: np.asarray(v) for k, v in engine.params.items()}
        engine.total_steps = 1
        engine.fit()
        assert float(engine._carry["loss_scale"].scale) == 2.0 ** 125
        assert int(engine.opt_state[-1].count) == 0
        for k, v in engine.params.items():
            np.testing.assert_array_equal(np.asarray(v), before[k], err_msg=k)


def test_compile_flag_is_reported_as_meaningless(tmp_path, caplog):
    with caplog.at_level("INFO", logger="llm"):
        TrainingEngine(tiny(tmp_path, "optimization.compile=true"), run_dir=tmp_path / "run")
    assert any("optimization.compile has no effect on the JAX backend" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------- tasks and callbacks
def test_regression_task_trains(tmp_path):
    config = tiny(tmp_path, "task=regression", "training.max_steps=60", "training.lr=1e-2",
                  "training.batch_size=32", "training.eval_every=60", "data.synthetic_size=2048")
    _, result = fit(config, tmp_path / "run")
    first = losses(tmp_path / "run")[1]
    assert first > 0.5 and result.val_loss < first / 20
    assert result.last_checkpoint is None and not (tmp_path / "run" / "checkpoints").exists()


class MAEFlax(FlaxTask):  # the flax half of a custom task: model + loss
    def build_model(self, config, datamodule):
        return nnx.Linear(datamodule.in_features, datamodule.out_features, rngs=nnx.Rngs(0))

    def loss(self, model, batch, *, deterministic):
        x, y = batch
        mae = jnp.abs(model(x) - y).mean()
        return mae, {"loss": mae}


@register_task("mae_regression_jax")
class MAERegressionJax(TrainingTask):
    backends = {"jax": MAEFlax}
    canonical = False

    def build_datamodule(self, config, *, rank=0, world_size=1):
        return SyntheticDataModule(task="regression", batch_size=config.training.batch_size,
                                   num_samples=1024, seed=config.training.seed, rank=rank, world_size=world_size)


class LossHistory(Callback):
    def __init__(self):
        self.losses = []
        self.hooks = []

    def needs_metrics(self, step):
        return step % 5 == 0

    def on_train_start(self, trainer):
        self.hooks.append(("start", trainer.step, trainer.total_steps, trainer.is_main, trainer.world_size))

    def on_step_end(self, trainer, metrics):
        assert {"step", "epoch", "lr", "tokens", "elapsed_s"} <= set(metrics)
        if "loss" in metrics:
            self.losses.append((metrics["step"], metrics["loss"]))

    def on_train_end(self, trainer, metrics):
        self.hooks.append(("end", metrics["stop_reason"]))


def test_custom_task_and_callback(tmp_path):
    history = LossHistory()
    config = tiny(tmp_path, "training.max_steps=40", "training.lr=0.05", "logging.every_steps=20",
                  "training.log_every=20")
    with TrainingEngine(config, task="mae_regression_jax", callbacks=[history], run_dir=tmp_path / "run") as engine:
        result = engine.fit()
    assert isinstance(engine.model, nnx.Linear) and engine.no_decay_names == ["bias"]
    assert [s for s, _ in history.losses] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert history.losses[-1][1] < 0.3 * history.losses[0][1] and result.stop_reason == "completed"
    assert history.hooks == [("start", 0, 40, True, 1), ("end", "completed")]


# ---------------------------------------------------------------------- data parallel
TWO_DEVICES = textwrap.dedent("""
    import json, sys
    import jax
    from backends.flax.engine import TrainingEngine
    from llm.callbacks import Callback
    from llm.config import ConfigError, load_config

    class Record(Callback):
        def __init__(self):
            self.rows = []
        def needs_metrics(self, step):
            return True
        def on_step_end(self, trainer, metrics):
            self.rows.append([metrics["loss"], metrics["grad_norm"]])

    overrides, root = json.loads(sys.argv[1]), sys.argv[2]
    config = load_config(None, overrides, env={})
    assert len(jax.devices()) == 2
    out = {}
    for n in (1, 2):
        record = Record()
        with TrainingEngine(config, run_dir=f"{root}/d{n}", devices=jax.devices()[:n], callbacks=[record],
                            callback_names=()) as engine:
            engine.fit()
            if n == 2:
                batch = engine._shard(engine.datamodule.batch_at(0)[0], 0)
                out["batch_sharding"] = [list(batch.sharding.spec), len(batch.addressable_shards)]
                out["param_sharding"] = list(engine.params["embed.weight"].sharding.spec)
                out["val"] = engine.evaluate(2)["val_loss"]
            else:
                out["val_1"] = engine.evaluate(2)["val_loss"]
        out[n] = record.rows
    try:
        TrainingEngine(load_config(None, overrides + ["training.batch_size=7"], env={}), run_dir=f"{root}/bad")
    except ConfigError as e:
        out["error"] = str(e)
    import llm.train  # noqa: F401 -- the CLI module too
    out["frameworks"] = sorted({"torch", "tensorflow"} & {m.split(".")[0] for m in sys.modules})
    print("RESULT", json.dumps(out))
""")


def test_two_devices_give_the_one_device_losses(tmp_path):
    overrides = [*TINY, "data.source=synthetic", "training.max_steps=4", "training.batch_size=8",
                 "training.grad_accum_steps=2", "model.dropout=0.1"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_", "JAX_COORDINATOR"))}
    env.update(PYTHONPATH=str(REPO), XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", TWO_DEVICES, json.dumps(overrides), str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.split("RESULT", 1)[1])
    one, two = np.array(result["1"]), np.array(result["2"])
    assert one.shape == two.shape == (4, 2)
    np.testing.assert_allclose(two, one, rtol=1e-5)  # dropout too: masks are drawn for the global batch
    assert result["val"] == pytest.approx(result["val_1"], rel=1e-6)
    assert result["batch_sharding"] == [["data"], 2] and result["param_sharding"] == []  # rows split, params replicated
    assert "training.batch_size=7" in result["error"] and "2 JAX devices" in result["error"]
    assert result["frameworks"] == []  # the JAX engine, its tasks and the CLI never import torch
