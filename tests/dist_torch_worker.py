"""One torch training run, under ``torchrun`` or alone, for ``tests/test_torch_sharding.py``.

    torchrun --standalone --nproc_per_node N tests/dist_torch_worker.py OUT.json RUN_DIR [--resume=CKPT]
        [--max-shard-bytes=N] KEY=VALUE...

Trains ``load_config(None, KEY=VALUE...)`` with the torch engine and a callback that reads every
step's loss and grad norm; process 0 writes ``OUT.json``: ``rows`` (step, loss, grad_norm),
``mesh`` (the mesh sizes), ``placements`` (canonical name -> the mesh axis of each dimension, from
the DTensors themselves, before training), ``expected`` (``llm.sharding.param_placements`` for
that mesh) and ``final`` (every whole parameter after the run, nested lists). ``--max-shard-bytes``
sets the engine's checkpoint file size (several files on a tiny model). With ``--resume`` every
rank also writes ``OUT.json.reads<rank>.json``: each checkpoint read of the resume, ``[name, index
(or null: whole), shape read, this rank's local shape of that tensor (null: held whole)]``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends.torch.engine import TrainingEngine  # noqa: E402
from backends.torch.parallel import mesh_placements  # noqa: E402
from llm.checkpoint import TensorReader, load_checkpoint  # noqa: E402
from llm.config import load_config  # noqa: E402
from llm.loop.callbacks import Callback  # noqa: E402
from llm.sharding import param_placements  # noqa: E402


class StepLog(Callback):
    """Every step's measured loss and grad norm."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def needs_metrics(self, step: int) -> bool:
        return True

    def on_step_end(self, trainer, metrics):
        self.rows.append({"step": metrics["step"], "loss": metrics["loss"], "grad_norm": metrics.get("grad_norm")})


def record_reads(reads: list) -> None:
    """Every ``TensorReader`` read from now on: [name, index (None: whole), shape read]."""
    read, read_slice = TensorReader.read, TensorReader.read_slice

    def whole(self, name):
        value = read(self, name)
        reads.append([name, None, list(value.shape)])
        return value

    def part(self, name, index):
        value = read_slice(self, name, index)
        reads.append([name, [[s.start, s.stop] for s in index], list(value.shape)])
        return value

    TensorReader.read, TensorReader.read_slice = whole, part


def local_shapes(engine: TrainingEngine) -> dict:
    """Checkpoint tensor name -> this rank's local shape (None: a tensor the rank holds whole)."""
    out = {}
    for name, p in engine.model.named_parameters():
        local = list(p.to_local().shape) if isinstance(p, DTensor) else None
        out[name] = out[f"exp_avg.{name}"] = out[f"exp_avg_sq.{name}"] = local
    return out


def main(argv: list[str]) -> None:
    out, run_dir, *rest = argv
    options = {a.partition("=")[0]: a.partition("=")[2] for a in rest if a.startswith("--")}
    resume = options.get("--resume", False)
    if "--max-shard-bytes" in options:
        TrainingEngine.max_shard_bytes = int(options["--max-shard-bytes"])
    config = load_config(None, [a for a in rest if not a.startswith("--")], env={})
    log = StepLog()
    reads: list = []
    if resume:
        record_reads(reads)
    with TrainingEngine(config, run_dir=run_dir, resume=resume, callbacks=[log], callback_names=()) as engine:
        if resume:
            shapes = local_shapes(engine)
            Path(f"{out}.reads{engine.rank}.json").write_text(json.dumps([[*r, shapes.get(r[0])] for r in reads]))
            reads.clear()
        placements = {name: list(mesh_placements(p)) for name, p in engine.model.named_parameters()}
        expected = {name: list(where) for name, where in param_placements(config.model, engine.mesh_shape).items()}
        engine.fit()  # ends with a checkpoint (every rank gathers; process 0 writes)
        checkpoint = engine.last_checkpoint
        if engine.is_main:
            final = {name: value.tolist() for name, value in load_checkpoint(checkpoint).params.items()}
            Path(out).write_text(json.dumps({
                "rows": log.rows, "mesh": engine.mesh_shape.to_dict(), "placements": placements,
                "expected": expected, "final": final, "data_shards": engine.data_shards}))


if __name__ == "__main__":
    main(sys.argv[1:])
