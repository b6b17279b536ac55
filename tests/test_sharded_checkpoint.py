"""Sharded canonical checkpoints (plan, several writers, index files, slice reads) and the engines'
asynchronous checkpoint writes (a slow writer, a failing one, a kill -9 mid-write)."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

import llm.checkpoint
from llm.checkpoint import (
    CheckpointError,
    begin_checkpoint,
    commit,
    load_checkpoint,
    open_checkpoint,
    open_tensors,
    plan_shards,
    save_checkpoint,
    verify_checkpoint,
    write_shard,
)
from llm.spec import ModelSpec, init_params

REPO = Path(__file__).resolve().parents[1]
SPEC = ModelSpec(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, max_seq_len=8)
MAX = 4096  # bytes per shard: the tiny spec's 17 tensors (~25 KB) in several files


def _params(seed=1):
    return init_params(SPEC, seed)


def _state(params):
    return {f"exp_avg.{k}": np.full(v.shape, 0.25, np.float32) for k, v in params.items()}


def _sizes(tensors):
    return {k: v.nbytes for k, v in tensors.items()}


# ---------------------------------------------------------------------- the plan
def test_the_plan_depends_on_names_and_sizes_only_and_balances_the_writers():
    params = _params()
    sizes, state_sizes = _sizes(params), _sizes(_state(params))
    one = plan_shards(sizes, 1, state_sizes=state_sizes, max_shard_bytes=MAX)
    three = plan_shards(dict(reversed(sizes.items())), 3, state_sizes=state_sizes, max_shard_bytes=MAX)
    assert [(f.name, f.tensors) for f in one] == [(f.name, f.tensors) for f in three]
    model = [f for f in one if f.part == "model"]
    assert len(model) >= 3 and model[0].name == f"model-00001-of-{len(model):05d}.safetensors"
    assert sorted(n for f in model for n in f.tensors) == sorted(sizes)  # every tensor once, whole
    assert all(f.nbytes <= MAX or len(f.tensors) == 1 for f in one)
    assert {f.writer for f in one} == {0} and {f.writer for f in three} == {0, 1, 2}
    load = [sum(f.nbytes for f in three if f.writer == r) for r in range(3)]
    assert max(load) - min(load) <= max(f.nbytes for f in three)  # greedy balance: within one file
    # unsharded: the single-file names, as before
    small = plan_shards(sizes, 2, state_sizes={})
    assert [(f.name, f.writer) for f in small] == [("model.safetensors", 0), ("state.safetensors", 1)]
    with pytest.raises(CheckpointError, match="num_writers=0 must be an integer >= 1"):
        plan_shards(sizes, 0)


# ---------------------------------------------------------------------- several writers
def _write_in_threads(path, params, state, num_writers):
    plan = plan_shards(_sizes(params), num_writers, state_sizes=_sizes(state), max_shard_bytes=MAX)
    tmp = begin_checkpoint(path)
    hashes: dict[str, str] = {}

    def rank(r):
        for file in plan:
            if file.writer == r:
                source = params if file.part == "model" else state
                hashes[file.name] = write_shard(tmp, file, {n: source[n] for n in file.tensors})

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(num_writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    commit(tmp, path, plan, {"model": SPEC.to_dict()}, hashes=hashes, state_meta={"step": 5})
    return plan


def test_one_and_three_writers_write_the_same_bytes_and_a_manifest_that_verifies(tmp_path):
    params = _params()
    state = _state(params)
    _write_in_threads(tmp_path / "one", params, state, 1)
    plan = _write_in_threads(tmp_path / "three", params, state, 3)
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "three").iterdir())
    for name in files:  # the manifest and the index files too
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "three" / name).read_bytes(), name
    manifest = verify_checkpoint(tmp_path / "three")
    assert {f.name for f in plan} | {"model.safetensors.index.json", "state.safetensors.index.json",
                                     "config.json", "state.json"} == set(manifest["files"])
    index = json.loads((tmp_path / "three" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in params.values())
    assert set(index["weight_map"]) == set(params)
    ck = load_checkpoint(tmp_path / "three")
    for k, v in params.items():
        np.testing.assert_array_equal(ck.params[k], v)
    for k, v in state.items():
        np.testing.assert_array_equal(ck.state_tensors[k], v)
    assert ck.state_meta == {"step": 5} and sorted(ck.shards) == sorted(f.name for f in plan if f.part == "model")
    # save_checkpoint (one writer holding everything) writes the same directory
    save_checkpoint(tmp_path / "saved", params, {"model": SPEC.to_dict()}, state_tensors=state,
                    state_meta={"step": 5}, max_shard_bytes=MAX)
    for name in files:
        assert (tmp_path / "saved" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def _process_writer(tmp, rank, num_writers):
    params = _params()
    for file in plan_shards(_sizes(params), num_writers, max_shard_bytes=MAX):
        if file.writer == rank:
            write_shard(tmp, file, {n: params[n] for n in file.tensors})


def test_writer_processes_leave_their_hashes_for_the_commit(tmp_path):
    plan = plan_shards(_sizes(_params()), 2, max_shard_bytes=MAX)
    tmp = begin_checkpoint(tmp_path / "ck")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_process_writer, args=(tmp, r, 2)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    commit(tmp, tmp_path / "ck", plan, {"model": SPEC.to_dict()})  # no hashes passed: the writers' files
    assert not tmp.exists()
    manifest = verify_checkpoint(tmp_path / "ck")
    assert not [n for n in manifest["files"] if n.endswith(".sha256")]
    np.testing.assert_array_equal(load_checkpoint(tmp_path / "ck").params["embed.weight"], _params()["embed.weight"])


def test_a_shard_the_plan_does_not_describe_is_refused(tmp_path):
    params = _params()
    plan = plan_shards(_sizes(params), 2, max_shard_bytes=MAX)
    tmp = begin_checkpoint(tmp_path / "ck")
    first = plan[0]
    with pytest.raises(CheckpointError, match=rf"shard {first.name}: the plan assigns it"):
        write_shard(tmp, first, {n: params[n] for n in first.tensors[1:]})
    write_shard(tmp, first, {n: params[n] for n in first.tensors})
    with pytest.raises(CheckpointError, match=rf"shard {plan[1].name} \(writer {plan[1].writer}\) was not written"):
        commit(tmp, tmp_path / "ck", plan, {"model": SPEC.to_dict()})
    assert not (tmp_path / "ck").exists()


# ---------------------------------------------------------------------- damage
def _sharded(tmp_path):
    params = _params()
    return save_checkpoint(tmp_path / "ck", params, {"model": SPEC.to_dict()}, state_tensors=_state(params),
                           max_shard_bytes=MAX)


def test_a_flipped_byte_in_one_shard_is_detected(tmp_path):
    path = _sharded(tmp_path)
    shard = sorted(path.glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01
    shard.write_bytes(bytes(data))
    for load in (load_checkpoint, open_tensors):
        with pytest.raises(CheckpointError, match=rf"{shard.name}: sha256 mismatch"):
            load(path)


def test_a_missing_shard_is_detected(tmp_path):
    path = _sharded(tmp_path)
    shard = sorted(path.glob("state-*.safetensors"))[2].name
    (path / shard).unlink()
    with pytest.raises(CheckpointError, match=rf"{shard} is listed in the manifest but missing"):
        load_checkpoint(path)
    # also when it is taken out of the manifest: the index still names it
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["files"][shard]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=rf"state.safetensors.index.json names {shard}, which the manifest "
                                              "does not list"):
        open_checkpoint(path)


# ---------------------------------------------------------------------- reading
def test_slice_reads_equal_the_full_tensors_slices(tmp_path):
    params = _params()
    path = _sharded(tmp_path)
    with open_tensors(path) as reader:
        assert reader.names == sorted(params)
        w = params["layers.1.mlp.up_proj.weight"]
        assert reader.shape("layers.1.mlp.up_proj.weight") == w.shape
        np.testing.assert_array_equal(reader.read_slice("layers.1.mlp.up_proj.weight", (slice(16, 48), slice(None))),
                                      w[16:48])
        np.testing.assert_array_equal(reader.read_slice("embed.weight", (slice(None), slice(8, 16))),
                                      params["embed.weight"][:, 8:16])
        np.testing.assert_array_equal(reader.read("final_norm.weight"), params["final_norm.weight"])
        with pytest.raises(CheckpointError, match="no tensor 'nope'"):
            reader.read("nope")
    state = open_tensors(path, part="state")
    np.testing.assert_array_equal(state.read_slice("exp_avg.embed.weight", (3,)), np.full(16, 0.25, np.float32))


def test_a_version_1_checkpoint_written_by_the_single_file_code_loads(tmp_path):
    """tests/data/checkpoint_v1 was written by the save_checkpoint before sharding (format version 1)."""
    path = REPO / "tests" / "data" / "checkpoint_v1"
    assert json.loads((path / "manifest.json").read_text())["version"] == 1
    ck = load_checkpoint(path)
    spec = ModelSpec(vocab_size=16, max_seq_len=8, hidden_size=8, num_layers=1, num_heads=2)
    assert ck.spec == spec and ck.state_meta == {"step": 2} and list(ck.shards) == ["model.safetensors"]
    for k, v in init_params(spec, 5).items():
        np.testing.assert_array_equal(ck.params[k], v)
    np.testing.assert_array_equal(ck.state_tensors["exp_avg.embed.weight"], 0.5)
    np.testing.assert_array_equal(open_tensors(path).read_slice("embed.weight", (slice(2, 4),)),
                                  init_params(spec, 5)["embed.weight"][2:4])


def test_the_hf_export_of_a_sharded_checkpoint_is_sharded_and_imports_back(tmp_path):
    pytest.importorskip("transformers")
    from llm.hf import export_hf, import_hf

    spec = SPEC.replace(norm_type="rmsnorm", use_glu=True, activation="silu")
    params = init_params(spec, 2)
    save_checkpoint(tmp_path / "ck", params, {"model": spec.to_dict()}, max_shard_bytes=MAX)
    export_hf(tmp_path / "ck", tmp_path / "hf")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((tmp_path / "hf" / s).is_file() for s in shards)
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in params.values())
    import_hf(tmp_path / "hf", tmp_path / "back")
    back = load_checkpoint(tmp_path / "back")
    for k, v in params.items():
        np.testing.assert_array_equal(back.params[k], v, err_msg=k)
    # an unsharded checkpoint exports the single file, as before
    save_checkpoint(tmp_path / "one", params, {"model": spec.to_dict()})
    export_hf(tmp_path / "one", tmp_path / "hf1")
    assert (tmp_path / "hf1" / "model.safetensors").is_file()
    assert not (tmp_path / "hf1" / "model.safetensors.index.json").exists()


# ---------------------------------------------------------------------- asynchronous saving in the engine
def _tiny(tmp_path, *overrides):
    sys.path.insert(0, str(REPO / "tests"))
    from engine_checks import tiny

    return tiny(tmp_path, "checkpoint.async_save=true", *overrides)


class _Gate:
    """A save_checkpoint that records its calls (in the writer thread) and holds one until released."""

    def __init__(self, real, hold: str):
        self.real, self.hold = real, hold
        self.release = threading.Event()
        self.writes: list[str] = []

    def __call__(self, path, *args, **kwargs):
        self.writes.append(f"{Path(path).name} after {sorted(p.name for p in Path(path).parent.glob('step_*'))}")
        if Path(path).name == self.hold:
            assert self.release.wait(120), "never released"
        self.real(path, *args, **kwargs)


@pytest.mark.usefixtures("one_torch_thread")
def test_the_loop_runs_on_while_a_slow_write_is_going_and_the_next_save_waits(tmp_path, monkeypatch):
    torch_engine = pytest.importorskip("backends.torch.engine")
    import llm.loop.engine
    from llm.loop.callbacks import Callback

    gate = _Gate(llm.checkpoint.save_checkpoint, hold="step_2")
    monkeypatch.setattr(llm.loop.engine, "save_checkpoint", gate)
    real_wait = llm.loop.engine._CheckpointWriter.wait
    events: list[str] = []  # the loop's thread only

    def wait(writer):
        if writer.busy:  # a save (or the end of fit) reached the wait with a write in flight
            events.append("wait while busy")
            gate.release.set()
        real_wait(writer)

    monkeypatch.setattr(llm.loop.engine._CheckpointWriter, "wait", wait)

    class Steps(Callback):
        def on_step_end(self, trainer, metrics):
            events.append(f"step {metrics['step']}: in flight={trainer._checkpoints.busy}, "
                          f"step_2 on disk={trainer.run.checkpoint_path(2).exists()}")

    config = _tiny(tmp_path, "checkpoint.every_steps=2", "checkpoint.keep_last=2")
    with torch_engine.TrainingEngine(config, run_dir=tmp_path / "run", callbacks=[Steps()]) as engine:
        result = engine.fit()
    assert events[:4] == [
        "step 1: in flight=False, step_2 on disk=False",
        "step 2: in flight=True, step_2 on disk=False",
        "step 3: in flight=True, step_2 on disk=False",  # the loop went on while the write was held
        "wait while busy",  # the save of step 4 waited for it
    ]
    assert events[4].startswith("step 4:") and events[4].endswith("step_2 on disk=True")  # step_4's may be in flight
    # each write began after the previous one had landed (and keep_last had pruned)
    assert gate.writes == ["step_2 after []", "step_4 after ['step_2']", "step_6 after ['step_2', 'step_4']"]
    assert result.last_checkpoint == tmp_path / "run" / "checkpoints" / "step_6"
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_4", "step_6"]
    verify_checkpoint(result.last_checkpoint)


@pytest.mark.usefixtures("one_torch_thread")
def test_async_snapshots_hold_the_state_of_their_step_while_training_goes_on(tmp_path, monkeypatch):
    """The torch engine stages weights and moments in host buffers it reuses: a write held across
    two more steps still writes its own step's values, the same bytes as a synchronous save."""
    torch_engine = pytest.importorskip("backends.torch.engine")
    import llm.loop.engine

    gate = _Gate(llm.checkpoint.save_checkpoint, hold="step_2")
    real_wait = llm.loop.engine._CheckpointWriter.wait

    def wait(writer):
        if writer.busy:
            gate.release.set()  # held until the next save's wait: steps 3 and 4 ran meanwhile
        real_wait(writer)

    written = {}
    for mode in ("false", "true"):
        with monkeypatch.context() as m:
            if mode == "true":
                m.setattr(llm.loop.engine, "save_checkpoint", gate)
                m.setattr(llm.loop.engine._CheckpointWriter, "wait", wait)
            config = _tiny(tmp_path, f"checkpoint.async_save={mode}", "checkpoint.every_steps=2",
                           "training.max_steps=4", "checkpoint.keep_last=null")
            with torch_engine.TrainingEngine(config, run_dir=tmp_path / mode) as engine:
                engine.fit()
                staged = "_staging" in engine.__dict__
            assert staged == (mode == "true")
        written[mode] = {step: {part: (tmp_path / mode / "checkpoints" / f"step_{step}" / part).read_bytes()
                                for part in ("model.safetensors", "state.safetensors")} for step in (2, 4)}
    assert gate.writes[:1] == ["step_2 after []"]
    assert written["true"] == written["false"]


@pytest.mark.usefixtures("one_torch_thread")
def test_a_failing_background_write_surfaces_as_one_line_at_the_next_wait(tmp_path, monkeypatch, capsys):
    pytest.importorskip("backends.torch.engine")
    import llm.loop.engine
    from llm.train import main

    real = llm.checkpoint.save_checkpoint

    def failing(path, *args, **kwargs):
        if Path(path).name == "step_2":
            raise RuntimeError("the writer broke\nin two lines")
        real(path, *args, **kwargs)

    monkeypatch.setattr(llm.loop.engine, "save_checkpoint", failing)
    config = tmp_path / "c.yaml"
    from llm.config import dump_yaml

    dump_yaml(_tiny(tmp_path, "checkpoint.every_steps=2"), config)
    rc = main(["--config", str(config), "--run-dir", str(tmp_path / "run"), "--sample-tokens", "0"])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert rc == 1 and len(err) == 1
    assert err[0] == (f"llm-train: error: the background write of checkpoint {tmp_path / 'run' / 'checkpoints' / 'step_2'} "
                      "failed: RuntimeError: the writer broke in two lines")
    assert not (tmp_path / "run" / "checkpoints" / "step_4").exists()  # raised at the wait before it


_KILLED_RUN = textwrap.dedent("""
    import sys, threading
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    import llm.checkpoint
    from engine_checks import tiny
    from backends.torch.engine import TrainingEngine

    real_commit = llm.checkpoint.commit

    def commit(tmp, path, *args, **kwargs):
        if Path(path).name == "step_4":  # the shards are written: stall before the rename
            Path({marker!r}).write_text(str(tmp))
            threading.Event().wait()
        return real_commit(tmp, path, *args, **kwargs)

    llm.checkpoint.commit = commit
    config = tiny(Path({tmp!r}), *{overrides!r}, "checkpoint.async_save=true")
    TrainingEngine(config, run_dir={run!r}).fit()
""")


@pytest.mark.usefixtures("one_torch_thread")
def test_kill_9_during_an_async_write_leaves_the_previous_checkpoint_and_an_exact_resume(tmp_path):
    torch_engine = pytest.importorskip("backends.torch.engine")
    over = ("training.max_steps=6", "checkpoint.every_steps=2", "model.dropout=0.1")
    run, marker = tmp_path / "cut", tmp_path / "in_flight"
    code = _KILLED_RUN.format(tests=str(REPO / "tests"), marker=str(marker), tmp=str(tmp_path), overrides=over,
                              run=str(run))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(2400):
            if marker.exists() or proc.poll() is not None:
                break
            threading.Event().wait(0.05)
        assert marker.exists(), proc.stderr.read() if proc.poll() is not None else "no marker"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(60)
    checkpoints = run / "checkpoints"
    assert (checkpoints / "step_2").is_dir() and not (checkpoints / "step_4").exists()
    assert Path(marker.read_text()).is_dir()  # the stalled write's temp dir, left by the kill
    verify_checkpoint(checkpoints / "step_2")

    with torch_engine.TrainingEngine(_tiny(tmp_path, *over), run_dir=run, resume=True) as engine:
        assert engine.step == 2
        engine.fit()
    with torch_engine.TrainingEngine(_tiny(tmp_path, *over), run_dir=tmp_path / "full") as engine:
        engine.fit()
    assert not Path(marker.read_text()).exists()  # recovered at the resume
    a, b = load_checkpoint(checkpoints / "step_6"), load_checkpoint(tmp_path / "full" / "checkpoints" / "step_6")
    for key in b.params:
        np.testing.assert_array_equal(a.params[key], b.params[key], err_msg=key)
    for key in b.state_tensors:
        np.testing.assert_array_equal(a.state_tensors[key], b.state_tensors[key], err_msg=key)
