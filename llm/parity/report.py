"""Where do the two backends diverge? ``python -m llm.parity --config FILE``.

Builds the PyTorch and the Flax model from the same seeded canonical weights, runs the same batch
through both in float32 (TF32 off, JAX matmul precision "highest") and reports, per layer and for
the whole model, max-abs and relative errors of activations, logits, loss, MoE aux losses and the
gradient of every parameter, plus the mean KL between the two softmaxes. ``--steps N`` also trains
both for N AdamW steps on identical batches and compares the loss trajectories.

This is the one module under ``llm`` that imports both frameworks, and only when called.

Error measures and tolerances: ``llm.parity.metrics``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llm.backend import backend
from llm.io import CliParser
from llm.parity.metrics import (
    GRAD_FLOOR,
    Tolerances,
    configure_numerics,
    grad_bound,
    max_abs_err,
    mean_kl,
    rel_err,
)
from llm.parity.trajectory import trajectory_parity
from llm.spec import ModelSpec


# ---------------------------------------------------------------------- one backend's pass
@dataclass
class BackendResult:
    """Numpy outputs of one forward + backward pass."""

    logits: np.ndarray
    loss: float
    aux_loss: float
    z_loss: float
    hidden: list[np.ndarray]
    grads: dict[str, np.ndarray]
    router_logits: list[np.ndarray] = field(default_factory=list)
    valid_targets: int | None = None  # targets != -100 in the batch (None: not recorded)


def torch_pass(spec: ModelSpec, params: dict[str, np.ndarray], ids: np.ndarray,
               targets: np.ndarray, model_inputs: dict[str, np.ndarray] | None = None) -> BackendResult:
    """Forward + backward of ``loss + aux_loss + z_loss`` in PyTorch, eval mode (no dropout).

    ``model_inputs``: further (B, T) arrays passed to the model by name (``attention_mask``,
    ``segment_ids``, ``positions``)."""
    import torch

    torch_backend = backend("torch")
    model = torch_backend.from_canonical(spec, params).eval()
    router_logits: list[np.ndarray] = []
    hooks = []
    if spec.use_moe:
        def keep_router_logits(moe, inputs, _output):
            x = inputs[0].detach().reshape(-1, spec.hidden_size).float()
            router_logits.append((x @ moe.router.weight.detach().float().T).numpy())

        for i, layer in enumerate(model.layers):
            if spec.is_moe_layer(i):  # the first_dense_layers have no router
                hooks.append(layer.mlp.register_forward_hook(keep_router_logits))
    extra = {k: torch.from_numpy(np.asarray(v)) for k, v in (model_inputs or {}).items()}
    out = model(torch.from_numpy(ids), torch.from_numpy(targets), return_hidden=True, **extra)
    for h in hooks:
        h.remove()
    (out.loss + out.aux_loss + out.z_loss).backward()
    grads = torch_backend.grads_to_canonical(model)
    return BackendResult(
        logits=out.logits.detach().numpy(),
        loss=out.loss.item(), aux_loss=out.aux_loss.item(), z_loss=out.z_loss.item(),
        hidden=[h.detach().numpy() for h in out.hidden_states],
        grads=grads, router_logits=router_logits, valid_targets=int((targets != -100).sum()),
    )


def flax_pass(spec: ModelSpec, params: dict[str, np.ndarray], ids: np.ndarray,
              targets: np.ndarray, model_inputs: dict[str, np.ndarray] | None = None) -> BackendResult:
    """Forward + backward of ``loss + aux_loss + z_loss`` in Flax NNX, deterministic, under jit
    (the way JAX code runs in training; one compile instead of one per primitive)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    flax_backend = backend("jax")
    model = flax_backend.from_canonical(spec, params)
    graphdef, weights, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def step(weights, rest, ids, targets, extra):
        def objective(weights):
            out = nnx.merge(graphdef, weights, rest)(ids, targets, return_hidden=True, **extra)
            return out.loss + out.aux_loss + out.z_loss, out

        (_, out), grads = jax.value_and_grad(objective, has_aux=True)(weights)
        return out, grads

    extra = {k: jnp.asarray(v) for k, v in (model_inputs or {}).items()}
    out, grads = step(weights, rest, jnp.asarray(ids), jnp.asarray(targets), extra)
    return BackendResult(
        logits=np.asarray(out.logits),
        loss=float(out.loss), aux_loss=float(out.aux_loss), z_loss=float(out.z_loss),
        hidden=[np.asarray(h) for h in out.hidden_states],
        grads=flax_backend.grads_to_canonical(model, grads), valid_targets=int((targets != -100).sum()),
    )


# ---------------------------------------------------------------------- comparison
def nothing_to_compare(ref: BackendResult) -> str | None:
    """Why ``ref`` leaves nothing to compare (no valid target, every gradient exactly zero), or None.

    Either makes every gradient check pass vacuously: both backends return exact zeros.
    """
    if ref.valid_targets == 0:
        return "no valid target in the batch (every target is -100): the loss and its gradients are 0"
    if not any(np.any(g) for g in ref.grads.values()):
        return "every reference gradient is exactly zero: the gradient checks would compare nothing"
    return None


DEFAULT_TOLERANCES = Tolerances()  # frozen: one shared default


def compare(spec: ModelSpec, ref: BackendResult, other: BackendResult,
            tol: Tolerances = DEFAULT_TOLERANCES) -> dict[str, Any]:
    """The report: every quantity's error, per-layer rows, and ``ok``.

    ``ok`` is False, with the reason in ``nothing_to_compare``, when the reference pass has nothing
    to compare (``nothing_to_compare``); a vacuous comparison is never a pass.
    """
    names = ["embed"] + [f"layers.{i}" for i in range(spec.num_layers)] + ["final_norm"]
    layers = []
    for name, a, b in zip(names, other.hidden, ref.hidden, strict=True):
        layers.append({"name": name, "max_abs_err": max_abs_err(a, b), "rel_err": rel_err(a, b)})
    grad_norms = {k: float(np.linalg.norm(v.ravel().astype(np.float64))) for k, v in ref.grads.items()}
    top = max(grad_norms.values(), default=0.0)
    grads: dict[str, dict[str, float]] = {}
    grad_exceptions: dict[str, dict[str, Any]] = {}
    for k in ref.grads:
        diff = float(np.linalg.norm((other.grads[k].astype(np.float64) - ref.grads[k]).ravel()))
        bound, floored = grad_bound(grad_norms[k], top, tol.grad_rel)
        grads[k] = {"rel_err": rel_err(other.grads[k], ref.grads[k], GRAD_FLOOR * top),
                    "max_abs_err": max_abs_err(other.grads[k], ref.grads[k]),
                    "norm": grad_norms[k], "abs_err": diff, "bound": bound}
        if floored and diff > tol.grad_rel * grad_norms[k]:  # the floor, not grad_rel, passed it
            grad_exceptions[k] = {
                "norm_rel_top": grad_norms[k] / top, "abs_err_rel_top": diff / top, "bound_rel_top": bound / top,
                "why": f"gradient under the floor {GRAD_FLOOR:g} of the largest: held to its absolute bound"}
    worst_grad = max(grads, key=lambda k: grads[k]["rel_err"]) if grads else None
    report: dict[str, Any] = {
        "logits_max_abs_err": max_abs_err(other.logits, ref.logits),
        "logits_rel_err": rel_err(other.logits, ref.logits),
        "loss_torch": ref.loss,
        "loss_jax": other.loss,
        "loss_abs_err": abs(other.loss - ref.loss),
        "aux_loss_abs_err": abs(other.aux_loss - ref.aux_loss),
        "z_loss_abs_err": abs(other.z_loss - ref.z_loss),
        "kl": mean_kl(ref.logits, other.logits),
        "grad_max_rel_err": grads[worst_grad]["rel_err"] if worst_grad else 0.0,
        "grad_worst_param": worst_grad,
        "hidden_max_rel_err": max((r["rel_err"] for r in layers), default=0.0),
        "layers": layers,
        "grads": grads,
        "nothing_to_compare": nothing_to_compare(ref),
        "grad_exceptions": grad_exceptions,
    }
    report["ok"] = bool(
        report["nothing_to_compare"] is None
        and report["logits_rel_err"] <= tol.logits_rel
        and report["loss_abs_err"] <= tol.loss_abs
        and report["aux_loss_abs_err"] <= tol.aux_abs
        and report["z_loss_abs_err"] <= tol.aux_abs
        and report["kl"] <= tol.kl
        and report["grad_max_rel_err"] <= tol.grad_rel
        and report["hidden_max_rel_err"] <= tol.hidden_rel
    )
    return report


def make_batch(spec: ModelSpec, batch_size: int, seq_len: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, targets), each (batch_size, seq_len), cut from seq_len + 1 random tokens.

    Every position has a target (the next token), so even a sequence of length 1 has a loss and
    gradients to compare.
    """
    rng = np.random.default_rng(seed + 1)
    tokens = rng.integers(0, spec.vocab_size, size=(batch_size, seq_len + 1), dtype=np.int64)
    return np.ascontiguousarray(tokens[:, :-1]), np.ascontiguousarray(tokens[:, 1:])


def run_parity(spec: ModelSpec, *, seed: int = 0, batch_size: int = 2, seq_len: int | None = None,
               tol: Tolerances = DEFAULT_TOLERANCES) -> dict[str, Any]:
    """Forward/backward parity of one spec on one random batch."""
    from llm.spec import init_params

    configure_numerics()
    seq_len = min(spec.max_seq_len, 32) if seq_len is None else seq_len
    if not 1 <= seq_len <= spec.max_seq_len:
        raise ValueError(f"--seq-len={seq_len} must be in 1..max_seq_len={spec.max_seq_len}")
    if batch_size < 1:
        raise ValueError(f"--batch-size={batch_size} must be >= 1")
    params = init_params(spec, seed)
    ids, targets = make_batch(spec, batch_size, seq_len, seed)
    ref = torch_pass(spec, params, ids, targets)
    other = flax_pass(spec, params, ids, targets)
    report = compare(spec, ref, other, tol)
    report.update(seed=seed, batch_size=batch_size, seq_len=seq_len, tolerances=asdict(tol))
    return report


# ---------------------------------------------------------------------- CLI
def _format_table(report: dict[str, Any]) -> str:
    lines = [f"seed {report['seed']}, batch {report['batch_size']} x {report['seq_len']} tokens",
             f"{'quantity':<34}{'max_abs_err':>14}{'rel_err':>14}"]
    for row in report["layers"]:
        lines.append(f"{'activation ' + row['name']:<34}{row['max_abs_err']:>14.3e}{row['rel_err']:>14.3e}")
    lines.append(f"{'logits':<34}{report['logits_max_abs_err']:>14.3e}{report['logits_rel_err']:>14.3e}")
    lines.append(f"{'loss':<34}{report['loss_abs_err']:>14.3e}{'':>14}")
    lines.append(f"{'aux_loss':<34}{report['aux_loss_abs_err']:>14.3e}{'':>14}")
    lines.append(f"{'z_loss':<34}{report['z_loss_abs_err']:>14.3e}{'':>14}")
    for name, g in report["grads"].items():
        lines.append(f"{'grad ' + name:<34}{g['max_abs_err']:>14.3e}{g['rel_err']:>14.3e}")
    for name, e in report["grad_exceptions"].items():
        lines.append(f"exception grad {name}: |d| {e['abs_err_rel_top']:.1e} <= {e['bound_rel_top']:.1e} of the "
                     f"largest gradient, its norm {e['norm_rel_top']:.1e} of it ({e['why']})")
    lines.append(f"mean KL(torch || jax) = {report['kl']:.3e}")
    lines.append(f"loss torch = {report['loss_torch']:.6f}   loss jax = {report['loss_jax']:.6f}")
    if "trajectory" in report:
        t = report["trajectory"]
        lines.append(f"trajectory over {len(t['torch'])} steps: max loss rel err {t['max_rel_err']:.3e} "
                     f"(tolerance {t['tolerances']['loss_rel']:g})")
        lines.append(f"trajectory final params: max rel err {t['param_max_rel_err']:.3e} ({t['param_worst']}; "
                     f"tolerance {t['tolerances']['param_rel']:g}); {t['clipped_steps']} of {len(t['torch'])} "
                     "steps clipped")
        for name, e in t["exceptions"].items():
            lines.append(f"exception trajectory {name}: rel err {e['rel_err']:.2e} <= {e['tol']:.2e} ({e['why']})")
        for f in t["routing_flips"]:
            lines.append(f"routing flip at step {f['step']}, layer {f['layer']}: {f['tokens']} token(s) chose "
                         f"other experts (torch margin {f['min_margin']:.1e})")
        if t["first_flip"]:
            ff = t["first_flip"]
            lines.append(f"first routing flip at step {ff['step']}: " + (
                "genuine (the backends agreed up to it: a near-tie resolved differently)" if ff["genuine"] else
                f"NOT genuine (the backends had already parted: params at {ff['param_tol_ratio_before']:.2g} "
                "x tolerance)"))
    lines.append(f"worst gradient: {report['grad_worst_param']} ({report['grad_max_rel_err']:.3e})")
    if report["nothing_to_compare"]:
        lines.append(f"nothing to compare: {report['nothing_to_compare']}")
    lines.append("PARITY OK" if report["ok"] else "PARITY FAILED (tolerances: " +
                 ", ".join(f"{k}={v:g}" for k, v in report["tolerances"].items()) + ")")
    return "\n".join(lines)


def _load_spec(path: str) -> ModelSpec:
    """The ``model:`` section of a run config. The parity CLI uses nothing else (``--seq-len`` and
    ``--batch-size`` are its own), so the data section's tie to the model (``data.seq_len <=
    model.max_seq_len``) must not reject a model-only file with a short ``max_seq_len``."""
    from llm.config import load_config

    return load_config(path, ["data.seq_len=1"]).model


def main(argv: list[str] | None = None) -> int:
    parser = CliParser(prog="python -m llm.parity", description=__doc__.split("\n")[0], error_label="llm.parity")
    parser.add_argument("--config", required=True, help="a run config YAML (its model: section is used)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--steps", type=int, default=0, help="also compare N training steps")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        if not Path(args.config).is_file():
            raise FileNotFoundError(f"config file not found: {args.config}")
        spec = _load_spec(args.config)
        report = run_parity(spec, seed=args.seed, batch_size=args.batch_size, seq_len=args.seq_len)
        if args.steps:
            report["trajectory"] = trajectory_parity(spec, steps=args.steps, seed=args.seed,
                                                     batch_size=args.batch_size, seq_len=report["seq_len"])
            report["ok"] = report["ok"] and report["trajectory"]["ok"]
    except Exception as e:  # a one-line error, never a traceback
        print(f"llm.parity: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, default=float))
    else:
        print(_format_table(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
