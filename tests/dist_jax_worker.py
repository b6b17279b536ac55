"""Sharded JAX training runs for ``tests/test_flax_sharding.py``, in a process of its own.

The host-device count is fixed when jax is first imported, so the test starts this module with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` already set and reads one JSON line back::

    python tests/dist_jax_worker.py trajectory '{"overrides": [...], "meshes": [[1, 8], [4, 2]]}' ROOT
    python tests/dist_jax_worker.py resume '{"overrides": [...], "half": 3, "max_shard_bytes": 8192}' ROOT
    python tests/dist_jax_worker.py resume_from '{"overrides": [...], "checkpoint": DIR, "fsdp": 4, "tensor": 2}' ROOT

``trajectory`` trains the same config on one device and on each ``[fsdp, tensor]`` mesh of all the
devices (data parallel takes the rest) and returns every run's per-step losses and final canonical
parameters, and, per mesh, the ``.sharding`` spec of every parameter beside the placement
``llm.sharding`` gives it. ``resume`` trains uninterrupted on (fsdp 4, tensor 2), then again with a
checkpoint halfway (files of at most ``max_shard_bytes``), resumed from that checkpoint on (data 8)
and on (fsdp 8), and returns the loss curves and the files; the (fsdp 8) resume records every
checkpoint read beside the canonical shape of the device shard it fills. ``resume_from`` continues
a given checkpoint (e.g. the torch engine's) on a mesh and returns its losses.
"""

from __future__ import annotations

import json
import sys

import jax

from backends.flax.convert import flax_placement
from backends.flax.engine import TrainingEngine
from llm.checkpoint import TensorReader
from llm.config import ConfigError, load_config
from llm.loop.callbacks import Callback
from llm.sharding import placement


class Record(Callback):
    """Every step's loss (``needs_metrics`` forces the read)."""

    def __init__(self):
        self.losses: dict[int, float] = {}

    def needs_metrics(self, step):
        return True

    def on_step_end(self, trainer, metrics):
        self.losses[int(metrics["step"])] = float(metrics["loss"])


def run(overrides: list[str], root: str, *, fsdp: int = 1, tensor: int = 1, devices: int | None = None,
        resume: str | bool = False, extra: tuple[str, ...] = ()) -> tuple[TrainingEngine, dict[int, float]]:
    config = load_config(None, [*overrides, f"distributed.fsdp={fsdp}", f"distributed.tensor={tensor}", *extra],
                         env={})
    record = Record()
    engine = TrainingEngine(config, run_dir=root, resume=resume, devices=jax.devices()[:devices],
                            callbacks=[record], callback_names=())
    with engine:
        engine.fit()
    return engine, record.losses


def shardings(engine: TrainingEngine) -> dict[str, list]:
    """Per parameter: [its array's PartitionSpec, its AdamW moment's, the llm.sharding placement in the
    flax layout], each padded with None to the array's rank."""
    spec = engine._model.spec
    adam = engine.opt_state[-1]
    out = {}
    for info in spec.param_table():
        arr = engine.params[info.name]

        def padded(sharding, rank=arr.ndim):
            parts = list(sharding.spec)
            return parts + [None] * (rank - len(parts))

        out[info.name] = [padded(arr.sharding), padded(adam.exp_avg[info.name].sharding),
                          list(flax_placement(info.name, placement(info, engine.mesh_shape))),
                          [len(arr.addressable_shards), list(arr.addressable_shards[0].data.shape)]]
    return out


def trajectory(job: dict, root: str) -> dict:
    ref, losses = run(job["overrides"], f"{root}/one", devices=1)
    out = {"one": {"losses": losses, "params": {k: v.tolist() for k, v in ref.impl.to_canonical(ref.model).items()}},
           "meshes": []}
    for fsdp, tensor in job["meshes"]:
        engine, losses = run(job["overrides"], f"{root}/m{fsdp}x{tensor}", fsdp=fsdp, tensor=tensor,
                             extra=tuple(job.get("extra", ())))
        params = engine.impl.to_canonical(engine.model)
        out["meshes"].append({"mesh": engine._placement(), "losses": losses, "shardings": shardings(engine),
                              "params": {k: v.tolist() for k, v in params.items()}})
    try:
        run([*job["overrides"], "training.batch_size=4"], f"{root}/bad", fsdp=8)
    except ConfigError as e:
        out["batch_error"] = str(e)
    return out


def recorded_reads() -> list:
    """Every ``TensorReader`` read from now on: [name, shape read, whole?]."""
    reads: list = []
    read, read_slice = TensorReader.read, TensorReader.read_slice

    def whole(self, name):
        value = read(self, name)
        reads.append([name, list(value.shape), True])
        return value

    def part(self, name, index):
        value = read_slice(self, name, index)
        reads.append([name, list(value.shape), False])
        return value

    TensorReader.read, TensorReader.read_slice = whole, part
    return reads


def resume(job: dict, root: str) -> dict:
    overrides = job["overrides"]
    TrainingEngine.max_shard_bytes = int(job.get("max_shard_bytes", TrainingEngine.max_shard_bytes))
    _, whole = run(overrides, f"{root}/whole", fsdp=4, tensor=2)
    half = int(job["half"])
    first, before = run(overrides, f"{root}/a", fsdp=4, tensor=2, extra=(f"checkpoint.every_steps={half}",))
    checkpoint = first.run.checkpoint_path(half)
    second, after = run(overrides, f"{root}/b", devices=8, resume=str(checkpoint))
    reads = recorded_reads()
    third, sliced = run(overrides, f"{root}/c", fsdp=8, resume=str(checkpoint))
    shard_shapes, whole_shapes = {}, {}  # canonical name (and its moments) -> one device's shard, whole
    for name, arr in third.params.items():
        for key in (name, f"exp_avg.{name}", f"exp_avg_sq.{name}"):
            shard_shapes[key] = list(flax_placement(name, tuple(arr.addressable_shards[0].data.shape)))
            whole_shapes[key] = list(flax_placement(name, tuple(arr.shape)))
    return {"whole": whole, "before": before, "after": after, "sliced": sliced, "reads": reads,
            "shard_shapes": shard_shapes, "whole_shapes": whole_shapes, "files": sorted(p.name for p in checkpoint.iterdir()),
            "meshes": [first._placement(), second._placement(), third._placement()]}


def resume_from(job: dict, root: str) -> dict:
    _, losses = run(job["overrides"], f"{root}/from", fsdp=job["fsdp"], tensor=job["tensor"], resume=job["checkpoint"])
    return {"losses": losses}


if __name__ == "__main__":
    jax.config.update("jax_default_matmul_precision", "highest")
    kind, job, root = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    result = {"trajectory": trajectory, "resume": resume, "resume_from": resume_from}[kind](job, root)
    print("RESULT", json.dumps(result))
