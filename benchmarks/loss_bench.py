"""Memory and speed of the LM loss head: plain (the (N, V) logits) against chunked (``backends/*/loss.py``).

One fwd+bwd of ``mean CE(hidden @ W.T)`` per call: hidden (N, D) in bf16 with a gradient, the head
weight W (V, D) float32 cast to bf16 inside (as in a mixed-precision training step), targets (N,).
Plain is what the model's loss-only path does (torch: ``F.linear`` + ``F.cross_entropy`` of the
upcast logits, eager and ``torch.compile``d; JAX: ``lean_cross_entropy``); chunked is
``chunked_cross_entropy`` at each ``--chunks`` size. Reported per case: median ms of ``--reps``
timed calls after warm-up, peak GPU bytes above the inputs (torch: ``max_memory_allocated``; JAX:
the compiled program's temp bytes, ``memory_analysis``), and the loss's relative difference from
plain. One JSON object per line on stdout (and to ``--out``).

Shapes (``--shapes``): ``gpt2`` (V 50304, D 768), ``llama_3b`` (V 128256, D 3072), ``llama3_8b``
(V 128256, D 4096), each at ``--tokens``.

Run on a GPU: ``python -m benchmarks.loss_bench --framework torch`` (or ``jax``).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

SHAPES = {"gpt2": (50304, 768), "llama_3b": (128256, 3072), "llama3_8b": (128256, 4096)}


def _torch_cases(shapes, tokens, chunks, reps, compile_too):
    import torch
    import torch.nn.functional as F

    from backends.torch.loss import chunked_cross_entropy

    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True

    def plain(h, w, t):
        return F.cross_entropy(F.linear(h, w).float(), t)

    for shape in shapes:
        V, D = SHAPES[shape]
        for N in tokens:
            g = torch.Generator(device=dev).manual_seed(0)
            w = (torch.randn(V, D, device=dev, generator=g) * 0.02).requires_grad_()
            h = torch.randn(N, D, device=dev, generator=g, dtype=torch.bfloat16).requires_grad_()
            t = torch.randint(0, V, (N,), device=dev, generator=g)
            ref = None
            variants = [("plain", 0, plain)]
            if compile_too:
                variants.append(("plain_compiled", 0, torch.compile(plain)))
            for c in chunks:
                if c < N:
                    chunked = functools.partial(_torch_chunked, chunked_cross_entropy, chunk=c)
                    variants.append(("chunked", c, chunked))
                    if compile_too and N // c <= 8:  # the chunk loop unrolls: compile the short ones
                        variants.append(("chunked_compiled", c, torch.compile(chunked, fullgraph=True)))
            for name, c, fn in variants:
                try:
                    row = _torch_time(torch, fn, h, w, t, reps)
                except torch.OutOfMemoryError:
                    row = {"oom": True}
                    torch.cuda.empty_cache()
                if "loss" in row:
                    ref = row["loss"] if name == "plain" else ref
                    row["loss_rel_diff"] = abs(row["loss"] - ref) / abs(ref) if ref else None
                yield {"framework": "torch", "shape": shape, "V": V, "D": D, "N": N, "impl": name,
                       "chunk": c, **row}
            del w, h, t
            torch.cuda.empty_cache()


def _torch_chunked(loss_fn, h, w, t, *, chunk):
    return loss_fn(h, w, None, t, chunk)


def _torch_time(torch, fn, h, w, t, reps):
    torch._dynamo.reset()  # each compiled variant compiles afresh (no recompile limit across cases)
    def step():
        w.grad = h.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn(h, w, t)
        loss.backward()
        return loss

    for _ in range(3):
        loss = step()
    torch.cuda.synchronize()
    w.grad = h.grad = None
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss = step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    peak = torch.cuda.max_memory_allocated() - base
    return {"ms": statistics.median(times), "peak_gib": peak / 2**30, "loss": float(loss)}


def _jax_cases(shapes, tokens, chunks, reps):
    import jax
    import jax.numpy as jnp

    from backends.flax.loss import chunked_cross_entropy
    from backends.flax.model import lean_cross_entropy

    def plain(h, w, t):
        logits = jnp.einsum("nd,vd->nv", h, w.astype(h.dtype))
        return lean_cross_entropy(logits, t)

    for shape in shapes:
        V, D = SHAPES[shape]
        for N in tokens:
            kw, kh, kt = jax.random.split(jax.random.key(0), 3)
            w = jax.random.normal(kw, (V, D), jnp.float32) * 0.02
            h = jax.random.normal(kh, (N, D), jnp.bfloat16)
            t = jax.random.randint(kt, (N,), 0, V)
            ref = None
            variants = [("plain", 0, plain)]
            variants += [("chunked", c, lambda h, w, t, c=c: chunked_cross_entropy(h, w, None, t, c, weight_layout="VD"))
                         for c in chunks if c < N]
            for name, c, fn in variants:
                step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
                try:
                    compiled = step.lower(h, w, t).compile()
                    temp = compiled.memory_analysis().temp_size_in_bytes
                    for _ in range(3):
                        jax.block_until_ready(compiled(h, w, t))
                    times = []
                    for _ in range(reps):
                        t0 = time.perf_counter()
                        loss, grads = jax.block_until_ready(compiled(h, w, t))
                        times.append((time.perf_counter() - t0) * 1e3)
                    row = {"ms": statistics.median(times), "peak_gib": temp / 2**30, "loss": float(loss)}
                except Exception as e:  # XLA's out-of-memory is a plain runtime error
                    if "RESOURCE_EXHAUSTED" not in str(e):
                        raise
                    row = {"oom": True}
                if "loss" in row:
                    ref = row["loss"] if name == "plain" else ref
                    row["loss_rel_diff"] = abs(row["loss"] - ref) / abs(ref) if ref else None
                yield {"framework": "jax", "shape": shape, "V": V, "D": D, "N": N, "impl": name, "chunk": c, **row}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--framework", choices=("torch", "jax"), required=True)
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=sorted(SHAPES))
    p.add_argument("--tokens", nargs="+", type=int, default=[8192, 16384, 32768])
    p.add_argument("--chunks", nargs="+", type=int, default=[1024, 2048, 4096, 8192])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--no-compile", action="store_true", help="torch: skip the torch.compile'd plain loss")
    p.add_argument("--out", help="also append the rows to this JSON-lines file")
    args = p.parse_args(argv)
    if args.framework == "torch":
        rows = _torch_cases(args.shapes, args.tokens, args.chunks, args.reps, not args.no_compile)
    else:
        rows = _jax_cases(args.shapes, args.tokens, args.chunks, args.reps)
    for row in rows:
        line = json.dumps(row)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
