"""The engines' memory and checkpoint stall on one device, beside the planner's estimate.

Three measurements, one JSON line each (appended to ``--out``):

``policy``  train ``--steps`` steps of ``--config`` with ``training.activation_checkpointing=--policy``
            on synthetic tokens; the device's peak bytes (torch ``max_memory_allocated``, JAX
            ``peak_bytes_in_use``: one process per run, the peak cannot be reset), the steady
            tokens/s of ``fit()``, and ``llm.memory``'s estimate for the same config.
``save``    the loop's stall of ``save_checkpoint`` with ``checkpoint.async_save`` on (twice: the first
            save allocates the staging buffers, the second is the steady state) and off (the async
            call returns after the device-to-host snapshot; ``wait_s`` is the write's remaining
            time), after ``--steps`` training steps so the moments exist.
``refuse``  the engine's start-up check on a config the planner says cannot fit: the one-line
            ``DeviceOutOfMemoryError`` and how long the refusal took (nothing is allocated).

The runs skip the end-of-run checkpoint (``_save`` is replaced for ``policy``): a benchmark
measures the step, not the disk. Run: ``python -m benchmarks.engine_memory policy --backend torch
--config configs/llama_3b.yaml --policy full --batch-size 4 --seq-len 2048 --out F``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from llm.backend import backend
from llm.config import load_config
from llm.memory import estimate


def _config(args: argparse.Namespace, *extra: str):
    sets = ["data.source=synthetic", f"data.synthetic_size={max(64, 4 * (args.batch_size or 8))}",
            "training.eval_every=0", "data.val_fraction=0", "logging.progress=false", "checkpoint.every_steps=0",
            f"training.max_steps={args.steps}", "training.warmup_steps=1", *extra, *args.set]
    if args.batch_size:
        sets.append(f"training.batch_size={args.batch_size}")
    if args.seq_len:
        sets.append(f"data.seq_len={args.seq_len}")
    return load_config(args.config, sets)


def _peak_bytes(name: str) -> int | None:
    if name == "torch":
        import torch
        return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None
    import jax
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def _versions(name: str) -> dict[str, str]:
    if name == "torch":
        import torch
        card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        return {"torch": torch.__version__, "card": card}
    import flax
    import jax
    return {"jax": jax.__version__, "flax": flax.__version__, "card": jax.devices()[0].device_kind}


def policy(args: argparse.Namespace) -> dict[str, Any]:
    config = _config(args, f"training.activation_checkpointing={args.policy}")
    planned = estimate(config, 1, args.backend)
    engine_cls = backend(args.backend).TrainingEngine
    with tempfile.TemporaryDirectory() as tmp:
        engine = engine_cls(config, run_dir=Path(tmp) / "run")
        engine._save = lambda reason: None  # no end-of-run checkpoint: the step is measured, not the disk
        result = engine.fit()
        engine.close()
    peak = _peak_bytes(args.backend)
    return {"what": "policy", "backend": args.backend, "config": args.config, "policy": args.policy,
            "batch": config.training.batch_size, "seq": config.data.seq_len, "steps": args.steps,
            "tokens_per_s": result.items_per_s, "compile_s": result.compile_seconds,
            "peak_bytes": peak, "planned_bytes": planned.total,
            "planned_over_peak": round(planned.total / peak, 3) if peak else None,
            "planned": planned.summary(), "loss": result.train_loss, **_versions(args.backend)}


def save(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"what": "save", "backend": args.backend, "config": args.config}
    engine_cls = backend(args.backend).TrainingEngine
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        config = _config(args)
        engine = engine_cls(config, run_dir=Path(tmp) / "run")
        engine._save = lambda reason: None
        engine.fit()
        # The first async save allocates the reused (pinned) staging buffers; the second is the
        # steady state every later save of the run sees.
        for mode in ("async", "async_again", "sync"):
            engine.config = engine.config.replace(
                checkpoint=engine.config.checkpoint.replace(async_save=mode != "sync"))
            t0 = time.perf_counter()
            path = engine.save_checkpoint(mode, path=Path(tmp) / f"ckpt_{mode}")
            stall = time.perf_counter() - t0
            engine.wait_for_checkpoint()
            total = time.perf_counter() - t0
            size = sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
            out[mode] = {"stall_s": round(stall, 3), "wait_s": round(total - stall, 3),
                         "total_s": round(total, 3), "bytes": size}
            import shutil
            shutil.rmtree(path)
        engine.close()
    out.update(_versions(args.backend))
    return out


def refuse(args: argparse.Namespace) -> dict[str, Any]:
    from llm.run import DeviceOutOfMemoryError

    config = _config(args)
    engine_cls = backend(args.backend).TrainingEngine
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            engine_cls(config, run_dir=Path(tmp) / "run")
        message, refused = None, False
    except DeviceOutOfMemoryError as e:
        message, refused = str(e), True
    return {"what": "refuse", "backend": args.backend, "config": args.config, "refused": refused,
            "message": message, "seconds": round(time.perf_counter() - t0, 3),
            "planned_bytes": estimate(config, 1, args.backend).total, **_versions(args.backend)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["policy", "save", "refuse"])
    p.add_argument("--backend", choices=["torch", "jax"], required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--policy", default="none", choices=["none", "full", "selective"])
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--set", action="append", default=[], help="section.field=value (repeatable)")
    p.add_argument("--tmp", default=None, help="where the save measurement writes (default: the temp dir)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    row = {"policy": policy, "save": save, "refuse": refuse}[args.what](args)
    print(json.dumps(row))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
