"""``python -m llm.plan``: will this run fit? The per-device memory of a training config on a mesh.

CLI::

    python -m llm.plan --config configs/llama3_8b.yaml --devices 8 --set distributed.fsdp=8 \\
        --device-memory 141GB [--json]

prints, for one device of the mesh ``config.distributed.mesh(--devices)``, the bytes of the float32
weights, the compute copy of the weights, the gradients, the AdamW moments, the activations (under
``training.activation_checkpointing``) and the logits, their total, and whether the total fits in
``--device-memory``. The formulas are ``llm.memory``'s. This command never asks a device: without
``--device-memory`` the verdict is "unknown" (a card's memory cannot be read from a CPU machine);
pass the card's size (``80GB``, ``141GB``: decimal units; ``96GiB``: binary). ``--json`` prints the
same numbers (bytes) and each parameter's placement as one JSON object. Bad input (an unknown
config, a size like ``80XB``, ``--devices 0``, degrees that do not divide the devices) is one
``error:`` line on stderr and exit status 2, never a traceback.

Importing this module never imports torch or jax.
"""

from __future__ import annotations

import argparse
import json
import sys

from llm.config import Config, ConfigError, load_config
from llm.io import CliParser
from llm.memory import BACKENDS, LABELS, PARTS, MemoryEstimate, PlanError, estimate, gib, parse_bytes
from llm.sharding import describe, param_placements

__all__ = ["build_parser", "main", "render", "report"]

PROG = "llm.plan"


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(prog="python -m llm.plan",
                  description="Per-device memory of a training run: weights, gradients, optimizer state, "
                              "activations and logits on the config's mesh, and whether they fit.")
    p.add_argument("--config", required=True, help="YAML run config (e.g. configs/llama3_8b.yaml)")
    p.add_argument("--devices", type=int, default=1,
                   help="devices the run trains on (default 1); the mesh is distributed.fsdp x "
                        "distributed.tensor x the data parallelism that is left")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set distributed.fsdp=8 (repeatable)")
    p.add_argument("--device-memory", metavar="SIZE",
                   help="memory of one device, e.g. 80GB or 141GB (decimal) or 96GiB (binary); without it "
                        "the verdict is unknown: nothing here asks the local accelerator")
    p.add_argument("--backend", choices=BACKENDS, default="torch",
                   help="whose buffer lifetimes the total follows (default torch; jax's XLA peak is lower)")
    p.add_argument("--json", action="store_true", help="print one JSON object (bytes) instead of the table")
    return p


def report(config: Config, devices: int, device_memory: int | None, name: str,
           backend: str = "torch") -> dict[str, object]:
    """The JSON object of ``--json``."""
    est = estimate(config, devices, backend)
    out: dict[str, object] = {"config": name, "parameters": config.model.num_params(), **est.to_dict(),
                              "device_memory": device_memory,
                              "fits": None if device_memory is None else est.total <= device_memory}
    out["placements"] = describe(param_placements(config.model, est.mesh))
    return out


def render(est: MemoryEstimate, config: Config, device_memory: int | None, memory_text: str | None,
           name: str) -> str:
    """The human table."""
    mesh = est.mesh
    lines = [f"{name} on {mesh.devices} device{'s' if mesh.devices > 1 else ''}: mesh data={mesh.data} "
             f"fsdp={mesh.fsdp} tensor={mesh.tensor}",
             f"{config.model.num_params():,} parameters; micro-batch {est.micro_batch} x {est.seq_len} tokens per "
             f"data-parallel shard; {est.dtype.value}; activation checkpointing "
             f"{est.activation_checkpointing.value}",
             f"{'per device':<34}{'bytes':>18}{'GiB':>10}"]
    for part in PARTS:
        lines.append(f"{LABELS[part]:<34}{est.parts[part]:>18,}{est.parts[part] / 2**30:>10.2f}")
    rule = "the sum" if est.backend == "torch" else "weights + optimizer + max(gradients, the rest)"
    lines.append(f"{'total':<34}{est.total:>18,}{est.total / 2**30:>10.2f}  ({est.backend}: {rule})")
    if device_memory is None:
        lines.append("fits: unknown (no --device-memory given; pass the card's memory, e.g. --device-memory 80GB)")
    else:
        used = est.total / device_memory
        verdict = "fits" if est.total <= device_memory else "does NOT fit"
        lines.append(f"device memory {memory_text} = {gib(device_memory)}: {verdict} ({used:.0%} of it)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.devices < 1:
            raise PlanError(f"--devices {args.devices}: must be >= 1")
        try:
            memory = None if args.device_memory is None else parse_bytes(args.device_memory)
        except PlanError as e:
            raise PlanError(f"--device-memory {e}") from None
        config = load_config(args.config, args.overrides)
        if args.json:
            print(json.dumps(report(config, args.devices, memory, args.config, args.backend), indent=1))
        else:
            print(render(estimate(config, args.devices, args.backend), config, memory, args.device_memory,
                         args.config))
        return 0
    except (ConfigError, PlanError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
