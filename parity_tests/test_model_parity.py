"""Whole-model parity, PyTorch vs Flax, on specs drawn over the whole ModelSpec space.

Both models get bitwise-identical weights (``init_params``, or ``parity_tests.perturb`` of it:
norm weights, biases, routers and the learned position table away from their init) and the same
batch; forward and backward of ``loss + aux_loss + z_loss`` run in float32 (TF32 off, JAX
precision "highest"). Tolerances are ``llm.parity.Tolerances``, justified in its docstring.

Besides the drawn specs, the rows of ``parity_tests.covering`` run on every CI run, so every pair
of feature choices is compared at least once.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import assume, given, note, settings
from hypothesis import strategies as st

from llm.parity import Tolerances, compare, flax_pass, make_batch, torch_pass
from llm.spec import ModelSpec, init_params
from parity_tests.covering import ROWS, row_spec
from parity_tests.perturb import weights_at
from parity_tests.recording import count, record
from parity_tests.strategies import cases, examples

TOL = Tolerances()
ROUTER_MARGIN = 1e-4  # backends differ by ~1e-7 in router logits; a smaller top-k gap could flip
# Drawn examples per model test: under ci fewer than the profile's 12, since the covering rows below
# add len(ROWS) whole-model comparisons to every run (the ci total stays about the same).
DRAWN = examples(ci=6)


def router_margin(spec: ModelSpec, router_logits: list[np.ndarray]) -> float:
    """Smallest gap between the k-th and (k+1)-th router logit over every token and layer."""
    k = spec.num_experts_per_token
    if not spec.use_moe or k == spec.num_experts:
        return np.inf
    gaps = []
    for logits in router_logits:
        top = -np.sort(-logits.astype(np.float64), axis=-1)
        gaps.append((top[:, k - 1] - top[:, k]).min())
    return float(min(gaps))


def check_model(spec: ModelSpec, batch: int, seq: int, seed: int, label: str, drawn: bool = True,
                weights: str = "init") -> dict:
    params = weights_at(spec, init_params(spec, seed), seed, weights)
    ids, targets = make_batch(spec, batch, seq, seed)
    ref = torch_pass(spec, params, ids, targets)
    margin = router_margin(spec, ref.router_logits)
    if drawn:
        assume(margin > ROUTER_MARGIN)
    else:
        assert margin > ROUTER_MARGIN, f"fixed example has a router near-tie ({margin:.2e}); pick another seed"
    other = flax_pass(spec, params, ids, targets)
    report = compare(spec, ref, other, TOL)
    if drawn:
        note(f"spec={spec.to_dict()} batch={batch} seq={seq} weights={weights}")
    bounds = {"logits_rel_err": TOL.logits_rel, "loss_abs_err": TOL.loss_abs, "aux_loss_abs_err": TOL.aux_abs,
              "z_loss_abs_err": TOL.aux_abs, "kl": TOL.kl, "grad_max_rel_err": TOL.grad_rel,
              "hidden_max_rel_err": TOL.hidden_rel}
    for key in ("logits_rel_err", "logits_max_abs_err", "loss_abs_err", "aux_loss_abs_err",
                "z_loss_abs_err", "kl", "grad_max_rel_err", "hidden_max_rel_err"):
        record(key, report[key], f"{label}: {report.get('grad_worst_param', '')}" if key.startswith("grad")
               else label, tolerance=bounds.get(key))
    count(label)
    # one assertion per quantity, so a failure names what diverged
    assert report["nothing_to_compare"] is None, report["nothing_to_compare"]
    for row in report["layers"]:
        assert row["rel_err"] <= TOL.hidden_rel, f"activation {row['name']}: rel err {row['rel_err']:.3e}"
    assert report["logits_rel_err"] <= TOL.logits_rel, report["logits_rel_err"]
    assert report["kl"] <= TOL.kl, report["kl"]
    assert report["loss_abs_err"] <= TOL.loss_abs, (ref.loss, other.loss)
    assert report["aux_loss_abs_err"] <= TOL.aux_abs, (ref.aux_loss, other.aux_loss)
    assert report["z_loss_abs_err"] <= TOL.aux_abs, (ref.z_loss, other.z_loss)
    for name, g in report["grads"].items():
        assert g["rel_err"] <= TOL.grad_rel, f"grad {name}: rel err {g['rel_err']:.3e}"
    assert report["ok"]
    return report


@settings(max_examples=DRAWN)
@given(case=cases(moe=False), seed=st.integers(0, 2**16))
def test_dense_model_parity(case, seed):
    spec, shape, weights = case
    check_model(spec, *shape, seed, "dense model", weights=weights)


@settings(max_examples=DRAWN)
@given(case=cases(moe=True), seed=st.integers(0, 2**16))
def test_moe_model_parity(case, seed):
    spec, shape, weights = case
    check_model(spec, *shape, seed, "moe model", weights=weights)


@pytest.mark.parametrize("index", range(len(ROWS)))
def test_covering_row(index):
    """One row of the pairwise covering array (``parity_tests.covering``), a fixed example."""
    row = ROWS[index]
    check_model(row_spec(row), 2, 8, index, f"covering row {index}", drawn=False, weights=row["weights"])


@pytest.mark.parametrize("preset", ["tiny", "default", "moe_small"])
def test_named_specs(preset):
    """Fixed, realistic shapes besides the drawn ones (the drawn ones are tiny)."""
    spec = {
        "tiny": ModelSpec(vocab_size=128, max_seq_len=64, hidden_size=64, num_layers=2, num_heads=4,
                          num_kv_heads=2, intermediate_size=128, activation="silu", use_glu=True,
                          norm_type="rmsnorm"),
        "default": ModelSpec(vocab_size=256, max_seq_len=64, hidden_size=96, num_layers=3, num_heads=6,
                             num_kv_heads=2, activation="silu", use_glu=True, norm_type="rmsnorm",
                             tie_embeddings=True),
        "moe_small": ModelSpec(vocab_size=64, max_seq_len=32, hidden_size=32, num_layers=2, num_heads=4,
                               num_kv_heads=1, use_moe=True, num_experts=4, num_experts_per_token=2,
                               use_glu=True, activation="silu", norm_type="rmsnorm",
                               router_z_loss_coef=1e-3, init_std=0.1),
    }[preset]
    check_model(spec, 2, min(spec.max_seq_len, 32), 0, f"preset {preset}", drawn=False)


def test_parity_detects_a_wrong_weight():
    """The harness itself can fail: perturb one flax weight by 1e-3 and the report says so."""
    from backends.flax.convert import from_canonical  # noqa: F401  (import check for clarity)

    spec = ModelSpec(vocab_size=32, max_seq_len=16, hidden_size=16, num_layers=1, num_heads=2)
    params = init_params(spec, 0)
    ids, targets = make_batch(spec, 2, 8, 0)
    ref = torch_pass(spec, params, ids, targets)
    bad = dict(params)
    bad["layers.0.mlp.up_proj.weight"] = params["layers.0.mlp.up_proj.weight"] * (1 + 1e-3)
    other = flax_pass(spec, bad, ids, targets)
    report = compare(spec, ref, other, TOL)
    assert not report["ok"]
    assert report["layers"][0]["rel_err"] == 0.0 and report["layers"][1]["rel_err"] > TOL.hidden_rel


def test_every_batch_shape_has_targets():
    """Targets are the next tokens of T + 1 drawn ones: even a length-1 sequence has one per row."""
    spec = ModelSpec(vocab_size=32, max_seq_len=4, hidden_size=8, num_layers=1, num_heads=2)
    for seq in (1, 4):
        ids, targets = make_batch(spec, 3, seq, 0)
        assert ids.shape == targets.shape == (3, seq)
        assert ((targets >= 0) & (targets < spec.vocab_size)).all()
    np.testing.assert_array_equal(ids[:, 1:], targets[:, :-1])


def test_a_comparison_with_nothing_to_compare_fails():
    """No valid target, or all-zero reference gradients, compare nothing: ``ok`` is False, with the reason."""
    spec = ModelSpec(vocab_size=32, max_seq_len=4, hidden_size=8, num_layers=1, num_heads=2)
    params = init_params(spec, 0)
    ids, targets = make_batch(spec, 2, 1, 0)
    real = torch_pass(spec, params, ids, targets)
    report = compare(spec, real, real, TOL)
    assert report["ok"] and report["nothing_to_compare"] is None
    masked = torch_pass(spec, params, ids, np.full_like(targets, -100))
    report = compare(spec, masked, masked, TOL)  # identical results: every error is exactly 0
    assert not report["ok"] and "no valid target" in report["nothing_to_compare"]
    zero = dataclasses.replace(real, grads={k: np.zeros_like(v) for k, v in real.grads.items()})
    report = compare(spec, zero, zero, TOL)
    assert not report["ok"] and "exactly zero" in report["nothing_to_compare"]
