"""JAX training runs over one or several processes for ``tests/test_flax_sharding.py``.

The test starts this module in every process of a run: with ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` set it is one of several processes (gloo CPU
collectives, ``jax.distributed.initialize()`` through the engine's ``initialize_distributed``);
without them, one process of all the host devices ``XLA_FLAGS`` asks for::

    python tests/dist_flax_mp_worker.py '{"overrides": [...], "max_shard_bytes": 8192, "runs": [RUN, ...]}' ROOT

Each ``RUN`` is ``{"name", "fsdp", "tensor", "extra": [...], "resume": DIR or null, "task": NAME or
null}``, trained in order on a mesh of every device of every process (``momentum_lm_jax``: the LM
with its own optax optimiser; a run refused at start returns ``{"refused": message}``). Every process prints one ``RESULT`` line: its
process index and count, and per run the per-step losses, the mesh, the checkpoint files this
process wrote (``write_shard``, ``step_<N>/<file>``), and, for a resumed run, every checkpoint read
this process made beside the canonical shapes of its devices' shards.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")  # before jax.distributed.initialize

import optax  # noqa: E402
from dist_jax_worker import Record, recorded_reads  # noqa: E402

import llm.loop.engine as loop_engine  # noqa: E402
from backends.flax.convert import flax_placement  # noqa: E402
from backends.flax.engine import TrainingEngine, initialize_distributed  # noqa: E402
from backends.flax.tasks import FlaxLMTask  # noqa: E402
from llm.config import ConfigError, load_config  # noqa: E402
from llm.loop.tasks import LMTask, register_task  # noqa: E402


class MomentumFlax(FlaxLMTask):
    """The LM with its own optax optimiser (state the engine does not shard in checkpoints)."""

    def build_optimizer(self, config, model):
        return optax.sgd(config.training.lr, momentum=0.9)


@register_task("momentum_lm_jax")
class MomentumLM(LMTask):
    backends = {"jax": MomentumFlax}


def recorded_writes() -> list[str]:
    """The shard files this process writes from now on, as ``step_<N>/<file>`` (the temporary
    directory is ``.step_<N>.tmp-*``)."""
    written: list[str] = []
    write_shard = loop_engine.write_shard

    def record(tmp_dir, file, tensors):
        written.append(f"{Path(tmp_dir).name[1:].split('.tmp-')[0]}/{file.name}")
        return write_shard(tmp_dir, file, tensors)

    loop_engine.write_shard = record
    return written


def local_shard_shapes(engine: TrainingEngine) -> dict[str, list[list[int]]]:
    """Canonical name (and its moments) -> the canonical shapes of this process's device shards."""
    out = {}
    for name, arr in engine.params.items():
        shapes = sorted({tuple(flax_placement(name, tuple(s.data.shape))) for s in arr.addressable_shards})
        for key in (name, f"exp_avg.{name}", f"exp_avg_sq.{name}"):
            out[key] = [list(s) for s in shapes]
    return out


def train(overrides: list[str], root: str, run: dict) -> dict:
    config = load_config(None, [*overrides, f"distributed.fsdp={run['fsdp']}", f"distributed.tensor={run['tensor']}",
                                *run.get("extra", ())], env={})
    WRITTEN.clear()
    READS.clear()
    record = Record()
    try:
        engine = TrainingEngine(config, run_dir=f"{root}/{run['name']}", resume=run.get("resume") or False,
                                task=run.get("task"), callbacks=[record], callback_names=())
    except ConfigError as e:
        return {"refused": str(e)}
    with engine:
        engine.fit()
        engine.wait_for_checkpoint()
    out = {"losses": record.losses, "mesh": engine._placement(), "written": list(WRITTEN),
           "checkpoints": str(engine.run.checkpoints)}
    if run.get("resume"):
        out.update(reads=list(READS), shard_shapes=local_shard_shapes(engine))
    return out


if __name__ == "__main__":
    jax.config.update("jax_default_matmul_precision", "highest")
    initialize_distributed()
    WRITTEN, READS = recorded_writes(), recorded_reads()
    job, root = json.loads(sys.argv[1]), sys.argv[2]
    TrainingEngine.max_shard_bytes = int(job.get("max_shard_bytes", TrainingEngine.max_shard_bytes))
    runs = {run["name"]: train(job["overrides"], root, run) for run in job["runs"]}
    print("RESULT", json.dumps({"process": jax.process_index(), "processes": jax.process_count(), "runs": runs}))
