"""What the benchmark ran on: card name and peak, driver, library versions.

Nothing here imports torch or jax at module level: the orchestrator stays framework-free so that
each measured mode owns the GPU alone in its own subprocess.
"""

from __future__ import annotations

import importlib.metadata
import platform
import re
import shutil
import subprocess
import sys

__all__ = ["DENSE_BF16_TFLOPS", "card_peak_tflops", "card_slug", "nvidia_smi", "collect_env"]

# Vendor datasheet dense (no sparsity) bf16 tensor-core peaks, TFLOP/s. Matched in order.
DENSE_BF16_TFLOPS: list[tuple[str, float]] = [
    (r"H100.*(PCIe)", 756.0),
    (r"H100.*NVL", 835.0),
    (r"H100", 989.4),  # SXM5, "NVIDIA H100 80GB HBM3"
    (r"H200", 989.4),
    (r"H800", 989.4),
    (r"A100", 312.0),
    (r"L40S", 362.05),
]


def card_peak_tflops(name: str | None) -> float | None:
    """The datasheet dense bf16 peak of a card by its ``nvidia-smi`` name; None when unknown (CPU)."""
    if not name:
        return None
    for pattern, peak in DENSE_BF16_TFLOPS:
        if re.search(pattern, name):
            return peak
    return None


def card_slug(name: str | None) -> str:
    """File-name form of a card name: 'NVIDIA H100 80GB HBM3' -> 'H100-80GB-HBM3'; no card -> 'cpu'."""
    if not name:
        return "cpu"
    name = re.sub(r"^NVIDIA\s+", "", name.strip())
    return re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-")


def nvidia_smi() -> list[dict[str, str]]:
    """One dict per GPU (name, driver, memory, clocks as nvidia-smi reads them); [] without GPUs."""
    if shutil.which("nvidia-smi") is None:
        return []
    fields = ["index", "name", "driver_version", "memory.total", "clocks.max.sm", "power.limit",
              "pci.bus_id"]
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    return [dict(zip(fields, (c.strip() for c in line.split(",")), strict=False))
            for line in out.strip().splitlines() if line.strip()]


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


_PROBE = r"""
import json
out = {}
try:
    import torch
    out["torch_cuda"] = torch.version.cuda
    out["cudnn_torch"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    out["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None
except Exception as e:
    out["torch_error"] = repr(e)
print(json.dumps(out))
"""


def collect_env() -> dict:
    """Versions of the stack and the card(s); the probe that imports torch runs in a subprocess."""
    gpus = nvidia_smi()
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": _dist_version("torch"),
        "jax": _dist_version("jax"),
        "jaxlib": _dist_version("jaxlib"),
        "jax_cuda_plugin": _dist_version("jax-cuda13-plugin") or _dist_version("jax-cuda12-plugin"),
        "flax": _dist_version("flax"),
        "optax": _dist_version("optax"),
        "numpy": _dist_version("numpy"),
        "triton": _dist_version("triton"),
        "gpus": gpus,
        "card": gpus[0]["name"] if gpus else None,
        "driver": gpus[0]["driver_version"] if gpus else None,
        "gpu_count": len(gpus),
    }
    try:
        probe = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120)
        import json
        env.update(json.loads(probe.stdout.strip().splitlines()[-1]))
    except Exception as e:  # noqa: BLE001 - the versions are informative, never fatal
        env["probe_error"] = repr(e)
    env["card_peak_bf16_tflops"] = card_peak_tflops(env["card"])
    env["card_slug"] = card_slug(env["card"])
    return env
