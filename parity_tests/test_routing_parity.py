"""Group-limited routing and the DeepSeek-V3 selection bias: the router of both backends against a
numpy reference of the rule, against transformers' DeepseekV2 / DeepseekV3 gates, and the balancing
update through both engines.

* ``route`` of torch and JAX on drawn specs (groups, ``max`` / ``top2_sum``, bias on/off, softmax /
  sigmoid, renormalised or not) and drawn inputs, some with exact ties: the same experts (exactly)
  and weights, and the experts the reference picks with the lowest-index tie rule;
* the DeepseekV2 ``group_limited_greedy`` and DeepseekV3 gates of the installed transformers on
  random inputs: the same experts and weights (theirs include ``routed_scaling_factor``, which this
  model applies to the routed output instead);
* a few AdamW steps with ``router_bias_update_rate`` > 0 in both engines: the biases are equal
  (bitwise: the update adds multiples of u to zeros) and have moved.
"""

from __future__ import annotations

import tempfile

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import backends.flax.model as fm
import backends.torch.model as tm
from backends.flax.convert import load_canonical as flax_load
from backends.torch.convert import load_canonical as torch_load
from llm.backend import backend
from llm.parity import configure_numerics
from llm.parity.trajectory import trajectory_config
from llm.spec import ModelSpec, init_params
from parity_tests.recording import count
from parity_tests.strategies import examples, routings

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D = 8


def _moes(spec: ModelSpec, router: np.ndarray, bias: np.ndarray | None):
    params = {k[len("layers.0.mlp."):]: v for k, v in init_params(spec, 0).items() if k.startswith("layers.0.mlp.")}
    params["router.weight"] = router.astype(np.float32)
    if bias is not None:
        params["router.selection_bias"] = bias.astype(np.float32)
    tmod, fmod = tm.MoE(spec), fm.MoE(spec)
    torch_load(tmod, params)
    flax_load(fmod, params)
    return tmod, fmod


def _both_routes(tmod, fmod, x: np.ndarray):
    t_combine, t_idx, _, _ = tmod.route(torch.from_numpy(x))
    f_combine, f_idx, _, _ = fmod.route(jnp.asarray(x))
    return (t_idx.numpy(), t_combine.detach().numpy()), (np.asarray(f_idx), np.asarray(f_combine))


def reference_route(spec: ModelSpec, scores: np.ndarray, bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The rule in numpy: chosen experts (N, k) in order and combine weights (N, E); every ordering
    a stable descending sort, so equal values go to the lower index."""
    N, E, k, g = scores.shape[0], spec.num_experts, spec.num_experts_per_token, spec.num_expert_groups
    choice = scores + (bias if bias is not None else 0.0)
    if g > 1:
        grouped = choice.reshape(N, g, E // g)
        top = -np.sort(-grouped, axis=-1)
        group_scores = top[..., :2].sum(-1) if spec.router_group_score.value == "top2_sum" else top[..., 0]
        kept = np.argsort(-group_scores, axis=-1, kind="stable")[:, :spec.topk_groups]
        mask = np.zeros((N, g), bool)
        np.put_along_axis(mask, kept, True, axis=-1)
        choice = np.where(np.repeat(mask, E // g, axis=1), choice, -np.inf)
    idx = np.argsort(-choice, axis=-1, kind="stable")[:, :k]
    w = np.take_along_axis(scores, idx, axis=-1)
    if spec.norm_topk_prob:
        w = w / w.sum(-1, keepdims=True)
    combine = np.zeros((N, E), np.float32)
    np.put_along_axis(combine, idx, w, axis=-1)
    return idx, combine


@st.composite
def router_cases(draw):
    E = draw(st.sampled_from([4, 6, 8, 12]))
    k = draw(st.integers(1, E))
    spec = ModelSpec(hidden_size=D, num_heads=2, use_moe=True, num_experts=E, num_experts_per_token=k,
                     router_scoring=draw(st.sampled_from(["softmax", "sigmoid"])),
                     norm_topk_prob=draw(st.booleans()), **draw(routings(E, k)))
    seed = draw(st.integers(0, 2 ** 16))
    ties = draw(st.booleans())  # duplicated router rows (and biases): exactly equal scores
    return spec, seed, ties


@settings(max_examples=examples(ci=40), deadline=None)
@given(case=router_cases())
def test_route_matches_across_backends_and_the_reference(case):
    spec, seed, ties = case
    rng = np.random.default_rng(seed)
    E = spec.num_experts
    router = rng.standard_normal((E, D)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(E)).astype(np.float32) if spec.router_selection_bias else None
    if ties:  # every expert copies one of the first two: ties within and across groups
        source = rng.integers(0, 2, E)
        router = router[source]
        bias = None if bias is None else bias[source]
    x = rng.standard_normal((16, D)).astype(np.float32)
    tmod, fmod = _moes(spec, router, bias)
    (t_idx, t_comb), (f_idx, f_comb) = _both_routes(tmod, fmod, x)
    np.testing.assert_array_equal(t_idx, f_idx)
    np.testing.assert_allclose(t_comb, f_comb, rtol=1e-6, atol=1e-7)
    # the reference on torch's own float32 scores, so a tie in float32 is a tie for the reference too
    logits = torch.nn.functional.linear(torch.from_numpy(x), torch.from_numpy(router))
    scores = (torch.sigmoid(logits) if spec.router_scoring.value == "sigmoid" else torch.softmax(logits, -1)).numpy()
    idx, combine = reference_route(spec, scores, bias)
    np.testing.assert_array_equal(t_idx, idx)
    np.testing.assert_allclose(t_comb, combine, rtol=1e-5, atol=1e-6)
    if ties and spec.num_experts_per_token < spec.num_experts:
        count("router draws with exact ties")


def test_masking_groups_keeps_the_lowest_index_tie_rule():
    """Four groups of two, every score equal: the kept groups are the first ones and the experts
    the lowest of them, in both backends (the mask does not reorder a tie)."""
    spec = ModelSpec(hidden_size=D, num_heads=2, use_moe=True, num_experts=8, num_experts_per_token=3,
                     num_expert_groups=4, topk_groups=2, router_group_score="top2_sum", router_scoring="sigmoid",
                     router_selection_bias=True)
    x = np.random.default_rng(0).standard_normal((5, D)).astype(np.float32)
    tmod, fmod = _moes(spec, np.zeros((8, D)), np.zeros(8))
    (t_idx, _), (f_idx, _) = _both_routes(tmod, fmod, x)
    np.testing.assert_array_equal(t_idx, [[0, 1, 2]] * 5)
    np.testing.assert_array_equal(f_idx, [[0, 1, 2]] * 5)
    # a bias on group 3 (experts 6, 7) moves the choice there, and the weights stay the plain scores
    bias = np.array([0, 0, 0, 0, 0, 0, 0.5, 0.25], np.float32)
    tmod, fmod = _moes(spec, np.zeros((8, D)), bias)
    (t_idx, t_comb), (f_idx, f_comb) = _both_routes(tmod, fmod, x)
    np.testing.assert_array_equal(t_idx, [[6, 7, 0]] * 5)
    np.testing.assert_array_equal(f_idx, t_idx)
    np.testing.assert_allclose(t_comb[:, [0, 6, 7]], 1 / 3, rtol=1e-6)  # sigmoid(0) each, renormalised
    np.testing.assert_allclose(f_comb, t_comb, rtol=1e-6)


# ---------------------------------------------------------------------- against transformers
def _hf_gate(kind: str, spec: ModelSpec, router: np.ndarray, bias: np.ndarray | None):
    if kind == "v2":
        from transformers.models.deepseek_v2.configuration_deepseek_v2 import DeepseekV2Config
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
        config = DeepseekV2Config(hidden_size=D, num_attention_heads=2, num_key_value_heads=2, n_routed_experts=spec.num_experts,
                                  num_experts_per_tok=spec.num_experts_per_token, topk_method="group_limited_greedy",
                                  n_group=spec.num_expert_groups, topk_group=spec.topk_groups,
                                  routed_scaling_factor=spec.routed_scaling_factor)
        gate = DeepseekV2TopkRouter(config)
    else:
        from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
        config = DeepseekV3Config(hidden_size=D, num_attention_heads=2, num_key_value_heads=2, n_routed_experts=spec.num_experts,
                                  num_experts_per_tok=spec.num_experts_per_token, n_group=spec.num_expert_groups,
                                  topk_group=spec.topk_groups, norm_topk_prob=spec.norm_topk_prob,
                                  routed_scaling_factor=spec.routed_scaling_factor)
        gate = DeepseekV3TopkRouter(config)
    with torch.no_grad():
        gate.weight.copy_(torch.from_numpy(router))
        if bias is not None:
            gate.e_score_correction_bias.copy_(torch.from_numpy(bias))
    return gate


HF_CASES = {
    "v2": dict(num_experts=8, num_experts_per_token=3, num_expert_groups=4, topk_groups=2, norm_topk_prob=False,
               routed_scaling_factor=16.0),
    "v3": dict(num_experts=16, num_experts_per_token=4, num_expert_groups=4, topk_groups=2, norm_topk_prob=True,
               routed_scaling_factor=2.5, router_scoring="sigmoid", router_group_score="top2_sum",
               router_selection_bias=True),
}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", list(HF_CASES))
def test_route_equals_the_transformers_deepseek_gate(kind, seed):
    spec = ModelSpec(hidden_size=D, num_heads=2, use_moe=True, **HF_CASES[kind])
    rng = np.random.default_rng([seed, 7])
    E = spec.num_experts
    router = rng.standard_normal((E, D)).astype(np.float32)
    bias = (0.2 * rng.standard_normal(E)).astype(np.float32) if spec.router_selection_bias else None
    x = rng.standard_normal((64, D)).astype(np.float32)
    gate = _hf_gate(kind, spec, router, bias)
    with torch.no_grad():
        _, hf_w, hf_idx = gate(torch.from_numpy(x))
    hf_combine = np.zeros((64, E), np.float32)
    np.put_along_axis(hf_combine, hf_idx.numpy(), hf_w.numpy() / spec.routed_scaling_factor, axis=-1)
    tmod, fmod = _moes(spec, router, bias)
    (t_idx, t_comb), (f_idx, f_comb) = _both_routes(tmod, fmod, x)
    np.testing.assert_array_equal(np.sort(t_idx, -1), np.sort(hf_idx.numpy(), -1))
    np.testing.assert_array_equal(t_idx, f_idx)
    np.testing.assert_allclose(t_comb, hf_combine, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(f_comb, hf_combine, rtol=1e-5, atol=1e-7)
    if bias is not None:  # the bias matters on these inputs: without it other experts win
        tmod_plain, _ = _moes(spec, router, np.zeros(E, np.float32))
        plain_idx = tmod_plain.route(torch.from_numpy(x))[1].numpy()
        assert (np.sort(plain_idx, -1) != np.sort(t_idx, -1)).any()


# ---------------------------------------------------------------------- the balancing update, both engines
DEEPSEEK_TINY = ModelSpec(vocab_size=40, max_seq_len=16, hidden_size=16, num_layers=2, num_heads=2, use_moe=True,
                          num_experts=8, num_experts_per_token=2, num_expert_groups=4, topk_groups=2,
                          router_group_score="top2_sum", router_scoring="sigmoid", norm_topk_prob=True,
                          router_selection_bias=True, router_bias_update_rate=1e-2, first_dense_layers=1,
                          num_shared_experts=1, routed_scaling_factor=2.5, init_std=0.1)


def _trained_biases(name: str, steps: int) -> dict[str, np.ndarray]:
    config = trajectory_config(DEEPSEEK_TINY, steps=steps, seed=3, batch_size=4, seq_len=12, grad_accum=2)
    engine_cls = backend(name).TrainingEngine
    with tempfile.TemporaryDirectory() as tmp, engine_cls(config, run_dir=tmp, callback_names=()) as engine:
        engine.fit()
        weights = engine.impl.to_canonical(engine.model)
    return {k: v for k, v in weights.items() if k.endswith("selection_bias")}


def test_bias_update_moves_the_biases_identically_in_both_engines():
    configure_numerics()
    steps, u = 4, DEEPSEEK_TINY.router_bias_update_rate
    torch_biases, jax_biases = _trained_biases("torch", steps), _trained_biases("jax", steps)
    assert list(torch_biases) == ["layers.1.mlp.router.selection_bias"]  # the MoE layer only
    for name, t in torch_biases.items():
        np.testing.assert_array_equal(jax_biases[name], t, err_msg=name)
        moves = t / u  # each step adds -u, 0 or +u per expert
        np.testing.assert_allclose(moves, np.round(moves), atol=1e-4)
        assert np.abs(moves).max() <= steps + 1e-4
        assert np.count_nonzero(np.round(moves)) >= 2, t  # moved: some experts up, some down
        assert (t > 0).any() and (t < 0).any(), t
