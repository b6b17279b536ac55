"""The sparse MoE dispatches (``moe_impl`` ``"blocked"`` and ``"grouped"``) across backends.

* bf16: with the same weights, torch's and flax's sparse paths agree as closely as their dense
  paths do.
* float32, one MoE layer: torch's grouped path (run-by-run matmuls on CPU) and flax's
  (``jax.lax.ragged_dot``) give the same outputs and gradients, x and router included.

Each backend's sparse paths are checked against its own dense path in
``tests/test_torch_speed_paths.py`` and ``tests/test_flax_speed_paths.py``; these are the fast-path
tests that need both frameworks.
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
from backends.flax import from_spec as flax_from_spec
from backends.flax.convert import load_canonical as flax_load
from backends.torch import from_spec as torch_from_spec
from backends.torch.convert import load_canonical as torch_load
from llm.spec import ModelSpec, init_params

SPEC = ModelSpec(vocab_size=97, max_seq_len=16, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                 use_glu=True, activation="silu", norm_type="rmsnorm", position="rope", use_moe=True,
                 num_experts=4, num_experts_per_token=2, router_z_loss_coef=1e-3)


@pytest.mark.parametrize("impl", ["blocked", "grouped"])
def test_sparse_moe_agrees_across_backends_in_bf16(impl):
    """Same weights, bf16 compute: the two sparse paths agree as closely as the dense ones do."""
    rng = np.random.default_rng(11)
    ids, tgt = rng.integers(0, SPEC.vocab_size, (2, 3, 12))
    tgt[0, :4] = -100
    tmodel = torch_from_spec(SPEC, seed=3)
    fmodel = flax_from_spec(SPEC, seed=3, dtype=jnp.bfloat16)
    losses = {}
    for mode in ("dense", impl):
        tm.set_moe_impl(tmodel, mode)
        fm.set_moe_impl(fmodel, mode)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            t = float(tmodel(torch.as_tensor(ids), torch.as_tensor(tgt)).loss)
        f = float(fmodel(jnp.asarray(ids), jnp.asarray(tgt)).loss)
        losses[mode] = (t, f)
    for t, f in losses.values():
        assert abs(t - f) < 2e-2 * abs(t)
    assert abs(losses[impl][0] - losses["dense"][0]) < 1e-2 * abs(losses["dense"][0])


def test_grouped_moe_layer_agrees_across_backends_in_float32():
    spec = SPEC.replace(num_experts=5, num_experts_per_token=3, capacity_factor=0.6, mlp_bias=True)
    rng = np.random.default_rng(12)
    params = {n[len("layers.0.mlp."):]: rng.standard_normal(v.shape).astype(np.float32) * 0.3
              for n, v in init_params(spec, 0).items() if n.startswith("layers.0.mlp.")}
    params["router.weight"][3] = params["router.weight"][1]  # an exact tie: expert 1 wins
    x = rng.standard_normal((1, 10, spec.hidden_size)).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)

    tlayer = tm.MoE(spec)
    torch_load(tlayer, params)
    tlayer.moe_impl = "grouped"
    xt = torch.tensor(x, requires_grad=True)
    y, balance, z, _ = tlayer(xt)
    ((y * torch.from_numpy(g)).sum() + balance + z).backward()
    t_grads = {"x": xt.grad.numpy(), **{n: p.grad.numpy() for n, p in tlayer.named_parameters()}}

    flayer = fm.MoE(spec)
    flax_load(flayer, params)
    flayer.moe_impl = "grouped"
    graphdef, state, rest = nnx.split(flayer, nnx.Param, ...)

    def objective(state, x):
        y, balance, z, _ = nnx.merge(graphdef, state, rest)(x)
        return jnp.sum(y * g) + balance + z, y

    (g_state, g_x), fy = jax.grad(objective, argnums=(0, 1), has_aux=True)(state, jnp.asarray(x))
    f_grads = {"x": np.asarray(g_x), **{".".join(map(str, k)): np.asarray(v[...])
                                        for k, v in nnx.to_flat_state(g_state)}}
    np.testing.assert_allclose(np.asarray(fy), y.detach().numpy(), rtol=1e-5, atol=1e-6)
    for name, want in t_grads.items():
        got = f_grads[name]
        if name.endswith("weight"):  # flax linears are (..., in, out); canonical and torch (..., out, in)
            got = np.swapaxes(got, -1, -2)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()), err_msg=name)
