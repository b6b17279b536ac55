"""The torch TrainingEngine: learning, optimiser groups, schedule, accumulation, AMP, checkpoints,
resume exactness, corrupt checkpoints, NaN handling, callbacks, tasks. Tiny specs, a few steps each."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from backends.torch.engine import TrainingEngine  # noqa: E402
from backends.torch.tasks import TorchTask  # noqa: E402
from llm.callbacks import Callback, register_callback  # noqa: E402
from llm.checkpoint import latest_valid_checkpoint, load_checkpoint  # noqa: E402
from llm.config import Config, load_config  # noqa: E402
from llm.data import SyntheticDataModule  # noqa: E402
from llm.run import STATE_KEYS, NonFiniteLossError  # noqa: E402
from llm.schedule import lr_at  # noqa: E402
from llm.tasks import TrainingTask, register_task  # noqa: E402
from llm.train import main  # noqa: E402

CORPUS = "".join(f"def f{i % 7}(x):\n    return x * {i % 5} + {i % 3}\n\n" for i in range(400))

TINY = ["model.vocab_size=64", "model.max_seq_len=32", "model.hidden_size=32", "model.num_layers=1",
        "model.num_heads=4", "model.num_kv_heads=2", "model.norm_type=rmsnorm", "model.use_glu=true",
        "model.activation=silu", "data.seq_len=16", "data.max_bytes=null", "training.batch_size=8",
        "training.max_steps=6", "training.warmup_steps=2", "training.lr=1e-2", "training.eval_every=0",
        "training.log_every=1", "logging.every_steps=1", "logging.progress=false",
        "checkpoint.every_steps=0", "checkpoint.keep_last=null"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from a thread pool, and on a shared CPU a spinning pool is far slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
    """Requests a stop after step ``at`` (what an interrupted run looks like, deterministically)."""

    def __init__(self, at: int):
        self.at = at

    def on_step_end(self, trainer, metrics):
        if metrics["step"] == self.at:
            trainer.request_stop()


# ---------------------------------------------------------------------- learning and the optimiser
def test_loss_falls_on_a_tiny_corpus_below_the_unigram_baseline(tmp_path, corpus):
    config = tiny(tmp_path, "training.max_steps=40", "training.eval_every=20", source=corpus)
    engine, result = fit(config, tmp_path / "run")
    steps = losses(tmp_path / "run")
    assert len(steps) == 40 and result.stop_reason == "completed"
    assert np.mean([steps[s] for s in range(36, 41)]) < 0.5 * np.mean([steps[s] for s in range(1, 6)])
    unigram = result.baselines["unigram_entropy"]
    assert 1.0 < unigram < math.log(64)
    assert result.val_loss < 0.6 * unigram  # context helps: well below the unigram entropy
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["val_loss"] == pytest.approx(result.val_loss)
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    assert (tmp_path / "run" / "tokenizer.json").is_file()
    assert engine.sample(max_new_tokens=20, temperature=0).startswith("def ")


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
    config = tiny(tmp_path, "training.max_steps=5", "training.warmup_steps=2", "training.lr=0.01",
                  "training.min_lr_ratio=0.1")
    fit(config, tmp_path / "run")
    logged = [r["lr"] for r in rows(tmp_path / "run")]
    assert logged == [lr_at(s, lr=0.01, warmup_steps=2, total_steps=5, final_lr=0.001) for s in range(5)]
    assert logged[1] == 0.01 and logged[-1] == pytest.approx(0.001)


def test_grad_accumulation_equals_the_big_batch(tmp_path, corpus):
    big = tiny(tmp_path, "training.max_steps=3", "training.batch_size=8", source=corpus)
    small = tiny(tmp_path, "training.max_steps=3", "training.batch_size=4", "training.grad_accum_steps=2",
                 source=corpus)
    e_big, _ = fit(big, tmp_path / "big")
    e_small, _ = fit(small, tmp_path / "small")
    a, b = losses(tmp_path / "big"), losses(tmp_path / "small")
    assert a.keys() == b.keys() == {1, 2, 3}
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-6, abs=1e-6)
    for (name, p), (_, q) in zip(e_big.model.named_parameters(), e_small.model.named_parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
    assert e_small.datamodule.step == 6 and e_big.datamodule.step == 3


# ---------------------------------------------------------------------- checkpoints and resume
def test_checkpoint_holds_the_canonical_training_state(tmp_path, corpus):
    config = tiny(tmp_path, "training.max_steps=2", source=corpus)
    engine, result = fit(config, tmp_path / "run")
    assert result.last_checkpoint == tmp_path / "run" / "checkpoints" / "step_2"
    ckpt = load_checkpoint(result.last_checkpoint)
    assert set(ckpt.state_meta) == set(STATE_KEYS)
    meta = ckpt.state_meta
    assert (meta["step"], meta["micro_step"], meta["backend"], meta["reason"]) == (2, 2, "torch", "final")
    assert meta["data"] == engine.datamodule.state_dict() and meta["grad_scaler"] is None
    assert meta["schedule"]["next_lr"] == pytest.approx(lr_at(2, lr=0.01, warmup_steps=2, total_steps=2,
                                                               final_lr=0.001))
    names = [p.name for p in config.model.param_table()]
    assert set(ckpt.state_tensors) == {f"{m}.{n}" for m in ("exp_avg", "exp_avg_sq") for n in names}
    state = engine.optimizer.state[dict(engine.model.named_parameters())["layers.0.attn.q_proj.weight"]]
    np.testing.assert_array_equal(ckpt.state_tensors["exp_avg_sq.layers.0.attn.q_proj.weight"],
                                  state["exp_avg_sq"].numpy())
    assert ckpt.config == config.to_dict()
    assert (result.last_checkpoint / "tokenizer.json").read_bytes() == (tmp_path / "run" / "tokenizer.json").read_bytes()
    from backends.torch.convert import from_canonical

    x = torch.randint(0, 40, (2, 16))
    torch.testing.assert_close(from_canonical(ckpt.spec, ckpt.params)(x).logits, engine.model(x).logits)


def test_resume_reproduces_the_uninterrupted_losses_exactly(tmp_path, corpus):
    # dropout and accumulation on purpose: the RNG and the data cursor must both resume exactly
    over = ("training.max_steps=8", "training.grad_accum_steps=2", "training.batch_size=4",
            "model.dropout=0.1", "training.eval_every=4", "training.early_stopping_patience=5")
    fit(tiny(tmp_path, *over, source=corpus), tmp_path / "full")
    _, first = fit(tiny(tmp_path, *over, source=corpus), tmp_path / "cut", callbacks=[StopAt(3)])
    assert first.stop_reason == "requested" and first.last_checkpoint.name == "step_3"
    assert main(["--run-dir", str(tmp_path / "cut"), "--resume", "--sample-tokens", "0"]) == 0
    full, cut = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert sorted(cut) == list(range(1, 9))
    assert [cut[s] for s in range(4, 9)] == [full[s] for s in range(4, 9)]  # bit-exact in fp32 on CPU
    val_full = {r["step"]: r["val_loss"] for r in rows(tmp_path / "full") if "val_loss" in r}
    val_cut = {r["step"]: r["val_loss"] for r in rows(tmp_path / "cut") if "val_loss" in r and r["step"] > 3}
    assert val_cut == val_full == {4: val_full[4], 8: val_full[8]}
    assert load_checkpoint(tmp_path / "cut" / "checkpoints" / "step_8").state_meta["callbacks"] == \
        load_checkpoint(tmp_path / "full" / "checkpoints" / "step_8").state_meta["callbacks"]


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "no_manifest"])
def test_corrupt_newest_checkpoint_is_skipped(tmp_path, caplog, damage):
    over = ("training.max_steps=6", "checkpoint.every_steps=2")
    fit(tiny(tmp_path, *over), tmp_path / "full")
    fit(tiny(tmp_path, *over), tmp_path / "run", callbacks=[StopAt(4)])
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
        _, result = fit(tiny(tmp_path, *over), tmp_path / "run", resume=True)
    assert any("skipping corrupt checkpoint" in r.getMessage() and "step_4" in r.getMessage()
               for r in caplog.records)
    assert any("resumed from" in r.getMessage() and "step_2" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "run" / "checkpoints" / "step_4.corrupt").is_dir()
    assert result.step == 6 and latest_valid_checkpoint(tmp_path / "run" / "checkpoints")[0].name == "step_6"
    assert losses(tmp_path / "run") == losses(tmp_path / "full")


def test_keep_last_retention(tmp_path):
    fit(tiny(tmp_path, "training.max_steps=5", "checkpoint.every_steps=1", "checkpoint.keep_last=2"),
        tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_4", "step_5"]


def test_fresh_run_refuses_a_run_dir_with_checkpoints(tmp_path):
    fit(tiny(tmp_path, "training.max_steps=1"), tmp_path / "run")
    with pytest.raises(Exception, match="--resume"):
        TrainingEngine(tiny(tmp_path, "training.max_steps=1"), run_dir=tmp_path / "run")


class NaNAt(Callback):
    def __init__(self, at: int):
        self.at = at

    def on_step_end(self, trainer, metrics):
        if metrics["step"] == self.at:
            with torch.no_grad():
                trainer.model.embed.weight.fill_(float("nan"))


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


def test_early_stopping(tmp_path):
    config = tiny(tmp_path, "training.max_steps=20", "training.eval_every=1", "training.eval_batches=1",
                  "training.early_stopping_patience=2", "training.early_stopping_min_delta=100")
    _, result = fit(config, tmp_path / "run")
    assert (result.stop_reason, result.step) == ("early_stop", 3)
    assert load_checkpoint(result.last_checkpoint).state_meta["reason"] == "early_stop"


# ---------------------------------------------------------------------- precision and compile
def test_bf16_autocast_trains_on_cpu(tmp_path):
    fit(tiny(tmp_path, "training.max_steps=3"), tmp_path / "fp32")
    engine, result = fit(tiny(tmp_path, "training.max_steps=3", "optimization.dtype=bfloat16"),
                         tmp_path / "bf16")
    assert engine.amp_dtype is torch.bfloat16 and engine.model.embed.weight.dtype is torch.float32
    a, b = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert all(abs(a[s] - b[s]) < 0.05 for s in a) and a != b  # bf16 differs, but only a little


def test_fp16_grad_scaler_state_is_checkpointed(tmp_path):
    _, result = fit(tiny(tmp_path, "training.max_steps=2", "optimization.dtype=float16"), tmp_path / "run")
    scaler = load_checkpoint(result.last_checkpoint).state_meta["grad_scaler"]
    assert scaler["scale"] > 0 and isinstance(scaler["growth_tracker"], int)
    assert all(math.isfinite(v) for v in losses(tmp_path / "run").values())


def test_compile_switch_wraps_the_model(tmp_path, monkeypatch):
    calls = []
    real_compile = torch.compile

    def cheap_compile(model, **kwargs):  # inductor needs ~20 s here; the eager backend tests the wiring
        calls.append(kwargs)
        return real_compile(model, backend="eager")

    monkeypatch.setattr(torch, "compile", cheap_compile)
    fit(tiny(tmp_path, "training.max_steps=2"), tmp_path / "eager")
    engine, _ = fit(tiny(tmp_path, "training.max_steps=2", "optimization.compile=true",
                         "optimization.compile_mode=max-autotune-no-cudagraphs"), tmp_path / "compiled")
    assert calls == [{"mode": "max-autotune-no-cudagraphs"}] and engine.train_model is not engine.model
    a, b = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert b == pytest.approx(a, rel=1e-6)


# ---------------------------------------------------------------------- tasks and callbacks
def test_regression_task_trains(tmp_path):
    config = tiny(tmp_path, "task=regression", "training.max_steps=60", "training.lr=1e-2",
                  "training.batch_size=32", "training.eval_every=60", "data.synthetic_size=2048")
    _, result = fit(config, tmp_path / "run")
    first = losses(tmp_path / "run")[1]
    assert first > 0.5 and result.val_loss < first / 20
    assert result.last_checkpoint is None and not (tmp_path / "run" / "checkpoints").exists()


# -- the docs example (docs/training.md): a new task and a new callback in a few lines
class MAETorch(TorchTask):  # the torch half of the task: model + loss
    def build_model(self, config, datamodule):
        return torch.nn.Linear(datamodule.in_features, datamodule.out_features)

    def loss(self, model, batch):
        x, y = batch
        mae = (model(x) - y).abs().mean()
        return mae, {"loss": mae}


@register_task("mae_regression")
class MAERegression(TrainingTask):
    backends = {"torch": MAETorch}
    canonical = False  # not a ModelSpec decoder: no canonical checkpoints

    def build_datamodule(self, config, *, rank=0, world_size=1):
        return SyntheticDataModule(task="regression", batch_size=config.training.batch_size,
                                   num_samples=1024, seed=config.training.seed, rank=rank, world_size=world_size)


@register_callback("loss_history")
class LossHistory(Callback):
    def __init__(self):
        self.losses = []

    def needs_metrics(self, step):
        return step % 5 == 0

    def on_step_end(self, trainer, metrics):
        if "loss" in metrics:
            self.losses.append((metrics["step"], metrics["loss"]))


def test_custom_task_and_callback(tmp_path):
    history = LossHistory()
    config = tiny(tmp_path, "training.max_steps=40", "training.lr=0.05", "logging.every_steps=20",
                  "training.log_every=20")
    with TrainingEngine(config, task="mae_regression", callbacks=[history], run_dir=tmp_path / "run") as engine:
        result = engine.fit()
    assert isinstance(engine.model, torch.nn.Linear)
    assert [s for s, _ in history.losses] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert history.losses[-1][1] < 0.3 * history.losses[0][1] and result.stop_reason == "completed"


def test_progress_bar_writes_loss_and_throughput(tmp_path):
    import io

    from llm.callbacks import ProgressBar

    out = io.StringIO()
    fit(tiny(tmp_path, "training.max_steps=4"), tmp_path / "run", callbacks=[ProgressBar(every=2, file=out)])
    text = out.getvalue()
    assert "4/4" in text and "loss=" in text and "tok/s=" in text


def test_vocab_that_does_not_fit_is_a_clear_error(tmp_path, corpus):
    from llm.tokenization import TokenizerError

    with pytest.raises(TokenizerError, match=r"model.vocab_size=8"):
        TrainingEngine(tiny(tmp_path, "model.vocab_size=8", source=corpus), run_dir=tmp_path / "run")
