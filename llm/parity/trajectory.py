"""Training-trajectory parity: the torch and the JAX engine, same spec, seed and batches, N steps.

``trajectory_parity(spec, steps=20, ...)`` trains the spec with both ``TrainingEngine``s -- the real
engines, so the AdamW math, weight-decay groups, warmup + cosine schedule, gradient clipping and
gradient accumulation are the ones runs use -- on the same synthetic token batches (one seeded
``SyntheticDataModule``, the same micro-batch cursor), in float32 on CPU with TF32 off and JAX
matmul precision "highest", and compares:

* the per-step logged loss (LM cross-entropy, the mean over the accumulated micro-batches):
  relative error ``|jax - torch| / |torch|`` at every step, worst must be <= ``loss_rel``
  (``Tolerances.trajectory_rel``, 1e-4);
* every parameter after the last step: ``||jax - torch|| / ||torch||`` per tensor must be
  <= ``param_rel`` (1e-4), scaled up only for tensors with tiny gradients (below).

Dropout is switched off (``model.dropout=0``): the backends draw different masks, so with dropout the
trajectories are different samples, not the same computation. Everything else in the spec is kept.

Why these tolerances hold: one forward/backward agrees to ~1e-6 relative (``llm.parity``), and Adam
normalises each update by the gradient's own running RMS, so a 1e-6 relative gradient difference
becomes a ~1e-6 relative update difference, accumulated over the steps (measured: per-step losses
~3e-7, final parameters ~5e-6 at worst). That argument needs the gradient itself to be accurate to
~1e-6 *relative*, and a small gradient is not: float32 gradients are accurate to ~1e-6 of the terms
that cancel in them, which are of the size of the model's largest gradients. This is the same fact
``llm.parity`` handles with ``GRAD_FLOOR`` (gradients below 1e-2 of the largest one are compared in
absolute terms), and the trajectory check scales the same way: a tensor whose gradient norm stayed
below ``GRAD_FLOOR`` times the model's largest at every step (the torch run's gradients, read by a
hook) gets the tolerance ``param_rel * GRAD_FLOOR * top / peak`` instead of ``param_rel``. Those
tensors are listed under ``loosened``. Typical cases: a key bias under RoPE with a slow frequency
(nearly shift-invariant under the softmax: measured errors up to ~1e-3 at gradients ~1e-4 of the
top), and gradients that are exactly zero in theory and float noise in practice (a key bias without
RoPE, q/k under a one-token sliding window), which Adam turns into lr-sized steps of arbitrary sign in
each backend -- their tolerance becomes effectively unbounded, which is the honest statement: such
tensors cannot move the loss, and their values are noise in both backends.

One tensor needs more than that rule, because Adam normalises per *element*: the key bias under
RoPE. ``q_i . R(j-i) b`` is constant over the keys ``j`` for the slow rotary frequencies, so those
elements of ``b``'s gradient cancel under the softmax's shift invariance while the fast-frequency
elements keep the tensor's gradient norm large. The cancelling elements are rounding-dominated and
Adam gives them lr-sized steps anyway; measured errors reach ~1e-3 (head_dim 4, rope_theta 1e6).
Names ending in ``attn.k_proj.bias`` therefore get ``KEY_BIAS_FACTOR`` (100) times ``param_rel``.

MoE routing is discontinuous: a token whose k-th and (k+1)-th router probabilities come within
float32 distance of each other may go to different experts in the two backends, and from then on
the trajectories part for a real reason. ``router_min_gap`` (the smallest such margin over every
token, layer and micro-batch of the torch run, from a forward hook) says how close a run came;
``parity_tests`` rejects draws below 1e-5 (ties themselves are tested exactly elsewhere).

``python -m llm.parity --config FILE --steps N`` prints this report after the one-batch report.
This module imports torch and jax only inside ``trajectory_parity``.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from llm.backend import backend
from llm.parity.metrics import GRAD_FLOOR, Tolerances, configure_numerics, rel_err
from llm.spec import ModelSpec

__all__ = ["KEY_BIAS_FACTOR", "trajectory_parity", "trajectory_config"]

KEY_BIAS_FACTOR = 100.0  # tolerance factor of attn.k_proj.bias (softmax shift invariance, see above)


def trajectory_config(spec: ModelSpec, *, steps: int, seed: int, batch_size: int, seq_len: int,
                      grad_accum: int = 2, lr: float = 1e-2, warmup_steps: int | None = None,
                      weight_decay: float = 0.1, grad_clip: float = 1.0):
    """The run config both engines train: synthetic tokens, no eval, no checkpoints, fp32."""
    from llm.config import (
        CheckpointConfig,
        Config,
        DataConfig,
        LoggingConfig,
        OptimizationConfig,
        TrainingConfig,
    )

    if not 1 <= seq_len <= spec.max_seq_len:
        raise ValueError(f"seq_len={seq_len} must be in 1..max_seq_len={spec.max_seq_len}")
    warmup = max(1, steps // 4) if warmup_steps is None else warmup_steps
    samples = max(256, 2 * batch_size * grad_accum * steps)
    return Config(
        model=spec.replace(dropout=0.0),
        training=TrainingConfig(batch_size=batch_size, max_steps=steps, lr=lr, warmup_steps=warmup,
                                weight_decay=weight_decay, grad_clip=grad_clip, grad_accum_steps=grad_accum,
                                seed=seed, eval_every=0, log_every=1),
        data=DataConfig(source="synthetic", seq_len=seq_len, synthetic_size=samples, val_fraction=0.0),
        optimization=OptimizationConfig(),
        checkpoint=CheckpointConfig(every_steps=0),
        logging=LoggingConfig(every_steps=1, progress=False),
    )


def _run(engine_cls: Any, config: Any, run_dir: Path, grad_peaks: dict[str, float] | None = None,
         router: dict[str, float] | None = None) -> tuple[list[float], list[float], dict[str, np.ndarray]]:
    """Train with ``engine_cls``; per-step losses and grad norms, final canonical params. Torch only:
    with ``grad_peaks`` a hook keeps each parameter's largest micro-batch gradient norm; with
    ``router`` a hook keeps ``router["min_gap"]``, the smallest margin between the k-th and the
    (k+1)-th router probability of any token in any step."""
    from llm.loop.callbacks import Callback

    class Record(Callback):
        def __init__(self):
            self.loss: list[float] = []
            self.grad_norm: list[float] = []

        def needs_metrics(self, step: int) -> bool:
            return True

        def on_step_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
            self.loss.append(float(metrics["loss"]))
            self.grad_norm.append(float(metrics.get("grad_norm", math.nan)))

    record = Record()
    with engine_cls(config, run_dir=run_dir, callbacks=[record], callback_names=()) as engine:
        if grad_peaks is not None:
            for name, p in engine.model.named_parameters():
                grad_peaks[name] = 0.0

                def keep(grad, name=name):
                    grad_peaks[name] = max(grad_peaks[name], float(grad.norm()))

                p.register_hook(keep)
        if router is not None:
            _watch_router(engine.model, router)
        engine.fit()
        params = engine.impl.to_canonical(engine.model)
    return record.loss, record.grad_norm, params


def _watch_router(model: Any, router: dict[str, float]) -> None:
    import torch

    spec = model.spec
    router["min_gap"] = math.inf
    k, experts = spec.num_experts_per_token, spec.num_experts
    if not spec.use_moe or k >= experts:
        return

    def gap(moe, inputs, output):
        with torch.no_grad():
            x = inputs[0].detach().reshape(-1, spec.hidden_size).float()
            probs = torch.softmax(x @ moe.router.weight.detach().float().T, dim=-1)
            top = torch.topk(probs, k + 1, dim=-1).values  # (N, k+1)
            router["min_gap"] = min(router["min_gap"], float((top[:, k - 1] - top[:, k]).min()))

    for layer in model.layers:
        layer.mlp.register_forward_hook(gap)


def trajectory_parity(spec: ModelSpec, steps: int = 20, seed: int = 0, batch_size: int = 4, seq_len: int = 16,
                      grad_accum: int = 2, *, lr: float = 1e-2, warmup_steps: int | None = None,
                      weight_decay: float = 0.1, grad_clip: float = 1.0, loss_rel: float | None = None,
                      param_rel: float = 1e-4) -> dict[str, Any]:
    """Train ``spec`` for ``steps`` AdamW steps with both engines; compare (see the module docstring).

    Returns ``torch`` / ``jax`` (per-step losses), ``rel_err`` (per step), ``max_rel_err``,
    ``grad_norm`` (torch's pre-clip norms; > ``grad_clip`` means that step clipped), ``clipped_steps``,
    ``params`` (per-tensor rel err), ``param_tol`` (per-tensor tolerance), ``param_max_rel_err`` /
    ``param_worst`` (over the tensors held to ``param_rel`` itself), ``loosened`` (name -> rel err,
    tolerance, gradient peak relative to the largest), ``worst_tol_ratio`` (max rel err / tolerance),
    ``router_min_gap`` (inf without MoE), ``tolerances`` and ``ok``.
    """
    JaxEngine = backend("jax").TrainingEngine
    TorchEngine = backend("torch").TrainingEngine

    configure_numerics()
    loss_rel = Tolerances().trajectory_rel if loss_rel is None else loss_rel
    if steps < 1:
        raise ValueError(f"--steps={steps} must be >= 1")
    seq_len = min(seq_len, spec.max_seq_len)
    config = trajectory_config(spec, steps=steps, seed=seed, batch_size=batch_size, seq_len=seq_len,
                               grad_accum=grad_accum, lr=lr, warmup_steps=warmup_steps,
                               weight_decay=weight_decay, grad_clip=grad_clip)
    with tempfile.TemporaryDirectory(prefix="llm-trajectory-") as tmp:
        peaks: dict[str, float] = {}
        router: dict[str, float] = {}
        torch_loss, grad_norm, torch_params = _run(TorchEngine, config, Path(tmp) / "torch", peaks, router)
        jax_loss, _, jax_params = _run(JaxEngine, config, Path(tmp) / "jax")

    rel = [abs(a - b) / max(abs(b), 1e-30) for a, b in zip(jax_loss, torch_loss, strict=True)]
    params = {k: rel_err(jax_params[k], torch_params[k]) for k in torch_params}
    top = max(peaks.values(), default=0.0)
    tol: dict[str, float] = {}
    loosened: dict[str, dict[str, float]] = {}
    for k in params:
        scale = GRAD_FLOOR * top / peaks[k] if peaks[k] > 0 else math.inf
        if k.endswith("attn.k_proj.bias"):
            scale = max(scale, KEY_BIAS_FACTOR)
        tol[k] = param_rel * max(1.0, scale)
        if scale > 1.0:
            loosened[k] = {"rel_err": params[k], "tol": tol[k], "grad_peak_rel": peaks[k] / top if top else 0.0}
    strict = {k: v for k, v in params.items() if k not in loosened}
    worst = max(strict, key=strict.get) if strict else None
    report = {
        "steps": steps, "seed": seed, "batch_size": batch_size, "seq_len": seq_len, "grad_accum": grad_accum,
        "lr": lr, "weight_decay": weight_decay, "grad_clip": grad_clip,
        "torch": torch_loss, "jax": jax_loss, "rel_err": rel, "max_rel_err": max(rel),
        "grad_norm": grad_norm, "clipped_steps": sum(1 for g in grad_norm if g > grad_clip),
        "params": params, "param_tol": tol, "param_max_rel_err": strict[worst] if worst else 0.0,
        "param_worst": worst, "loosened": loosened, "router_min_gap": router["min_gap"],
        "worst_tol_ratio": max((params[k] / tol[k] for k in params), default=0.0),
        "tolerances": {"loss_rel": loss_rel, "param_rel": param_rel, "grad_floor": GRAD_FLOOR},
    }
    report["ok"] = bool(report["max_rel_err"] <= loss_rel and report["worst_tol_ratio"] <= 1.0
                        and all(math.isfinite(x) for x in torch_loss + jax_loss))
    return report
