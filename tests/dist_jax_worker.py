"""Sharded JAX training runs for ``tests/test_flax_sharding.py``, in a process of its own.

The host-device count is fixed when jax is first imported, so the test starts this module with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` already set and reads one JSON line back::

    python tests/dist_jax_worker.py trajectory '{"overrides": [...], "meshes": [[1, 8], [4, 2]]}' ROOT
    python tests/dist_jax_worker.py resume '{"overrides": [...]}' ROOT

``trajectory`` trains the same config on one device and on each ``[fsdp, tensor]`` mesh of all the
devices (data parallel takes the rest) and returns every run's per-step losses and final canonical
parameters, and, per mesh, the ``.sharding`` spec of every parameter beside the placement
``llm.sharding`` gives it. ``resume`` trains uninterrupted on (fsdp 4, tensor 2), then again with a
checkpoint halfway, resumed from that checkpoint on (data 8), and returns both loss curves.
"""

from __future__ import annotations

import json
import sys

import jax

from backends.flax.convert import flax_placement
from backends.flax.engine import TrainingEngine
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


def resume(job: dict, root: str) -> dict:
    overrides = job["overrides"]
    _, whole = run(overrides, f"{root}/whole", fsdp=4, tensor=2)
    half = int(job["half"])
    first, before = run(overrides, f"{root}/a", fsdp=4, tensor=2, extra=(f"checkpoint.every_steps={half}",))
    checkpoint = first.run.checkpoint_path(half)
    second, after = run(overrides, f"{root}/b", devices=8, resume=str(checkpoint))
    return {"whole": whole, "before": before, "after": after, "meshes": [first._placement(), second._placement()]}


if __name__ == "__main__":
    jax.config.update("jax_default_matmul_precision", "highest")
    kind, job, root = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    result = {"trajectory": trajectory, "resume": resume}[kind](job, root)
    print("RESULT", json.dumps(result))
