"""Which fused attention kernels run the presets' attention shapes, how fast, and do they agree.

For each shape (GPT-2: 12 heads; Llama-1B: 32 query heads on 8 kv heads; MoE preset: 12 on 4),
causal, bf16, forward + backward:
``--framework torch``: every SDPA backend (flash, cuDNN, efficient, math) with ``enable_gqa``;
``--framework jax``: ``jax.nn.dot_product_attention`` with ``implementation="cudnn"`` and ``"xla"``.
Each prints one JSON line per (shape, kernel): ok or the error, median ms of fwd+bwd, and the
output's relative error against the float32 math reference.

Run: ``python -m benchmarks.attention_check --framework torch|jax [--out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

SHAPES = {  # name: (B, T, H, KV, hd)
    "gpt2_124m": (32, 1024, 12, 12, 64),
    "llama_1b": (8, 2048, 32, 8, 64),
    "moe": (16, 1024, 12, 4, 64),
}


def _attn_flops(B, T, H, hd) -> float:
    """fwd + bwd FLOPs of causal attention as the spec counts them (no causal discount): 12 B T^2 H hd."""
    return 12.0 * B * T * T * H * hd


def torch_check() -> list[dict]:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = []
    for name, (B, T, H, KV, hd) in SHAPES.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(B, H, T, hd, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(B, KV, T, hd, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn(B, KV, T, hd, device="cuda", dtype=torch.bfloat16, generator=g)
        dy = torch.randn(B, H, T, hd, device="cuda", dtype=torch.bfloat16, generator=g)
        ref = None
        if B * H * T * T * 4 < 24e9:  # the float32 reference on one sequence keeps memory small
            rep = H // KV
            q1, k1, v1 = q[:1].float(), k[:1].float().repeat_interleave(rep, 1), v[:1].float().repeat_interleave(rep, 1)
            with sdpa_kernel([SDPBackend.MATH]):
                ref = F.scaled_dot_product_attention(q1, k1, v1, is_causal=True)
        for backend in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH"):
            entry = {"framework": "torch", "shape": name, "kernel": backend}
            try:
                qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
                with sdpa_kernel([getattr(SDPBackend, backend)]):
                    def run(qq=qq, kk=kk, vv=vv, dy=dy, gqa=KV != H):
                        y = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=gqa)
                        y.backward(dy)
                        return y
                    y = run()
                    torch.cuda.synchronize()
                    times = []
                    for _ in range(5 if backend != "MATH" else 2):
                        qq.grad = kk.grad = vv.grad = None
                        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        s.record()
                        run()
                        e.record()
                        e.synchronize()
                        times.append(s.elapsed_time(e))
                ms = statistics.median(times)
                entry.update(status="ok", ms_fwd_bwd=ms, tflops_spec_count=_attn_flops(B, T, H, hd) / ms / 1e9)
                if ref is not None:
                    entry["rel_err_vs_fp32"] = float((y[:1].float() - ref).norm() / ref.norm())
            except Exception as e:  # noqa: BLE001 - unsupported kernels are the finding
                entry.update(status="failed", error=f"{type(e).__name__}: {str(e)[:300]}")
            torch.cuda.empty_cache()
            out.append(entry)
    return out


def jax_check() -> list[dict]:
    import jax
    import jax.numpy as jnp

    out = []
    for name, (B, T, H, KV, hd) in SHAPES.items():
        ks = jax.random.split(jax.random.key(0), 4)
        q = jax.random.normal(ks[0], (B, T, H, hd), jnp.bfloat16)
        k = jax.random.normal(ks[1], (B, T, KV, hd), jnp.bfloat16)
        v = jax.random.normal(ks[2], (B, T, KV, hd), jnp.bfloat16)
        dy = jax.random.normal(ks[3], (B, T, H, hd), jnp.bfloat16)
        ref = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
            q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), is_causal=True,
            implementation="xla"))(q[:1], k[:1], v[:1])
        for impl in ("cudnn", "xla"):
            entry = {"framework": "jax", "shape": name, "kernel": impl}
            try:
                def f(q, k, v, dy, impl=impl):
                    y, vjp = jax.vjp(lambda q, k, v: jax.nn.dot_product_attention(
                        q, k, v, is_causal=True, implementation=impl), q, k, v)
                    return y, vjp(dy)
                fj = jax.jit(f)
                y, _ = jax.block_until_ready(fj(q, k, v, dy))
                times = []
                for _ in range(5):
                    t = time.perf_counter()
                    jax.block_until_ready(fj(q, k, v, dy))
                    times.append((time.perf_counter() - t) * 1e3)
                ms = statistics.median(times)
                entry.update(status="ok", ms_fwd_bwd=ms, tflops_spec_count=_attn_flops(B, T, H, hd) / ms / 1e9,
                             rel_err_vs_fp32=float(jnp.linalg.norm(y[:1].astype(jnp.float32) - ref)
                                                   / jnp.linalg.norm(ref)))
            except Exception as e:  # noqa: BLE001
                entry.update(status="failed", error=f"{type(e).__name__}: {str(e)[:300]}")
            out.append(entry)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--framework", choices=["torch", "jax"], required=True)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = torch_check() if args.framework == "torch" else jax_check()
    text = "\n".join(json.dumps(r) for r in rows)
    print(text, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
