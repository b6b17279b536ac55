"""``python -m llm.train``: config resolution, one-line errors, Ctrl-C, NaN exit, 2-process DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from llm.checkpoint import latest_valid_checkpoint, load_checkpoint
from llm.config import dump_yaml, load_config
from llm.train import EMBEDDED_DEFAULT, main

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.vocab_size=64", "model.max_seq_len=32", "model.hidden_size=32", "model.num_layers=1",
        "model.num_heads=4", "model.num_kv_heads=2", "data.source=synthetic", "data.seq_len=16",
        "data.synthetic_size=512", "training.batch_size=8", "training.max_steps=4",
        "training.warmup_steps=1", "training.lr=1e-2", "training.eval_every=0", "training.log_every=1",
        "logging.every_steps=1", "logging.progress=false", "checkpoint.every_steps=0",
        "checkpoint.keep_last=null"]


def tiny_yaml(tmp_path: Path, *overrides: str) -> Path:
    path = tmp_path / "tiny.yaml"
    dump_yaml(load_config(None, [*TINY, *overrides], env={}), path)
    return path


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("LLM_")}
    out["PYTHONPATH"] = str(REPO) + os.pathsep + out.get("PYTHONPATH", "")
    out["OMP_NUM_THREADS"] = "1"
    return out


def cli(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llm.train", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, env=env(), timeout=timeout)


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


# ---------------------------------------------------------------------- config resolution
def test_print_config_from_any_cwd_is_the_default_and_imports_no_framework(tmp_path):
    code = ("import sys, llm.train; rc = llm.train.main(['--print-config']); "
            "print('FRAMEWORK', sorted({'torch', 'jax'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env=env(), timeout=60)
    assert out.returncode == 0, out.stderr
    text, _, tail = out.stdout.rpartition("FRAMEWORK")
    assert tail.strip() == "[]"
    assert yaml.safe_load(text) == load_config(REPO / "configs" / "default.yaml", env={}).to_dict()


def test_embedded_default_equals_configs_default(tmp_path):
    (tmp_path / "embedded.yaml").write_text(EMBEDDED_DEFAULT)
    assert load_config(tmp_path / "embedded.yaml", env={}) == load_config(REPO / "configs" / "default.yaml", env={})


def test_named_flags_override_set_which_overrides_env(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLM_TRAINING__LR", "0.1")
    monkeypatch.setenv("LLM_TRAINING__SEED", "5")
    args = ["--config", str(tiny_yaml(tmp_path)), "--set", "training.lr=0.2", "--set", "training.batch_size=2",
            "--batch-size", "4", "--epochs", "3", "--max-steps", "9", "--task", "regression",
            "--run-dir", "somewhere", "--print-config"]
    assert main(args) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    t = printed["training"]
    assert (t["lr"], t["seed"], t["batch_size"], t["epochs"], t["max_steps"]) == (0.2, 5, 4, 3, 9)
    assert printed["task"] == "regression" and printed["logging"]["run_dir"] == "somewhere"
    assert main(args + ["--lr", "0.3", "--seed", "7"]) == 0
    t = yaml.safe_load(capsys.readouterr().out)["training"]
    assert (t["lr"], t["seed"]) == (0.3, 7)
    assert main(["--epochs", "2", "--print-config"]) == 0  # --epochs alone lifts the default max_steps
    t = yaml.safe_load(capsys.readouterr().out)["training"]
    assert (t["epochs"], t["max_steps"]) == (2, None)


@pytest.mark.parametrize("args, needle", [
    (["--set", "training.lrr=1"], "did you mean 'training.lr'"),
    (["--set", "optimization.dtype=float8"], "optimization.dtype"),
    (["--set", "model.hidden_size=30", "--set", "model.num_heads=4", "--set", "model.head_dim=null"],
     "model.hidden_size"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--batch-size", "abc"], "--batch-size: invalid int value: 'abc'"),
    (["--config", "/nonexistent.yaml"], "config file not found: /nonexistent.yaml"),
    (["--callback", "nope"], "unknown callback 'nope'"),
    (["--task", "translate"], "task: unknown task 'translate'; registered: lm, regression"),
])
def test_bad_flags_and_keys_are_one_line_errors(args, needle):
    out = cli(*args, "--print-config", timeout=60)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llm-train: error: ") and needle in lines[0], out.stderr
    assert out.stdout == ""


def test_runtime_errors_are_one_line_too(tmp_path, capsys, one_torch_thread):
    (tmp_path / "corpus.txt").write_text("abcdefghij" * 500)
    rc = main(["--config", str(tiny_yaml(tmp_path)), "--set", f"data.source={tmp_path / 'corpus.txt'}",
               "--set", "model.vocab_size=8", "--set", f"data.cache_dir={tmp_path / 'cache'}",
               "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err[-1].startswith("llm-train: error: tokenizer (char) has 14 tokens but "
                                          "model.vocab_size=8")


def test_missing_backend_engine_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    import llm.backend

    monkeypatch.setitem(llm.backend.PACKAGES, "jax", "backends.nowhere")  # a backend that is not there
    assert main(["--backend", "jax", "--config", str(tiny_yaml(tmp_path)), "--run-dir", str(tmp_path)]) == 2
    assert "--backend jax: backend 'jax': its package backends.nowhere is missing" in capsys.readouterr().err


def test_nan_loss_exits_1_with_a_clear_message(tmp_path, capsys, one_torch_thread):
    # an absurd lr without clipping overflows the weights within a few steps
    rc = main(["--config", str(tiny_yaml(tmp_path)), "--lr", "1e30", "--set", "training.grad_clip=0",
               "--set", "checkpoint.every_steps=1", "--max-steps", "20", "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 1 and "llm-train: error: the loss is nan at step" in err and "last good checkpoint" in err
    step = int(err.split("at step ")[1].split(";")[0])
    newest, skipped = latest_valid_checkpoint(tmp_path / "run" / "checkpoints")
    assert newest.name == f"step_{step - 1}" and not skipped and f"{newest}" in err


def test_resume_without_any_run_is_a_clear_error(tmp_path):
    out = cli("--resume", "--print-config", cwd=tmp_path, timeout=60)
    assert out.returncode == 2 and "no run with checkpoints under runs/" in out.stderr


# ---------------------------------------------------------------------- signals and processes
def test_sigint_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "llm.train", "--config", str(tiny_yaml(tmp_path)),
                             "--max-steps", "100000", "--run-dir", str(run)], cwd=REPO, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    metrics = run / "metrics.jsonl"
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 130, err
    assert "SIGINT received" in err and "Traceback" not in err and "stopped: interrupted" in out
    path, skipped = latest_valid_checkpoint(run / "checkpoints")
    meta = load_checkpoint(path).state_meta
    last_logged = max(losses(run))
    assert not skipped and meta["reason"] == "interrupt" and meta["step"] == last_logged >= 3
    assert path.name == f"step_{last_logged}"


def test_ddp_two_processes_match_one_process(tmp_path, capsys, one_torch_thread):
    config = tiny_yaml(tmp_path, "training.grad_accum_steps=2", "training.eval_every=2",
                       "training.eval_batches=2", "checkpoint.every_steps=2")
    assert main(["--config", str(config), "--run-dir", str(tmp_path / "single")]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "llm.train", "--config", str(config), "--run-dir", str(tmp_path / "ddp")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env(),
                            start_new_session=True)  # a hung worker must not outlive the test
    try:
        stdout, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout.count("stopped: completed at step 4/4") == 1, stdout  # rank 0 alone prints the summary
    single, ddp = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert single.keys() == ddp.keys() == {1, 2, 3, 4}
    for step in single:
        assert abs(single[step] - ddp[step]) < 1e-5, (step, single[step], ddp[step], stderr[-2000:])
    val = [json.loads(line).get("val_loss") for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    val_single = [json.loads(line).get("val_loss")
                  for line in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    assert val == pytest.approx(val_single, abs=1e-5) and val[1] is not None
    assert sorted(p.name for p in tmp_path.rglob("metrics.jsonl")) == ["metrics.jsonl"] * 2  # one per run
    meta = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "step_4").state_meta
    assert meta["world_size"] == 2 and meta["micro_step"] == 8


def test_a_table_padded_past_the_tokenizer_samples_only_known_ids(tmp_path, one_torch_thread):
    """model.vocab_size (64) > the char tokenizer's size: the end-of-run sample never proposes an id
    without text, the run exits 0 and summary.json keeps the sample."""
    corpus = tmp_path / "text.txt"
    corpus.write_text("abc def ghi\n" * 200, encoding="utf-8")
    run = tmp_path / "run"
    rc = main(["--config", str(tiny_yaml(tmp_path)), "--set", f"data.source={corpus}",
               "--set", f"data.cache_dir={tmp_path / 'cache'}", "--max-steps", "2", "--sample-tokens", "24",
               "--run-dir", str(run)])
    assert rc == 0
    summary = json.loads((run / "summary.json").read_text())
    assert isinstance(summary["sample"], str) and len(summary["sample"]) > len("def ")


# ---------------------------------------------------------------------- --init-from
def _starting_checkpoint(root: Path, seed: int = 0) -> tuple[Path, object]:
    """A canonical checkpoint of the TINY spec with a char tokenizer, as a run's ``checkpoints/step_3``."""
    from llm.checkpoint import save_checkpoint
    from llm.spec import init_params
    from llm.tokenization import build_tokenizer

    spec = load_config(None, TINY, env={}).model
    tokenizer = build_tokenizer("char", ["abcdefghij"])
    path = save_checkpoint(root / "checkpoints" / "step_3", init_params(spec, seed), {"model": spec.to_dict()},
                           extra_files={"tokenizer.json": tokenizer.to_bytes()}, overwrite=True)
    return path, tokenizer


def test_init_from_verifies_and_loads_the_checkpoint_once(tmp_path, monkeypatch, one_torch_thread):
    import llm.checkpoint
    import llm.tokenization

    ckpt, tokenizer = _starting_checkpoint(tmp_path / "src")
    (tmp_path / "corpus.txt").write_text("abcdefghij" * 500)
    calls: dict[str, int] = {"verify": 0, "read": 0, "tokenizer": 0}

    def counting(name, fn, path_of):
        def wrapper(*args, **kwargs):
            if Path(path_of(*args)).resolve().is_relative_to(ckpt.resolve()):
                calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(llm.checkpoint, "verify_checkpoint",
                        counting("verify", llm.checkpoint.verify_checkpoint, lambda p: p))
    monkeypatch.setattr(llm.checkpoint, "_read_checkpoint",
                        counting("read", llm.checkpoint._read_checkpoint, lambda p, *_: p))
    monkeypatch.setattr(llm.tokenization, "load_tokenizer",
                        counting("tokenizer", llm.tokenization.load_tokenizer, lambda p: p))
    rc = main(["--config", str(tiny_yaml(tmp_path)), "--init-from", str(ckpt.parent),  # the checkpoints dir
               "--set", f"data.source={tmp_path / 'corpus.txt'}", "--set", f"data.cache_dir={tmp_path / 'cache'}",
               "--run-dir", str(tmp_path / "run"), "--max-steps", "2", "--sample-tokens", "0"])
    assert rc == 0
    assert calls == {"verify": 1, "read": 1, "tokenizer": 1}
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text())["training"]["init_from"] == str(ckpt.resolve())
    assert (run / "tokenizer.json").read_bytes() == tokenizer.to_bytes()  # the checkpoint's, not rebuilt


def test_a_starting_point_is_loaded_again_when_its_checkpoint_is_rewritten(tmp_path):
    import numpy as np

    from llm.init_from import load_starting_point

    ckpt, _ = _starting_checkpoint(tmp_path)
    first = load_starting_point(ckpt)
    assert load_starting_point(ckpt.parent) is first and load_starting_point(ckpt) is first
    assert first.path == ckpt.resolve() and first.tokenizer.vocab_size == 14
    _starting_checkpoint(tmp_path, seed=1)  # same directory, other weights
    second = load_starting_point(ckpt)
    assert second is not first
    name = "embed.weight"
    assert not np.array_equal(second.params[name], first.params[name])


# ---------------------------------------------------------------------- bad input: one line, nothing written
def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("llm-train: error: ") and "Traceback" not in "\n".join(err), err
    return err[-1]


def test_a_run_dir_that_cannot_be_created_is_one_line_naming_the_path(tmp_path, capsys, one_torch_thread):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    rc = main(["--config", str(tiny_yaml(tmp_path)), "--run-dir", str(blocker / "run"),
               "--sample-tokens", "0"])
    line = _one_error_line(capsys)
    assert rc == 1 and line == f"llm-train: error: {blocker / 'run'}: Not a directory (ENOTDIR)"
    assert blocker.read_text() == "not a directory"


def test_a_read_only_run_dir_is_one_line_and_nothing_is_written(tmp_path, capsys, monkeypatch,
                                                                 one_torch_thread):
    import errno

    read_only = tmp_path / "ro"
    read_only.mkdir()
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):  # what a non-writable parent does (root ignores chmod, so simulate it)
        if Path(path).parent == read_only:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    rc = main(["--config", str(tiny_yaml(tmp_path)), "--run-dir", str(read_only / "run"),
               "--sample-tokens", "0"])
    line = _one_error_line(capsys)
    assert rc == 1 and line == f"llm-train: error: {read_only / 'run'}: Permission denied (EACCES)"
    assert list(read_only.iterdir()) == []


def test_a_full_disk_at_a_checkpoint_is_one_line_and_the_previous_checkpoint_stays(
        tmp_path, capsys, monkeypatch, one_torch_thread):
    import errno

    import llm.checkpoint

    real_save = llm.checkpoint.save_file

    def save_file(tensors, filename, *args, **kwargs):
        if "step_4" in filename:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(llm.checkpoint, "save_file", save_file)
    run = tmp_path / "run"
    rc = main(["--config", str(tiny_yaml(tmp_path, "checkpoint.every_steps=2")), "--run-dir", str(run),
               "--sample-tokens", "0"])
    line = _one_error_line(capsys)
    assert rc == 1
    assert f"cannot write checkpoint {run / 'checkpoints' / 'step_4'}: the disk is full (ENOSPC" in line
    assert line.endswith("the previous checkpoints are intact")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_2"]  # no temp dir left
    newest, skipped = latest_valid_checkpoint(run / "checkpoints")
    assert newest.name == "step_2" and not skipped and load_checkpoint(newest).state_meta["step"] == 2


def test_logging_level_sets_the_console_level(tmp_path):
    quiet = cli("--config", str(tiny_yaml(tmp_path, "checkpoint.every_steps=2")), "--run-dir",
                str(tmp_path / "quiet"), "--sample-tokens", "0", "--set", "logging.level=warning")
    assert quiet.returncode == 0, quiet.stderr
    assert "saved checkpoint" not in quiet.stderr and "step 4" not in quiet.stderr
    assert "stopped: completed at step 4/4" in quiet.stdout  # the summary is output, not logging
    loud = cli("--config", str(tiny_yaml(tmp_path, "checkpoint.every_steps=1", "checkpoint.keep_last=1")),
               "--run-dir", str(tmp_path / "loud"), "--sample-tokens", "0", "--set", "logging.level=debug")
    assert loud.returncode == 0, loud.stderr
    assert "saved checkpoint" in loud.stderr and "removed old checkpoint" in loud.stderr  # a debug record


def test_the_jax_tpu_probe_record_is_dropped_and_nothing_else(monkeypatch):
    import logging

    from llm.train import _setup_logging

    probe = logging.getLogger("jax._src.xla_bridge")
    monkeypatch.setattr(probe, "filters", [])
    monkeypatch.setattr(logging.getLogger("llm"), "level", logging.getLogger("llm").level)
    _setup_logging("info")
    _setup_logging("info")  # idempotent: one filter

    def passes(level: int, message: str) -> bool:
        return bool(probe.filter(probe.makeRecord(probe.name, level, __file__, 1, message, (), None)))

    assert len(probe.filters) == 1
    assert not passes(logging.INFO, "Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so")
    assert passes(logging.INFO, "Unable to initialize backend 'cuda': no CUDA driver")
    assert passes(logging.WARNING, "Unable to initialize backend 'tpu': INTERNAL: broken")
    assert passes(logging.WARNING, "An NVIDIA GPU may be present on this machine, but a CUDA-enabled "
                                   "jaxlib is not installed")


def test_print_config_help_says_a_module_task_is_imported():
    out = cli("--help", timeout=60)
    assert out.returncode == 0 and "is still imported" in " ".join(out.stdout.split())


def test_readme_commands_point_at_checkpoints_the_default_run_keeps():
    import re

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    default = load_config(REPO / "configs" / "default.yaml", env={})
    every, keep = default.checkpoint.every_steps, default.checkpoint.keep_last
    last = default.training.max_steps
    written = sorted({*range(every, last + 1, every), last})  # periodic ones and the final one
    kept = set(written[-keep:])
    named = {int(n) for n in re.findall(r"checkpoints/step_(\d+)", readme)}
    assert named <= kept, (named, kept)
    generate = [line for line in readme.splitlines() if line.startswith("python -m llm.generate")]
    assert generate and all("--checkpoint runs/<run>/checkpoints " in line for line in generate)
    assert ".venv/bin/llm-train" in readme
