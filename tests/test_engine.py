"""The torch TrainingEngine: learning, optimiser groups, schedule, accumulation, AMP, checkpoints,
resume exactness, corrupt checkpoints, NaN handling, callbacks, tasks. Tiny specs, a few steps each."""

from __future__ import annotations

import json
import shutil
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import engine_checks as checks  # noqa: E402
from engine_checks import fit, losses, tiny  # noqa: E402

import llm.loop.tasks  # noqa: E402
from backends.torch.engine import TrainingEngine  # noqa: E402
from callbacks_for_tests import StopAt  # noqa: E402
from llm.checkpoint import CheckpointError, latest_valid_checkpoint, load_checkpoint  # noqa: E402
from llm.data import SyntheticDataModule  # noqa: E402
from llm.loop.callbacks import Callback, register_callback  # noqa: E402
from llm.loop.tasks import TASKS, get_task  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------- learning and the optimiser
def test_loss_falls_on_a_tiny_corpus_below_the_unigram_baseline(tmp_path, corpus):
    checks.learns_below_the_unigram_baseline(TrainingEngine, tmp_path, corpus)


def test_adamw_groups_follow_the_spec_no_decay_names(tmp_path):
    config = tiny(tmp_path, "training.weight_decay=0.25")
    engine = TrainingEngine(config, run_dir=tmp_path / "run")
    decay_group, no_decay_group = engine.optimizer.param_groups
    assert decay_group["weight_decay"] == 0.25 and no_decay_group["weight_decay"] == 0.0
    assert set(engine.no_decay_names) == config.model.no_decay_names()
    assert {"embed.weight", "final_norm.weight", "layers.0.attn_norm.weight"} <= set(engine.no_decay_names)
    assert set(engine.decay_names) == {p.name for p in config.model.param_table() if p.weight_decay}
    params = dict(engine.model.named_parameters())
    assert [id(p) for p in no_decay_group["params"]] == [id(params[n]) for n in engine.no_decay_names]


def test_engine_uses_the_schedule(tmp_path):
    checks.follows_the_schedule(TrainingEngine, tmp_path)


def test_grad_accumulation_equals_the_big_batch(tmp_path, corpus):
    e_big, e_small = checks.accumulation_equals_the_big_batch(TrainingEngine, tmp_path, corpus)
    for (name, p), (_, q) in zip(e_big.model.named_parameters(), e_small.model.named_parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------------- checkpoints and resume
def test_checkpoint_holds_the_canonical_training_state(tmp_path, corpus):
    engine, ckpt = checks.checkpoint_holds_the_training_state(TrainingEngine, "torch", tmp_path, corpus)
    state = engine.optimizer.state[dict(engine.model.named_parameters())["layers.0.attn.q_proj.weight"]]
    np.testing.assert_array_equal(ckpt.state_tensors["exp_avg_sq.layers.0.attn.q_proj.weight"],
                                  state["exp_avg_sq"].numpy())
    from backends.torch.convert import from_canonical

    x = torch.randint(0, 40, (2, 16))
    torch.testing.assert_close(from_canonical(ckpt.spec, ckpt.params)(x).logits, engine.model(x).logits)


def test_restore_puts_moments_back_and_names_a_misshaped_one(tmp_path):
    checks.restore_puts_moments_back_and_names_a_misshaped_one(TrainingEngine, tmp_path)


def test_resume_reproduces_the_uninterrupted_losses_exactly(tmp_path, corpus):
    checks.resume_is_exact(TrainingEngine, tmp_path, corpus)  # the CLI's default backend


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "no_manifest"])
def test_corrupt_newest_checkpoint_is_skipped(tmp_path, caplog, damage):
    over = ("training.max_steps=6", "checkpoint.every_steps=2")
    fit(TrainingEngine, tiny(tmp_path, *over), tmp_path / "full")
    fit(TrainingEngine, tiny(tmp_path, *over), tmp_path / "run", callbacks=[StopAt(4)])
    newest = tmp_path / "run" / "checkpoints" / "step_4"
    if damage == "flip_byte":
        blob = bytearray((newest / "state.safetensors").read_bytes())
        blob[-3] ^= 0xFF
        (newest / "state.safetensors").write_bytes(bytes(blob))
    elif damage == "truncate":
        data = (newest / "model.safetensors").read_bytes()
        (newest / "model.safetensors").write_bytes(data[: len(data) // 2])
    else:
        (newest / "manifest.json").unlink()
    with caplog.at_level("INFO", logger="llm"):
        _, result = fit(TrainingEngine, tiny(tmp_path, *over), tmp_path / "run", resume=True)
    assert any("skipping corrupt checkpoint" in r.getMessage() and "step_4" in r.getMessage()
               for r in caplog.records)
    assert any("resumed from" in r.getMessage() and "step_2" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "run" / "checkpoints" / "step_4.corrupt").is_dir()
    assert result.step == 6 and latest_valid_checkpoint(tmp_path / "run" / "checkpoints")[0].name == "step_6"
    assert losses(tmp_path / "run") == losses(tmp_path / "full")


def test_keep_last_retention(tmp_path):
    fit(TrainingEngine, tiny(tmp_path, "training.max_steps=5", "checkpoint.every_steps=1",
                             "checkpoint.keep_last=2"), tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_4", "step_5"]


def test_fresh_run_refuses_a_run_dir_with_checkpoints(tmp_path):
    fit(TrainingEngine, tiny(tmp_path, "training.max_steps=1"), tmp_path / "run")
    with pytest.raises(Exception, match="--resume"):
        TrainingEngine(tiny(tmp_path, "training.max_steps=1"), run_dir=tmp_path / "run")


def poison_embedding(trainer) -> None:
    with torch.no_grad():
        trainer.model.embed.weight.fill_(float("nan"))


@pytest.mark.parametrize("log_every", [1, 4])
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, log_every):
    checks.nan_stops_at_the_last_good_checkpoint(TrainingEngine, tmp_path, log_every, poison_embedding)


def test_early_stopping(tmp_path):
    config = tiny(tmp_path, "training.max_steps=20", "training.eval_every=1", "training.eval_batches=1",
                  "training.early_stopping_patience=2", "training.early_stopping_min_delta=100")
    _, result = fit(TrainingEngine, config, tmp_path / "run")
    assert (result.stop_reason, result.step) == ("early_stop", 3)
    assert load_checkpoint(result.last_checkpoint).state_meta["reason"] == "early_stop"


class EventLog(Callback):
    """Records the events an observer receives, with what it can see of the step."""

    def __init__(self):
        self.events = []

    def on_eval_end(self, trainer, metrics):
        self.events.append(("eval", metrics["step"]))

    def on_checkpoint(self, trainer, path):
        self.events.append(("checkpoint", path.name))

    def on_step_end(self, trainer, metrics):
        self.events.append(("step", metrics["step"], "val_loss" in metrics, trainer.last_checkpoint.name
                            if trainer.last_checkpoint else None))

    def on_train_end(self, trainer, metrics):
        self.events.append(("end", metrics["stop_reason"], bool(metrics.get("evaluated_at_end"))))


def test_the_loop_evaluates_and_checkpoints_before_the_observers_see_the_step(tmp_path):
    log = EventLog()
    config = tiny(tmp_path, "training.max_steps=5", "training.eval_every=2", "training.eval_batches=1",
                  "checkpoint.every_steps=3")
    fit(TrainingEngine, config, tmp_path / "run", callbacks=[log, StopAt(4)])
    assert log.events == [
        ("step", 1, False, None),
        ("eval", 2), ("step", 2, True, None),
        ("checkpoint", "step_3"), ("step", 3, False, "step_3"),
        ("eval", 4), ("step", 4, True, "step_3"),  # StopAt(4) asks for a stop after the step
        ("checkpoint", "step_4"), ("end", "requested", False),  # evaluated at 4 already: no second eval
    ]


def test_early_stopping_state_resumes_and_counts_on(tmp_path):
    """Patience 3, no improvement possible after the first eval: stopped after step 2 (1 bad eval),
    the resumed run stops at step 4 (its 2nd and 3rd bad evals), not at step 6 as a fresh count would."""
    over = ("training.max_steps=20", "training.eval_every=1", "training.eval_batches=1",
            "training.early_stopping_patience=3", "training.early_stopping_min_delta=100")
    _, first = fit(TrainingEngine, tiny(tmp_path, *over), tmp_path / "run", callbacks=[StopAt(2)])
    state = load_checkpoint(first.last_checkpoint).state_meta["callbacks"]["early_stopping"]
    assert state["bad_evals"] == 1 and state["best"] is not None  # the first eval sets the best
    _, again = fit(TrainingEngine, tiny(tmp_path, *over), tmp_path / "run", resume=True)
    assert (again.stop_reason, again.step) == ("early_stop", 4)


def test_torch_throughput_leaves_out_the_first_step(tmp_path):
    checks.throughput_leaves_out_the_first_step(TrainingEngine, tmp_path)


# ---------------------------------------------------------------------- precision and compile
def test_bf16_autocast_trains_on_cpu(tmp_path):
    engine = checks.bf16_stays_close_to_fp32(TrainingEngine, tmp_path)
    assert engine.amp_dtype is torch.bfloat16 and engine.model.embed.weight.dtype is torch.float32


def test_fp16_grad_scaler_state_is_checkpointed(tmp_path):
    checks.fp16_scaler_is_checkpointed(TrainingEngine, tmp_path)


def test_compile_switch_wraps_the_model(tmp_path, monkeypatch):
    calls = []
    real_compile = torch.compile

    def cheap_compile(model, **kwargs):  # inductor needs ~20 s here; the eager backend tests the wiring
        calls.append(kwargs)
        return real_compile(model, backend="eager")

    monkeypatch.setattr(torch, "compile", cheap_compile)
    fit(TrainingEngine, tiny(tmp_path, "training.max_steps=2"), tmp_path / "eager")
    engine, _ = fit(TrainingEngine, tiny(tmp_path, "training.max_steps=2", "optimization.compile=true",
                         "optimization.compile_mode=max-autotune-no-cudagraphs"), tmp_path / "compiled")
    assert calls == [{"mode": "max-autotune-no-cudagraphs"}] and engine.train_model is not engine.model
    a, b = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert b == pytest.approx(a, rel=1e-6)


# ---------------------------------------------------------------------- tasks and callbacks
def test_regression_task_trains(tmp_path):
    checks.regression_task_trains(TrainingEngine, tmp_path)


# -- the docs examples: the new task of llm/loop/tasks.py's docstring and the callback of docs/training.md
def tasks_docstring_example() -> str:
    """The code of ``llm.loop.tasks``' docstring example (the literal block after "a few lines::")."""
    _, found, rest = llm.loop.tasks.__doc__.partition("A new task is a few lines::\n\n")
    assert found, "the llm.loop.tasks docstring lost its example"
    block = []
    for line in rest.splitlines():
        if line.strip() and not line.startswith("    "):
            break
        block.append(line)
    return textwrap.dedent("\n".join(block))


@register_callback("loss_history")
class LossHistory(Callback):
    def __init__(self):
        self.losses = []

    def needs_metrics(self, step):
        return step % 5 == 0

    def on_step_end(self, trainer, metrics):
        if "loss" in metrics:
            self.losses.append((metrics["step"], metrics["loss"]))


def test_custom_task_and_callback(tmp_path, monkeypatch):
    """The docstring's example runs as written, its last line included: ``config`` and
    ``TrainingEngine`` are what it expects in scope (the engine is the torch one, kept for the
    assertions and given the callback)."""
    monkeypatch.setattr(TASKS, "_classes", dict(TASKS._classes))  # the example's registration ends here
    history = LossHistory()
    config = tiny(tmp_path, "training.max_steps=40", "training.lr=0.05", "logging.every_steps=20",
                  "training.log_every=20", f"logging.run_dir={tmp_path / 'run'}")
    ran = []

    class Engine(TrainingEngine):
        def __init__(self, config, **kwargs):
            super().__init__(config, callbacks=[history], **kwargs)
            ran.append(self)

        def fit(self):
            ran.append(super().fit())
            return ran[-1]

    namespace = {"__name__": "tasks_docstring_example", "torch": torch,
                 "SyntheticDataModule": SyntheticDataModule, "TrainingEngine": Engine, "config": config}
    exec(compile(tasks_docstring_example(), "llm/loop/tasks.py docstring", "exec"), namespace)
    engine, result = ran
    engine.close()
    assert type(get_task("mae_regression")) is namespace["MAERegression"] is type(engine.task)
    assert isinstance(engine.model, torch.nn.Linear)
    assert [s for s, _ in history.losses] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert history.losses[-1][1] < 0.3 * history.losses[0][1] and result.stop_reason == "completed"
    # The run records the task that ran (config.task was "lm"), so a resume from it trains the same one.
    assert engine.config.task == "mae_regression"
    assert json.loads((tmp_path / "run" / "config.json").read_text())["task"] == "mae_regression"


def test_progress_bar_writes_loss_and_throughput(tmp_path):
    import io

    from llm.loop.callbacks import ProgressBar

    out = io.StringIO()
    fit(TrainingEngine, tiny(tmp_path, "training.max_steps=4"), tmp_path / "run",
        callbacks=[ProgressBar(every=2, file=out)])
    text = out.getvalue()
    assert "4/4" in text and "loss=" in text and "tok/s=" in text


def test_vocab_that_does_not_fit_is_a_clear_error(tmp_path, corpus):
    from llm.tokenization import TokenizerError

    with pytest.raises(TokenizerError, match=r"model.vocab_size=8"):
        TrainingEngine(tiny(tmp_path, "model.vocab_size=8", source=corpus), run_dir=tmp_path / "run")


def test_cuda_step_puts_cudnn_attention_first_and_restores_the_order():
    """The CUDA step context ranks cuDNN's fused attention first; a CPU step leaves SDPA alone."""
    from torch.nn.attention import SDPBackend

    before = torch._C._get_sdp_priority_order()
    engine = TrainingEngine.__new__(TrainingEngine)  # only the two attributes the context reads
    engine.amp_dtype = None
    engine.device = torch.device("cuda")
    with engine._autocast():
        assert torch._C._get_sdp_priority_order()[0] == int(SDPBackend.CUDNN_ATTENTION)
    assert torch._C._get_sdp_priority_order() == before
    engine.device = torch.device("cpu")
    with engine._autocast():
        assert torch._C._get_sdp_priority_order() == before


def test_tensorboard_callback_writes_train_and_val_scalars(tmp_path, monkeypatch):
    """logging.tensorboard=true: one writer under <run_dir>/tensorboard, train/* every logged step,
    val/* at evals, closed at the end (a recording writer stands in for tensorboard's)."""
    from llm.loop.callbacks import TensorBoard

    writers = []

    class Recorder:
        def __init__(self, log_dir):
            self.log_dir, self.scalars, self.closed = log_dir, [], False
            writers.append(self)

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, float(value), step))

        def close(self):
            self.closed = True

    monkeypatch.setattr(TensorBoard, "writer_class", staticmethod(lambda: Recorder))
    config = tiny(tmp_path, "logging.tensorboard=true", "training.eval_every=3", "training.eval_batches=1")
    _, result = fit(TrainingEngine, config, tmp_path / "run")
    (writer,) = writers
    assert writer.log_dir == str(tmp_path / "run" / "tensorboard") and writer.closed
    train = {step: value for tag, value, step in writer.scalars if tag == "train/loss"}
    assert train == pytest.approx(losses(tmp_path / "run"))
    assert sorted(train) == list(range(1, 7))
    val = [step for tag, _, step in writer.scalars if tag == "val/loss"]
    assert val == [3, 6]
    assert {tag for tag, _, _ in writer.scalars} >= {"train/loss", "train/lr", "val/loss"}


# ---------------------------------------------------------------------- a refused resume changes nothing
def _snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_resume_with_every_checkpoint_corrupt_is_an_error_and_changes_nothing(tmp_path):
    fit(TrainingEngine, tiny(tmp_path, "training.max_steps=2", "checkpoint.every_steps=1"), tmp_path / "run")
    for step in (1, 2):
        (tmp_path / "run" / "checkpoints" / f"step_{step}" / "manifest.json").write_text("[]")
    before = _snapshot(tmp_path / "run")
    with pytest.raises(CheckpointError, match=r"--resume: no valid checkpoint under .*step_2: .*step_1: "):
        TrainingEngine(tiny(tmp_path, "training.max_steps=4"), run_dir=tmp_path / "run", resume=True)
    assert _snapshot(tmp_path / "run") == before


def test_resume_of_a_run_dir_that_does_not_exist_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="the run directory .*nowhere does not exist"):
        TrainingEngine(tiny(tmp_path), run_dir=tmp_path / "nowhere", resume=True)
    assert not (tmp_path / "nowhere").exists()


def test_a_rejected_resume_leaves_the_run_config_as_it_was(tmp_path):
    fit(TrainingEngine, tiny(tmp_path, "training.max_steps=2", "checkpoint.every_steps=1"), tmp_path / "run")
    before = _snapshot(tmp_path / "run")
    with pytest.raises(CheckpointError, match="different model spec"):
        TrainingEngine(tiny(tmp_path, "training.max_steps=4", "model.hidden_size=64"), run_dir=tmp_path / "run",
                       resume=True)
    assert _snapshot(tmp_path / "run") == before
    _, result = fit(TrainingEngine, tiny(tmp_path, "training.max_steps=3"), tmp_path / "run", resume=True)
    assert result.step == 3  # the plain resume still works


def test_a_fresh_run_refuses_a_run_dir_of_corrupt_or_deleted_checkpoints(tmp_path):
    fit(TrainingEngine, tiny(tmp_path, "training.max_steps=1"), tmp_path / "run")
    ckpts = tmp_path / "run" / "checkpoints"
    (ckpts / "step_1").rename(ckpts / "step_1.corrupt")
    with pytest.raises(CheckpointError, match="already holds checkpoints .*step_1.corrupt.*--resume"):
        TrainingEngine(tiny(tmp_path, "training.max_steps=1"), run_dir=tmp_path / "run")
    shutil.rmtree(ckpts)
    with pytest.raises(CheckpointError, match="already holds an earlier run .*config.json.*--resume"):
        TrainingEngine(tiny(tmp_path, "training.max_steps=1"), run_dir=tmp_path / "run")


def test_interrupted_checkpoint_writes_are_cleaned_at_resume(tmp_path):
    fit(TrainingEngine, tiny(tmp_path, "training.max_steps=2", "checkpoint.every_steps=1"), tmp_path / "run")
    ckpts = tmp_path / "run" / "checkpoints"
    (ckpts / ".step_3.tmp-abc").mkdir()
    (ckpts / ".step_3.tmp-abc" / "model.safetensors").write_bytes(b"partial")
    shutil.copytree(ckpts / "step_1", ckpts / ".step_1.old-99")  # step_1 is in place: a stale copy
    (ckpts / "step_2").rename(ckpts / ".step_2.old-7")  # cut between the two renames of an overwrite
    _, result = fit(TrainingEngine, tiny(tmp_path, "training.max_steps=3"), tmp_path / "run", resume=True)
    names = sorted(p.name for p in ckpts.iterdir())
    assert names == ["step_1", "step_2", "step_3"] and result.step == 3


@pytest.mark.parametrize("key,value", [("step", "abc"), ("tokens_seen", -3), ("data", []),
                                       ("best_val_loss", "low")])
def test_a_corrupt_state_json_behind_a_valid_manifest_is_a_one_line_error(tmp_path, key, value):
    import hashlib

    fit(TrainingEngine, tiny(tmp_path, "training.max_steps=1"), tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "step_1"
    meta = json.loads((ckpt / "state.json").read_text())
    meta[key] = value
    (ckpt / "state.json").write_text(json.dumps(meta))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"]["state.json"] = hashlib.sha256((ckpt / "state.json").read_bytes()).hexdigest()
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=f"state.json {key}=.* must be .*corrupt"):
        TrainingEngine(tiny(tmp_path, "training.max_steps=2"), run_dir=tmp_path / "run", resume=ckpt)


def test_plateau_schedule_reduces_on_flat_val_losses_and_resumes_its_state(tmp_path, monkeypatch):
    checks.plateau_schedule_reduces_and_resumes(TrainingEngine, tmp_path, monkeypatch)


def test_every_hook_fires_in_the_order_a_user_expects(tmp_path):
    checks.every_hook_fires_in_order(TrainingEngine, tmp_path)


def test_save_best_keeps_the_lowest_val_loss_checkpoint_beside_the_last_ones(tmp_path, monkeypatch):
    vals = iter([3.0, 2.0, 2.5, 2.8, 2.9, 3.1])
    monkeypatch.setattr(TrainingEngine, "_val_loss", lambda self, n: next(vals))
    config = tiny(tmp_path, "training.max_steps=6", "training.eval_every=1", "checkpoint.every_steps=1",
                  "checkpoint.keep_last=2", "checkpoint.save_best=true")
    fit(TrainingEngine, config, tmp_path / "run")
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["best", "step_5", "step_6"]
    best = load_checkpoint(ckpts / "best")
    assert best.state_meta["step"] == 2 and best.state_meta["best_val_loss"] == 2.0
    assert best.state_meta["reason"] == "best"


def test_device_out_of_memory_is_one_line_naming_the_step_sizes_and_knobs(tmp_path, monkeypatch, capsys):
    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                   "capacity of 79.11 GiB of which 1.50 GiB is free. Of the allocated ...")
    err = checks.out_of_memory_is_one_line(TrainingEngine, tmp_path, monkeypatch, capsys, error)
    assert "asked for 2.00 GiB with 1.50 GiB free" in err


def test_progress_bar_prints_each_log_line_once_through_the_bar(tmp_path, monkeypatch, capsys):
    """The console handler is on the root logger, on stderr (as llm.train sets it up): while the bar
    is drawn every record is written once, through the bar, in the handler's own format."""
    import logging
    import os
    import sys

    from llm.loop.callbacks import ProgressBar

    handler = logging.StreamHandler(sys.stderr)  # capsys's stderr
    handler.setFormatter(logging.Formatter("LOG %(message)s"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    # a terminal that reports no size, to tqdm and to the bar's own check
    monkeypatch.setattr("shutil.get_terminal_size", lambda fallback=None: os.terminal_size((0, 0)))
    monkeypatch.setattr("tqdm.std._screen_shape_wrapper", lambda: (lambda fp: (0, 0)))
    try:
        fit(TrainingEngine, tiny(tmp_path, "training.max_steps=4", "training.eval_every=2",
                                 "training.eval_batches=1"), tmp_path / "run",
            callbacks=[ProgressBar(every=2)], callback_names=())  # the bar instead of the console
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    err = capsys.readouterr().err
    assert err.count("step 2: val loss") == 1 and "LOG step 2: val loss" in err
    assert ("|#" in err or "|\u2588" in err) and "4/4" in err  # a terminal without a size still gets a bar


@pytest.mark.parametrize("change", ["training.batch_size=4", "data.seq_len=8", "training.seed=3"])
def test_a_resume_refused_by_the_data_cursor_changes_nothing(tmp_path, change):
    fit(TrainingEngine, tiny(tmp_path, "training.max_steps=2", "checkpoint.every_steps=1"), tmp_path / "run")
    before = _snapshot(tmp_path / "run")
    with pytest.raises(Exception, match=r"batch|seq_len|seed"):
        TrainingEngine(tiny(tmp_path, "training.max_steps=4", change), run_dir=tmp_path / "run", resume=True)
    assert _snapshot(tmp_path / "run") == before


# ---------------------------------------------------------------------- a task's units and named checkpoints
def test_regression_reports_rows_and_mse(tmp_path, monkeypatch):
    checks.regression_reports_its_units(TrainingEngine, tmp_path, monkeypatch)


def test_regression_resumes_exactly_from_a_named_checkpoint(tmp_path):
    ckpt = checks.regression_resumes_exactly(TrainingEngine, tmp_path)
    assert set(ckpt.params) == {"hidden.weight", "hidden.bias", "out.weight", "out.bias"}  # state_dict keys
    assert ckpt.params["hidden.weight"].shape == (64, ckpt.params["hidden.weight"].shape[1])  # (out, in)


def test_a_named_checkpoint_with_other_names_is_refused(tmp_path):
    message = checks.named_resume_refuses_other_names(TrainingEngine, tmp_path)
    assert "this torch model of task 'regression'" in message


# ---------------------------------------------------------------------- a task's own optimiser
from backends.torch.tasks import TorchLMTask  # noqa: E402
from llm.loop.tasks import LMTask, register_task  # noqa: E402


class SGDStepTorch(TorchLMTask):
    """The LM with SGD + momentum and a StepLR halving the rate every 2 steps."""

    def build_optimizer(self, config, model):
        return torch.optim.SGD(model.parameters(), lr=config.training.lr, momentum=0.9)

    def build_scheduler(self, config, optimizer):
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)


@register_task("sgd_step_lm")
class SGDStepLM(LMTask):
    backends = {"torch": SGDStepTorch}


def _sgd_config(tmp_path, corpus):
    return tiny(tmp_path, "training.max_steps=6", "training.lr=0.2", "training.grad_clip=0.5",
                "training.grad_accum_steps=2", "training.batch_size=4", "model.dropout=0.1", source=corpus)


def test_a_task_optimizer_and_scheduler_train_and_the_lr_follows_the_scheduler(tmp_path, corpus):
    engine, result = fit(TrainingEngine, _sgd_config(tmp_path, corpus), tmp_path / "run", task="sgd_step_lm")
    assert type(engine.optimizer) is torch.optim.SGD and engine.moments() == {}
    logged = checks.rows(tmp_path / "run")
    assert [r["lr"] for r in logged] == [0.2, 0.2, 0.1, 0.1, 0.05, 0.05]
    assert logged[-1]["loss"] < logged[0]["loss"] and logged[0]["grad_norm"] > 0.5  # clipping was due
    ckpt = load_checkpoint(result.last_checkpoint)
    assert ckpt.state_meta["optimizer"]["class"] == "torch.optim.sgd.SGD"
    assert ckpt.state_meta["optimizer"]["scheduler"] == "torch.optim.lr_scheduler.StepLR"
    assert ckpt.state_tensors and all(n.startswith("task_optimizer.optimizer.") for n in ckpt.state_tensors)
    for index, p in enumerate(engine.model.parameters()):  # SGD's state is keyed by parameter index
        saved = ckpt.state_tensors[f"task_optimizer.optimizer.state.{index}.momentum_buffer"]
        np.testing.assert_array_equal(saved, engine.optimizer.state[p]["momentum_buffer"].numpy())


def test_a_task_optimizer_resumes_exactly_and_refuses_another_optimizer(tmp_path, corpus):
    config = _sgd_config(tmp_path, corpus)
    full, _ = fit(TrainingEngine, config, tmp_path / "full", task="sgd_step_lm")
    _, first = fit(TrainingEngine, config, tmp_path / "cut", task="sgd_step_lm", callbacks=[StopAt(3)])
    assert first.last_checkpoint.name == "step_3"
    cut, _ = fit(TrainingEngine, config, tmp_path / "cut", task="sgd_step_lm", resume=True)
    a, b = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert [b[s] for s in range(4, 7)] == [a[s] for s in range(4, 7)]
    assert [r["lr"] for r in checks.rows(tmp_path / "cut")][3:] == [0.1, 0.05, 0.05]
    for (name, p), (_, q) in zip(full.model.named_parameters(), cut.model.named_parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)
    with pytest.raises(CheckpointError, match=r"task optimiser torch\.optim\.sgd\.SGD with the scheduler "
                                              r".*StepLR, this run uses the engine's AdamW"):
        TrainingEngine(config, run_dir=tmp_path / "other", resume=first.last_checkpoint)
    _, adamw = fit(TrainingEngine, config.replace(training=config.training.replace(max_steps=2)),
                   tmp_path / "adamw")
    with pytest.raises(CheckpointError, match=r"trained with the engine's AdamW, this run uses the torch task "
                                              r"optimiser torch\.optim\.sgd\.SGD"):
        TrainingEngine(config, run_dir=tmp_path / "other2", resume=adamw.last_checkpoint, task="sgd_step_lm")


def test_a_task_optimizer_state_round_trips_through_the_checkpoint_encoding():
    from backends.torch.engine import _decode_state, _encode_state

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1, betas=(0.8, 0.9))  # int keys, 0-d steps, a tuple
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    tensors: dict = {}
    saved = json.loads(json.dumps(_encode_state(optimizer.state_dict(), "optimizer", tensors)))
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}  # as the checkpoint writes: 0-d -> (1,)
    back, original = _decode_state(saved, tensors), optimizer.state_dict()
    assert back["param_groups"] == original["param_groups"] and back["param_groups"][0]["betas"] == (0.8, 0.9)
    assert back["state"].keys() == original["state"].keys() == {0, 1}
    for index, state in original["state"].items():
        for key, value in state.items():
            restored = back["state"][index][key]
            assert restored.shape == value.shape and torch.equal(restored, value)


def test_memory_estimate_is_logged_and_a_run_that_cannot_fit_is_refused(tmp_path, monkeypatch, caplog, capsys):
    checks.memory_estimate_is_logged_and_refuses_what_cannot_fit(TrainingEngine, tmp_path, monkeypatch, caplog,
                                                                 capsys)
