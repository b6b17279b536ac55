"""The two ceilings, measured on the card in the same run: bf16 matmul rate and copy bandwidth.

``framework`` ``torch``: ``n x n @ n x n`` bf16 products on random normal data (never zeros), timed
one by one with CUDA events after a warm-up, median of ``reps`` (``2 n^3`` FLOPs each); a
device-to-device copy of ``copy_bytes`` (bytes read + written over time). ``framework`` ``jax``: the
same product through XLA, timed with ``block_until_ready`` over ``reps`` back-to-back products.

Run: ``python -m benchmarks.peak_worker --job job.json --out result.json``.
"""

from __future__ import annotations

import statistics
import time

from benchmarks.job import run_worker


def _torch(job: dict) -> dict:
    import torch

    n, reps = job["n"], job["reps"]
    cuda = job["device"] == "cuda"
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32  # CPU (smoke): the dtype CPUs are fast at
    g = torch.Generator(device=dev).manual_seed(0)
    sets = [(torch.randn(n, n, device=dev, dtype=dtype, generator=g),
             torch.randn(n, n, device=dev, dtype=dtype, generator=g)) for _ in range(2)]
    out = torch.empty(n, n, device=dev, dtype=dtype)
    for a, b in sets * 2:
        torch.matmul(a, b, out=out)
    times = []
    for i in range(reps):
        a, b = sets[i % 2]
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.matmul(a, b, out=out)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            torch.matmul(a, b, out=out)
            times.append(time.perf_counter() - t)
    assert torch.isfinite(out).all() and out.abs().sum() > 0
    tflops = [2 * n**3 / s / 1e12 for s in times]
    result = {"framework": "torch", "n": n, "reps": reps, "dtype": str(dtype).removeprefix("torch."), "matmul_tflops_median": statistics.median(tflops),
              "matmul_tflops_max": max(tflops), "matmul_tflops_min": min(tflops)}
    if cuda:
        nbytes = job.get("copy_bytes", 4 << 30)
        src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=dev).normal_()
        dst = torch.empty_like(src)
        dst.copy_(src)
        ctimes = []
        for _ in range(10):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            ctimes.append(start.elapsed_time(end) / 1e3)
        result["copy_bytes"] = nbytes
        result["copy_tb_per_s_median"] = 2 * nbytes / statistics.median(ctimes) / 1e12
        result["device_name"] = torch.cuda.get_device_name()
    return result


def _jax(job: dict) -> dict:
    import jax
    import jax.numpy as jnp

    n, reps = job["n"], job["reps"]
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    mm = jax.jit(lambda a, b: a @ b)
    mm(a, b).block_until_ready()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(reps):
            c = mm(a, b)
        c.block_until_ready()
        times.append((time.perf_counter() - t) / reps)
    tflops = [2 * n**3 / s / 1e12 for s in times]
    return {"framework": "jax", "n": n, "reps": reps, "matmul_tflops_median": statistics.median(tflops),
            "matmul_tflops_max": max(tflops), "backend": jax.default_backend()}


def run(job: dict) -> dict:
    return _torch(job) if job["framework"] == "torch" else _jax(job)


if __name__ == "__main__":
    raise SystemExit(run_worker(run))
