"""Every planted bug of ``parity_tests.mutants``, applied to each backend in turn, fails the CI parity
check(s) its catalogue entry names; the same checks pass on the real code.

The checks are the parity suite's own (``run_component``, ``check_model``, ``check_greedy_decoding``,
the router-tie tests) on small fixed specs that exercise the feature, at perturbed weights.

``make test`` runs the mutants marked ``fast``, each against its first (cheapest) check only;
``make parity-mutants`` (``PARITY_MUTANTS=all``) runs every mutant against every check it names.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import jax
import pytest

from llm.spec import ModelSpec
from parity_tests import test_moe_ties
from parity_tests.mutants import BY_NAME, MUTANTS
from parity_tests.recording import EXAMPLES, WORST
from parity_tests.test_components import run_component
from parity_tests.test_generation_parity import SPECS as DECODE_SPECS
from parity_tests.test_generation_parity import check_greedy_decoding
from parity_tests.test_model_parity import check_model

BASE = dict(vocab_size=32, max_seq_len=8, hidden_size=16, num_layers=1, num_heads=2)
MOE = dict(BASE, use_moe=True, num_experts=4, num_experts_per_token=2, norm_topk_prob=True, use_glu=True,
           activation="silu", router_aux_loss_coef=0.01, router_z_loss_coef=1e-3, init_std=0.1)
# DeepSeek-V3 routing: sigmoid scores, 4 groups of 2 scored by their top two, 2 kept, the selection
# bias (nonzero at the perturbed weights)
MOE_ROUTING = dict(MOE, num_experts=8, router_scoring="sigmoid", num_expert_groups=4, topk_groups=2,
                   router_group_score="top2_sum", router_selection_bias=True)
SHAPE = (2, 6)
DECODE_TOKENS = 8


def _component(name: str, **spec):
    return lambda _dir: run_component(name, ModelSpec(**spec), SHAPE, "perturbed", 0, drawn=False)


def _model(**spec):
    return lambda _dir: check_model(ModelSpec(**spec), *SHAPE, 0, "mutant check", drawn=False, weights="perturbed")


def _decode(name: str):
    return lambda ckpt_dir: check_greedy_decoding(DECODE_SPECS[name], ckpt_dir, DECODE_TOKENS)


def _moe_ties(_dir):
    test_moe_ties.test_all_equal_logits_pick_lowest_indices(4, 2)
    test_moe_ties.test_tie_between_two_experts_goes_to_lower_index()


CHECKS = {
    "component:norm": _component("norm", **BASE, norm_type="layernorm"),
    "component:attention_rope": _component("attention", **BASE, position="rope", attention_bias=True),
    "component:attention_qk_norm": _component("attention", **BASE, position="rope", qk_norm=True),
    "component:attention_gqa": _component("attention", **dict(BASE, num_heads=4), num_kv_heads=2,
                                          position="learned"),
    "component:attention_window": _component("attention", **BASE, sliding_window=2),
    "component:moe": _component("moe", **MOE),
    "component:moe_capacity": _component("moe", **MOE, capacity_factor=0.5),
    "model:layernorm": _model(**dict(BASE, num_layers=2), norm_type="layernorm", attention_bias=True),
    "model:rmsnorm": _model(**dict(BASE, num_layers=2), norm_type="rmsnorm"),
    "model:moe": _model(**dict(MOE, num_layers=2)),
    "component:moe_routing": _component("moe", **MOE_ROUTING),
    "model:moe_routing": _model(**dict(MOE_ROUTING, num_layers=2)),
    "model:tied": _model(**dict(BASE, num_layers=2), tie_embeddings=True),
    "decode:rope": _decode("rope_gqa_glu_rms"),
    "decode:learned": _decode("learned_tied_layernorm"),
    "moe_ties": _moe_ties,
}

RUN_ALL = os.environ.get("PARITY_MUTANTS", "fast") == "all"
SELECTED = [m.name for m in MUTANTS if RUN_ALL or m.fast]


def checks_of(name: str) -> tuple[str, ...]:
    checks = BY_NAME[name].checks
    return checks if RUN_ALL else checks[:1]


SELECTED_CHECKS = sorted({c for name in SELECTED for c in checks_of(name)})

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("check", SELECTED_CHECKS)
def test_check_passes_on_the_real_code(check, tmp_path):
    CHECKS[check](tmp_path / "ckpt")


@pytest.mark.parametrize("backend", ["torch", "jax"])
@pytest.mark.parametrize("name", SELECTED)
def test_planted_bug_is_caught(name, backend, tmp_path):
    mutant = BY_NAME[name]
    jax.clear_caches()  # module-level jitted functions (the decoding loop) must trace the mutant
    worst, examples = dict(WORST), dict(EXAMPLES)  # a mutant's errors are not the suite's worst errors
    try:
        with pytest.MonkeyPatch.context() as mp:
            mutant.apply(mp, backend)
            for check in checks_of(name):
                with pytest.raises(AssertionError):
                    CHECKS[check](tmp_path / re.sub(r"\W", "_", check))
    finally:
        jax.clear_caches()  # and nothing traced with the mutant may serve a later test
        WORST.clear()
        WORST.update(worst)
        EXAMPLES.clear()
        EXAMPLES.update(examples)


def test_catalogue():
    """At least 12 bugs; every named check exists; each bug is listed in docs/architecture.md."""
    assert len(MUTANTS) >= 12 and len(BY_NAME) == len(MUTANTS)
    assert {c for m in MUTANTS for c in m.checks} <= set(CHECKS)
    docs = (Path(__file__).parents[1] / "docs" / "architecture.md").read_text()
    section = docs[docs.index("## Planted bugs the parity suite catches"):]
    missing = [m.name for m in MUTANTS if f"`{m.name}`" not in section]
    assert not missing, f"not in docs/architecture.md: {missing}"
