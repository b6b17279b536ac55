"""The JAX mode of the throughput benchmark (``jax-jit``), in its own process.

One step is a single ``jax.jit`` program: forward (bf16 compute, float32 parameters, float32 norms,
softmax and loss, cuDNN flash attention on the GPU), ``value_and_grad``, ``clip_by_global_norm(1.0)``
and AdamW with the spec's no-decay mask, with the parameter and optimiser buffers donated. It is
compiled ahead of time (``lower().compile()``, timed as the compile time). With several devices
(``job["devices"]`` > 1) the batch is sharded over a one-axis ``Mesh`` ("data") and parameters are
replicated: XLA inserts the gradient all-reduce (data parallel in one process).

Options (``job["options"]``, each an ablation of one speed change): ``attention``: ``auto``
(default: cuDNN where it applies) | ``xla`` (the einsum path) | ``cudnn``; ``loss``: ``lean``
(default: ``return_logits=False``, no float32 logits) | ``full`` (float32 logits, autodiff CE) |
``pallas`` (``lean`` with the one-pass log-sum-exp kernel, ``backends/flax/pallas_lse.py``);
``donate``: ``1`` (default) | ``0``; ``moe``: ``auto`` (default: ``llm.moe_dispatch.resolve_moe_impl``
for the device and dtype, as the engine picks; the result's options record the impl it resolved to)
| ``dense`` (the reference) | ``blocked`` | ``grouped`` (``llm.moe_dispatch``); ``remat``: the preset's
``training.activation_checkpointing`` (default, as the engine trains it) | ``none`` | ``full`` | ``selective``.

Run: ``python -m benchmarks.jax_worker --job job.json --out result.json``.
"""

from __future__ import annotations

import glob
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from backends.flax.convert import load_canonical
from backends.flax.model import DecoderModel, set_moe_impl
from benchmarks.job import load_weights, make_batches, preset_config, run_worker
from benchmarks.measure import step_stats, summarise_kernels, time_steps
from llm.config import ActivationCheckpointing
from llm.moe_dispatch import resolve_moe_impl


def _canonical(path) -> str:
    return ".".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def _kernel_label(event) -> str:
    """The kernel name, with the HLO instruction that launched it when the trace records one."""
    try:
        stats = {str(k): str(v) for k, v in event.stats}
    except Exception:  # noqa: BLE001
        stats = {}
    hlo = stats.get("hlo_op") or stats.get("long_name") or stats.get("tf_op")
    return f"{event.name} [{hlo}]" if hlo and hlo not in event.name else event.name


def _profile(step, sync, steps: int) -> dict:
    """GPU kernels of ``steps`` steps from a JAX profiler trace (device planes, stream lines)."""
    with tempfile.TemporaryDirectory() as tmp:
        sync()
        jax.profiler.start_trace(tmp)
        for _ in range(steps):
            step()
        sync()
        jax.profiler.stop_trace()
        files = glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)
        if not files:
            return {"error": "no xplane file written"}
        data = jax.profiler.ProfileData.from_file(files[0])
        events = []
        gpus = sorted((p for p in data.planes if p.name.startswith("/device:GPU")), key=lambda p: p.name)
        for plane in gpus[:1]:  # one device; with several, they all run the same program
            for line in plane.lines:
                if not line.name.lower().startswith("stream"):
                    continue
                events += [(_kernel_label(e), e.start_ns / 1e3, e.end_ns / 1e3) for e in line.events]
        return summarise_kernels(events, steps=steps)


def run(job: dict) -> dict:
    opts = {"attention": "auto", "loss": "lean", "donate": 1, "moe": "auto", **job.get("options", {})}
    config = preset_config(job)
    spec, t = config.model, config.training
    B, T = job["batch_size"], job["seq_len"]  # B per device
    n_dev = job.get("devices", 1)
    devices = jax.devices()[:n_dev]
    if len(devices) < n_dev:
        raise RuntimeError(f"job asks for {n_dev} devices, JAX sees {len(jax.devices())}")
    mesh = Mesh(np.array(devices), ("data",))
    replicated, batch_sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    dtype = {"bfloat16": jnp.bfloat16, "float16": jnp.float16}.get(job["dtype"], jnp.float32)

    t_setup = time.perf_counter()
    with jax.default_device(devices[0]):
        model = DecoderModel(spec, rngs=nnx.Rngs(job["seed"]), dtype=dtype)
        load_canonical(model, load_weights(job["weights_dir"]))
    if opts["loss"] not in ("lean", "full", "pallas"):
        raise ValueError(f"loss={opts['loss']!r} is not one of: lean, full, pallas")
    model.set_attributes(attention_impl=opts["attention"],
                         loss_impl="pallas" if opts["loss"] == "pallas" else "xla", raise_if_not_found=False)
    opts["moe"] = resolve_moe_impl(opts["moe"], "jax", devices[0].platform, job["dtype"])
    set_moe_impl(model, opts["moe"])
    opts.setdefault("remat", t.activation_checkpointing.value)  # as the engine trains the preset
    model.remat = ActivationCheckpointing(opts["remat"]).value
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.device_put(params, replicated)
    rest = jax.device_put(rest, replicated)
    no_decay = spec.no_decay_names()
    mask = jax.tree_util.tree_map_with_path(lambda path, _: _canonical(path) not in no_decay, params)
    chain = [optax.clip_by_global_norm(t.grad_clip)] if t.grad_clip > 0 else []
    tx = optax.chain(*chain, optax.adamw(t.lr, b1=t.beta1, b2=t.beta2, eps=t.eps,
                                         weight_decay=t.weight_decay, mask=mask))
    opt_state = jax.jit(tx.init, out_shardings=replicated)(params)

    return_logits = opts["loss"] == "full"

    def loss_fn(params, rest, x, y):
        out = nnx.merge(graphdef, params, rest)(x, y, return_logits=return_logits)
        return out.loss + out.aux_loss + out.z_loss

    def train_step(params, opt_state, rest, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, rest, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    param_sh = jax.tree.map(lambda _: replicated, params)
    opt_sh = jax.tree.map(lambda _: replicated, opt_state)
    jitted = jax.jit(train_step, donate_argnums=(0, 1) if int(opts["donate"]) else (),
                     out_shardings=(param_sh, opt_sh, replicated))

    tokens = make_batches(spec.vocab_size, B * n_dev, T, job["num_batches"], job["seed"])
    inputs = [jax.device_put(b[:, :-1], batch_sharded) for b in tokens]  # (B * n_dev, T) each
    targets = [jax.device_put(b[:, 1:], batch_sharded) for b in tokens]
    setup_s = time.perf_counter() - t_setup

    check = None
    if job.get("check_attention") and opts["attention"] == "auto" and jax.default_backend() == "gpu":
        check = _attention_check(model, params, rest, inputs[0][:2], targets[0][:2])

    t0 = time.perf_counter()
    lowered = jitted.lower(params, opt_state, rest, inputs[0], targets[0])
    lower_s = time.perf_counter() - t0
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    if job.get("dump_dir"):  # the optimised HLO: kernel names in the profile are its fusion names
        with open(f"{job['dump_dir']}/{job.get('name', 'jax')}.hlo.txt", "w") as f:
            f.write(compiled.as_text())
    xla_cost = {}
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        xla_cost = {k: float(cost[k]) for k in ("flops", "bytes accessed") if k in cost}
    except Exception:  # noqa: BLE001 - informative only
        pass
    try:
        mem = compiled.memory_analysis()
        xla_cost["temp_bytes"] = int(mem.temp_size_in_bytes)
        xla_cost["argument_bytes"] = int(mem.argument_size_in_bytes)
    except Exception:  # noqa: BLE001
        pass

    state = {"params": params, "opt": opt_state, "loss": None, "i": 0}

    def step() -> None:
        i = state["i"] % len(inputs)
        state["i"] += 1
        state["params"], state["opt"], state["loss"] = compiled(state["params"], state["opt"], rest,
                                                                inputs[i], targets[i])

    def sync() -> None:
        jax.block_until_ready((state["params"], state["opt"], state["loss"]))

    timing = time_steps(step, sync, warmup=0, steps=0, repeats=0)
    loss0 = float(state["loss"])
    more = time_steps(step, sync, warmup=job["warmup"], steps=job["steps"], repeats=job["repeats"])
    loss_last = float(state["loss"])
    stats = step_stats(more["step_times_s"])
    tokens_per_step = B * n_dev * T
    result = {
        "mode": job["mode"], "options": opts, "world_size": n_dev, "device": str(devices[0]),
        "backend": jax.default_backend(), "batch_per_process": B * n_dev, "seq_len": T,
        "global_batch": B * n_dev, "tokens_per_step": tokens_per_step,
        "setup_s": setup_s, "first_step_s": timing["first_step_s"],
        "compile_s": compile_s, "lower_s": lower_s,
        "step_time": stats, "step_times_s": more["step_times_s"],
        "tokens_per_s": tokens_per_step / stats["median_s"],
        "loss_step0": loss0, "loss_last": loss_last, "xla": xla_cost,
        "attention_used": _attention_used(model),
        "jax": jax.__version__,
    }
    if check is not None:
        result["attention_check"] = check
    if jax.default_backend() == "gpu":
        stats_mem = [d.memory_stats() or {} for d in devices]
        result["peak_memory_bytes"] = max(int(m.get("peak_bytes_in_use", 0)) for m in stats_mem)
        result["device_name"] = devices[0].device_kind
        if job.get("profile_steps", 0) > 0:
            try:
                result["profile"] = _profile(step, sync, job["profile_steps"])
            except Exception as e:  # noqa: BLE001 - the profile is evidence, not the measurement
                result["profile"] = {"error": repr(e)}
    return result


def _attention_used(model: DecoderModel) -> str:
    layer = model.layers[0].attn
    cudnn = getattr(layer, "_cudnn_applies", None)  # MLA attention has the einsum path only
    return "cudnn" if cudnn is not None and cudnn(None, True) else "xla-einsum"


def _attention_check(model, params, rest, x, y) -> dict:
    """The loss with cuDNN attention vs the einsum path, same weights and batch (bf16 compute)."""
    out = {}
    for impl in ("auto", "xla"):
        model.set_attributes(attention_impl=impl, raise_if_not_found=False)
        g, _, _ = nnx.split(model, nnx.Param, ...)

        @jax.jit
        def loss(params, rest, x, y, g=g):
            o = nnx.merge(g, params, rest)(x, y)
            return o.loss, o.logits

        out[impl] = loss(params, rest, x, y)
    model.set_attributes(attention_impl="auto", raise_if_not_found=False)
    (la, za), (lb, zb) = out["auto"], out["xla"]
    pa, pb = jax.nn.log_softmax(za), jax.nn.log_softmax(zb)
    kl = float(jnp.mean(jnp.sum(jnp.exp(pb) * (pb - pa), axis=-1)))
    return {"loss_cudnn": float(la), "loss_xla": float(lb),
            "logits_rel_err": float(jnp.linalg.norm(za - zb) / jnp.linalg.norm(zb)), "kl": kl}


if __name__ == "__main__":
    raise SystemExit(run_worker(run))
