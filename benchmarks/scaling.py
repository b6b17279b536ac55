"""Data-parallel scaling on the GPUs of one host: torch DDP (torchrun) and JAX data parallel vs one GPU.

For each preset and backend, in the same run: the throughput benchmark's step on one GPU
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
from benchmarks.throughput import run_worker, workload  # noqa: E402
from llm.config import load_config  # noqa: E402
from llm.spec import init_params  # noqa: E402

TARGET_RATIO = 1.85
BACKENDS = {"torch": ("torch-compile", "benchmarks.torch_worker"), "jax": ("jax-jit", "benchmarks.jax_worker")}
# NVLink multicast stays off on shared hosts (a program using it can take the GPUs down).
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _summary(res: dict) -> dict:
    keep = ("status", "error", "tokens_per_s", "step_time", "step_times_s", "global_batch", "tokens_per_step",
            "world_size", "peak_memory_bytes", "compile_s", "first_step_s", "loss_step0", "loss_last",
            "wall_s", "options", "profile")
    return {k: res[k] for k in keep if k in res}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["gpt2_124m"])
    p.add_argument("--batch-size", type=int, default=None, help="per GPU (default: the preset's batch)")
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
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
                                    "gradient_as_bucket_view",
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
        work = Path(tmp)
        for preset in args.presets:
            config = load_config(ROOT / "configs" / f"{preset}.yaml")
            B, T = args.batch_size or config.training.batch_size, config.data.seq_len
            wdir = work / f"weights_{preset}"
            write_weights(init_params(config.model, args.seed), wdir)
            for backend in args.backends:
                mode, module = BACKENDS[backend]
                entry = {"preset": preset, "backend": backend, "mode": mode, "batch_per_gpu": B, "seq_len": T,
                         "workload": workload(config, B, T)}
                for gpus in (1, n):
                    remaining = deadline - time.time()
                    if remaining < 30:
                        entry[f"gpus_{gpus}"] = {"status": "skipped", "error": "time budget spent"}
                        continue
                    job = {"config_path": str(ROOT / "configs" / f"{preset}.yaml"), "mode": mode, "options": {},
                           "device": args.device, "batch_size": B, "seq_len": T,
                           "dtype": config.optimization.dtype.value, "warmup": args.warmup, "steps": args.steps,
                           "repeats": args.repeats, "seed": args.seed, "num_batches": 4,
                           "weights_dir": str(wdir), "profile_steps": args.profile_steps if args.device == "cuda" else 0,
                           "devices": gpus}
                    launcher, extra_env = None, {}
                    if gpus == 1 and args.device == "cuda":
                        extra_env["CUDA_VISIBLE_DEVICES"] = "0"
                    if args.device == "cpu" and backend == "jax":
                        extra_env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={gpus}"
                    elif backend == "torch":
                        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                    f"--nproc_per_node={gpus}"]
                    name = f"scaling_{preset}_{backend}_{gpus}gpu"
                    print(f"[{preset}] {backend} on {gpus} GPU(s): running", flush=True)
                    res = run_worker(module, job, work, name, min(args.mode_timeout_s, remaining), args.device,
                                     launcher=launcher, log_dir=log_dir, extra_env=extra_env)
                    entry[f"gpus_{gpus}"] = _summary(res)
                    msg = (f"{res['tokens_per_s']:,.0f} tok/s (global batch {res['global_batch']})"
                           if res.get("status") == "ok" else f"{res.get('status')}: {res.get('error')}")
                    print(f"[{preset}] {backend} on {gpus} GPU(s): {msg}", flush=True)
                one, many = entry.get("gpus_1", {}), entry.get(f"gpus_{n}", {})
                if one.get("status") == "ok" and many.get("status") == "ok":
                    entry["ratio"] = many["tokens_per_s"] / one["tokens_per_s"]
                    entry["efficiency"] = entry["ratio"] / n
                    entry["met"] = entry["ratio"] >= TARGET_RATIO
                else:
                    entry["ratio"], entry["met"] = None, False
                record["runs"].append(entry)
                write()
            shutil.rmtree(wdir, ignore_errors=True)
    write()
    print(render(record))
    return 0


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
    if record.get("notes"):
        lines += [""] + [f"- {n}" for n in record["notes"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
