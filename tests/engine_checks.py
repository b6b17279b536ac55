"""What every training engine must do, as checks that take the engine class.

``tests/test_engine.py`` (torch) and ``tests/test_flax_engine.py`` (JAX) call these and then add
their backend's own assertions. Importing this module loads neither torch nor jax, so the JAX tests
stay torch-free. The ``corpus`` fixture they take lives in ``tests/conftest.py``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from callbacks_for_tests import PoisonAt, StopAt
from llm.checkpoint import (
    Checkpoint,
    CheckpointError,
    latest_valid_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from llm.config import Config, dump_yaml, load_config
from llm.loop.callbacks import Callback
from llm.run import STATE_KEYS, DeviceOutOfMemoryError, NonFiniteLossError, TrainResult, split_moment_name
from llm.schedule import lr_at
from llm.train import main

TINY = ["model.vocab_size=64", "model.max_seq_len=32", "model.hidden_size=32", "model.num_layers=1",
        "model.num_heads=4", "model.num_kv_heads=2", "model.norm_type=rmsnorm", "model.use_glu=true",
        "model.activation=silu", "data.seq_len=16", "data.max_bytes=null", "training.batch_size=8",
        "training.max_steps=6", "training.warmup_steps=2", "training.lr=1e-2", "training.eval_every=0",
        "training.log_every=1", "logging.every_steps=1", "logging.progress=false",
        "checkpoint.every_steps=0", "checkpoint.keep_last=null"]


def tiny(tmp_path: Path, *overrides: str, source: str | Path = "synthetic") -> Config:
    return load_config(None, [*TINY, f"data.source={source}", f"data.cache_dir={tmp_path / 'cache'}",
                              *overrides], env={})


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows(run_dir) if "loss" in r}


def fit(engine_cls: type, config: Config, run_dir: Path, **kwargs: Any) -> tuple[Any, TrainResult]:
    with engine_cls(config, run_dir=run_dir, **kwargs) as engine:
        return engine, engine.fit()


# ---------------------------------------------------------------------- learning
def learns_below_the_unigram_baseline(engine_cls: type, tmp_path: Path, corpus: Path) -> tuple[Any, TrainResult]:
    config = tiny(tmp_path, "training.max_steps=40", "training.eval_every=20", source=corpus)
    engine, result = fit(engine_cls, config, tmp_path / "run")
    steps = losses(tmp_path / "run")
    assert len(steps) == 40 and result.stop_reason == "completed"
    assert np.mean([steps[s] for s in range(36, 41)]) < 0.5 * np.mean([steps[s] for s in range(1, 6)])
    unigram = result.baselines["unigram_entropy"]
    assert 1.0 < unigram < math.log(64)
    assert result.val_loss < 0.6 * unigram  # context helps: well below the unigram entropy
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["val_loss"] == pytest.approx(result.val_loss) and summary["tokens_per_s"] > 0
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    assert (tmp_path / "run" / "tokenizer.json").is_file()
    assert all(r["grad_norm"] > 0 for r in rows(tmp_path / "run") if "loss" in r)
    assert engine.sample(max_new_tokens=20, temperature=0).startswith("def ")
    return engine, result


def follows_the_schedule(engine_cls: type, tmp_path: Path) -> Any:
    config = tiny(tmp_path, "training.max_steps=5", "training.warmup_steps=2", "training.lr=0.01",
                  "training.min_lr_ratio=0.1")
    engine, _ = fit(engine_cls, config, tmp_path / "run")
    logged = [r["lr"] for r in rows(tmp_path / "run")]
    assert logged == [lr_at(s, lr=0.01, warmup_steps=2, total_steps=5, final_lr=0.001) for s in range(5)]
    assert logged[1] == 0.01 and logged[-1] == pytest.approx(0.001)
    assert set(engine.no_decay_names) == config.model.no_decay_names()
    assert {"embed.weight", "final_norm.weight", "layers.0.attn_norm.weight"} <= set(engine.no_decay_names)
    assert set(engine.decay_names) == {p.name for p in config.model.param_table() if p.weight_decay}
    return engine


def accumulation_equals_the_big_batch(engine_cls: type, tmp_path: Path, corpus: Path) -> tuple[Any, Any]:
    """Returns the (big-batch, accumulating) engines, whose parameters the caller compares."""
    big = tiny(tmp_path, "training.max_steps=3", "training.batch_size=8", source=corpus)
    small = tiny(tmp_path, "training.max_steps=3", "training.batch_size=4", "training.grad_accum_steps=2",
                 source=corpus)
    e_big, _ = fit(engine_cls, big, tmp_path / "big")
    e_small, _ = fit(engine_cls, small, tmp_path / "small")
    a, b = losses(tmp_path / "big"), losses(tmp_path / "small")
    assert a.keys() == b.keys() == {1, 2, 3}
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-6, abs=1e-6)
    assert e_small.datamodule.step == 6 and e_big.datamodule.step == 3
    return e_big, e_small


# ---------------------------------------------------------------------- checkpoints and resume
def checkpoint_holds_the_training_state(engine_cls: type, backend: str, tmp_path: Path, corpus: Path
                                        ) -> tuple[Any, Checkpoint]:
    config = tiny(tmp_path, "training.max_steps=2", source=corpus)
    engine, result = fit(engine_cls, config, tmp_path / "run")
    assert result.last_checkpoint == tmp_path / "run" / "checkpoints" / "step_2"
    ckpt = load_checkpoint(result.last_checkpoint)
    assert set(ckpt.state_meta) == set(STATE_KEYS)
    meta = ckpt.state_meta
    assert (meta["step"], meta["micro_step"], meta["backend"], meta["reason"]) == (2, 2, backend, "final")
    assert meta["data"] == engine.datamodule.state_dict() and meta["grad_scaler"] is None
    assert meta["optimizer"]["step"] == 2 and meta["schedule"]["total_steps"] == 2
    assert meta["schedule"]["next_lr"] == pytest.approx(lr_at(2, lr=0.01, warmup_steps=2, total_steps=2,
                                                               final_lr=0.001))
    names = [p.name for p in config.model.param_table()]
    assert set(ckpt.state_tensors) == {f"{m}.{n}" for m in ("exp_avg", "exp_avg_sq") for n in names}
    assert ckpt.config == config.to_dict()
    assert (result.last_checkpoint / "tokenizer.json").read_bytes() == (tmp_path / "run" / "tokenizer.json").read_bytes()
    return engine, ckpt


def restore_puts_moments_back_and_names_a_misshaped_one(engine_cls: type, tmp_path: Path) -> None:
    """``_restore`` loads canonical moments exactly (``moments()`` gives them back bit for bit), and
    a mis-shaped one is a ``CheckpointError`` naming the checkpoint, the moment, the name and both shapes."""
    engine, _ = fit(engine_cls, tiny(tmp_path, "training.max_steps=1"), tmp_path / "run")
    params = engine.impl.to_canonical(engine.model)
    saved = engine.moments()
    moments: dict[str, dict[str, np.ndarray]] = {}
    for key, value in saved.items():
        moment, name = split_moment_name(key)
        moments.setdefault(name, {})[moment] = value + np.float32(1.0)
    engine._restore(tmp_path / "ck", params, moments, 1, None)
    assert {k: v.tobytes() for k, v in engine.moments().items()} == \
        {k: (v + np.float32(1.0)).tobytes() for k, v in saved.items()}
    q = "layers.0.attn.q_proj.weight"
    moments[q]["exp_avg_sq"] = moments[q]["exp_avg_sq"][:, :16]
    with pytest.raises(CheckpointError) as err:
        engine._restore(tmp_path / "ck", params, moments, 1, None)
    assert str(err.value) == (f"{tmp_path / 'ck'}: exp_avg_sq: optimizer moments for DecoderModel do not match -- "
                              f"mis-shaped 1: {q}: expected (32, 32), got (32, 16)")


def resume_is_exact(engine_cls: type, tmp_path: Path, corpus: Path, cli: tuple[str, ...] = ()) -> None:
    """Stopped at step 3 and resumed by ``python -m llm.train [cli] --resume``, the run logs the
    uninterrupted run's losses and writes its final state bit for bit (fp32 on CPU)."""
    # dropout and accumulation on purpose: the RNG and the data cursor must both resume exactly
    over = ("training.max_steps=8", "training.grad_accum_steps=2", "training.batch_size=4",
            "model.dropout=0.1", "training.eval_every=4", "training.early_stopping_patience=5")
    fit(engine_cls, tiny(tmp_path, *over, source=corpus), tmp_path / "full")
    _, first = fit(engine_cls, tiny(tmp_path, *over, source=corpus), tmp_path / "cut", callbacks=[StopAt(3)])
    assert first.stop_reason == "requested" and first.last_checkpoint.name == "step_3"
    assert main([*cli, "--run-dir", str(tmp_path / "cut"), "--resume", "--sample-tokens", "0"]) == 0
    full, cut = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert sorted(cut) == list(range(1, 9))
    assert [cut[s] for s in range(4, 9)] == [full[s] for s in range(4, 9)]
    val_full = {r["step"]: r["val_loss"] for r in rows(tmp_path / "full") if "val_loss" in r}
    val_cut = {r["step"]: r["val_loss"] for r in rows(tmp_path / "cut") if "val_loss" in r and r["step"] > 3}
    assert val_cut == val_full == {4: val_full[4], 8: val_full[8]}
    a = load_checkpoint(tmp_path / "cut" / "checkpoints" / "step_8")
    b = load_checkpoint(tmp_path / "full" / "checkpoints" / "step_8")
    assert a.state_meta["callbacks"] == b.state_meta["callbacks"]
    for key in b.state_tensors:
        np.testing.assert_array_equal(a.state_tensors[key], b.state_tensors[key], err_msg=key)
    assert a.params.keys() == b.params.keys()
    for key in b.params:  # the weights themselves, not only the losses and moments
        np.testing.assert_array_equal(a.params[key], b.params[key], err_msg=key)


def nan_stops_at_the_last_good_checkpoint(engine_cls: type, tmp_path: Path, log_every: int,
                                          poison: Callable[[Any], None]) -> None:
    """``poison`` makes the weights NaN after step 3: the run raises, and step 2 stays the newest
    checkpoint. With log_every=4 the NaN at step 4 is not read as a metric before the step-4
    checkpoint; the device-side flag must still stop the save."""
    config = tiny(tmp_path, "training.max_steps=10", "checkpoint.every_steps=2",
                  f"logging.every_steps={log_every}", f"training.log_every={log_every}")
    with pytest.raises(NonFiniteLossError, match=r"nan.*last good checkpoint is .*step_2"):
        fit(engine_cls, config, tmp_path / "run", callbacks=[PoisonAt(3, poison)])
    path, skipped = latest_valid_checkpoint(tmp_path / "run" / "checkpoints")
    assert path.name == "step_2" and not skipped
    assert all(np.isfinite(a).all() for a in load_checkpoint(path).params.values())


def throughput_leaves_out_the_first_step(engine_cls: type, tmp_path: Path) -> TrainResult:
    """On a fake clock -- 100 s in the first optimiser step (compilation), 1 s in each later one,
    nothing elsewhere -- the run reports the first step as ``compile_seconds`` and the steady 128
    tokens per second (8 x 16 tokens a step) of steps 2-4; a row of step 1 alone gets its own rate."""
    now = [0.0]

    class SlowFirstStep(engine_cls):
        clock = staticmethod(lambda: now[0])

        def _optimizer_step(self, batches, lr, micro_step):
            now[0] += 100.0 if self.step == 0 else 1.0
            return super()._optimizer_step(batches, lr, micro_step)

    config = tiny(tmp_path, "training.max_steps=4", "training.eval_every=2", "training.eval_batches=1",
                  "checkpoint.every_steps=2")
    _, result = fit(SlowFirstStep, config, tmp_path / "run")
    assert (result.compile_seconds, result.tokens_per_s, result.train_seconds) == (100.0, 128.0, 103.0)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["compile_seconds"], summary["tokens_per_s"]) == (100.0, 128.0)
    assert [r["tokens_per_s"] for r in rows(tmp_path / "run") if "loss" in r] == [1.28, 128.0, 128.0, 128.0]
    return result


def plateau_schedule_reduces_and_resumes(engine_cls: type, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """lr_schedule=plateau: the loop feeds every evaluation to the schedule (flat val losses here), the
    rate halves after lr_patience of them, and a resume continues from the saved reductions."""
    monkeypatch.setattr(engine_cls, "_val_loss", lambda self, n: 2.0)
    over = ("training.lr_schedule=plateau", "training.warmup_steps=0", "training.lr=0.01",
            "training.min_lr=0.0", "training.lr_patience=1", "training.lr_factor=0.5", "training.eval_every=1",
            "training.max_steps=4", "checkpoint.every_steps=2")
    fit(engine_cls, tiny(tmp_path, *over), tmp_path / "run")
    lrs = {r["step"]: r["lr"] for r in rows(tmp_path / "run") if "lr" in r}
    # evals after steps 1, 2, 3: the first sets the best, each later flat one halves the rate
    assert [lrs[s] for s in (1, 2, 3, 4)] == pytest.approx([0.01, 0.01, 0.005, 0.0025])
    meta = json.loads((tmp_path / "run" / "checkpoints" / "step_2" / "state.json").read_text())
    assert meta["schedule"]["state"] == {"best": 2.0, "bad_evals": 0, "reductions": 1}
    fit(engine_cls, tiny(tmp_path, *over), tmp_path / "again",
        resume=tmp_path / "run" / "checkpoints" / "step_2")
    again = {r["step"]: r["lr"] for r in rows(tmp_path / "again") if "lr" in r}
    assert again[3] == pytest.approx(lrs[3]) and again[4] == pytest.approx(lrs[4])


def out_of_memory_is_one_line(engine_cls: type, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture, error: Exception,
                              cli: tuple[str, ...] = ()) -> str:
    """The step raises the framework's out-of-memory ``error``: ``fit`` raises a
    ``DeviceOutOfMemoryError`` naming the step and the sizes, and ``python -m llm.train [cli]`` turns
    it into one error line naming the step, the sizes and the knobs. Returns that line, whose
    "asked for ..." part (the framework's own wording of the sizes) the caller checks."""

    def oom(self, *args):
        raise error

    monkeypatch.setattr(engine_cls, "_optimizer_step", oom)
    config = tiny(tmp_path, "training.max_steps=2")
    with pytest.raises(DeviceOutOfMemoryError, match=r"ran out of memory at step 1 .*asked for .*"
                                                     r"training.batch_size=8.*data.seq_len=16"):
        fit(engine_cls, config, tmp_path / "run")
    dump_yaml(config, tmp_path / "c.yaml")
    capsys.readouterr()
    assert main([*cli, "--config", str(tmp_path / "c.yaml"), "--run-dir", str(tmp_path / "cli"),
                 "--sample-tokens", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("llm-train: error: the device ran out of memory at step 1")
    assert "training.batch_size=8" in err and "data.seq_len=16" in err
    assert "optimization.dtype=bfloat16" in err
    return err


# ---------------------------------------------------------------------- precision and tasks
def bf16_stays_close_to_fp32(engine_cls: type, tmp_path: Path) -> Any:
    """Returns the bfloat16 engine, whose dtypes the caller checks."""
    fit(engine_cls, tiny(tmp_path, "training.max_steps=3"), tmp_path / "fp32")
    engine, _ = fit(engine_cls, tiny(tmp_path, "training.max_steps=3", "optimization.dtype=bfloat16"),
                    tmp_path / "bf16")
    a, b = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert all(abs(a[s] - b[s]) < 0.05 for s in a) and a != b  # bf16 differs, but only a little
    return engine


def fp16_scaler_is_checkpointed(engine_cls: type, tmp_path: Path) -> dict[str, Any]:
    """Two float16 steps without overflow: the scale stays at its 2**16 start and counts 2 good steps
    (torch's GradScaler rule, which both engines follow); a run resumed from step 2 carries the scale on
    and writes the uninterrupted run's step-3 scaler. Returns the step-2 entry."""
    fp16 = ("optimization.dtype=float16", "checkpoint.every_steps=1")
    _, result = fit(engine_cls, tiny(tmp_path, "training.max_steps=2", *fp16), tmp_path / "run")
    scaler = load_checkpoint(result.last_checkpoint).state_meta["grad_scaler"]
    assert scaler == {"scale": 65536.0, "growth_tracker": 2}
    assert all(math.isfinite(v) for v in losses(tmp_path / "run").values())
    fit(engine_cls, tiny(tmp_path, "training.max_steps=3", *fp16), tmp_path / "full")
    fit(engine_cls, tiny(tmp_path, "training.max_steps=3", *fp16), tmp_path / "resumed",
        resume=result.last_checkpoint)
    step3 = [load_checkpoint(tmp_path / run / "checkpoints" / "step_3").state_meta["grad_scaler"]
             for run in ("full", "resumed")]
    assert step3[0] == step3[1] == {"scale": 65536.0, "growth_tracker": 3}
    return scaler


def regression_task_trains(engine_cls: type, tmp_path: Path) -> None:
    config = tiny(tmp_path, "task=regression", "training.max_steps=60", "training.lr=1e-2",
                  "training.batch_size=32", "training.eval_every=60", "data.synthetic_size=2048")
    _, result = fit(engine_cls, config, tmp_path / "run")
    first = losses(tmp_path / "run")[1]
    assert first > 0.5 and result.val_loss < first / 20
    # every task checkpoints: this one, not a decoder, in the named-tensor kind
    assert result.last_checkpoint == tmp_path / "run" / "checkpoints" / "step_60"
    assert load_checkpoint(result.last_checkpoint, allow_named=True).kind == "named"


# ---------------------------------------------------------------------- a task's units and named checkpoints
REGRESSION = ["task=regression", "training.max_steps=8", "training.batch_size=16", "data.synthetic_size=256",
              "training.eval_every=4", "training.eval_batches=2", "checkpoint.every_steps=3"]


def regression_reports_its_units(engine_cls: type, tmp_path: Path, monkeypatch: Any) -> TrainResult:
    """The regression task is reported in rows and MSE: ``rows_per_s`` / ``rows`` in metrics.jsonl
    and ``summary.json``, no perplexity, a ``loss (MSE)`` plot, summary lines in rows/s."""
    from llm.loop.callbacks import LossPlot

    drawn = []
    figure = LossPlot.figure
    monkeypatch.setattr(LossPlot, "figure", staticmethod(lambda *a, **k: drawn.append(figure(*a, **k)) or drawn[-1]))
    _, result = fit(engine_cls, tiny(tmp_path, *REGRESSION), tmp_path / "run")
    logged = [r for r in rows(tmp_path / "run") if "loss" in r]
    assert len(logged) == 8 and all(r["rows_per_s"] > 0 and r["rows"] == 16 * r["step"] for r in logged)
    assert not any({"tokens_per_s", "tokens", "val_ppl"} & set(r) for r in rows(tmp_path / "run"))
    assert [r["step"] for r in rows(tmp_path / "run") if "val_loss" in r] == [4, 8]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["rows_per_s"] == result.items_per_s > 0 and summary["rows_seen"] == result.items_seen == 128
    assert "tokens_per_s" not in summary and result.tokens_per_s is None
    assert (summary["items"], summary["loss_unit"]) == ("rows", "MSE")
    lines = result.summary_lines()
    assert lines[0].endswith("128 rows)") and lines[1].endswith("(MSE)")
    assert any(line.startswith("throughput ") and line.endswith(" rows/s") for line in lines)
    assert not any("tokens" in line or "nats" in line for line in lines)
    assert [fig.axes[0].get_ylabel() for fig in drawn] == ["loss (MSE)"]
    return result


def regression_resumes_exactly(engine_cls: type, tmp_path: Path) -> Checkpoint:
    """A regression run stopped after step 5 and resumed logs the same losses, bit for bit, as one
    that ran its 8 steps through; its checkpoints are named ones (the half's own parameter names,
    AdamW moments under ``moment_name``). Returns the step-5 checkpoint."""
    config = tiny(tmp_path, *REGRESSION)
    fit(engine_cls, config, tmp_path / "full")
    _, stopped = fit(engine_cls, config, tmp_path / "part", callbacks=[StopAt(5)])
    assert stopped.step == 5 and stopped.last_checkpoint == tmp_path / "part" / "checkpoints" / "step_5"
    manifest = json.loads((stopped.last_checkpoint / "manifest.json").read_text())
    assert manifest["kind"] == "named" and {"model.safetensors", "state.safetensors"} <= set(manifest["files"])
    ckpt = load_checkpoint(stopped.last_checkpoint, allow_named=True)
    assert ckpt.spec is None and ckpt.state_meta["step"] == 5
    assert {split_moment_name(k)[1] for k in ckpt.state_tensors} == set(ckpt.params)
    _, resumed = fit(engine_cls, config, tmp_path / "part", resume=True)
    assert resumed.step == 8 and losses(tmp_path / "part") == losses(tmp_path / "full")
    assert sorted(losses(tmp_path / "full")) == list(range(1, 9))
    return ckpt


def named_resume_refuses_other_names(engine_cls: type, tmp_path: Path) -> str:
    """A named checkpoint whose parameter names are not this model's (another backend's, here the
    same numbers renamed) is refused with a message naming the writer; so is resuming a canonical
    task from a named checkpoint. Returns the first message."""
    config = tiny(tmp_path, *REGRESSION, "training.max_steps=2")
    _, result = fit(engine_cls, config, tmp_path / "run")
    ckpt = load_checkpoint(result.last_checkpoint, allow_named=True)
    other = save_checkpoint(tmp_path / "other" / "checkpoints" / "step_2",
                            {f"other.{k}": v for k, v in ckpt.params.items()}, ckpt.config,
                            state_tensors={f"{m}.other.{n}": v for m, n, v in
                                           ((*split_moment_name(k), v) for k, v in ckpt.state_tensors.items())},
                            state_meta={**ckpt.state_meta, "backend": "elsewhere"}, kind="named")
    with pytest.raises(CheckpointError, match=r"written by the elsewhere backend") as info:
        engine_cls(config, run_dir=tmp_path / "again", resume=other)
    assert "other." in str(info.value) and not (tmp_path / "again").exists()
    with pytest.raises(CheckpointError, match=r"is a named checkpoint .* task 'lm' resumes only from canonical"):
        engine_cls(tiny(tmp_path), run_dir=tmp_path / "lm", resume=result.last_checkpoint)
    return str(info.value)


class HookLog(Callback):
    """Every hook in the order the loop calls it."""

    def __init__(self):
        self.events = []

    def on_train_start(self, trainer):
        self.events.append("train_start")

    def on_epoch_start(self, trainer, epoch):
        self.events.append(f"epoch_start {epoch}")

    def on_batch_start(self, trainer, step):
        self.events.append(f"batch {step}")

    def on_validation_start(self, trainer):
        self.events.append("validation")

    def on_eval_end(self, trainer, metrics):
        self.events.append("eval_end")

    def on_checkpoint(self, trainer, path):
        self.events.append(f"checkpoint {path.name}")

    def on_step_end(self, trainer, metrics):
        self.events.append(f"step_end {metrics['step']}")

    def on_epoch_end(self, trainer, epoch):
        self.events.append(f"epoch_end {epoch}")

    def on_train_end(self, trainer, metrics):
        self.events.append("train_end")


def every_hook_fires_in_order(engine_cls: type, tmp_path: Path) -> None:
    """2 steps per epoch (32 samples, batch 8, accumulation 2), 5 steps, eval every 2 (and at the end),
    checkpoint every 3 (and at the end), save_best: hooks of the third epoch end when the run does."""
    log = HookLog()
    config = tiny(tmp_path, "data.source=synthetic", "data.synthetic_size=40", "data.val_fraction=0.2",
                  "training.grad_accum_steps=2", "training.max_steps=5", "training.eval_every=2",
                  "training.eval_batches=1", "checkpoint.every_steps=3")
    _, result = fit(engine_cls, config, tmp_path / "run", callbacks=[log])
    assert result.step == 5
    assert log.events == [
        "train_start",
        "epoch_start 0", "batch 1", "step_end 1", "batch 2", "validation", "eval_end", "step_end 2",
        "epoch_end 0",
        "epoch_start 1", "batch 3", "checkpoint step_3", "step_end 3", "batch 4", "validation", "eval_end",
        "step_end 4", "epoch_end 1",
        "epoch_start 2", "batch 5", "validation", "eval_end", "step_end 5", "epoch_end 2",
        "checkpoint step_5", "train_end",
    ]


# ---------------------------------------------------------------------- the memory estimate at start
def memory_estimate_is_logged_and_refuses_what_cannot_fit(engine_cls: type, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture,
                                                          capsys: pytest.CaptureFixture,
                                                          cli: tuple[str, ...] = ()) -> None:
    """The start-up log line is ``llm.memory``'s estimate (total per device and the largest parts);
    a device memory (the backend's ``_device_memory``, faked here) one byte below the estimate is
    refused at construction, before the run dir exists, with one line in ``python -m llm.train``;
    exactly the estimate is accepted; on the CPU (None) nothing is refused."""
    from llm.memory import estimate, gib

    config = tiny(tmp_path, "training.max_steps=1")
    with caplog.at_level("INFO", logger="llm"):
        engine, _ = fit(engine_cls, config, tmp_path / "run")
    assert engine._device_memory() is None  # the tests run on the CPU
    expected = estimate(config, engine._device_count(), engine.backend)  # each engine plans its own buffers
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("memory estimate: ")]
    assert lines == [f"memory estimate: {expected.summary()}"]
    assert lines[0].startswith(f"memory estimate: {gib(expected.total)} per device on mesh data=")

    monkeypatch.setattr(engine_cls, "_device_memory", lambda self: expected.total - 1)
    with pytest.raises(DeviceOutOfMemoryError, match=r"^the memory estimate, .* exceeds the device's .*"
                                                     r"training.batch_size=8, data.seq_len=16"):
        engine_cls(config, run_dir=tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    dump_yaml(config, tmp_path / "c.yaml")
    capsys.readouterr()
    assert main([*cli, "--config", str(tmp_path / "c.yaml"), "--run-dir", str(tmp_path / "cli"),
                 "--sample-tokens", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llm-train: error: the memory estimate, ")

    monkeypatch.setattr(engine_cls, "_device_memory", lambda self: expected.total)
    with engine_cls(config, run_dir=tmp_path / "fits") as engine:
        assert engine.memory_estimate == expected


# ---------------------------------------------------------------------- loss chunking
def chunked_loss_has_the_plain_losses(engine_cls: type, tmp_path: Path) -> None:
    """``optimization.loss_chunk_tokens=24`` (8 x 16 tokens: 5 chunks, the last one short) trains
    to the losses of the plain loss (``0``)."""
    got = {}
    for chunk in (0, 24):
        config = tiny(tmp_path, f"optimization.loss_chunk_tokens={chunk}", "training.max_steps=4")
        engine, _ = fit(engine_cls, config, tmp_path / f"run{chunk}")
        assert engine.impl.optimization.loss_chunk_tokens == chunk
        got[chunk] = losses(tmp_path / f"run{chunk}")
    assert len(got[0]) == 4
    np.testing.assert_allclose(list(got[24].values()), list(got[0].values()), rtol=1e-5)
