"""Data-parallel scaling on the GPUs of one host: torch DDP (torchrun) and JAX data parallel vs one GPU.

For each preset and mode (``--modes``, with options as in ``throughput.py``), in the same run: the throughput benchmark's step on one GPU
(``CUDA_VISIBLE_DEVICES=0``), then on ``--gpus`` GPUs -- torch through ``torchrun --standalone
--nproc_per_node N`` (one process per GPU, DDP over NCCL, compiled model), JAX in one process
over a ``Mesh`` of all N devices (batch sharded on "data", parameters replicated, XLA's all-reduce).
Each GPU keeps the preset's batch (weak scaling: N times the global batch), so the ratio
``tokens/s(N) / tokens/s(1)`` is the scaling efficiency times N; the target is >= 1.85 on two.

    python benchmarks/scaling.py --presets gpt2_124m --out-dir benchmarks/results

Output: ``<out-dir>/scaling_<card>x<N>_<date>.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.hardware import collect_env  # noqa: E402
from benchmarks.job import write_weights  # noqa: E402
from benchmarks.throughput import WORKERS, mode_env, parse_mode, run_worker, workload  # noqa: E402
from llm.config import load_config  # noqa: E402
from llm.spec import init_params  # noqa: E402

TARGET_RATIO = 1.85
MODE_BACKEND = {"torch-eager": "torch", "torch-compile": "torch", "jax-jit": "jax"}
# Options that only change the multi-GPU run; the variants that differ only in these share one 1-GPU run.
DATA_PARALLEL_OPTIONS = {"bucket_mb", "ddp_split", "static_graph", "comm_hook", "nccl_channels"}
# NVLink multicast stays off on shared hosts (a program using it can take the GPUs down).
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")


def _summary(res: dict) -> dict:
    keep = ("status", "error", "tokens_per_s", "step_time", "step_times_s", "global_batch", "tokens_per_step",
            "world_size", "peak_memory_bytes", "compile_s", "first_step_s", "loss_step0", "loss_last",
            "wall_s", "options", "profile")
    return {k: res[k] for k in keep if k in res}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["gpt2_124m"])
    p.add_argument("--batch-size", type=int, default=None, help="per GPU (default: the preset's batch)")
    p.add_argument("--modes", nargs="+", default=["torch-compile", "jax-jit"],
                   help="modes as in throughput.py, with options, e.g. 'torch-compile[bucket_mb=100]' "
                        "(DDP options: see benchmarks/torch_worker.py)")
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile-steps", type=int, default=0,
                   help="profile this many steps after timing (torch: rank 0; JAX: device 0), kernels by category")
    p.add_argument("--mode-timeout-s", type=float, default=400.0)
    p.add_argument("--budget-s", type=float, default=3600.0)
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--log-dir", default=None)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: a harness check only (gloo, host-platform devices), no meaningful numbers")
    p.add_argument("--append", action="store_true",
                   help="add to this card/date's scaling file instead of starting a new one")
    p.add_argument("--date", default=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"))
    args = p.parse_args(argv)
    for key, value in SAFE_ENV.items():
        os.environ.setdefault(key, value)
    deadline = time.time() + args.budget_s
    env = collect_env()
    n = args.gpus
    if env.get("gpu_count", 0) < n:
        print(f"need {n} GPUs, nvidia-smi shows {env.get('gpu_count', 0)}", file=sys.stderr)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_dir = Path(args.log_dir) if args.log_dir else None
    if log_dir:
        log_dir.mkdir(parents=True, exist_ok=True)
    stem = f"scaling_{env.get('card_slug', 'cpu')}x{n}_{args.date}"
    record = {"schema": 1, "date": args.date, "env": env, "gpus": n, "target_ratio": TARGET_RATIO,
              "protocol": {"warmup": args.warmup, "steps": args.steps, "repeats": args.repeats,
                           "scaling": "weak: each GPU keeps the preset's batch",
                           "torch": f"torchrun --standalone --nproc_per_node {n}, DDP(torch.compile(model)), NCCL, "
                                    "gradient_as_bucket_view; a row's options set bucket_mb (25), ddp_split (on: DDPOptimizer "
                                    "graph splits at buckets), static_graph (0), comm_hook (none: fp32 all-reduce)",
                           "jax": f"one process, Mesh of {n} devices ('data'), batch sharded, params replicated"},
              "command": sys.argv, "runs": []}
    previous = out_dir / f"{stem}.json"
    if args.append and previous.exists():
        old = json.loads(previous.read_text())
        record["runs"] = old.get("runs", [])
        record["command"] = [*old.get("command", []), "&&", *sys.argv]

    def write() -> None:
        (out_dir / f"{stem}.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
        (out_dir / f"{stem}.md").write_text(render(record))

    with tempfile.TemporaryDirectory(prefix="scaling_") as tmp:
        for preset in args.presets:
            _scale_preset(preset, args, Path(tmp), log_dir, deadline, record, write)
    write()
    print(render(record))
    return 0


def _scale_preset(preset: str, args: argparse.Namespace, work: Path, log_dir: Path | None, deadline: float,
                  record: dict, write) -> None:
    """Every mode of ``args.modes`` on one GPU and on ``args.gpus``, appended to ``record`` as it goes."""
    n = args.gpus
    config = load_config(ROOT / "configs" / f"{preset}.yaml")
    B, T = args.batch_size or config.training.batch_size, config.data.seq_len
    wdir = work / f"weights_{preset}"
    write_weights(init_params(config.model, args.seed), wdir)
    singles: dict[str, dict] = {}  # one-GPU job key -> its result, shared by the variants

    def run(mode: str, opts: dict, gpus: int, label: str) -> dict:
        remaining = deadline - time.time()
        if remaining < 30:
            return {"status": "skipped", "error": "time budget spent"}
        backend = MODE_BACKEND[mode]
        job = {"config_path": str(ROOT / "configs" / f"{preset}.yaml"), "mode": mode, "options": opts,
               "device": args.device, "batch_size": B, "seq_len": T,
               "dtype": config.optimization.dtype.value, "warmup": args.warmup, "steps": args.steps,
               "repeats": args.repeats, "seed": args.seed, "num_batches": 4,
               "weights_dir": str(wdir), "profile_steps": args.profile_steps,
               "devices": gpus}
        launcher = None
        extra_env = {"TORCHINDUCTOR_CACHE_DIR": str(work / f"inductor_{_slug(label)}_{gpus}"), **mode_env(opts)}
        if gpus == 1 and args.device == "cuda":
            extra_env["CUDA_VISIBLE_DEVICES"] = "0"
        if args.device == "cpu" and backend == "jax":
            extra_env["XLA_FLAGS"] = " ".join(filter(None, [extra_env.get("XLA_FLAGS", ""),
                                                            f"--xla_force_host_platform_device_count={gpus}"]))
        elif backend == "torch":
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc_per_node={gpus}"]
        name = f"scaling_{preset}_{_slug(label)}_{gpus}gpu"
        print(f"[{preset}] {label} on {gpus} GPU(s): running", flush=True)
        res = run_worker(WORKERS[mode], job, work, name, min(args.mode_timeout_s, remaining), args.device,
                         launcher=launcher, log_dir=log_dir, extra_env=extra_env)
        msg = (f"{res['tokens_per_s']:,.0f} tok/s (global batch {res['global_batch']}, "
               f"step {res['step_time']['median_s'] * 1e3:.1f} ms)"
               if res.get("status") == "ok" else f"{res.get('status')}: {res.get('error')}")
        print(f"[{preset}] {label} on {gpus} GPU(s): {msg}", flush=True)
        return _summary(res)

    for text in args.modes:
        mode, opts = parse_mode(text)
        backend = MODE_BACKEND[mode]
        entry = {"preset": preset, "backend": backend, "mode": text, "batch_per_gpu": B, "seq_len": T,
                 "workload": workload(config, B, T)}
        single_opts = {k: v for k, v in opts.items() if k not in DATA_PARALLEL_OPTIONS}
        key = json.dumps([mode, single_opts], sort_keys=True)
        if key not in singles:
            single_text = mode + ("[" + ",".join(f"{k}={v}" for k, v in single_opts.items()) + "]"
                                  if single_opts else "")
            singles[key] = run(mode, single_opts, 1, single_text)
            singles[key]["mode"] = single_text
        entry["gpus_1"] = singles[key]
        entry[f"gpus_{n}"] = run(mode, opts, n, text)
        one, many = entry["gpus_1"], entry[f"gpus_{n}"]
        if one.get("status") == "ok" and many.get("status") == "ok":
            entry["ratio"] = many["tokens_per_s"] / one["tokens_per_s"]
            entry["efficiency"] = entry["ratio"] / n
            entry["met"] = entry["ratio"] >= TARGET_RATIO
        else:
            entry["ratio"], entry["met"] = None, False
        record["runs"].append(entry)
        write()
    shutil.rmtree(wdir, ignore_errors=True)


def render(record: dict) -> str:
    env, n = record["env"], record["gpus"]
    lines = [f"# Data-parallel scaling on {n} x {env.get('card') or '?'} ({record['date']})", "",
             f"Weak scaling (each GPU keeps the preset's batch); the same step as `benchmarks/throughput.py`; "
             f"1-GPU and {n}-GPU runs in the same call. torch: {record['protocol']['torch']}. "
             f"jax: {record['protocol']['jax']}. Versions: torch {env.get('torch')} (CUDA {env.get('torch_cuda')}, "
             f"NCCL {env.get('nccl')}), jax {env.get('jax')}, flax {env.get('flax')}, driver {env.get('driver')}.", "",
             f"| preset | mode | 1 GPU tok/s | {n} GPU tok/s | ratio | efficiency | step ms 1 / {n} | "
             f"target >= {record['target_ratio']} |", "|---|---|---|---|---|---|---|---|"]
    for e in record["runs"]:
        one, many = e.get("gpus_1", {}), e.get(f"gpus_{n}", {})

        def tps(r):
            return f"{r['tokens_per_s']:,.0f}" if r.get("status") == "ok" else f"**{r.get('status')}**: {str(r.get('error'))[:80]}"

        def ms(r):
            return f"{r['step_time']['median_s'] * 1e3:.1f}" if r.get("status") == "ok" else "-"

        ratio = "-" if e.get("ratio") is None else f"{e['ratio']:.3f}x"
        eff = "-" if e.get("ratio") is None else f"{e['efficiency'] * 100:.1f}%"
        lines.append(f"| {e['preset']} | {e['mode']} | {tps(one)} | {tps(many)} | {ratio} | {eff} | "
                     f"{ms(one)} / {ms(many)} | {'MET' if e.get('met') else 'MISSED'} |")
    profiled = [(e, g) for e in record["runs"] for g in (1, n)
                 if isinstance(e.get(f"gpus_{g}", {}).get("profile"), dict) and "by_category_ms_per_step" in e[f"gpus_{g}"]["profile"]]
    if profiled:
        lines += ["", "Kernel profiles (torch: rank 0; JAX: device 0), ms per step by category:", ""]
        for e, g in profiled:
            prof = e[f"gpus_{g}"]["profile"]
            cats = ", ".join(f"{k} {v:.1f}" for k, v in prof["by_category_ms_per_step"].items())
            lines.append(f"- {e['preset']} {e[f'gpus_{g}'].get('mode', e['mode']) if g == 1 else e['mode']} on {g} GPU(s): "
                         f"span {prof['span_ms_per_step']:.1f}, GPU busy {prof['busy_fraction'] * 100:.1f}%; {cats}")
    if record.get("notes"):
        lines += [""] + [f"- {n}" for n in record["notes"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
