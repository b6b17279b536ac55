"""DDP's gradient bucket size: the rule behind ``distributed.bucket_mb`` (null = auto).

With ``torch.compile`` each DDP bucket is also a graph split (dynamo's DDPOptimizer), so DDP's own
25 MB default cuts a 1B model's backward into ~180 compiled graphs. Auto aims at about
``AUTO_BUCKETS`` buckets and never goes under those 25 MB (benchmarks/NOTES.md has the
measurements). The engine and the benchmark worker both size their ``DistributedDataParallel``
with it. This module never imports jax or flax.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["AUTO_BUCKETS", "DDP_DEFAULT_BUCKET_MB", "bucket_cap_mb"]

AUTO_BUCKETS = 10
DDP_DEFAULT_BUCKET_MB = 25.0  # torch's own bucket_cap_mb, the floor of the auto size


def bucket_cap_mb(bucket_mb: float | None, params: Iterable[torch.Tensor]) -> float:
    """DDP's ``bucket_cap_mb`` for gradients of ``params``: ``bucket_mb`` when set, else about
    ``AUTO_BUCKETS`` buckets of their bytes (a gradient has its parameter's dtype), at least 25 MB."""
    if bucket_mb is not None:
        return float(bucket_mb)
    grad_bytes = sum(p.numel() * p.element_size() for p in params)
    return max(DDP_DEFAULT_BUCKET_MB, grad_bytes / AUTO_BUCKETS / 2**20)
