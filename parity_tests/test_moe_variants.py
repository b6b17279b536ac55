"""The MoE variants, one fixed spec each, in float32.

* torch vs JAX, the whole model (``check_model``: logits, losses, every gradient, activations);
* in each backend, the sparse dispatches (``blocked``, ``grouped``) against the ``dense`` reference:
  logits and the aux loss, and the gradient of every parameter;
* each variant changes the function: its logits differ from the plain MoE's by more than the
  tolerance (a field both backends ignored would pass the first two checks).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import backends.flax.model as fm
import backends.torch.model as tm
from backends.flax.convert import from_canonical as flax_model
from backends.flax.convert import grads_to_canonical
from backends.torch.convert import from_canonical as torch_model
from llm.spec import ModelSpec, init_params
from parity_tests.perturb import weights_at
from parity_tests.test_model_parity import check_model

BASE = dict(vocab_size=40, max_seq_len=16, hidden_size=16, num_layers=3, num_heads=2, use_moe=True,
            num_experts=4, num_experts_per_token=2, use_glu=True, activation="silu", norm_type="rmsnorm",
            init_std=0.3, router_z_loss_coef=1e-3)
VARIANTS = {
    "shared": dict(num_shared_experts=1),
    "shared2-sized-gated-bias": dict(num_shared_experts=2, shared_expert_intermediate_size=6,
                                     shared_expert_gate=True, mlp_bias=True),
    "moe-size-first-dense": dict(moe_intermediate_size=8, first_dense_layers=1),
    "sigmoid-renormalised": dict(router_scoring="sigmoid"),
    "sigmoid-raw-scaled": dict(router_scoring="sigmoid", norm_topk_prob=False, routed_scaling_factor=2.5),
    "deepseek-like": dict(router_scoring="sigmoid", routed_scaling_factor=2.5, first_dense_layers=1,
                          moe_intermediate_size=8, num_shared_experts=2, capacity_factor=1.0),
    # group-limited routing (DeepSeek-V2: the best expert scores a group) and DeepSeek-V3's: sigmoid
    # scores, the selection bias (nonzero at the perturbed weights), groups scored by their top two
    "groups-max": dict(num_expert_groups=2, topk_groups=1),
    "deepseek-v3-routing": dict(router_scoring="sigmoid", num_expert_groups=2, topk_groups=1,
                                router_group_score="top2_sum", router_selection_bias=True,
                                router_bias_update_rate=1e-3, routed_scaling_factor=2.5, num_shared_experts=1),
}
PLAIN = ModelSpec(**BASE)


def _spec(name: str) -> ModelSpec:
    return ModelSpec(**BASE, **VARIANTS[name])


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_torch_vs_jax(name):
    check_model(_spec(name), 2, 9, 1, f"moe variant {name}", drawn=False, weights="perturbed")


def _torch_run(spec, params, ids, impl):
    model = torch_model(spec, params)
    tm.set_moe_impl(model, impl)
    out = model(torch.from_numpy(ids), torch.from_numpy(ids))
    (out.loss + out.aux_loss + out.z_loss).backward()
    grads = {n: p.grad.numpy() for n, p in model.named_parameters()}
    return out.logits.detach().numpy(), float(out.aux_loss), grads


def _flax_run(spec, params, ids, impl):
    model = flax_model(spec, params)
    fm.set_moe_impl(model, impl)
    graphdef, weights, rest = nnx.split(model, nnx.Param, ...)

    def objective(weights):
        out = nnx.merge(graphdef, weights, rest)(jnp.asarray(ids), jnp.asarray(ids))
        return out.loss + out.aux_loss + out.z_loss, out

    (_, out), grads = jax.value_and_grad(objective, has_aux=True)(weights)
    return np.asarray(out.logits), float(out.aux_loss), grads_to_canonical(model, grads)


@pytest.mark.parametrize("backend", ["torch", "jax"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_sparse_dispatches_match_the_dense_reference(name, backend):
    spec = _spec(name)
    params = weights_at(spec, init_params(spec, 2), 2, "perturbed")
    ids = np.random.default_rng(3).integers(0, spec.vocab_size, (2, 9))
    run = _torch_run if backend == "torch" else _flax_run
    ref_logits, ref_aux, ref_grads = run(spec, params, ids, "dense")
    assert ref_aux > 0
    for impl in ("blocked", "grouped"):
        logits, aux, grads = run(spec, params, ids, impl)
        np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5, err_msg=f"{impl} logits")
        assert abs(aux - ref_aux) <= 1e-6, (impl, aux, ref_aux)
        assert set(grads) == set(ref_grads) == {p.name for p in spec.param_table() if p.trainable}
        for key, ref in ref_grads.items():
            scale = max(float(np.abs(ref).max()), 1e-6)
            err = float(np.abs(grads[key] - ref).max()) / scale
            assert err <= 1e-4, f"{impl} {key}: rel err {err:.2e}"


@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_variant_changes_the_function(name):
    """The variant's logits against the plain MoE's on the weights the two share."""
    spec = _spec(name)
    params = init_params(spec, 4)
    ids = np.random.default_rng(5).integers(0, spec.vocab_size, (1, 12))
    got = torch_model(spec, params)(torch.from_numpy(ids)).logits.detach().numpy()
    plain = init_params(PLAIN, 4)
    shared = {k: v for k, v in params.items() if k in plain and v.shape == plain[k].shape}
    plain.update(shared)
    ref = torch_model(PLAIN, plain)(torch.from_numpy(ids)).logits.detach().numpy()
    assert float(np.abs(got - ref).max()) > 1e-3
