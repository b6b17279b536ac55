"""Component-by-component parity, so a failure names the layer: norm, embedding, attention, MLP,
MoE and one TransformerBlock, each built alone in both backends from the same canonical
sub-weights, compared on outputs and on gradients w.r.t. every parameter and the input.

The objective is ``sum(out * cotangent)`` (+ fixed weights on MoE's balance and z terms) with a
random cotangent, so every output element's gradient path is exercised. Each example compares at
the initial weights or at perturbed ones (``parity_tests.perturb``: norm weights, biases and routers
away from 1 / 0 / their init), where misplaced norm and bias terms show.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from hypothesis import assume, given, note
from hypothesis import strategies as st

import backends.flax.model as fm
import backends.torch.model as tm
from backends.flax.convert import grads_to_canonical
from backends.flax.convert import load_canonical as flax_load
from backends.torch.convert import load_canonical as torch_load
from llm.parity import GRAD_FLOOR, Tolerances, rel_err
from llm.spec import ModelSpec, init_params
from parity_tests.perturb import weights_at
from parity_tests.recording import count, record
from parity_tests.strategies import cases

TOL = Tolerances()
ROUTER_MARGIN = 1e-4

# name -> (torch constructor, flax constructor, canonical prefix of its weights, input kind)
COMPONENTS = {
    "norm": (lambda s: tm.build_norm(s), lambda s: fm.build_norm(s), "layers.0.attn_norm.", "x"),
    "embedding": (lambda s: tm.EmbeddingLayer(s), lambda s: fm.EmbeddingLayer(s, rngs=nnx.Rngs(0)), "embed.", "ids"),
    "attention": (lambda s: tm.build_attention(s), lambda s: fm.build_attention(s, rngs=nnx.Rngs(0)),
                  "layers.0.attn.", "x"),
    # causal=False: the component-level encoder-style layer (no triangle; a window keeps |i - j| < w)
    "attention_noncausal": (lambda s: tm.build_attention(s, causal=False),
                            lambda s: fm.build_attention(s, causal=False, rngs=nnx.Rngs(0)), "layers.0.attn.", "x"),
    "mlp": (lambda s: tm.MLP(s), lambda s: fm.MLP(s), "layers.0.mlp.", "x"),
    "moe": (lambda s: tm.MoE(s), lambda s: fm.MoE(s), "layers.0.mlp.", "x"),
    "block": (lambda s: tm.TransformerBlock(s, 0), lambda s: fm.TransformerBlock(s, 0, rngs=nnx.Rngs(0)),
              "layers.0.", "x"),
}


def _split(out):
    """(main output, balance, z) for components that return a tuple (the MoE's expert load left
    out), else (out, 0, 0)."""
    return out[:3] if isinstance(out, tuple) else (out, 0.0, 0.0)


def _router_margin(moe, t_in, tmod, spec: ModelSpec) -> float:
    """Smallest k-th vs (k+1)-th router-logit gap the MoE sees (inf when k == E)."""
    k = spec.num_experts_per_token
    if k == spec.num_experts:
        return np.inf
    captured = {}

    def keep_input(_module, inputs, _output):  # returns None: a hook's return value replaces the output
        captured.setdefault("x", inputs[0].detach())

    handle = moe.register_forward_hook(keep_input)
    with torch.no_grad():
        tmod(t_in)
    handle.remove()
    logits = captured["x"].reshape(-1, spec.hidden_size).double() @ moe.router.weight.detach().double().T
    top = torch.sort(logits, dim=-1, descending=True).values
    return float((top[:, k - 1] - top[:, k]).min())


def run_component(name: str, spec: ModelSpec, shape: tuple[int, int], weights: str, seed: int,
                  drawn: bool = True) -> None:
    """Compare component ``name`` of ``spec``; ``drawn=False`` for a fixed example (a router near-tie is
    then an error instead of a discarded draw)."""
    make_torch, make_flax, prefix, kind = COMPONENTS[name]
    canonical = weights_at(spec, init_params(spec, seed), seed, weights)
    params = {k[len(prefix):]: v for k, v in canonical.items() if k.startswith(prefix)}
    rng = np.random.default_rng(seed)
    B, T = shape
    if kind == "ids":
        inp = rng.integers(0, spec.vocab_size, size=(B, T)).astype(np.int64)
    else:
        inp = rng.standard_normal((B, T, spec.hidden_size)).astype(np.float32)
    cot = rng.standard_normal((B, T, spec.hidden_size)).astype(np.float32)
    a_bal, a_z = 0.7, 0.3

    # torch
    tmod = make_torch(spec).eval()
    torch_load(tmod, params)
    t_in = torch.from_numpy(inp).requires_grad_(kind == "x")
    t_out, t_bal, t_z = _split(tmod(t_in))
    if name in ("moe", "block") and spec.use_moe:
        margin = _router_margin(tmod if name == "moe" else tmod.mlp, t_in, tmod, spec)
        if drawn:
            assume(margin > ROUTER_MARGIN)
        else:
            assert margin > ROUTER_MARGIN, f"fixed example has a router near-tie ({margin:.2e}); pick another seed"
    objective = (t_out * torch.from_numpy(cot)).sum() + a_bal * t_bal + a_z * t_z
    objective.backward()
    t_grads = {n: p.grad.numpy() for n, p in tmod.named_parameters()}
    t_in_grad = t_in.grad.numpy() if kind == "x" else None

    # flax
    fmod = make_flax(spec)
    flax_load(fmod, params)
    graphdef, weights, rest = nnx.split(fmod, nnx.Param, ...)

    def f_objective(weights, x):
        out, bal, z = _split(nnx.merge(graphdef, weights, rest)(x))
        return (out * jnp.asarray(cot)).sum() + a_bal * bal + a_z * z, out

    argnums = (0, 1) if kind == "x" else 0
    (_, f_out), f_grads = jax.jit(jax.value_and_grad(f_objective, argnums=argnums, has_aux=True))(
        weights, jnp.asarray(inp))
    if kind == "x":
        f_grads, f_in_grad = f_grads
    f_grads = grads_to_canonical(fmod, f_grads)

    if drawn:
        note(f"{name}: spec={spec.to_dict()} shape={shape} weights={weights}")
    out_err = rel_err(np.asarray(f_out), t_out.detach().numpy())
    record(f"{name} output rel", out_err, name)
    assert out_err <= TOL.hidden_rel, f"{name} output rel err {out_err:.3e}"
    if kind == "x":
        in_err = rel_err(np.asarray(f_in_grad), t_in_grad)
        record(f"{name} input-grad rel", in_err, name)
        assert in_err <= TOL.grad_rel, f"{name} input grad rel err {in_err:.3e}"
    assert set(f_grads) == set(t_grads)
    floor = GRAD_FLOOR * max(float(np.linalg.norm(g)) for g in t_grads.values())
    for pname, tg in t_grads.items():
        err = rel_err(f_grads[pname], tg, floor)
        record(f"{name} param-grad rel", err, f"{name}.{pname}")
        assert err <= TOL.grad_rel, f"{name} grad {pname} rel err {err:.3e}"
    assert floor > 0, f"{name}: every parameter gradient is exactly zero, nothing was compared"
    count(f"component {name}")


def _given(moe: bool | None = False):
    return given(case=cases(moe=moe, max_layers=1), seed=st.integers(0, 2**16))


@_given()
def test_norm(case, seed):
    run_component("norm", *case, seed)


@_given()
def test_embedding(case, seed):
    run_component("embedding", *case, seed)


@_given()
def test_attention(case, seed):
    run_component("attention", *case, seed)


@_given()
def test_attention_noncausal(case, seed):
    run_component("attention_noncausal", *case, seed)


@_given()
def test_mlp(case, seed):
    run_component("mlp", *case, seed)


@_given(moe=True)
def test_moe(case, seed):
    run_component("moe", *case, seed)


@_given(moe=None)
def test_block(case, seed):
    run_component("block", *case, seed)
