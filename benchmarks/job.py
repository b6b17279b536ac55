"""The contract between the orchestrator and a worker process: one job in, one result out.

A job is a JSON file the orchestrator writes (``throughput.py`` / ``scaling.py``); the worker
(``python -m benchmarks.torch_worker --job J --out R``) writes a result JSON. Both backends read the
same starting weights (``llm.spec.init_params``, written once per preset as ``.npy`` files) and the
same token batches (``make_batches``), so every mode trains the same model on the same data.
Framework-free: nothing here imports torch or jax.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np

from llm.config import Config, load_config

__all__ = ["load_job", "preset_config", "write_weights", "load_weights", "make_batches", "run_worker"]


def load_job(path: str | os.PathLike) -> dict:
    return json.loads(Path(path).read_text())


def preset_config(job: dict) -> Config:
    """The preset's resolved config (the job carries batch size and sequence length separately)."""
    return load_config(job["config_path"])


def write_weights(params: dict[str, np.ndarray], directory: str | os.PathLike) -> None:
    """One ``<canonical name>.npy`` per parameter (read back memory-mapped by each worker)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, value in params.items():
        np.save(directory / f"{name}.npy", np.ascontiguousarray(value, dtype=np.float32))
    (directory / "DONE").write_text(json.dumps(sorted(params)))


def load_weights(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    directory = Path(directory)
    names = json.loads((directory / "DONE").read_text())
    return {name: np.load(directory / f"{name}.npy", mmap_mode="r") for name in names}


def make_batches(vocab_size: int, batch: int, seq_len: int, count: int, seed: int) -> np.ndarray:
    """``count`` batches of random tokens, int32 (count, batch, seq_len + 1): inputs ``[..., :-1]``,
    targets ``[..., 1:]``. Seeded, so both backends see identical data."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xBE7C]))
    return rng.integers(0, vocab_size, size=(count, batch, seq_len + 1), dtype=np.int64).astype(np.int32)


def run_worker(body: Callable[[dict], dict], argv: list[str] | None = None) -> int:
    """Parse ``--job J --out R``, run ``body(job)`` and write its result; a failure is written too.

    The result always carries ``status`` ("ok" or "failed") and, on failure, ``error`` (the
    exception's type and message) and ``traceback`` (its last lines), so the report shows why.
    """
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--job", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    job = load_job(args.job)
    try:
        result = body(job)
        result.setdefault("status", "ok")
        code = 0
    except BaseException as e:  # noqa: BLE001 - report every failure, OOM and KeyboardInterrupt too
        tb = traceback.format_exc()
        print(tb, file=sys.stderr, flush=True)
        result = {"status": "failed", "error": f"{type(e).__name__}: {str(e)[:2000]}",
                  "traceback": tb[-4000:]}
        code = 1
    if result.get("write", True):
        result.pop("write", None)
        Path(args.out).write_text(json.dumps(result, indent=1, default=_json_default))
    return code


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    return str(value)
