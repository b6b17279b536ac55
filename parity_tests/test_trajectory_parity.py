"""Training-trajectory parity: 20 AdamW steps of the torch and the JAX engine agree step by step.

Same spec, seed and batches, float32 on CPU (``llm.parity.configure_numerics``), warmup + cosine,
weight decay, gradient clipping and gradient accumulation 2, through the real ``TrainingEngine``s
(``llm.parity.trajectory.trajectory_parity``). Asserted: the logged loss of every step within 1e-4
relative (``Tolerances.trajectory_rel``) and, after the last step, every parameter within 1e-4
relative (``||jax - torch|| / ||torch||`` per tensor) -- scaled by ``GRAD_FLOOR * top / peak`` for a
tensor whose gradient stayed below 1e-2 of the model's largest (its gradient is only accurate to
~1e-6 of the largest in absolute terms), and by 100 for the key bias (its slow-RoPE elements cancel
under the softmax's shift invariance); ``llm/parity/trajectory.py`` explains both. A draw in which some
token came within 1e-5 of an MoE routing tie is rejected (``assume``): top-k is discontinuous there.
Measured on CPU over ~150 drawn specs: per-step loss errors <= ~1e-6 (typically a few float32 ulps,
~3e-7), final parameters <= ~1.4e-5 for the tensors held to 1e-4 itself.

Specs are drawn by hypothesis over the whole space (GQA/MQA, GLU or not, both norms, every
position scheme, MoE with aux and z losses, biases, sliding windows); dropout is set to 0 because
the backends draw different masks. Each example compiles a new JAX step, so the ``ci`` profile runs
a handful (plus two fixed specs that pin the headline features); ``thorough`` runs more.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from llm.parity import Tolerances
from llm.parity.trajectory import trajectory_parity
from llm.spec import ModelSpec
from parity_tests.recording import count, record
from parity_tests.strategies import specs

torch = pytest.importorskip("torch")

STEPS = 20
ROUTER_MARGIN = 1e-5  # a token this close to a routing tie may pick another expert in the other backend
EXAMPLES = {"ci": 3, "thorough": 40}[os.environ.get("HYPOTHESIS_PROFILE", "ci")]
DENSE = ModelSpec(vocab_size=48, max_seq_len=16, hidden_size=24, num_layers=2, num_heads=4, num_kv_heads=2,
                  use_glu=True, activation="silu", norm_type="rmsnorm", position="rope", init_std=0.1)
MOE = ModelSpec(vocab_size=40, max_seq_len=16, hidden_size=16, num_layers=2, num_heads=4, num_kv_heads=1,
                norm_type="layernorm", position="learned", attention_bias=True, use_moe=True, num_experts=4,
                num_experts_per_token=2, norm_topk_prob=True, router_aux_loss_coef=0.1, router_z_loss_coef=0.001,
                init_std=0.1)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _check(report: dict, context: str) -> None:
    count("trajectory")
    record("trajectory loss rel (per step)", report["max_rel_err"], context)
    record("trajectory final param rel", report["param_max_rel_err"], f"{context}: {report['param_worst']}")
    if report["loosened"]:
        worst = max(report["loosened"], key=lambda k: report["loosened"][k]["rel_err"] / report["loosened"][k]["tol"])
        w = report["loosened"][worst]
        record("trajectory small-grad param rel", w["rel_err"],
               f"{context}: {worst} (tol {w['tol']:.1e}, grad {w['grad_peak_rel']:.1e} of top)")
    tol = Tolerances().trajectory_rel
    worst_step = max(range(STEPS), key=lambda i: report["rel_err"][i])
    assert report["max_rel_err"] <= tol, (
        f"step {worst_step + 1}: torch {report['torch'][worst_step]!r} vs jax {report['jax'][worst_step]!r}")
    assert report["param_max_rel_err"] <= 1e-4, report["param_worst"]
    bad = {k: (v, report["param_tol"][k]) for k, v in report["params"].items() if v > report["param_tol"][k]}
    assert not bad, bad
    assert report["ok"]


@settings(max_examples=EXAMPLES)
@given(spec=specs(max_layers=2), seed=st.integers(0, 2 ** 16), clip=st.sampled_from([0.05, 0.3, 1.0]))
@example(spec=DENSE, seed=0, clip=1.0)
@example(spec=MOE, seed=2, clip=0.5)
def test_twenty_adamw_steps_agree(spec, seed, clip):
    report = trajectory_parity(spec, steps=STEPS, seed=seed, batch_size=4, seq_len=12, grad_accum=2, lr=1e-2,
                               warmup_steps=5, weight_decay=0.1, grad_clip=clip)
    # MoE top-k is discontinuous: when some token's k-th and (k+1)-th router probabilities came within
    # float32 distance of each other during the run, the backends may legitimately route it differently
    # and the trajectories part (a real ~1e-3 loss jump). Such draws say nothing about parity; ties
    # themselves are tested exactly in test_moe_ties.py.
    fixed = spec in (DENSE, MOE)
    if fixed:
        assert report["router_min_gap"] > ROUTER_MARGIN  # the fixed examples are chosen clear of ties
    assume(report["router_min_gap"] > ROUTER_MARGIN)
    _check(report, f"seed={seed} clip={clip} moe={spec.use_moe} layers={spec.num_layers}")
    if fixed:  # the fixed specs exercise clipping on some steps and not on others
        assert 0 < report["clipped_steps"] < STEPS, report["grad_norm"]
