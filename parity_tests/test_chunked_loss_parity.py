"""Torch vs JAX chunked linear + cross-entropy (``backends/{torch,flax}/loss.py``): the same loss
and gradients of the hidden states, the weight and the bias, in float32, on shared numpy inputs,
with a chunk that does not divide the tokens and an all-ignored chunk."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from backends.flax.loss import chunked_cross_entropy as jax_chunked
from backends.torch.loss import chunked_cross_entropy as torch_chunked
from llm.parity import configure_numerics


@pytest.mark.parametrize("n,d,v,chunk,bias", [(37, 16, 50, 8, True), (64, 8, 301, 24, False), (5, 3, 7, 2, True)])
def test_torch_and_jax_chunked_losses_agree(n, d, v, chunk, bias):
    configure_numerics()
    rng = np.random.default_rng(n * v)
    h = rng.normal(size=(n, d)).astype(np.float32)
    w = (rng.normal(size=(v, d)) * 0.5).astype(np.float32)  # (V, D): torch's layout, JAX reads it as "VD"
    b = rng.normal(size=(v,)).astype(np.float32) if bias else None
    t = rng.integers(0, v, n)
    t[:chunk] = -100  # the first chunk ignored entirely
    th, tw = torch.tensor(h, requires_grad=True), torch.tensor(w, requires_grad=True)
    tb = torch.tensor(b, requires_grad=True) if bias else None
    loss = torch_chunked(th, tw, tb, torch.tensor(t), chunk)
    want = [loss.detach().numpy(), *(g.numpy() for g in torch.autograd.grad(loss, [th, tw] + ([tb] if bias else [])))]
    jb = None if b is None else jnp.asarray(b)
    jl, jg = jax.value_and_grad(lambda h, w, b: jax_chunked(h, w, b, jnp.asarray(t), chunk, weight_layout="VD"),
                                argnums=(0, 1, 2))(jnp.asarray(h), jnp.asarray(w), jb)
    got = [np.asarray(jl), *(np.asarray(g) for g in jg if g is not None)]
    assert float(np.abs(want[0])) > 0
    for name, g_, r in zip(("loss", "hidden", "weight", "bias"), got, want):
        rel = float(np.linalg.norm(g_ - r) / np.linalg.norm(r))
        assert rel <= (1e-6 if name == "loss" else 1e-5), (name, rel)  # float32 targets: llm.parity.Tolerances
