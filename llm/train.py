"""``python -m llm.train`` / ``llm-train``: resolve the config, pick the backend, train, summarise.

    python -m llm.train                                   the default config (configs/default.yaml)
    python -m llm.train --config configs/tiny.yaml --set training.lr=1e-3 --max-steps 50
    python -m llm.train --run-dir runs/exp1 --resume      continue from the newest valid checkpoint
    python -m llm.train --init-from ckpts/llama --set data.source=my.txt   fine-tune a checkpoint's weights
    python -m llm.train --print-config                    print the resolved YAML and exit
    python -m llm.train --task mypkg.tasks:my_task        import mypkg.tasks, train the task it registers
    torchrun --nproc_per_node=2 -m llm.train ...          data-parallel (torch backend)

Config precedence: defaults < ``--config`` YAML (default: configs/default.yaml; with ``--resume`` and
no ``--config``: the run's own config.json) < env ``LLM_<SECTION>__<FIELD>`` < ``--set`` < named flags.
The task (``task``, ``--task``) is a registered name or ``package.module:name``; resolving the config
imports that module, whose ``register_task`` runs before the name is checked (``llm.loop.tasks.get_task``).
The backend module (``backends.<name>.engine``) is imported only after the config resolved, so config
errors are fast. Errors the user can fix print one line (``llm-train: error: ...``) and exit 2
(config) or 1 (run); an interrupted run (Ctrl-C) saves a checkpoint and exits 130.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import tempfile
from pathlib import Path

from llm.backend import ALIASES, BackendError
from llm.backend import backend as get_backend
from llm.config import ConfigError, dump_yaml, load_config
from llm.io import CONFIG_FILE, CliParser, write_json_atomic

PROG = "llm-train"
# What configs/default.yaml holds, for installs without the configs/ folder (a test keeps them equal).
EMBEDDED_DEFAULT = """\
model: {vocab_size: 256, max_seq_len: 256, hidden_size: 192, num_layers: 4, num_heads: 6, num_kv_heads: 2,
  activation: silu, use_glu: true, norm_type: rmsnorm, position: rope, tie_embeddings: true, dropout: 0.0}
training: {batch_size: 24, max_steps: 1200, lr: 3.0e-3, min_lr_ratio: 0.05, warmup_steps: 60, weight_decay: 0.1,
  grad_clip: 1.0, eval_every: 200, eval_batches: 10, log_every: 25}
data: {source: stdlib, tokenizer: char, seq_len: 128, max_bytes: 3000000}
checkpoint: {every_steps: 400, keep_last: 2}
logging: {every_steps: 1}
"""


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(prog=PROG, error_label=PROG, description="Train a model from a run config (see docs/training.md).")
    p.add_argument("--backend", default="torch", choices=sorted(ALIASES), help="training engine")
    p.add_argument("--config", help="YAML run config (default: configs/default.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set training.lr=1e-3 (repeatable)")
    p.add_argument("--run-dir", help="run directory (default: runs/<timestamp>)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue from the newest valid checkpoint of --run-dir (or of the newest run "
                        "under runs/), or from the checkpoint directory given")
    p.add_argument("--init-from", metavar="CHECKPOINT",
                   help="= --set training.init_from=DIR: start from that checkpoint's weights, spec (replaces "
                        "model:) and tokenizer.json (e.g. one made by python -m llm.hf import)")
    p.add_argument("--max-steps", type=int, help="= --set training.max_steps=N")
    p.add_argument("--seed", type=int, help="= --set training.seed=N")
    p.add_argument("--task", help="= --set task=NAME: a registered task (lm, regression) or "
                                  "'package.module:name' (imports package.module, which registers name)")
    p.add_argument("--epochs", type=int, help="= --set training.epochs=N training.max_steps=null "
                                               "(unless --max-steps is given too)")
    p.add_argument("--batch-size", type=int, help="= --set training.batch_size=N (global)")
    p.add_argument("--lr", type=float, help="= --set training.lr=X")
    p.add_argument("--callback", dest="callbacks", action="append", default=[], metavar="NAME",
                   help="add a registered callback or 'package.module:Class' (repeatable)")
    p.add_argument("--sample-tokens", type=int, default=200,
                   help="tokens to sample from an LM at the end (0: none)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config and exit (a 'package.module:name' task, from the config, "
                        "a run's config.json or --task, is still imported: its module registers the name)")
    return p


def _config_path(args: argparse.Namespace) -> str | None:
    if args.config:
        return args.config
    if isinstance(args.resume, str) and (Path(args.resume) / CONFIG_FILE).is_file():
        return str(Path(args.resume) / CONFIG_FILE)  # JSON is YAML: the checkpoint's resolved config
    if args.resume is not False and args.run_dir and (Path(args.run_dir) / CONFIG_FILE).is_file():
        return str(Path(args.run_dir) / CONFIG_FILE)  # the run's own resolved config
    from llm.run import DEFAULT_CONFIG_PATH

    if DEFAULT_CONFIG_PATH.is_file():
        return str(DEFAULT_CONFIG_PATH)
    fd, path = tempfile.mkstemp(prefix="llm-default-", suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        f.write(EMBEDDED_DEFAULT)
    return path


def resolve_config(args: argparse.Namespace):
    """The Config of the command line (see the module docstring for precedence)."""
    if args.resume is True and not args.run_dir:
        from llm.run import newest_run_dir

        newest = newest_run_dir()
        if newest is None:
            raise ConfigError("--resume: no run with checkpoints under runs/; pass --run-dir")
        args.run_dir = str(newest)
    named = {"training.max_steps": args.max_steps, "training.seed": args.seed, "task": args.task,
             "training.epochs": args.epochs, "training.batch_size": args.batch_size, "training.lr": args.lr,
             "logging.run_dir": args.run_dir, "training.init_from": args.init_from}
    overrides = list(args.overrides) + [f"{k}={v}" for k, v in named.items() if v is not None]
    if args.epochs is not None and args.max_steps is None:
        overrides.append("training.max_steps=null")  # --epochs means: run that many epochs
    from llm.init_from import apply_init_from
    from llm.loop.tasks import TaskError, get_task

    config = apply_init_from(load_config(_config_path(args), overrides))  # model: from training.init_from
    try:
        task = get_task(config.task)  # imports a 'package.module:name' task's module; the name must be registered
    except TaskError as e:
        raise ConfigError(str(e), "task") from None
    if not args.print_config and args.backend not in task.backends:
        have = ", ".join(sorted(task.backends)) or "none"
        raise ConfigError(f"task {task.name!r} has no {args.backend!r} implementation (it has: {have}); "
                          f"choose --backend {sorted(task.backends)[0] if task.backends else '...'}", "task")
    return config


def _cpu_threads_yield() -> None:
    """Let idle OpenMP threads sleep instead of spin, unless the user chose (``OMP_WAIT_POLICY``).

    Measured on the 2-core dev machine, default-config step: with one other busy process, torch's
    spinning thread pool took 5.2 s per step against 0.41 s passive; unloaded, passive costs ~13%
    (0.245 s vs 0.216 s). Shared CPUs are the common case here, so passive is the default;
    ``OMP_WAIT_POLICY=ACTIVE`` restores spinning. Must run before the backend (and its OpenMP
    runtime) is imported; once torch is loaded it is too late, and the environment is left alone.
    """
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


class _QuietTpuProbe(logging.Filter):
    """Drops jax's INFO record ``Unable to initialize backend 'tpu': ...``: jax logs it on every
    machine without libtpu while it probes for platforms. A TPU the user asked for
    (``JAX_PLATFORMS=tpu``) that fails is a raised error, not this record, so nothing real is hidden."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno < logging.WARNING
                    and record.getMessage().startswith("Unable to initialize backend 'tpu'"))


def _setup_logging(level: str = "info") -> None:
    """Console logging on stderr: ``level`` (``logging.level``) on rank 0, warnings on the others."""
    rank = int(os.environ.get("RANK", "0"))
    fmt = "%(asctime)s %(message)s" if rank == 0 else f"%(asctime)s [rank {rank}] %(message)s"
    chosen = getattr(logging, level.upper()) if rank == 0 else logging.WARNING
    logging.basicConfig(level=max(chosen, logging.INFO), format=fmt, datefmt="%H:%M:%S", stream=sys.stderr)
    logging.getLogger("llm").setLevel(chosen)  # debug reaches the project's records, not every library's
    probe = logging.getLogger("jax._src.xla_bridge")
    if not any(isinstance(f, _QuietTpuProbe) for f in probe.filters):
        probe.addFilter(_QuietTpuProbe())


def _os_error_line(e: OSError) -> str:
    """``<path>: <errno text> (<errno name>)``, e.g. ``runs/x/config.json: Permission denied (EACCES)``."""
    paths = " -> ".join(str(p) for p in (e.filename, e.filename2) if p is not None)
    name = errno.errorcode.get(e.errno) if e.errno is not None else None
    text = e.strerror or str(e)
    return f"{paths + ': ' if paths else ''}{text}{f' ({name})' if name else ''}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from llm.checkpoint import CheckpointError
    from llm.data import DataError
    from llm.loop.tasks import TaskError
    from llm.run import DeviceOutOfMemoryError, NonFiniteLossError
    from llm.spec import SpecError
    from llm.tokenization import TokenizerError

    _cpu_threads_yield()  # before a task module (resolve_config imports it) or the backend loads torch
    try:
        config = resolve_config(args)
        from llm.loop.callbacks import get_callback

        try:
            extra = [get_callback(name).from_config(config) for name in args.callbacks]
        except ValueError as e:
            raise ConfigError(f"--callback: {e}") from None
        if args.print_config:
            sys.stdout.write(dump_yaml(config))
            return 0
        _setup_logging(config.logging.level.value)
        try:
            engine_cls = get_backend(args.backend).TrainingEngine
        except BackendError as e:
            raise ConfigError(f"--backend {args.backend}: {e}") from None
        with engine_cls(config, resume=args.resume, callbacks=[c for c in extra if c]
                                          ) as engine:
            result = engine.fit()
        # after the process group is gone: only rank 0 samples, the others may already have exited
        if engine.is_main and args.sample_tokens > 0 and result.stop_reason != "interrupted":
            result.sample = engine.sample(max_new_tokens=args.sample_tokens)
            write_json_atomic(engine.run.summary_path, result.to_dict())  # the summary keeps its sample
        if engine.is_main:
            print("\n".join(result.summary_lines()))
            if result.sample is not None:
                print(f"--- sample (temperature 0.8) ---\n{result.sample}\n---")
        return 130 if result.stop_reason == "interrupted" else 0
    except ConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, DataError, DeviceOutOfMemoryError, NonFiniteLossError, SpecError, TaskError,
            TokenizerError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a run dir or file that cannot be created or written: read-only, full, not a dir
        print(f"{PROG}: error: {_os_error_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        print(f"{PROG}: aborted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
