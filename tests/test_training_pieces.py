"""The backend-agnostic training pieces: schedule, tasks, callbacks, run directory (no framework)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from llm.checkpoint import CheckpointError
from llm.config import ConfigError, load_config
from llm.loop.cadence import every
from llm.loop.callbacks import (
    Callback,
    CallbackList,
    LossPlot,
    MetricsLogger,
    TensorBoard,
    build_callbacks,
    get_callback,
    register_callback,
)
from llm.loop.engine import EarlyStopping
from llm.loop.registry import Registry
from llm.loop.tasks import TaskError, TrainingTask, get_task, register_task, unigram_entropy
from llm.run import RunDir, moment_name, split_moment_name
from llm.schedule import lr_at, schedule_for


@pytest.mark.parametrize("module", ["llm.train", "llm.loop.callbacks", "llm.loop.engine", "llm.loop.tasks", "llm.run",
                                    "llm.schedule"])
def test_training_modules_import_no_framework(module):
    code = f"import sys, {module}; print(sorted({{'torch', 'jax', 'flax'}} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------- schedule
def test_warmup_then_cosine_to_the_floor():
    kw = dict(lr=1.0, warmup_steps=4, total_steps=15, final_lr=0.1)  # decay over steps 4..14
    assert [lr_at(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, **kw) == 1.0  # decay starts at the peak
    assert lr_at(9, **kw) == pytest.approx(0.55)  # halfway through the decay: mean of peak and floor
    assert lr_at(14, **kw) == pytest.approx(0.1) and lr_at(100, **kw) == pytest.approx(0.1)
    values = [lr_at(s, **kw) for s in range(4, 15)]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))


def test_linear_and_constant_schedules_and_no_warmup():
    assert lr_at(7, lr=2.0, warmup_steps=2, total_steps=13, final_lr=0.0, schedule="linear") == pytest.approx(1.0)
    assert lr_at(11, lr=2.0, warmup_steps=0, total_steps=12, final_lr=0.5, schedule="linear") == 0.5
    assert lr_at(0, lr=2.0, warmup_steps=0, total_steps=12, final_lr=0.5) == 2.0
    assert lr_at(50, lr=2.0, warmup_steps=3, total_steps=12, final_lr=0.5, schedule="constant") == 2.0
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_at(5, lr=1.0, warmup_steps=0, total_steps=9, final_lr=0.0, schedule="exponential")


def test_step_schedule_multiplies_by_gamma_every_step_size_steps_down_to_the_floor():
    kw = dict(lr=1.0, warmup_steps=2, total_steps=100, final_lr=0.01, schedule="step", step_size=3, gamma=0.5)
    assert [lr_at(s, **kw) for s in range(11)] == pytest.approx(
        [0.5, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25])
    assert lr_at(99, **kw) == 0.01  # 0.5 ** 32 is below the floor


def test_plateau_schedule_reduces_after_patience_evals_without_a_new_best_and_resumes():
    t = load_config(None, ["training.lr=1.0", "training.warmup_steps=0", "training.min_lr=0.1",
                           "training.lr_schedule=plateau", "training.lr_patience=2", "training.lr_factor=0.5"],
                    env={}).training
    sched = schedule_for(t, total_steps=100)
    seen = []
    for val in [3.0, 2.0, 2.5, 2.1, 1.9, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]:
        sched.observe(val)
        seen.append(sched(50))
    assert seen == pytest.approx([1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25, 0.125, 0.125, 0.1, 0.1, 0.1])
    again = schedule_for(t, total_steps=100)
    again.load_state_dict(json.loads(json.dumps(sched.state_dict())))
    sched.observe(5.0), again.observe(5.0)
    assert again(50) == sched(50) and again.state_dict() == sched.state_dict()
    other = schedule_for(t.replace(lr_schedule="cosine"), total_steps=100)
    other.observe(1.0), other.observe(2.0), other.observe(3.0)
    assert other.state_dict()["reductions"] == 0  # only plateau listens


def test_plateau_needs_evaluation():
    with pytest.raises(ValueError, match="lr_schedule.*plateau.*eval_every > 0"):
        load_config(None, ["training.lr_schedule=plateau", "training.eval_every=0"], env={})


def test_schedule_for_a_config():
    t = load_config(None, ["training.lr=0.5", "training.warmup_steps=10", "training.min_lr=0.05",
                           "training.lr_schedule=linear"], env={}).training
    lr_of = schedule_for(t, total_steps=110)
    assert lr_of(4) == pytest.approx(0.25) and lr_of(109) == pytest.approx(0.05)


# ---------------------------------------------------------------------- cadence and the registry
def test_every_n_steps_and_zero_is_never():
    assert [s for s in range(13) if every(4)(s)] == [4, 8, 12]
    assert [s for s in range(4) if every(1)(s)] == [1, 2, 3]
    assert not any(every(0)(s) for s in range(10))
    with pytest.raises(ValueError, match="n must be >= 0"):
        every(-1)


def test_registry_checks_clashes_and_suggests_the_nearest_name():
    class Base:
        name = ""

    reg = Registry("widget", Base, decorator="register_widget", error=KeyError)

    @reg.register("gear")
    class Gear(Base):
        pass

    assert reg.get("gear") is Gear and Gear.name == "gear" and "gear" in reg and reg.names() == ["gear"]
    assert reg.register("gear")(Gear) is Gear  # the same class again (a re-import) is no clash
    with pytest.raises(KeyError, match=r"widget 'gear' is already registered \(.*Gear\); pass replace=True"):
        reg.register("gear")(type("Other", (Base,), {}))
    other = reg.register("gear", replace=True)(type("Other", (Base,), {}))
    assert reg.get("gear") is other
    with pytest.raises(KeyError, match=r"register_widget\('cog'\) decorates Base subclasses, got 3"):
        reg.register("cog")(3)
    with pytest.raises(KeyError) as info:
        reg.get("gaer", where="w: ", hint=" (or else)")
    assert info.value.args[0] == "w: unknown widget 'gaer'; did you mean 'gear'? registered: gear (or else)"
    assert reg.suggestions("zzz") == "; registered: gear"


# ---------------------------------------------------------------------- tasks
def test_unigram_entropy():
    assert unigram_entropy(np.array([3, 3, 3])) == 0.0
    assert unigram_entropy(np.arange(8)) == pytest.approx(math.log(8))
    assert unigram_entropy(np.array([0, 0, 0, 1])) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))


def test_task_registry():
    assert get_task("lm").name == "lm" and get_task("regression").canonical is False
    with pytest.raises(TaskError, match="unknown task 'nope'; registered: .*lm"):
        get_task("nope")

    @register_task("pieces_demo")
    class Demo(TrainingTask):
        backends = {"torch": "collections:OrderedDict"}

    assert isinstance(get_task("pieces_demo"), Demo) and get_task("pieces_demo").backend("torch") == {}
    with pytest.raises(TaskError, match="no 'jax' implementation"):
        get_task("pieces_demo").backend("jax")
    with pytest.raises(TaskError, match="already registered"):
        @register_task("lm")
        class Other(TrainingTask):
            pass
    # Same class name from another module is another task, not a re-import of this one.
    twin = type("Demo", (TrainingTask,), {"__module__": "elsewhere", "backends": {}})
    with pytest.raises(TaskError, match="already registered"):
        register_task("pieces_demo")(twin)
    assert type(get_task("pieces_demo")) is Demo


# ---------------------------------------------------------------------- callbacks
def test_callback_registry_and_defaults():
    config = load_config(None, ["training.eval_every=5", "training.early_stopping_patience=2",
                                "logging.progress=false"], env={})
    names = [cb.name for cb in build_callbacks(config)]
    assert names == ["console", "metrics", "loss_plot"]  # evaluation, checkpoints, early stopping: the loop's
    assert [cb.due(10) for cb in build_callbacks(config)[:2]] == [True, True]  # log_every, every_steps: 10
    assert EarlyStopping.from_config(config).patience == 2
    assert EarlyStopping.from_config(load_config(None, [], env={})) is None
    assert get_callback("llm.loop.callbacks:LossPlot") is LossPlot
    with pytest.raises(ValueError, match="unknown callback 'nope'"):
        get_callback("nope")
    with pytest.raises(ValueError, match=r"unknown callback 'metric'; did you mean 'metrics'\? registered: .*"
                                         r"\(or give 'package.module:Class'\)"):
        get_callback("metric")
    with pytest.raises(ValueError, match="unknown callback 'eval'"):  # no longer a callback
        get_callback("eval")


def test_callback_list_keeps_list_order_and_writers_on_rank_0():
    calls = []

    class Rec(Callback):
        def __init__(self, tag, main_only=False):
            self.tag, self.main_process_only = tag, main_only

        def needs_metrics(self, step):
            return self.tag == "writer" and step == 3

        def on_step_end(self, trainer, metrics):
            calls.append(self.tag)

    cbs = [Rec("writer", main_only=True), Rec("first"), Rec("plain")]
    CallbackList(cbs).call("on_step_end", None, {})
    assert calls == ["writer", "first", "plain"]
    other_rank = CallbackList(cbs, is_main=False)
    assert [cb.tag for cb in other_rank] == ["first", "plain"]
    assert other_rank.needs_metrics(3) and not other_rank.needs_metrics(4)  # same sync steps on every rank


def test_early_stopping_counts_and_round_trips():
    es = EarlyStopping(patience=2, min_delta=0.01)
    for loss in (1.0, 0.995, 0.98, 0.979):
        es.update(loss)
    assert not es.exhausted and es.bad_evals == 1 and es.best == 0.98
    state = json.loads(json.dumps(es.state_dict()))
    again = EarlyStopping(patience=2, min_delta=0.01)
    again.load_state_dict(state)
    again.update(0.975)
    assert again.exhausted and "not improved on 0.9800 for 2 evaluations" in again.message()
    with pytest.raises(ValueError, match="patience=0 must be >= 1"):
        EarlyStopping(patience=0)


def test_metrics_logger_drops_rows_after_the_resume_step(tmp_path):
    run = RunDir(tmp_path, tmp_path / "checkpoints")
    run.metrics_path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 7))
                                + '{"step": 7, "lo')  # a torn last line
    logger = MetricsLogger(every=2)
    trainer = SimpleNamespace(run=run, step=4)
    logger.on_train_start(trainer)
    logger.on_step_end(trainer, {"step": 5, "loss": 0.5, "lr": 1e-3})  # not a logging step
    logger.on_step_end(trainer, {"step": 6, "loss": float("nan"), "lr": 1e-3})
    logger.on_train_end(trainer, {"step": 6, "stop_reason": "completed"})
    rows = [json.loads(line) for line in run.metrics_path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 6] and rows[-1]["loss"] is None  # JSON has no NaN


def test_loss_plot(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    assert not LossPlot.draw(metrics, tmp_path / "loss.png")
    metrics.write_text("".join(json.dumps({"step": s, "loss": 3 / s, **({"val_loss": 3.2 / s} if s % 5 == 0 else {})})
                               + "\n" for s in range(1, 21)))
    assert LossPlot.draw(metrics, tmp_path / "loss.png", {"unigram_entropy": 3.0})
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_tensorboard_without_the_package_is_a_config_error(monkeypatch):
    def missing():
        raise ImportError("logging.tensorboard=true needs the 'tensorboard' package (pip install tensorboard)")

    monkeypatch.setattr(TensorBoard, "writer_class", staticmethod(missing))
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        TensorBoard.from_config(load_config(None, ["logging.tensorboard=true"], env={}))
    assert TensorBoard.from_config(load_config(None, [], env={})) is None


def test_register_callback_rejects_a_clash():
    with pytest.raises(ValueError, match="already registered"):
        @register_callback("metrics")
        class Mine(Callback):
            pass


# ---------------------------------------------------------------------- run directory
def test_moment_names_round_trip():
    assert moment_name("exp_avg_sq", "layers.0.attn.q_proj.weight") == "exp_avg_sq.layers.0.attn.q_proj.weight"
    assert split_moment_name("exp_avg.embed.weight") == ("exp_avg", "embed.weight")
    with pytest.raises(CheckpointError):
        split_moment_name("momentum.embed.weight")


def test_run_dir_retention(tmp_path):
    run = RunDir(tmp_path, tmp_path / "checkpoints")
    for step in (2, 4, 10, 6):
        (run.checkpoint_path(step)).mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_3.corrupt").mkdir()
    removed = run.prune(keep_last=2)
    assert sorted(p.name for p in removed) == ["step_2", "step_4"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_10", "step_3.corrupt", "step_6"]
    assert run.prune(None) == []


# ---------------------------------------------------------------------- a task's units
def test_tasks_name_their_units():
    lm, regression = get_task("lm"), get_task("regression")
    assert (lm.items, lm.loss_unit, lm.perplexity) == ("tokens", "nats/token", True)
    assert (regression.items, regression.loss_unit, regression.perplexity) == ("rows", "MSE", False)
    assert (lm.canonical, regression.canonical) == (True, False)


def test_train_result_speaks_the_tasks_units():
    from llm.run import TrainResult

    lm = TrainResult(None, 10, 10, "completed", 1.5, 1.6, 1.6, items_per_s=2000.0, items_seen=5120)
    assert lm.tokens_per_s == 2000.0 and lm.to_dict()["tokens_per_s"] == 2000.0
    assert lm.to_dict()["tokens_seen"] == 5120
    assert "throughput 2,000 tokens/s" in lm.summary_lines() and lm.summary_lines()[1].endswith("(nats/token)")
    rows = TrainResult(None, 10, 10, "completed", 0.1, 0.2, 0.2, items_per_s=300.0, items_seen=320,
                       items="rows", loss_unit="MSE")
    summary = rows.to_dict()
    assert (summary["rows_per_s"], summary["rows_seen"], rows.tokens_per_s) == (300.0, 320, None)
    assert "tokens_per_s" not in summary and "tokens_seen" not in summary
    lines = rows.summary_lines()
    assert lines[0] == "stopped: completed at step 10/10 (0s training, 320 rows)"
    assert lines[1] == "final train loss 0.1000 | val loss 0.2000 | best val 0.2000 (MSE)"
    assert "throughput 300 rows/s" in lines


def test_loss_plot_labels_the_loss_with_its_unit(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    assert LossPlot.figure(metrics) is None
    metrics.write_text("".join(json.dumps({"step": s, "loss": 1 / s}) + "\n" for s in range(1, 5)))
    assert LossPlot.figure(metrics).axes[0].get_ylabel() == "loss (nats/token)"
    assert LossPlot.figure(metrics, loss_unit="MSE").axes[0].get_ylabel() == "loss (MSE)"
