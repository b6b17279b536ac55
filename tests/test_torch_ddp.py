"""The torch backend's DDP bucket-size rule (``distributed.bucket_mb``; null = auto)."""

import pytest
import torch

from backends.torch.ddp import bucket_cap_mb
from llm.config import load_config


def _params(*numels: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    return [torch.empty(n, dtype=dtype, device="meta") for n in numels]  # sizes only, no memory


def test_auto_aims_at_ten_buckets_and_keeps_ddps_floor():
    auto = load_config(None, [], env={}).distributed.bucket_mb
    assert auto is None
    big = _params(1_000_000_000, 104_000_000)  # 4_416_000_000 bytes of float32 gradients
    assert bucket_cap_mb(auto, big) == pytest.approx(4_416_000_000 / 10 / 2**20)  # ~10 buckets
    half = _params(1_000_000_000, 104_000_000, dtype=torch.bfloat16)  # a gradient has its parameter's dtype
    assert bucket_cap_mb(auto, half) == pytest.approx(2_208_000_000 / 10 / 2**20)
    assert bucket_cap_mb(auto, _params(25 * 2**20)) == 25.0  # 100 MB: never under DDP's own 25 MB


def test_an_explicit_size_is_used_as_given():
    explicit = load_config(None, ["distributed.bucket_mb=400"], env={}).distributed.bucket_mb
    assert bucket_cap_mb(explicit, _params(1)) == 400.0
    assert bucket_cap_mb(2.5, _params(10**9)) == 2.5
