"""The blocked MoE dispatch (``moe_impl="blocked"``) across backends: with the same weights and
bf16 compute, torch's and flax's blocked paths agree as closely as their dense paths do.

Each backend's blocked path is checked against its own dense path in ``tests/test_torch_speed_paths.py``
and ``tests/test_flax_speed_paths.py``; this is the one fast-path test that needs both frameworks.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import torch

from backends.flax import from_spec as flax_from_spec
from backends.torch import from_spec as torch_from_spec
from llm.spec import ModelSpec

SPEC = ModelSpec(vocab_size=97, max_seq_len=16, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                 use_glu=True, activation="silu", norm_type="rmsnorm", position="rope", use_moe=True,
                 num_experts=4, num_experts_per_token=2, router_z_loss_coef=1e-3)


def test_blocked_moe_agrees_across_backends_in_bf16():
    """Same weights, bf16 compute: the two blocked paths agree as closely as the dense ones do."""
    rng = np.random.default_rng(11)
    ids, tgt = rng.integers(0, SPEC.vocab_size, (2, 3, 12))
    tgt[0, :4] = -100
    tmodel = torch_from_spec(SPEC, seed=3)
    fmodel = flax_from_spec(SPEC, seed=3, dtype=jnp.bfloat16)
    losses = {}
    for impl in ("dense", "blocked"):
        for m in tmodel.modules():
            if hasattr(m, "moe_impl"):
                m.moe_impl = impl
        fmodel.set_attributes(moe_impl=impl)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            t = float(tmodel(torch.as_tensor(ids), torch.as_tensor(tgt)).loss)
        f = float(fmodel(jnp.asarray(ids), jnp.asarray(tgt)).loss)
        losses[impl] = (t, f)
    for t, f in losses.values():
        assert abs(t - f) < 2e-2 * abs(t)
    assert abs(losses["blocked"][0] - losses["dense"][0]) < 1e-2 * abs(losses["dense"][0])
