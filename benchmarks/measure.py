"""Backend-agnostic measuring: the timed-window loop, its statistics, and kernel-profile summaries.

Both workers (``torch_worker.py``, ``jax_worker.py``) hand ``time_steps`` a ``step`` callable (one
full training step, enqueued asynchronously) and a ``sync`` callable (``torch.cuda.synchronize`` /
``jax.block_until_ready`` on the newest state), so the two frameworks are timed by the same code.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable, Iterable

__all__ = ["time_steps", "step_stats", "categorise_kernel", "summarise_kernels"]


def time_steps(step: Callable[[], object], sync: Callable[[], object], *, warmup: int, steps: int,
               repeats: int) -> dict:
    """Time ``repeats`` windows of ``steps`` steps after ``warmup`` steps (the first one is timed alone).

    Each window is bracketed by ``sync()`` so the host clock sees finished device work; inside a
    window nothing waits on the device. Returns ``first_step_s`` (compile and autotune included) and
    ``step_times_s`` (one mean step time per window).
    """
    sync()
    t0 = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        step()
    sync()
    windows = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        windows.append((time.perf_counter() - t) / steps)
    return {"first_step_s": first, "step_times_s": windows}


def step_stats(step_times: list[float]) -> dict:
    """Median, min, max and relative spread ((max - min) / median) of per-window step times."""
    med = statistics.median(step_times)
    return {"median_s": med, "min_s": min(step_times), "max_s": max(step_times),
            "spread": (max(step_times) - min(step_times)) / med if med > 0 else 0.0,
            "windows": len(step_times)}


_CATEGORIES = [  # first match wins; names of cuBLAS/CUTLASS/cuDNN/Triton/XLA kernels on Hopper
    ("attention", r"flash|fmha|attention|sdpa|cudnn_generated|cudnn.*(mha|sdpa)"),
    ("communication", r"nccl|all_?reduce|allgather|reduce_?scatter"),
    ("matmul", r"gemm|cutlass|xmma|nvjet|cublas|wgmma|hmma|sm90_|matmul|_mm_|triton_tem_fused_mm|mm_kernel"),
    ("optimizer", r"adam|foreach|multi_tensor"),
    ("copy/memset", r"memcpy|memset|copy_kernel|CatArrayBatched"),
]


def categorise_kernel(name: str) -> str:
    """A coarse class of a GPU kernel by its name: matmul, attention, communication, optimizer, ..."""
    low = name.lower()
    for category, pattern in _CATEGORIES:
        if re.search(pattern, low):
            return category
    return "elementwise/reduction/other"


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def summarise_kernels(events: Iterable[tuple[str, float, float]], *, steps: int, top: int = 15) -> dict:
    """Per-step GPU time by kernel and by category, and how busy the GPU was.

    ``events`` are (kernel name, start, end) in microseconds over ``steps`` profiled steps.
    ``busy_fraction`` is the union of kernel intervals over the span from the first kernel's start
    to the last one's end: under 1 means the GPU waited (host overhead, launch gaps, syncs).
    """
    events = [(n, float(s), float(e)) for n, s, e in events if e > s]
    if not events:
        return {"kernels": 0}
    by_name: dict[str, float] = {}
    by_cat: dict[str, float] = {}
    for name, s, e in events:
        by_name[name] = by_name.get(name, 0.0) + (e - s)
        cat = categorise_kernel(name)
        by_cat[cat] = by_cat.get(cat, 0.0) + (e - s)
    span = max(e for _, _, e in events) - min(s for _, s, _ in events)
    busy = _union_length([(s, e) for _, s, e in events])
    kernel_sum = sum(by_name.values())
    ms = 1e-3 / steps
    return {
        "profiled_steps": steps,
        "kernels": len(events),
        "span_ms_per_step": span * ms,
        "busy_ms_per_step": busy * ms,
        "busy_fraction": busy / span if span > 0 else 0.0,
        "kernel_ms_per_step": kernel_sum * ms,
        "by_category_ms_per_step": {k: v * ms for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        "top_kernels_ms_per_step": [
            {"name": n[:160], "category": categorise_kernel(n), "ms": v * ms}
            for n, v in sorted(by_name.items(), key=lambda kv: -kv[1])[:top]
        ],
    }
