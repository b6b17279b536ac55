"""The tolerance rules themselves: the gradient floor, the trajectory exceptions, routing flips.

Small synthetic inputs with known answers, so each rule is pinned by numbers that would change if
the rule did (the parity tests proper only see whether drawn specs pass).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from llm.parity import GRAD_FLOOR, BackendResult, Tolerances, compare
from llm.parity.metrics import grad_bound
from llm.parity.trajectory import _adam_step_bound, _routing_flips, param_tolerances, trajectory_config
from llm.spec import ModelSpec, init_params

TOL = Tolerances()
SPEC = ModelSpec(vocab_size=16, max_seq_len=8, hidden_size=8, num_layers=1, num_heads=2)


def _result(grads: dict[str, np.ndarray]) -> BackendResult:
    return BackendResult(logits=np.zeros((1, 2, 16), np.float32), loss=1.0, aux_loss=0.0, z_loss=0.0,
                         hidden=[np.zeros((1, 2, 8), np.float32)] * 3, grads=grads)


def test_grad_bound_is_relative_above_the_floor_and_absolute_below():
    assert grad_bound(2.0, 4.0, 1e-4) == (2e-4, False)
    bound, floored = grad_bound(1e-9, 4.0, 1e-4)
    assert floored and bound == pytest.approx(1e-4 * GRAD_FLOOR * 4.0)


def test_compare_lists_the_floor_only_where_it_decides():
    top = np.ones(4, np.float32)
    small = np.full(4, 1e-5, np.float32)  # norm 2e-5: under the floor
    ref = _result({"big": top, "small_ok": small, "small_floored": small, "zero": np.zeros(4, np.float32)})
    noise = GRAD_FLOOR * TOL.grad_rel * 2.0 / 4  # |d| = half the absolute bound of the top norm 2
    other = _result({"big": top, "small_ok": small * (1 + 1e-6), "small_floored": small + np.float32(noise),
                     "zero": np.zeros(4, np.float32)})
    report = compare(SPEC, ref, other, TOL)
    assert set(report["grad_exceptions"]) == {"small_floored"}
    assert report["grad_exceptions"]["small_floored"]["bound_rel_top"] == pytest.approx(GRAD_FLOOR * TOL.grad_rel)
    assert report["grad_max_rel_err"] <= TOL.grad_rel  # within the bound: passes, but listed
    other.grads["small_floored"] = small + np.float32(4 * noise)  # twice the bound
    assert not compare(SPEC, ref, other, TOL)["ok"]


def test_param_tolerances_exceptions_are_finite_and_exact_zero_stays_strict():
    params = {"top": np.ones(4), "small": np.ones(4), "noise": np.ones(4), "zero": np.ones(4)}
    nu = TOL.grad_rel * GRAD_FLOOR * 2.0  # the absolute noise bound for a top norm of 2
    peaks = {"top": np.ones(4), "small": np.full(4, GRAD_FLOOR / 10), "noise": np.full(4, nu / 2),
             "zero": np.zeros(4)}
    tol, exceptions = param_tolerances(params, peaks, walk=0.1, param_rel=1e-4)
    assert tol["top"] == tol["zero"] == 1e-4 and "zero" not in exceptions and "top" not in exceptions
    assert tol["small"] == pytest.approx(1e-4 * 10.0)  # GRAD_FLOOR * top / peak = 10 (peak norm 2 * GRAD_FLOOR / 10)
    assert tol["noise"] == pytest.approx(1e-4 + 2 * 0.1 * math.sqrt(4) / 2.0)  # two walks, 4 elements, ||p|| = 2
    assert exceptions["noise"]["noisy_elements"] == 4 and math.isfinite(tol["noise"])


def test_adam_step_bound_is_one_on_the_first_step_and_covers_a_sign_flip():
    config = trajectory_config(SPEC, steps=3, seed=0, batch_size=1, seq_len=4)
    b1, b2 = config.training.beta1, config.training.beta2
    bound = _adam_step_bound(config, 3)
    assert bound[0] == pytest.approx(1.0)
    m = v = 0.0  # the largest |update| of a gradient sequence (1, 1e-3) is within the bound at step 2
    for g in (1.0, 1e-3):
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    assert abs(m / (1 - b1 ** 2)) / math.sqrt(v / (1 - b2 ** 2)) <= bound[1]


def test_routing_flips_found_when_one_backend_routes_a_token_elsewhere():
    spec = ModelSpec(vocab_size=16, max_seq_len=8, hidden_size=8, num_layers=1, num_heads=2, use_moe=True,
                     num_experts=4, num_experts_per_token=1)
    params = init_params(spec, 0)
    batches = [np.arange(8, dtype=np.int64).reshape(1, 8)]
    flips, gap = _routing_flips(spec, [params, params], [params, params], batches, accum=1)
    assert flips == [] and 0 < gap < 1
    swapped = dict(params)
    router = params["layers.0.mlp.router.weight"]
    swapped["layers.0.mlp.router.weight"] = router[[1, 0, 3, 2]]  # every token's expert is renamed
    flips, _ = _routing_flips(spec, [params, params], [swapped, params], batches, accum=1)
    assert flips and flips[0]["step"] == 1 and flips[0]["layer"] == 0 and flips[0]["tokens"] == 8
