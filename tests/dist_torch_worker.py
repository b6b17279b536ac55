"""One torch training run, under ``torchrun`` or alone, for ``tests/test_torch_sharding.py``.

    torchrun --standalone --nproc_per_node N tests/dist_torch_worker.py OUT.json RUN_DIR [--resume=CKPT] KEY=VALUE...

Trains ``load_config(None, KEY=VALUE...)`` with the torch engine and a callback that reads every
step's loss and grad norm; process 0 writes ``OUT.json``: ``rows`` (step, loss, grad_norm),
``mesh`` (the mesh sizes), ``placements`` (canonical name -> the mesh axis of each dimension, from
the DTensors themselves, before training), ``expected`` (``llm.sharding.param_placements`` for
that mesh) and ``final`` (every whole parameter after the run, nested lists).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends.torch.engine import TrainingEngine  # noqa: E402
from backends.torch.parallel import mesh_placements  # noqa: E402
from llm.checkpoint import load_checkpoint  # noqa: E402
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


def main(argv: list[str]) -> None:
    out, run_dir, *rest = argv
    resume = next((a.partition("=")[2] for a in rest if a.startswith("--resume=")), False)
    config = load_config(None, [a for a in rest if not a.startswith("--resume=")], env={})
    log = StepLog()
    with TrainingEngine(config, run_dir=run_dir, resume=resume, callbacks=[log], callback_names=()) as engine:
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
