"""What masks cost: forward + backward of the model with no mask, a padding mask and packed segments.

The plain causal path runs the fused kernels (torch SDPA ``is_causal=True``; JAX cuDNN attention
through ``attention_impl="auto"``); an ``attention_mask`` or ``segment_ids`` builds an explicit
(B, 1, T, S) mask, which torch SDPA takes as ``attn_mask`` and the JAX path as a bias. This times the
three cases, bf16, on the presets' shapes cut to ``--layers`` blocks (the attention cost per layer is
what differs), and prints one JSON line per (framework, preset, case): median ms per fwd+bwd step and
the ratio to the no-mask step of the same run.

Run: ``python -m benchmarks.mask_cost --framework torch|jax [--presets gpt2_124m llama_1b] [--out F]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from llm.config import load_config

CASES = ("none", "padding", "segments")


def _batch(vocab: int, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Token ids and targets, a right-padding mask (a quarter of each row padded) and 4 packed
    documents per row."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(batch, seq), dtype=np.int64)
    targets = rng.integers(0, vocab, size=(batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    mask[:, seq - seq // 4:] = 0
    padded_targets = np.where(mask == 1, targets, -100)
    segments = np.repeat(np.arange(4), seq // 4)[None].repeat(batch, 0).astype(np.int64)
    return {"ids": ids, "targets": targets, "mask": mask, "padded_targets": padded_targets,
            "segments": segments}


def _spec(preset: str, layers: int):
    cfg = load_config(f"configs/{preset}.yaml")
    return cfg, cfg.model.replace(num_layers=layers, dropout=0.0)


def _time(step, warmup: int, steps: int, sync) -> float:
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def torch_run(preset: str, layers: int, batch: int | None, warmup: int, steps: int) -> list[dict]:
    import torch

    from backends.torch import from_spec

    cfg, spec = _spec(preset, layers)
    B, T = batch or cfg.training.batch_size, cfg.data.seq_len
    data = {k: torch.as_tensor(v, device="cuda") for k, v in _batch(spec.vocab_size, B, T).items()}
    model = from_spec(spec).cuda()
    kwargs = {"none": {"targets": data["targets"]},
              "padding": {"targets": data["padded_targets"], "attention_mask": data["mask"]},
              "segments": {"targets": data["targets"], "segment_ids": data["segments"]}}
    out = []
    for case in CASES:
        def step(kw=kwargs[case]):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(data["ids"], return_logits=False, **kw).loss
            loss.backward()
        ms = _time(step, warmup, steps, torch.cuda.synchronize)
        out.append({"framework": "torch", "preset": preset, "case": case, "layers": layers,
                    "batch": B, "seq": T, "ms": round(ms, 3)})
    return out


def jax_run(preset: str, layers: int, batch: int | None, warmup: int, steps: int) -> list[dict]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from backends.flax import from_spec

    cfg, spec = _spec(preset, layers)
    B, T = batch or cfg.training.batch_size, cfg.data.seq_len
    data = {k: jnp.asarray(v, dtype=jnp.int32) for k, v in _batch(spec.vocab_size, B, T).items()}
    model = from_spec(spec, dtype=jnp.bfloat16)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    kwargs = {"none": {"targets": data["targets"]},
              "padding": {"targets": data["padded_targets"], "attention_mask": data["mask"]},
              "segments": {"targets": data["targets"], "segment_ids": data["segments"]}}
    out = []
    for case in CASES:
        @jax.jit
        def grads(p, kw=kwargs[case]):
            def loss(p):
                return nnx.merge(graphdef, p, rest)(data["ids"], return_logits=False, **kw).loss
            return jax.grad(loss)(p)

        holder: list = []

        def step(fn=grads, holder=holder):
            holder[:] = [fn(params)]

        ms = _time(step, warmup, steps, lambda holder=holder: jax.block_until_ready(holder))
        out.append({"framework": "jax", "preset": preset, "case": case, "layers": layers,
                    "batch": B, "seq": T, "ms": round(ms, 3)})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--framework", choices=["torch", "jax"], required=True)
    p.add_argument("--presets", nargs="+", default=["gpt2_124m", "llama_1b"])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    run = torch_run if args.framework == "torch" else jax_run
    rows = []
    for preset in args.presets:
        got = run(preset, args.layers, args.batch_size, args.warmup, args.steps)
        base = next(r["ms"] for r in got if r["case"] == "none")
        for r in got:
            r["vs_none"] = round(r["ms"] / base, 3)
        rows += got
    for r in rows:
        print(json.dumps(r))
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
