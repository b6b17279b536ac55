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

import engine_checks as checks  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from engine_checks import TINY, fit, losses, tiny  # noqa: E402
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
from llm.data import SyntheticDataModule  # noqa: E402
from llm.loop.callbacks import Callback  # noqa: E402
from llm.loop.tasks import TrainingTask, register_task  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


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
    engine, _ = checks.learns_below_the_unigram_baseline(TrainingEngine, tmp_path, corpus)
    assert engine.model.embed.weight[...].dtype == jnp.float32


def test_weight_decay_groups_follow_the_spec_and_the_schedule_is_llm_schedule(tmp_path):
    checks.follows_the_schedule(TrainingEngine, tmp_path)


def test_grad_accumulation_equals_the_big_batch(tmp_path, corpus):
    e_big, e_small = checks.accumulation_equals_the_big_batch(TrainingEngine, tmp_path, corpus)
    for name in e_big.params:
        np.testing.assert_allclose(e_small.params[name], e_big.params[name], rtol=1e-5, atol=1e-6, err_msg=name)


# ---------------------------------------------------------------------- checkpoints and resume
def test_checkpoint_holds_the_canonical_training_state(tmp_path, corpus):
    engine, ckpt = checks.checkpoint_holds_the_training_state(TrainingEngine, "jax", tmp_path, corpus)
    # canonical layout: the flax (in, out) moment of a linear is stored transposed, like its weight
    adam = engine.opt_state[-1]
    q = "layers.0.attn.q_proj.weight"
    np.testing.assert_array_equal(ckpt.state_tensors[f"exp_avg_sq.{q}"], np.asarray(adam.exp_avg_sq[q]).T)
    np.testing.assert_array_equal(ckpt.params[q], np.asarray(engine.params[q]).T)
    assert int(adam.count) == 2


def test_restore_puts_moments_back_and_names_a_misshaped_one(tmp_path):
    checks.restore_puts_moments_back_and_names_a_misshaped_one(TrainingEngine, tmp_path)


def test_resume_reproduces_the_uninterrupted_losses_exactly(tmp_path, corpus):
    checks.resume_is_exact(TrainingEngine, tmp_path, corpus, cli=("--backend", "jax"))


def test_dropout_is_on_in_training_and_off_in_eval(tmp_path):
    e0, _ = fit(TrainingEngine, tiny(tmp_path, "training.max_steps=1"), tmp_path / "a")
    e1, _ = fit(TrainingEngine, tiny(tmp_path, "training.max_steps=1", "model.dropout=0.3"), tmp_path / "b")
    assert losses(tmp_path / "a")[1] != losses(tmp_path / "b")[1]  # same weights and batch, masks differ
    # evaluation is deterministic: the same params give the same val loss with and without dropout
    e1.params = dict(e0.params)
    assert e1.evaluate(2)["val_loss"] == e0.evaluate(2)["val_loss"]


def poison_embedding(trainer) -> None:
    trainer.params = {k: v * jnp.nan if k == "embed.weight" else v for k, v in trainer.params.items()}


@pytest.mark.parametrize("log_every", [1, 4])
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, log_every):
    checks.nan_stops_at_the_last_good_checkpoint(TrainingEngine, tmp_path, log_every, poison_embedding)


# ---------------------------------------------------------------------- precision
def test_bf16_computes_in_bf16_with_fp32_master_weights(tmp_path):
    engine = checks.bf16_stays_close_to_fp32(TrainingEngine, tmp_path)
    assert engine.model.dtype == jnp.bfloat16
    assert all(p.dtype == jnp.float32 for p in engine.params.values())
    assert all(m.dtype == jnp.float32 for m in jax.tree.leaves(engine.opt_state[-1].exp_avg))


def test_fp16_loss_scale_is_checkpointed_and_an_overflow_skips_the_step(tmp_path):
    assert checks.fp16_scaler_is_checkpointed(TrainingEngine, tmp_path) == {"scale": 65536.0, "growth_tracker": 2}
    # a scale so large that the scaled gradients overflow float16: the update is skipped, the scale halves
    config = tiny(tmp_path, "training.max_steps=3", "optimization.dtype=float16")
    with TrainingEngine(config, run_dir=tmp_path / "inf", callback_names=()) as engine:
        engine._carry = engine._place(engine._fresh_carry(scale=2.0 ** 126))
        before = {k: np.asarray(v) for k, v in engine.params.items()}
        engine.total_steps = 1
        engine.fit()
        assert float(engine._carry["loss_scale"].scale) == 2.0 ** 125
        assert int(engine.opt_state[-1].count) == 0
        for k, v in engine.params.items():
            np.testing.assert_array_equal(np.asarray(v), before[k], err_msg=k)


def test_jax_throughput_leaves_out_the_first_step(tmp_path):
    checks.throughput_leaves_out_the_first_step(TrainingEngine, tmp_path)


def test_compile_flag_is_reported_as_meaningless(tmp_path, caplog):
    with caplog.at_level("INFO", logger="llm"):
        TrainingEngine(tiny(tmp_path, "optimization.compile=true"), run_dir=tmp_path / "run")
    assert any("optimization.compile has no effect on the JAX backend" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------- tasks and callbacks
def test_regression_task_trains(tmp_path):
    checks.regression_task_trains(TrainingEngine, tmp_path)


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
    from llm.loop.callbacks import Callback
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


def test_plateau_schedule_reduces_on_flat_val_losses_and_resumes_its_state(tmp_path, monkeypatch):
    checks.plateau_schedule_reduces_and_resumes(TrainingEngine, tmp_path, monkeypatch)


def test_device_out_of_memory_is_one_line_naming_the_step_sizes_and_knobs(tmp_path, monkeypatch, capsys):
    error = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
                                       "1073741824 bytes.")
    err = checks.out_of_memory_is_one_line(TrainingEngine, tmp_path, monkeypatch, capsys, error,
                                           cli=("--backend", "jax"))
    assert "asked for 1.00 GiB" in err


# ---------------------------------------------------------------------- a task's units and named checkpoints
def test_regression_reports_rows_and_mse(tmp_path, monkeypatch):
    checks.regression_reports_its_units(TrainingEngine, tmp_path, monkeypatch)


def test_regression_resumes_exactly_from_a_named_checkpoint(tmp_path):
    ckpt = checks.regression_resumes_exactly(TrainingEngine, tmp_path)
    assert set(ckpt.params) == {"hidden.kernel", "hidden.bias", "out.kernel", "out.bias"}  # NNX paths
    assert ckpt.params["hidden.kernel"].shape == (ckpt.params["hidden.kernel"].shape[0], 64)  # (in, out)


def test_a_named_checkpoint_with_other_names_is_refused(tmp_path):
    message = checks.named_resume_refuses_other_names(TrainingEngine, tmp_path)
    assert "this jax model of task 'regression'" in message


# ---------------------------------------------------------------------- a task's own optimiser
import optax  # noqa: E402
from engine_checks import StopAt, rows  # noqa: E402

from backends.flax.tasks import FlaxLMTask  # noqa: E402
from llm.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from llm.loop.tasks import LMTask  # noqa: E402


class SGDScheduleFlax(FlaxLMTask):
    """The LM with ``optax.sgd(momentum=0.9)`` on a rate halving every 2 updates (inside the tx)."""

    def build_optimizer(self, config, model):
        schedule = optax.exponential_decay(config.training.lr, transition_steps=2, decay_rate=0.5,
                                           staircase=True)
        return optax.inject_hyperparams(optax.sgd)(learning_rate=schedule, momentum=0.9)


@register_task("sgd_schedule_lm_jax")
class SGDScheduleLM(LMTask):
    backends = {"jax": SGDScheduleFlax}


# clipping due at the first step, accumulation and dropout: what the engine keeps doing around the task's tx
SGD_RUN = ("training.max_steps=6", "training.lr=0.2", "training.grad_clip=0.5", "training.grad_accum_steps=2",
           "training.batch_size=4", "model.dropout=0.1")


@pytest.fixture(scope="module")
def sgd_run(tmp_path_factory, module_corpus):
    """The uninterrupted SGD_RUN: (its run dir, engine, result), read by both tests below."""
    root = tmp_path_factory.mktemp("sgd")
    engine, result = fit(TrainingEngine, tiny(root, *SGD_RUN, source=module_corpus), root / "run",
                         task="sgd_schedule_lm_jax")
    return root / "run", engine, result


def test_a_task_optax_optimizer_trains_and_the_lr_follows_its_schedule(sgd_run):
    run_dir, engine, result = sgd_run
    assert engine.moments() == {}
    logged = rows(run_dir)
    assert [r["lr"] for r in logged] == [float(np.float32(lr)) for lr in (0.2, 0.2, 0.1, 0.1, 0.05, 0.05)]
    assert logged[-1]["loss"] < logged[0]["loss"] and logged[0]["grad_norm"] > 0.5  # clipping was due
    ckpt = load_checkpoint(result.last_checkpoint)
    assert ckpt.state_meta["optimizer"]["name"] == "task" and ckpt.state_meta["optimizer"]["backend"] == "jax"
    trace = {k: v for k, v in ckpt.state_tensors.items() if k.endswith("trace['embed.weight']")}
    assert ckpt.state_tensors and all(k.startswith("task_optimizer.") for k in ckpt.state_tensors)
    assert len(trace) == 1 and np.abs(next(iter(trace.values()))).max() > 0  # the momentum buffer


def test_a_task_optax_optimizer_resumes_exactly_and_refuses_the_engines_adamw(tmp_path, module_corpus, sgd_run):
    config = tiny(tmp_path, *SGD_RUN, source=module_corpus)
    full_dir, full, _ = sgd_run
    _, first = fit(TrainingEngine, config, tmp_path / "cut", task="sgd_schedule_lm_jax", callbacks=[StopAt(3)])
    assert first.last_checkpoint.name == "step_3"
    cut, _ = fit(TrainingEngine, config, tmp_path / "cut", task="sgd_schedule_lm_jax", resume=True)
    a, b = losses(full_dir), losses(tmp_path / "cut")
    assert [b[s] for s in range(4, 7)] == [a[s] for s in range(4, 7)]
    assert [r["lr"] for r in rows(tmp_path / "cut")][3:] == [float(np.float32(lr)) for lr in (0.1, 0.05, 0.05)]
    for name in full.params:
        np.testing.assert_array_equal(np.asarray(cut.params[name]), np.asarray(full.params[name]), err_msg=name)
    with pytest.raises(CheckpointError, match=r"jax task optimiser .*SGDScheduleFlax.build_optimizer, this run "
                                              r"uses the engine's AdamW"):
        TrainingEngine(config, run_dir=tmp_path / "other", resume=first.last_checkpoint)


def test_every_hook_fires_in_the_order_a_user_expects(tmp_path):
    checks.every_hook_fires_in_order(TrainingEngine, tmp_path)


def test_memory_estimate_is_logged_and_a_run_that_cannot_fit_is_refused(tmp_path, monkeypatch, caplog, capsys):
    checks.memory_estimate_is_logged_and_refuses_what_cannot_fit(TrainingEngine, tmp_path, monkeypatch, caplog,
                                                                 capsys, cli=("--backend", "jax"))
