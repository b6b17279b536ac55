"""Training-trajectory parity: 20 AdamW steps of the torch and the JAX engine agree step by step.

Same spec, seed and batches, float32 on CPU (``llm.parity.configure_numerics``), warmup + cosine,
weight decay, gradient clipping and gradient accumulation 2, through the real ``TrainingEngine``s
(``llm.parity.trajectory.trajectory_parity``). Asserted: the logged loss of every step within
``Tolerances.trajectory_rel`` relative and, after the last step, every parameter within 1e-4
relative (``||jax - torch|| / ||torch||`` per tensor) unless one of the two exceptions of
``llm/parity/trajectory.py`` applies (a gradient under the absolute floor of ``llm.parity``, or
elements whose gradient never rose above float32 noise), each a finite bound derived there. A draw
with a routing flip (a token routed to other experts by the two backends at some step) is rejected
(``assume``) only when the flip is genuine -- the backends still agreed up to it; a flip after they
had parted fails. The fixed top-1 renormalised MoE pins the router's exactly-zero gradient.

Specs are drawn by hypothesis over the whole space (GQA/MQA, GLU or not, both norms, every
position scheme, MoE with aux and z losses, biases, sliding windows); dropout is set to 0 because
the backends draw different masks. Each example compiles a new JAX step: ``make test`` runs the
three fixed specs that pin the headline features; the drawn ones are marked ``slow`` (``make
test-slow`` and ``make parity``: a handful in the ``ci`` profile, more in ``thorough``).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from llm.parity import Tolerances
from llm.parity.trajectory import trajectory_parity
from llm.spec import ModelSpec
from parity_tests.recording import count, record
from parity_tests.strategies import specs

torch = pytest.importorskip("torch")

STEPS = 20
EXAMPLES = {"ci": 3, "thorough": 40}[os.environ.get("HYPOTHESIS_PROFILE", "ci")]
DENSE = ModelSpec(vocab_size=48, max_seq_len=16, hidden_size=24, num_layers=2, num_heads=4, num_kv_heads=2,
                  use_glu=True, activation="silu", norm_type="rmsnorm", position="rope", init_std=0.1)
MOE = ModelSpec(vocab_size=40, max_seq_len=16, hidden_size=16, num_layers=2, num_heads=4, num_kv_heads=1,
                norm_type="layernorm", position="learned", attention_bias=True, use_moe=True, num_experts=4,
                num_experts_per_token=2, norm_topk_prob=True, router_aux_loss_coef=0.1, router_z_loss_coef=0.001,
                init_std=0.1)
# top-1 with renormalisation (Mixtral-style routing at k=1): its combine weight is identically 1
MOE_TOP1 = ModelSpec(vocab_size=32, max_seq_len=16, hidden_size=8, num_layers=1, num_heads=2, use_moe=True,
                     num_experts=8, num_experts_per_token=1, norm_topk_prob=True, router_aux_loss_coef=0.0,
                     router_z_loss_coef=0.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _check(report: dict, context: str) -> None:
    count("trajectory")
    record("trajectory loss rel (per step)", report["max_rel_err"], context, tolerance=Tolerances().trajectory_rel)
    record("trajectory final param rel", report["param_max_rel_err"], f"{context}: {report['param_worst']}",
           tolerance=report["param_tol"].get(report["param_worst"]))
    if report["exceptions"]:
        worst = max(report["exceptions"], key=lambda k: report["params"][k] / report["param_tol"][k])
        record("trajectory exception rel/tol", report["params"][worst] / report["param_tol"][worst],
               f"{context}: {worst} ({report['exceptions'][worst]['why']})")
    tol = Tolerances().trajectory_rel
    worst_step = max(range(STEPS), key=lambda i: report["rel_err"][i])
    assert report["max_rel_err"] <= tol, (
        f"step {worst_step + 1}: torch {report['torch'][worst_step]!r} vs jax {report['jax'][worst_step]!r}")
    assert report["param_max_rel_err"] <= 1e-4, report["param_worst"]
    bad = {k: (v, report["param_tol"][k]) for k, v in report["params"].items() if v > report["param_tol"][k]}
    assert not bad, bad
    assert report["ok"]


# (spec, seed, clip): chosen clear of routing ties
FIXED = {"dense": (DENSE, 0, 1.0), "moe": (MOE, 2, 0.5), "moe_top1": (MOE_TOP1, 2, 1.0)}


@pytest.mark.parametrize("spec,seed,clip", list(FIXED.values()), ids=list(FIXED))
def test_twenty_adamw_steps_agree_on_the_fixed_specs(spec, seed, clip):
    twenty_adamw_steps_agree(spec, seed, clip)


@pytest.mark.slow  # make test-slow, make parity: the fixed specs above hold the property in make test
@settings(max_examples=EXAMPLES)
@given(spec=specs(max_layers=2), seed=st.integers(0, 2 ** 16), clip=st.sampled_from([0.05, 0.3, 1.0]))
def test_twenty_adamw_steps_agree_on_drawn_specs(spec, seed, clip):
    twenty_adamw_steps_agree(spec, seed, clip)


def twenty_adamw_steps_agree(spec, seed, clip):
    report = trajectory_parity(spec, steps=STEPS, seed=seed, batch_size=4, seq_len=12, grad_accum=2, lr=1e-2,
                               warmup_steps=5, weight_decay=0.1, grad_clip=clip)
    context = f"seed={seed} clip={clip} moe={spec.use_moe} layers={spec.num_layers}"
    # MoE top-k is discontinuous: a token at a near-tie may go to different experts in the two backends
    # (a routing flip, found by routing every step's batches in each backend), and from then on the
    # trajectories part for a real reason. Such a draw says nothing more about parity -- but only when
    # the flip is genuine: the backends still agreed up to that step (ties are tested in test_moe_ties.py).
    fixed = spec in (DENSE, MOE, MOE_TOP1)
    if report["routing_flips"]:
        count("trajectory routing flip")
        record("trajectory router gap at a flip", report["routing_flips"][0]["min_margin"], context)
        assert not fixed, report["routing_flips"]  # the fixed examples are chosen clear of ties
        assert report["first_flip"]["genuine"], report["first_flip"]
        assume(False)  # a drawn spec only: the fixed ones failed above
    _check(report, context)
    if fixed and spec is not MOE_TOP1:  # these exercise clipping on some steps and not on others
        assert 0 < report["clipped_steps"] < STEPS, report["grad_norm"]


def test_top1_renormalised_router_gets_exactly_zero_gradient():
    """Top-1 with norm_topk_prob: the combine weight is the constant 1, so the router's gradient is
    exactly zero in both backends (not float noise that AdamW would blow up to lr-sized steps) and
    the router moves by weight decay alone, identically."""
    report = trajectory_parity(MOE_TOP1, steps=STEPS, seed=2, batch_size=4, seq_len=12, grad_accum=2, lr=1e-2,
                               warmup_steps=5, weight_decay=0.1, grad_clip=1.0)
    assert report["params"]["layers.0.mlp.router.weight"] == 0.0
    assert "layers.0.mlp.router.weight" not in report["exceptions"]
    assert report["max_rel_err"] <= Tolerances().trajectory_rel
