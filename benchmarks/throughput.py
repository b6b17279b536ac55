"""Training-step throughput of every preset in each mode: ``torch-eager``, ``torch-compile``, ``jax-jit``.

For each preset (``configs/<preset>.yaml``) every mode runs the full training step (forward,
backward, clip, AdamW) in bf16 on the preset's global batch and sequence length, from the same
seeded weights (``llm.spec.init_params``, written once and read by every mode) and the same token
batches. Each mode runs in its own subprocess (``benchmarks/torch_worker.py``,
``benchmarks/jax_worker.py``), so torch and JAX never share a GPU's memory and a crash or an OOM is
recorded as that mode's error. The card's bf16 matmul rate and copy bandwidth are measured in the
same run (``benchmarks/peak_worker.py``); MFU is reported against both the datasheet peak and that
measured peak, with the spec's FLOPs per token (``ModelSpec.flops_per_token``).

Output, per preset: ``<out-dir>/<preset>_<card>_<date>.{json,md,png}``, rewritten after every
mode (a run cut short keeps what it measured), and ``<out-dir>/LATEST.md``.

    python benchmarks/throughput.py                           # all presets, all modes, on the GPU
    python benchmarks/throughput.py --presets gpt2_124m --modes jax-jit "jax-jit[attention=xla]"
    python benchmarks/throughput.py --smoke --out-dir /tmp/b  # CPU, tiny preset, seconds (make test)
    python benchmarks/throughput.py --render benchmarks/results/*.json --update-readme

A mode is ``name`` or ``name[key=value,...]`` with the worker's options (an ablation of one speed
change; see the worker modules). ``--budget-s`` bounds the whole run: modes that would start after
it are reported as skipped, and a running one is cut at it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import report  # noqa: E402
from benchmarks.hardware import collect_env  # noqa: E402
from benchmarks.job import write_weights  # noqa: E402
from llm.config import load_config  # noqa: E402
from llm.spec import ModelSpec, init_params  # noqa: E402

PRESETS = ["gpt2_124m", "llama_1b", "moe"]
MODES = ["torch-eager", "torch-compile", "jax-jit"]
WORKERS = {"torch-eager": "benchmarks.torch_worker", "torch-compile": "benchmarks.torch_worker",
           "jax-jit": "benchmarks.jax_worker"}

# The targets, set for one H100 80GB HBM3 (SXM). nanoGPT bench.py: ~480k tok/s, batch 32 x 1024.
TARGET_CARD = r"H100 80GB HBM3"
TARGETS = {
    "gpt2_124m": [
        {"mode": "*", "metric": "all_modes_ok", "threshold": 1, "label": "every mode reports", "card": TARGET_CARD},
        {"mode": "torch-compile", "metric": "tokens_per_s", "threshold": 480_000,
         "label": "torch-compile >= 480,000 tokens/s", "card": TARGET_CARD},
        {"mode": "jax-jit", "metric": "tokens_per_s", "threshold": 480_000,
         "label": "jax-jit >= 480,000 tokens/s", "card": TARGET_CARD},
    ],
    "llama_1b": [
        {"mode": "torch-compile", "metric": "mfu_card", "threshold": 0.50,
         "label": "torch-compile >= 50% MFU of the card's dense bf16 peak", "card": TARGET_CARD},
        {"mode": "jax-jit", "metric": "mfu_card", "threshold": 0.50,
         "label": "jax-jit >= 50% MFU of the card's dense bf16 peak", "card": TARGET_CARD},
    ],
}


# Named XLA flag sets for the ``xla=<name>`` option of ``jax-jit`` (set as XLA_FLAGS before JAX starts).
XLA_FLAG_SETS = {
    "default": "",
    # Schedule collectives against independent compute (overlap the gradient all-reduce with the backward).
    "lhs": "--xla_gpu_enable_latency_hiding_scheduler=true",
    "lhs_combine": "--xla_gpu_enable_latency_hiding_scheduler=true "
                   "--xla_gpu_all_reduce_combine_threshold_bytes=134217728",
    "no_triton_gemm": "--xla_gpu_enable_triton_gemm=false",
    # cuBLASLt matmuls, whose epilogues can take the bias add (and GELU) in the same kernel.
    "cublaslt": "--xla_gpu_enable_cublaslt=true",
}


def mode_env(opts: dict[str, str]) -> dict[str, str]:
    """Environment a mode's options need before its framework starts (``xla=<flag set>``)."""
    if "xla" not in opts:
        return {}
    if opts["xla"] not in XLA_FLAG_SETS:
        raise SystemExit(f"xla={opts['xla']!r} is not one of: {', '.join(XLA_FLAG_SETS)}")
    flags = " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), XLA_FLAG_SETS[opts["xla"]]]))
    return {"XLA_FLAGS": flags}


def parse_mode(text: str) -> tuple[str, dict[str, str]]:
    """``'jax-jit[attention=xla,donate=0]'`` -> ``('jax-jit', {'attention': 'xla', 'donate': '0'})``."""
    m = re.fullmatch(r"([a-z-]+)(?:\[(.*)\])?", text.strip())
    if not m or m.group(1) not in WORKERS:
        raise SystemExit(f"unknown mode {text!r}; modes are {', '.join(WORKERS)} (optionally name[key=value,...])")
    opts = {}
    for part in filter(None, (m.group(2) or "").split(",")):
        key, _, value = part.partition("=")
        opts[key.strip()] = value.strip()
    mode_env(opts)  # an unknown flag set is an error now, not a failed run later
    return m.group(1), opts


def _worker_env(device: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.94")  # JAX owns the card alone in its process
    env.setdefault("PYTHONUNBUFFERED", "1")
    if device == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_worker(module: str, job: dict, work: Path, name: str, timeout: float, device: str,
               launcher: list[str] | None = None, log_dir: Path | None = None,
               extra_env: dict[str, str] | None = None) -> dict:
    """Run one worker process on ``job``; its result, or a failure record (exit code, stderr tail)."""
    job_path, out_path = work / f"{name}.job.json", work / f"{name}.result.json"
    log_path = (log_dir or work) / f"{name}.log"
    job_path.write_text(json.dumps(job, indent=1))
    out_path.unlink(missing_ok=True)
    cmd = (launcher or [sys.executable]) + ["-m", module, "--job", str(job_path), "--out", str(out_path)]
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        # Its own session, so a timeout kills the whole tree: torchrun's workers would otherwise
        # outlive it and keep holding the GPUs the next mode needs.
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_worker_env(device) | (extra_env or {}),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            code = None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    wall = time.perf_counter() - t0
    tail = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
    if out_path.exists():
        result = json.loads(out_path.read_text())
    else:
        why = f"timed out after {timeout:.0f} s" if code is None else f"exit code {code}"
        last = [ln for ln in tail.strip().splitlines() if ln.strip()][-1:] or [""]
        result = {"status": "failed", "error": f"{why}: {last[0][:300]}"}
    if result.get("status") != "ok":
        result.setdefault("log_tail", tail)
    result["wall_s"] = wall
    result["log"] = str(log_path)
    return result


def measure_peaks(args, work: Path, log_dir: Path | None) -> dict:
    """Matmul and copy ceilings on this card, measured now (torch; JAX's matmul for reference)."""
    on_gpu = args.device == "cuda"
    n, reps = (8192, 30) if on_gpu else (256, 5)
    peaks: dict = {}
    res = run_worker("benchmarks.peak_worker", {"framework": "torch", "n": n, "reps": reps, "device": args.device},
                     work, "peak_torch", 180, args.device, log_dir=log_dir)
    peaks["torch"] = res
    if on_gpu and not args.no_jax_peak:
        peaks["jax"] = run_worker("benchmarks.peak_worker", {"framework": "jax", "n": n, "reps": 20,
                                                              "device": args.device},
                                  work, "peak_jax", 180, args.device, log_dir=log_dir)
    return peaks


def workload(config, batch: int, seq_len: int) -> dict:
    spec = config.model
    w = {"global_batch": batch, "seq_len": seq_len, "tokens_per_step": batch * seq_len,
         "dtype": config.optimization.dtype.value, "params": spec.num_params(),
         "active_params": spec.num_params(active=True), "flops_per_token": spec.flops_per_token(seq_len),
         "flops_per_token_causal": spec.flops_per_token(seq_len, causal=True),
         "flops_per_step": spec.flops_per_token(seq_len) * batch * seq_len}
    if spec.use_moe:
        # The dense reference dispatch (``moe: dense``) evaluates every expert on every token: the
        # work of a top-E model. The workers default to ``auto`` (a sparse dispatch); each result's
        # options say which impl ran, and the report counts executed work from that.
        dense = spec.replace(num_experts_per_token=spec.num_experts, num_expert_groups=1, topk_groups=1,
                             router_group_score="max")  # every expert: no group limit to honour
        w["executed_flops_per_token"] = dense.flops_per_token(seq_len)
        w["moe_dispatch"] = "per result: options.moe (auto resolves per backend, device and dtype)"
    return w


def new_record(preset: str, args, env: dict, peaks: dict) -> dict:
    """The result record of one preset, before any mode has run."""
    config = load_config(ROOT / "configs" / f"{preset}.yaml")
    batch = args.batch_size or config.training.batch_size
    seq_len = args.seq_len or config.data.seq_len
    tp = peaks.get("torch", {})
    measured = tp.get("matmul_tflops_median") if tp.get("status") == "ok" else None
    return {
        "schema": 1, "preset": preset, "config_path": f"configs/{preset}.yaml", "config": config.to_dict(),
        "date": args.date, "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": args.device, "env": env,
        "peak": {"card_bf16_tflops": env.get("card_peak_bf16_tflops"), "measured_matmul_tflops": measured,
                 "measured_how": (f"torch {tp.get('n')}^3 {tp.get('dtype')} matmul, median of {tp.get('reps')}, "
                                  "random data"
                                  if measured else "not measured"),
                 "copy_tb_per_s": tp.get("copy_tb_per_s_median"),
                 "jax_matmul_tflops": peaks.get("jax", {}).get("matmul_tflops_median"),
                 "workers": peaks},
        "workload": workload(config, batch, seq_len),
        "protocol": {"warmup": args.warmup, "steps": args.steps, "repeats": args.repeats,
                     "timer": "host perf_counter around windows bracketed by torch.cuda.synchronize / "
                              "jax.block_until_ready; per-window mean step time; median/min/max over windows",
                     "processes": "one subprocess per mode", "profile_steps": args.profile_steps},
        "command": sys.argv,
        "results": [],
        "targets": [],
    }


def run_modes(record: dict, mode_texts: list[str], args, work: Path, deadline: float,
              log_dir: Path | None) -> None:
    """Run ``mode_texts`` for the record's preset, appending to it and rewriting its files after each."""
    preset = record["preset"]
    config = load_config(ROOT / record["config_path"])
    w = record["workload"]
    weights_dir = work / f"weights_{preset}"
    t0 = time.perf_counter()
    write_weights(init_params(config.model, args.seed), weights_dir)
    print(f"[{preset}] weights written in {time.perf_counter() - t0:.1f} s", flush=True)
    for text in mode_texts:
        mode, opts = parse_mode(text)
        remaining = deadline - time.time()
        if remaining < args.min_mode_s:
            record["results"].append({"mode": text, "status": "skipped",
                                      "error": f"time budget (--budget-s {args.budget_s:.0f}) spent"})
            print(f"[{preset}] {text}: skipped (budget)", flush=True)
        else:
            job = {"config_path": str(ROOT / record["config_path"]), "mode": mode, "options": opts,
                   "device": args.device, "batch_size": w["global_batch"], "seq_len": w["seq_len"],
                   "dtype": w["dtype"], "warmup": args.warmup, "steps": args.steps, "repeats": args.repeats,
                   "seed": args.seed, "num_batches": args.num_batches, "weights_dir": str(weights_dir),
                   "profile_steps": args.profile_steps if args.device == "cuda" else 0,
                   "check_attention": (args.device == "cuda" and mode == "jax-jit" and not opts
                                       and preset in args.check_attention)}
            name = f"{preset}_{re.sub(r'[^A-Za-z0-9]+', '-', text).strip('-')}"
            job["name"] = name
            if log_dir is not None and args.device == "cuda":
                job["dump_dir"] = str(log_dir)
            timeout = min(args.mode_timeout_s, remaining)
            print(f"[{preset}] {text}: running (timeout {timeout:.0f} s)", flush=True)
            # One inductor cache per option set: torch's compiled-graph cache is keyed on the traced
            # graph, not on settings like the SDPA backend, so a variant could reuse another's kernels.
            cache = work / ("inductor_" + (re.sub(r"[^A-Za-z0-9]+", "-", json.dumps(opts, sort_keys=True)).strip("-")
                                           or "default"))
            res = run_worker(WORKERS[mode], job, work, name, timeout, args.device, log_dir=log_dir,
                             extra_env={"TORCHINDUCTOR_CACHE_DIR": str(cache), **mode_env(opts)})
            res["mode"] = text
            record["results"].append(res)
            if res.get("status") == "ok":
                print(f"[{preset}] {text}: {res['tokens_per_s']:,.0f} tok/s, step "
                      f"{res['step_time']['median_s'] * 1e3:.1f} ms, first step {res['first_step_s']:.1f} s, "
                      f"wall {res['wall_s']:.0f} s", flush=True)
            else:
                print(f"[{preset}] {text}: {res.get('status')}: {res.get('error')}", flush=True)
        report.add_derived(record)
        record["targets"] = report.check_targets(record, [] if args.smoke else TARGETS.get(preset, []))
        report.write_preset_files(record, args.out_dir)
    shutil.rmtree(weights_dir, ignore_errors=True)


def render(paths: list[str], args) -> None:
    records = [json.loads(Path(p).read_text()) for p in paths]
    out_dir = Path(args.out_dir)
    for rec in records:
        w = rec["workload"]
        if "flops_per_token_causal" not in w and "model" in (rec.get("config") or {}):
            # results written before the causal column: the same spec, counted the other way
            w["flops_per_token_causal"] = ModelSpec.from_dict(rec["config"]["model"]).flops_per_token(
                w["seq_len"], causal=True)
        report.add_derived(rec)
        rec["targets"] = report.check_targets(rec, TARGETS.get(rec["preset"], []))
        report.write_preset_files(rec, out_dir)
    report.write_latest(records, out_dir)
    if args.update_readme:
        rel = os.path.relpath(out_dir, ROOT)
        ok = report.update_readme(ROOT / "README.md", records, rel)
        print("README updated" if ok else "README has no bench markers; not updated")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=None, help=f"config stems (default {' '.join(PRESETS)})")
    p.add_argument("--modes", nargs="+", default=None, help=f"modes (default {' '.join(MODES)})")
    p.add_argument("--extra-modes", nargs="*", default=[],
                   help="PRESET:MODE[opts] ablations run after every preset's main modes, e.g. "
                        "'gpt2_124m:jax-jit[attention=xla]'")
    p.add_argument("--device", choices=["cuda", "cpu", "auto"], default="auto")
    p.add_argument("--warmup", type=int, default=3, help="steps after the first (compile) step, untimed")
    p.add_argument("--steps", type=int, default=10, help="steps per timed window")
    p.add_argument("--repeats", type=int, default=5, help="timed windows")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (default: the preset's)")
    p.add_argument("--seq-len", type=int, default=None, help="default: the preset's data.seq_len")
    p.add_argument("--num-batches", type=int, default=4, help="distinct token batches cycled through")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile-steps", type=int, default=2, help="steps profiled per mode after timing (GPU)")
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--log-dir", default=None, help="keep worker logs here (default: the temp work dir)")
    p.add_argument("--budget-s", type=float, default=3600.0, help="wall-clock bound of the whole run")
    p.add_argument("--mode-timeout-s", type=float, default=900.0)
    p.add_argument("--min-mode-s", type=float, default=20.0, help="don't start a mode with less budget left")
    p.add_argument("--no-jax-peak", action="store_true")
    p.add_argument("--check-attention", nargs="*", default=["gpt2_124m", "moe"], metavar="PRESET",
                   help="presets whose jax-jit run first compares cuDNN and einsum attention (GPU)")
    p.add_argument("--smoke", action="store_true",
                   help="CPU harness check: tiny preset, torch-eager and jax-jit, 1 window of 1 step")
    p.add_argument("--render", nargs="+", default=None, metavar="JSON",
                   help="only re-render MD/PNG/LATEST.md from result JSON files")
    p.add_argument("--update-readme", action="store_true", help="with --render: refresh the README block")
    p.add_argument("--date", default=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"))
    args = p.parse_args(argv)

    if args.render:
        render(args.render, args)
        return 0
    if args.smoke:
        args.device = "cpu" if args.device == "auto" else args.device
        args.presets = args.presets or ["tiny"]
        args.modes = args.modes or ["torch-eager", "jax-jit"]
        args.warmup, args.steps, args.repeats, args.num_batches = 1, 1, 2, 2
        args.profile_steps, args.no_jax_peak = 0, True
    if args.device == "auto":
        args.device = "cuda" if shutil.which("nvidia-smi") else "cpu"
    presets = args.presets or PRESETS
    modes = args.modes or MODES
    extra: list[tuple[str, list[str]]] = []  # consecutive items of one preset share its weights
    for item in args.extra_modes:
        preset, _, mode = item.partition(":")
        parse_mode(mode)
        if extra and extra[-1][0] == preset:
            extra[-1][1].append(mode)
        else:
            extra.append((preset, [mode]))
    for m in modes:
        parse_mode(m)
    start = time.time()
    deadline = start + args.budget_s
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_dir = Path(args.log_dir) if args.log_dir else None
    if log_dir:
        log_dir.mkdir(parents=True, exist_ok=True)

    env = collect_env()
    if args.device == "cpu":
        env.update(card=None, card_slug="cpu", card_peak_bf16_tflops=None)
    print(f"card: {env.get('card')}  driver: {env.get('driver')}  torch {env.get('torch')} "
          f"(CUDA {env.get('torch_cuda')})  jax {env.get('jax')}  flax {env.get('flax')}", flush=True)
    records = []
    with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
        work = Path(tmp)
        peaks = measure_peaks(args, work, log_dir)
        tp = peaks["torch"]
        print(f"measured matmul: {tp.get('matmul_tflops_median', float('nan')):.1f} TFLOP/s (torch), "
              f"{peaks.get('jax', {}).get('matmul_tflops_median', float('nan')):.1f} (jax); copy "
              f"{tp.get('copy_tb_per_s_median') or float('nan'):.2f} TB/s", flush=True)
        for preset in presets:
            records.append(new_record(preset, args, env, peaks))
            run_modes(records[-1], modes, args, work, deadline, log_dir)
            report.write_latest(records, out_dir)
        # Ablations last, in the order given: the main table is complete before any of them can
        # eat the budget.
        by_preset = {rec["preset"]: rec for rec in records}
        for preset, group in extra:
            if preset not in by_preset:
                by_preset[preset] = new_record(preset, args, env, peaks)
                records.append(by_preset[preset])
            run_modes(by_preset[preset], group, args, work, deadline, log_dir)
            report.write_latest(records, out_dir)
    report.write_latest(records, out_dir)
    print(f"\nwritten to {out_dir} in {time.time() - start:.0f} s\n", flush=True)
    for rec in records:
        print(report.render_markdown(rec, level=3))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
