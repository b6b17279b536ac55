"""One PyTorch mode of the throughput benchmark (``torch-eager`` / ``torch-compile``), in its own process.

The step is the engine's (``backends/torch/engine.py``), written lean: fp32 master weights, bf16
autocast, the loss-only forward (``return_logits=False``), ``backward``, ``clip_grad_norm_(1.0)``,
fused AdamW with the spec's no-decay set, ``zero_grad(set_to_none=True)``. Nothing in the step reads
a value back to the host. Under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in DDP
after compiling, as the engine does, and each rank trains ``job["batch_size"]`` sequences.

Options (``job["options"]``, each an ablation of one speed change):
``logits``: ``lossonly`` (default) | ``full`` (the float32 (B, T, V) logits are produced too);
``adamw``: ``fused`` (default on CUDA) | ``foreach``;
``sdpa``: ``cudnn`` (default on CUDA: measured fastest on H100, ``benchmarks/NOTES.md``) | ``flash`` |
``efficient`` | ``math`` | ``any`` (torch's own choice);
``moe``: ``auto`` (default: ``llm.moe_dispatch.resolve_moe_impl`` for the device and dtype, as the
engine picks; the result's options record the impl it resolved to) | ``dense`` (the reference, every
expert on every token) | ``blocked`` | ``grouped`` (``llm.moe_dispatch``: only the selected experts);
``remat``: the preset's ``training.activation_checkpointing`` (default, as the engine trains it) |
``none`` | ``full`` | ``selective``.

Data parallel options (under ``torchrun`` only): ``bucket_mb``: DDP's gradient bucket size in MB
(default ``auto``: the engine's rule,
``backends.torch.ddp.bucket_cap_mb``, about 10 buckets and at least DDP's own 25); ``ddp_split``: ``on`` (default: dynamo's DDPOptimizer splits the compiled
graph at bucket boundaries so each bucket's all-reduce overlaps the rest of the backward) | ``off``
(one graph: every all-reduce waits for the whole backward); ``static_graph``: ``0`` (default) |
``1``; ``comm_hook``: ``none`` (default: float32 all-reduce) | ``bf16`` (gradients cast to bf16 for
the all-reduce, half the bytes, and back); ``nccl_channels``: NCCL_MAX_NCHANNELS (unset: NCCL's
choice), fewer channels take fewer SMs from the overlapped backward.

Run: ``python -m benchmarks.torch_worker --job job.json --out result.json``.
"""

from __future__ import annotations

import contextlib
import os
import time

import numpy as np
import torch
import torch.distributed as dist

from backends.torch.ddp import bucket_cap_mb
from backends.torch.model import DecoderModel, set_moe_impl
from backends.torch.parallel import apply_activation_checkpointing
from benchmarks.job import load_weights, make_batches, preset_config, run_worker
from benchmarks.measure import step_stats, summarise_kernels, time_steps
from llm.config import ActivationCheckpointing
from llm.moe_dispatch import resolve_moe_impl

_SDPA = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
         "math": "MATH"}


def _sdpa_context(choice: str):
    if choice == "any":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, _SDPA[choice])])


def _profile(step, sync, steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    sync()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync()
    # Kernels only: record_function ranges (e.g. "Optimizer.step#AdamW.step") are mirrored on the GPU
    # timeline as user annotations and would count their kernels twice.
    events = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
              if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
              and "#" not in e.name]
    return summarise_kernels(events, steps=steps)


def run(job: dict) -> dict:
    opts = job.get("options", {})
    with _sdpa_context(opts.get("sdpa", "cudnn" if job["device"] == "cuda" else "any")):
        return _run(job)


def _run(job: dict) -> dict:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    on_cuda = job["device"] == "cuda"
    device = torch.device(f"cuda:{local_rank}" if on_cuda else "cpu")
    if on_cuda:
        torch.cuda.set_device(device)
    opts = {"logits": "lossonly", "adamw": "fused" if on_cuda else "foreach", "moe": "auto",
            "sdpa": "cudnn" if on_cuda else "any", **job.get("options", {})}
    if world > 1:
        opts = {"bucket_mb": "auto", "ddp_split": "on", "static_graph": "0", "comm_hook": "none", **opts}
        torch._dynamo.config.optimize_ddp = opts["ddp_split"] == "on"
        if "nccl_channels" in opts:  # read by NCCL when the communicator is created
            os.environ["NCCL_MAX_NCHANNELS"] = opts["nccl_channels"]
        dist.init_process_group("nccl" if on_cuda else "gloo")
    compiled = job["mode"] == "torch-compile"
    config = preset_config(job)
    spec, t = config.model, config.training
    B, T = job["batch_size"], job["seq_len"]
    amp = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(job["dtype"])
    torch.backends.cuda.matmul.allow_tf32 = True  # float32 leftovers (none in bf16 mode) on tensor cores
    torch.backends.cudnn.allow_tf32 = True

    t_setup = time.perf_counter()
    with torch.device(device):
        model = DecoderModel(spec)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in load_weights(job["weights_dir"]).items()})
    model.to(device).train()
    opts["moe"] = resolve_moe_impl(opts["moe"], "torch", device.type, job["dtype"])
    set_moe_impl(model, opts["moe"])
    opts.setdefault("remat", t.activation_checkpointing.value)
    apply_activation_checkpointing(model, ActivationCheckpointing(opts["remat"]))
    no_decay = spec.no_decay_names()
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if n not in no_decay], "weight_decay": t.weight_decay},
              {"params": [p for n, p in named if n in no_decay], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps,
                            fused=opts["adamw"] == "fused", foreach=opts["adamw"] == "foreach" or None)
    params = [p for _, p in named]
    fwd = torch.compile(model) if compiled else model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        bucket_mb = bucket_cap_mb(None if opts["bucket_mb"] == "auto" else float(opts["bucket_mb"]), params)
        opts["bucket_mb_used"] = f"{bucket_mb:.1f}"
        fwd = DistributedDataParallel(fwd, device_ids=[local_rank] if on_cuda else None,
                                      gradient_as_bucket_view=True, bucket_cap_mb=bucket_mb,
                                      static_graph=opts["static_graph"] == "1")
        if opts["comm_hook"] == "bf16":
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            fwd.register_comm_hook(None, default_hooks.bf16_compress_hook)
        elif opts["comm_hook"] != "none":
            raise ValueError(f"comm_hook={opts['comm_hook']!r} is not one of: none, bf16")

    tokens = torch.from_numpy(make_batches(spec.vocab_size, B, T, job["num_batches"],
                                           job["seed"] + rank).astype(np.int64)).to(device)
    inputs, targets = tokens[..., :-1].contiguous(), tokens[..., 1:].contiguous()  # (n, B, T)
    return_logits = opts["logits"] == "full"
    state = {"i": 0, "loss": None}

    def step() -> None:
        i = state["i"] % inputs.shape[0]
        state["i"] += 1
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out = fwd(inputs[i], targets[i], return_logits=return_logits)
            objective = out.loss + out.aux_loss + out.z_loss
        objective.backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["loss"] = objective.detach()

    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    setup_s = time.perf_counter() - t_setup
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    # The very first loss, before any update: equal across modes (same weights, same batch 0).
    timing = time_steps(step, sync, warmup=0, steps=0, repeats=0)
    loss0 = float(state["loss"])
    more = time_steps(step, sync, warmup=job["warmup"], steps=job["steps"], repeats=job["repeats"])
    timing["step_times_s"] = more["step_times_s"]
    loss_last = float(state["loss"])
    stats = step_stats(timing["step_times_s"])
    result = {
        "mode": job["mode"], "options": opts, "world_size": world, "device": str(device),
        "batch_per_process": B, "seq_len": T, "global_batch": B * world,
        "tokens_per_step": B * T * world,
        "setup_s": setup_s, "first_step_s": timing["first_step_s"],
        "compile_s": max(0.0, timing["first_step_s"] - stats["median_s"]) if compiled else None,
        "step_time": stats, "step_times_s": timing["step_times_s"],
        "tokens_per_s": B * T * world / stats["median_s"],
        "loss_step0": loss0, "loss_last": loss_last,
    }
    if on_cuda:
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
        result["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
        result["device_name"] = torch.cuda.get_device_name(device)
    if job.get("profile_steps", 0) > 0:
        # Every rank runs the profiled steps (their all-reduces must be matched); rank 0 reports.
        try:
            result["profile"] = _profile(step, sync, job["profile_steps"])
        except Exception as e:  # noqa: BLE001 - the profile is evidence, not the measurement
            result["profile"] = {"error": repr(e)}
    result["torch"] = torch.__version__
    result["torch_cuda"] = torch.version.cuda
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if rank != 0:
        result["write"] = False
    return result


if __name__ == "__main__":
    raise SystemExit(run_worker(run))
