"""Exact router ties, tested on their own: both backends pick the lower expert index."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import backends.flax.model as fm
import backends.torch.model as tm
from backends.flax.convert import load_canonical as flax_load
from backends.torch.convert import load_canonical as torch_load
from llm.spec import ModelSpec, init_params


def _both_routes(spec: ModelSpec, router: np.ndarray, x: np.ndarray):
    params = {k[len("layers.0.mlp."):]: v for k, v in init_params(spec, 0).items()
              if k.startswith("layers.0.mlp.")}
    params["router.weight"] = router.astype(np.float32)
    tmod, fmod = tm.MoE(spec), fm.MoE(spec)
    torch_load(tmod, params)
    flax_load(fmod, params)
    t_combine, t_idx, _, _ = tmod.route(torch.from_numpy(x))
    f_combine, f_idx, _, _ = fmod.route(jnp.asarray(x))
    return (t_idx.numpy(), t_combine.detach().numpy()), (np.asarray(f_idx), np.asarray(f_combine))


@pytest.mark.parametrize("num_experts,k", [(2, 1), (4, 2), (8, 3), (8, 8), (5, 4)])
def test_all_equal_logits_pick_lowest_indices(num_experts, k):
    spec = ModelSpec(hidden_size=8, num_heads=2, use_moe=True, num_experts=num_experts,
                     num_experts_per_token=k, norm_topk_prob=False)
    x = np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32)
    (t_idx, t_comb), (f_idx, f_comb) = _both_routes(spec, np.zeros((num_experts, 8)), x)
    expected = np.tile(np.arange(k), (6, 1))
    np.testing.assert_array_equal(t_idx, expected)
    np.testing.assert_array_equal(f_idx, expected)
    np.testing.assert_allclose(t_comb[:, :k], 1.0 / num_experts, rtol=1e-6)
    np.testing.assert_array_equal(t_comb[:, k:], 0.0)
    np.testing.assert_allclose(f_comb, t_comb, rtol=1e-6)


def test_tie_between_two_experts_goes_to_lower_index():
    """Experts 1 and 3 share a router row and beat the others: top-1 must be 1, then 3 for top-2."""
    spec = ModelSpec(hidden_size=8, num_heads=2, use_moe=True, num_experts=4, num_experts_per_token=1)
    x = np.abs(np.random.default_rng(1).standard_normal((5, 8))).astype(np.float32)
    router = np.zeros((4, 8))
    router[1] = router[3] = 1.0  # logits: 0, s, 0, s with s > 0
    (t_idx, _), (f_idx, _) = _both_routes(spec, router, x)
    np.testing.assert_array_equal(t_idx[:, 0], 1)
    np.testing.assert_array_equal(f_idx[:, 0], 1)
    spec2 = spec.replace(num_experts_per_token=2)
    (t_idx, _), (f_idx, _) = _both_routes(spec2, router, x)
    np.testing.assert_array_equal(t_idx, [[1, 3]] * 5)
    np.testing.assert_array_equal(f_idx, [[1, 3]] * 5)
