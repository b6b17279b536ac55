"""The Flax NNX model against the contract (docs/architecture.md), on tiny hand-checkable inputs.

Everything runs eagerly except ``test_jit_forward_and_jit_decode_step_match_eager``: eager op-by-op
on tiny shapes compiles each primitive once, and the specs and batches share their sizes so those
compilations are reused across tests; the suite stays well under a minute on a 2-core CPU.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from backends.flax.convert import (
    from_canonical,
    from_spec,
    grads_to_canonical,
    is_linear_weight,
    load_canonical,
    moments_from_canonical,
    moments_to_canonical,
    to_canonical,
)
from backends.flax.model import (
    Buffer,
    DecoderModel,
    KVCache,
    LayerNorm,
    Linear,
    ModelOutput,
    MoE,
    MultiHeadAttention,
    RMSNorm,
    TransformerBlock,
)
from llm.spec import ModelSpec, SpecError, init_params, rope_cos_sin, sinusoidal_table

B, T = 2, 8  # one batch shape almost everywhere, so eager ops compile once
BASE = dict(vocab_size=32, max_seq_len=16, hidden_size=16, num_layers=2, num_heads=4, intermediate_size=32)
SPECS = {
    "rope_layernorm": ModelSpec(**BASE),
    "moe_glu_rms_bias": ModelSpec(**BASE, use_moe=True, num_experts=4, use_glu=True, norm_type="rmsnorm",
                                  mlp_bias=True, num_kv_heads=2, activation="silu", sliding_window=4,
                                  router_z_loss_coef=0.001),
    "tied_learned_bias": ModelSpec(**BASE, tie_embeddings=True, position="learned", attention_bias=True,
                                   attention_out_bias=False),
    "sinusoidal_gqa_outbias": ModelSpec(**BASE, position="sinusoidal", num_kv_heads=1,
                                        attention_out_bias=True, activation="gelu_tanh"),
}


@functools.cache
def _model(name: str) -> DecoderModel:
    """Shared read-only models (from_spec, seed 0); tests that load weights build their own."""
    return from_spec(SPECS[name])


def _ids(batch: int, length: int, seed: int = 0, vocab: int = 32) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (batch, length)), jnp.int32)


def _random_canonical(spec: ModelSpec, seed: int) -> dict[str, np.ndarray]:
    """Canonical params with every entry random (norms and biases too), so nothing is trivially 0/1."""
    rng = np.random.default_rng(seed)
    return {k: (0.3 * rng.standard_normal(v.shape)).astype(np.float32)
            for k, v in init_params(spec, 0).items()}


def _flat(state) -> dict[str, tuple[int, ...]]:
    return {".".join(str(p) for p in path): tuple(v[...].shape) for path, v in nnx.to_flat_state(state)}


# ---------------------------------------------------------------------- names, state, conversion
@pytest.mark.parametrize("name", list(SPECS))
def test_param_state_paths_are_the_canonical_names(name):
    spec = SPECS[name]
    model = _model(name)
    params = _flat(nnx.state(model, nnx.Param))
    assert set(params) == {p.name for p in spec.param_table()}
    for p in spec.param_table():  # linears stored (in, out): the only layout difference
        want = (*p.shape[:-2], p.shape[-1], p.shape[-2]) if is_linear_weight(p.name) else p.shape
        assert params[p.name] == want, p.name

    # Position tables are Buffers: in the state, never Params, equal to llm.spec's tables.
    buffers = dict(nnx.to_flat_state(nnx.state(model, Buffer)))
    names = {".".join(str(p) for p in path) for path in buffers}
    if spec.position.value == "rope":
        cos, sin = rope_cos_sin(spec)
        assert names == {f"layers.{i}.attn.rope_{t}" for i in range(spec.num_layers) for t in ("cos", "sin")}
        np.testing.assert_array_equal(np.asarray(buffers[("layers", 1, "attn", "rope_sin")][...]), sin)
        np.testing.assert_array_equal(np.asarray(buffers[("layers", 0, "attn", "rope_cos")][...]), cos)
    elif spec.position.value == "sinusoidal":
        assert names == {"embed.sinusoidal"}
        np.testing.assert_array_equal(np.asarray(buffers[("embed", "sinusoidal")][...]), sinusoidal_table(spec))
    else:
        assert names == set()
    assert not names & set(params)


@pytest.mark.parametrize("name", ["moe_glu_rms_bias", "tied_learned_bias"])
def test_canonical_round_trip_is_bitwise_and_transposes_linears(name):
    spec = SPECS[name]
    assert {k: v.tobytes() for k, v in to_canonical(_model(name)).items()} == \
        {k: v.tobytes() for k, v in init_params(spec, 0).items()}

    params = _random_canonical(spec, seed=1)
    model = from_canonical(spec, params)
    back = to_canonical(model)
    assert set(back) == set(params)
    for k, v in params.items():
        assert back[k].dtype == np.float32 and back[k].shape == v.shape, k
        assert back[k].tobytes() == v.tobytes(), k
    # The stored layout really is (in, out): a canonical (out, in) weight, transposed.
    np.testing.assert_array_equal(np.asarray(model.layers[1].attn.q_proj.weight[...]),
                                  params["layers.1.attn.q_proj.weight"].T)
    if spec.use_moe:
        np.testing.assert_array_equal(np.asarray(model.layers[0].mlp.experts.down_proj.weight[...]),
                                      params["layers.0.mlp.experts.down_proj.weight"].transpose(0, 2, 1))
        np.testing.assert_array_equal(np.asarray(model.layers[0].mlp.router.weight[...]),
                                      params["layers.0.mlp.router.weight"].T)


@pytest.mark.parametrize("name", ["moe_glu_rms_bias", "tied_learned_bias"])
def test_constructor_draws_nothing_and_from_spec_is_init_params(name):
    spec = SPECS[name].replace(dropout=0.1)
    rngs = nnx.Rngs(params=0, dropout=1)
    model = DecoderModel(spec, rngs=rngs)
    assert int(rngs.params.count[...]) == 0  # no parameter draw; only the dropout streams are forked
    assert int(rngs.dropout.count[...]) > 0
    for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        assert value[...].dtype == jnp.float32 and not np.asarray(value[...]).any(), path
    want = init_params(spec, seed=5)
    got = to_canonical(from_spec(spec, seed=5))
    assert {k: v.tobytes() for k, v in got.items()} == {k: v.tobytes() for k, v in want.items()}


def test_grads_and_moments_convert_exactly_and_strictly():
    spec = SPECS["moe_glu_rms_bias"]
    model = from_spec(spec)
    ids = _ids(B, T, seed=10)
    grads = nnx.grad(lambda m: m(ids, ids).loss)(model)
    canonical = grads_to_canonical(model, grads)
    assert set(canonical) == {p.name for p in spec.param_table()}
    q = "layers.0.attn.q_proj.weight"
    np.testing.assert_array_equal(canonical[q], np.asarray(grads["layers"][0]["attn"]["q_proj"]["weight"][...]).T)
    assert np.abs(canonical[q]).max() > 0

    moment = _random_canonical(spec, seed=11)
    held = moments_from_canonical(model, moment)  # the flax layout: what the optimiser keeps
    np.testing.assert_array_equal(held[q], moment[q].T)
    e = "layers.1.mlp.experts.down_proj.weight"
    np.testing.assert_array_equal(held[e], moment[e].transpose(0, 2, 1))
    back = moments_to_canonical(model, held)
    assert {k: v.tobytes() for k, v in back.items()} == {k: v.tobytes() for k, v in moment.items()}

    bad = dict(moment)
    del bad["final_norm.weight"]
    bad[q] = np.zeros((16, 8), np.float32)
    with pytest.raises(SpecError) as err:
        moments_from_canonical(model, bad)
    assert "missing 1: final_norm.weight" in str(err.value)
    assert f"{q}: expected (16, 16), got (16, 8)" in str(err.value)
    flax_bad = {**held, q: np.zeros((8, 16), np.float32)}
    del flax_bad["final_norm.weight"]
    for convert in (moments_to_canonical, grads_to_canonical):
        values = flax_bad if convert is moments_to_canonical else nnx.from_flat_state(
            {tuple(int(p) if p.isdigit() else p for p in k.split(".")): v for k, v in flax_bad.items()})
        with pytest.raises(SpecError) as err:
            convert(model, values)
        assert "missing 1: final_norm.weight" in str(err.value), convert.__name__
        assert f"{q}: expected (16, 16), got (8, 16)" in str(err.value), convert.__name__
    with pytest.raises(SpecError, match="unexpected 1: layers.9.attn.q_proj.weight"):
        moments_to_canonical(model, {**held, "layers.9.attn.q_proj.weight": held[q]})


def test_strict_load_lists_every_bad_name_and_writes_nothing():
    spec = SPECS["rope_layernorm"]
    model = from_canonical(spec, init_params(spec, 0))
    before = to_canonical(model)
    bad = _random_canonical(spec, seed=2)
    del bad["layers.1.mlp.up_proj.weight"]
    del bad["final_norm.bias"]
    bad["layers.0.attn.qkv_proj.weight"] = np.zeros((48, 16), np.float32)
    bad["layers.0.attn.q_proj.weight"] = bad["layers.0.attn.q_proj.weight"].T[:, :8]  # (16, 8)
    with pytest.raises(SpecError) as info:
        load_canonical(model, bad)
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    for fragment in ("missing 2", "layers.1.mlp.up_proj.weight", "final_norm.bias",
                     "unexpected 1", "layers.0.attn.qkv_proj.weight",
                     "mis-shaped 1", "layers.0.attn.q_proj.weight: expected (16, 16), got (16, 8)"):
        assert fragment in msg
    after = to_canonical(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    with pytest.raises(SpecError, match="lm_head.weight"):
        from_canonical(spec, {k: v for k, v in init_params(spec, 0).items() if k != "lm_head.weight"})


def test_load_canonical_into_submodules():
    spec = SPECS["moe_glu_rms_bias"]
    full = _random_canonical(spec, seed=3)
    model = from_canonical(spec, full)

    # A standalone block takes the "layers.1." sub-dict and computes what layer 1 of the model does.
    block = TransformerBlock(spec, 1, rngs=nnx.Rngs(5))
    prefix = "layers.1."
    sub = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
    load_canonical(block, sub)
    assert to_canonical(block).keys() == sub.keys()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((B, T, 16)), jnp.float32)
    got, want = block(x), model.layers[1](x)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))

    norm = RMSNorm(16)
    load_canonical(norm, {"weight": full["final_norm.weight"]})
    with pytest.raises(SpecError, match="unexpected 1: bias"):
        load_canonical(norm, {"weight": full["final_norm.weight"], "bias": np.zeros(16, np.float32)})

    # A root-level Linear: its own "weight" is canonical (out, in) and gets transposed.
    w = np.arange(6, dtype=np.float32).reshape(3, 2)  # (out=3, in=2)
    lin = Linear(2, 3)
    load_canonical(lin, {"weight": w})
    np.testing.assert_array_equal(np.asarray(lin(jnp.array([[1.0, 10.0]]))), [[10.0, 32.0, 54.0]])
    assert to_canonical(lin)["weight"].tobytes() == w.tobytes()
    # d/dW sum(x @ W) in canonical (out, in) layout: every row is the column sums of x.
    x = jnp.array([[1.0, 10.0], [2.0, 20.0]])
    grads = grads_to_canonical(lin, nnx.grad(lambda m: jnp.sum(m(x)))(lin))
    np.testing.assert_array_equal(grads["weight"], [[3.0, 30.0]] * 3)


# ---------------------------------------------------------------------- layers, by hand
def test_rmsnorm_and_layernorm_by_hand():
    norm = RMSNorm(2, eps=1e-6)
    norm.weight[...] = jnp.array([1.0, 2.0])
    x = jnp.array([[3.0, 4.0]])  # mean square 12.5
    np.testing.assert_allclose(np.asarray(norm(x)), [[3 / math.sqrt(12.5 + 1e-6), 8 / math.sqrt(12.5 + 1e-6)]],
                               rtol=1e-6)
    assert norm(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16

    ln = LayerNorm(2, eps=1e-6)
    ln.weight[...] = jnp.array([2.0, 1.0])
    ln.bias[...] = jnp.array([0.5, -0.5])
    # mean 2, biased variance 1: normalised [-1, 1]
    s = 1 / math.sqrt(1 + 1e-6)
    np.testing.assert_allclose(np.asarray(ln(jnp.array([[1.0, 3.0]]))), [[-2 * s + 0.5, s - 0.5]], rtol=1e-6)


def _np_attention(spec: ModelSpec, p: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Loop-by-loop reference of the contract's attention (rotate-half RoPE, GQA, window)."""
    T = x.shape[0]
    H, K, hd = spec.num_heads, spec.kv_heads, spec.dim_head
    q = (x @ p["q_proj.weight"].T).reshape(T, H, hd)
    k = (x @ p["k_proj.weight"].T).reshape(T, K, hd)
    v = (x @ p["v_proj.weight"].T).reshape(T, K, hd)
    cos, sin = rope_cos_sin(spec)

    def rope(a, t):
        half = hd // 2
        rot = np.concatenate([-a[..., half:], a[..., :half]], axis=-1)
        return a * cos[t] + rot * sin[t]

    out = np.zeros((T, H, hd))
    for h in range(H):
        kv = h // (H // K)
        for i in range(T):
            keys = [j for j in range(T) if j <= i and (spec.sliding_window is None or j > i - spec.sliding_window)]
            s = np.array([rope(q[i, h], i) @ rope(k[j, kv], j) for j in keys]) / math.sqrt(hd)
            w = np.exp(s - s.max())
            w /= w.sum()
            out[i, h] = sum(wj * v[j, kv] for wj, j in zip(w, keys, strict=True))
    return out.reshape(T, H * hd) @ p["o_proj.weight"].T


@pytest.mark.parametrize("window", [None, 3])
def test_attention_matches_loop_reference_and_window_blocks_old_keys(window):
    spec = ModelSpec(**BASE, num_kv_heads=2, sliding_window=window)
    attn = MultiHeadAttention(spec, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(4)
    p = {k: (0.5 * rng.standard_normal(v.shape)).astype(np.float32)
         for k, v in to_canonical(attn).items()}
    load_canonical(attn, p)
    x = rng.standard_normal((B, T, 16)).astype(np.float32)
    y_all = np.asarray(attn(jnp.asarray(x)))
    for b in range(B):
        np.testing.assert_allclose(y_all[b], _np_attention(spec, p, x[b].astype(np.float64)),
                                   rtol=1e-5, atol=1e-5)
    y = y_all[0]

    # Perturb position 4: it reaches queries 4..6 always, query 7 only without the window
    # (query i sees keys j with i - 3 < j <= i).
    x2 = x.copy()
    x2[0, 4] += 1.0
    moved = np.abs(np.asarray(attn(jnp.asarray(x2)))[0] - y).max(axis=-1)  # (T,)
    assert np.all(moved[:4] == 0)
    assert moved[4:7].min() > 1e-3
    if window is None:
        assert moved[7] > 1e-3
    else:
        assert moved[7] == 0


def test_gqa_equals_mha_with_duplicated_kv_heads():
    gqa_spec = ModelSpec(**BASE, num_kv_heads=2)
    mha_spec = ModelSpec(**BASE)
    gqa, mha = MultiHeadAttention(gqa_spec, rngs=nnx.Rngs(0)), MultiHeadAttention(mha_spec, rngs=nnx.Rngs(1))
    p = _random_canonical(gqa_spec, 5)
    p = {k[len("layers.0.attn."):]: v for k, v in p.items() if k.startswith("layers.0.attn.")}
    load_canonical(gqa, p)
    hd = 4
    dup = {**p}
    for name in ("k_proj.weight", "v_proj.weight"):  # query head h reads kv head h // 2
        dup[name] = p[name].reshape(2, hd, 16)[[0, 0, 1, 1]].reshape(16, 16)
    load_canonical(mha, dup)
    x = jnp.asarray(np.random.default_rng(6).standard_normal((B, T, 16)), jnp.float32)
    np.testing.assert_allclose(np.asarray(gqa(x)), np.asarray(mha(x)), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------- mixture of experts
def _np_expert(p: dict[str, np.ndarray], e: int, x: np.ndarray) -> np.ndarray:
    """Expert e of a SiLU GLU MoE, from canonical weights."""
    g = p["experts.gate_proj.weight"][e] @ x + p["experts.gate_proj.bias"][e]
    u = p["experts.up_proj.weight"][e] @ x + p["experts.up_proj.bias"][e]
    h = g / (1 + np.exp(-g)) * u
    return p["experts.down_proj.weight"][e] @ h + p["experts.down_proj.bias"][e]


def test_moe_ties_go_to_the_lower_expert_and_outputs_mix_the_chosen_experts():
    spec = SPECS["moe_glu_rms_bias"]  # E=4, k=2, norm_topk_prob
    moe = MoE(spec)
    full = _random_canonical(spec, 7)
    p = {k[len("layers.0.mlp."):]: v for k, v in full.items() if k.startswith("layers.0.mlp.")}
    router = np.zeros((4, 16), np.float32)
    router[:, 0] = [1.0, 3.0, 2.0, 2.0]  # token 0: expert 1, then a 2-vs-3 tie
    router[:, 2] = [0.5, 0.5, 0.5, 0.5]  # token 2: all equal
    p["router.weight"] = router
    load_canonical(moe, p)
    x = np.zeros((3, 16), np.float32)
    x[0, 0] = 1.0
    x[1, 1] = 1.0  # router sees only zeros: a four-way tie
    x[2, 2] = 1.0
    combine, idx, logits, probs = moe.route(jnp.asarray(x))
    assert np.asarray(idx).tolist() == [[1, 2], [0, 1], [0, 1]]
    probs0 = np.exp([1.0, 3.0, 2.0, 2.0]) / np.exp([1.0, 3.0, 2.0, 2.0]).sum()
    w = probs0[[1, 2]] / probs0[[1, 2]].sum()
    np.testing.assert_allclose(np.asarray(combine)[0], [0, w[0], w[1], 0], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(combine)[1:], [[0.5, 0.5, 0, 0]] * 2, rtol=1e-6)

    y, balance, z, _ = moe(jnp.asarray(x)[None])
    want0 = w[0] * _np_expert(p, 1, x[0]) + w[1] * _np_expert(p, 2, x[0])
    np.testing.assert_allclose(np.asarray(y)[0, 0], want0, rtol=1e-5, atol=1e-6)
    want1 = 0.5 * _np_expert(p, 0, x[1]) + 0.5 * _np_expert(p, 1, x[1])
    np.testing.assert_allclose(np.asarray(y)[0, 1], want1, rtol=1e-5, atol=1e-6)

    # balance = E * sum_e f_e P_e: assignments (1,2), (0,1), (0,1) -> f = [2, 3, 1, 0] / 6
    P = np.asarray(probs).mean(axis=0)
    np.testing.assert_allclose(float(balance), 4 * np.dot([2 / 6, 3 / 6, 1 / 6, 0], P), rtol=1e-6)
    lse = np.log(np.exp(np.asarray(logits, np.float64)).sum(-1))
    np.testing.assert_allclose(float(z), np.mean(lse ** 2), rtol=1e-6)


def test_moe_capacity_drops_later_tokens():
    # E=2, k=1, N=4, capacity_factor=0.5 -> C = ceil(4 * 1 / 2 * 0.5) = 1 per expert
    spec = ModelSpec(**BASE, use_moe=True, num_experts=2, num_experts_per_token=1, capacity_factor=0.5)
    assert spec.capacity(4) == 1
    moe = MoE(spec)
    p = {k[len("layers.0.mlp."):]: v for k, v in _random_canonical(spec, 8).items()
         if k.startswith("layers.0.mlp.")}
    router = np.zeros((2, 16), np.float32)
    router[0, 0] = router[1, 1] = 10.0
    p["router.weight"] = router
    load_canonical(moe, p)
    x = np.random.default_rng(9).standard_normal((1, 4, 16)).astype(np.float32)
    x[0, :, :2] = [[3, 0], [3, 0], [0, 3], [3, 0]]  # tokens route to experts 0, 0, 1, 0
    y, balance, _, _ = moe(jnp.asarray(x))
    y = np.asarray(y)[0]
    norms = np.abs(y).max(axis=-1)
    assert norms[0] > 1e-3 and norms[2] > 1e-3  # first token at each expert is kept
    assert norms[1] == 0 and norms[3] == 0  # later tokens at the full expert get exactly 0
    # the balance counts assignments before the drops: f = [3/4, 1/4]
    _, _, _, probs = moe.route(jnp.asarray(x[0]))
    P = np.asarray(probs).mean(axis=0)
    np.testing.assert_allclose(float(balance), 2 * (0.75 * P[0] + 0.25 * P[1]), rtol=1e-6)

    dropless = MoE(spec.replace(capacity_factor=None))
    load_canonical(dropless, p)
    y_all = np.asarray(dropless(jnp.asarray(x))[0])[0]
    np.testing.assert_array_equal(y_all[[0, 2]], y[[0, 2]])
    assert np.abs(y_all[[1, 3]]).max(axis=-1).min() > 1e-3


# ---------------------------------------------------------------------- the model
def test_causality_future_tokens_do_not_change_past_logits():
    model = _model("rope_layernorm")
    ids = _ids(B, T, seed=1)
    ids2 = ids.at[:, 5:].set((ids[:, 5:] + 1) % 32)
    a, b = np.asarray(model(ids).logits), np.asarray(model(ids2).logits)
    np.testing.assert_allclose(a[:, :5], b[:, :5], rtol=1e-6, atol=1e-6)
    assert np.abs(a[:, 5] - b[:, 5]).max(axis=-1).min() > 1e-4


@pytest.mark.parametrize("name", ["moe_glu_rms_bias", "tied_learned_bias"])
def test_kv_cache_decoding_equals_full_forward(name):
    model = _model(name)  # rope + GQA + window + MoE, and learned positions + tied head
    ids = _ids(B, T, seed=2)
    full = np.asarray(model(ids).logits)
    cache = model.new_cache(B)
    steps = [model(ids[:, :5], cache=cache, start_pos=0).logits]  # prefill 5
    for pos in range(5, T):
        steps.append(model(ids[:, pos:pos + 1], cache=cache, start_pos=pos).logits)
    np.testing.assert_allclose(np.concatenate([np.asarray(s) for s in steps], axis=1), full,
                               rtol=1e-5, atol=1e-6)


def test_positions_past_max_seq_len_are_a_clear_error():
    model = _model("tied_learned_bias")  # max_seq_len 16
    with pytest.raises(ValueError, match="max_seq_len=16"):
        model(_ids(1, 17))
    with pytest.raises(ValueError, match="max_seq_len=16"):
        model(_ids(1, 3), start_pos=14, cache=model.new_cache(1))
    with pytest.raises(ValueError, match="KV cache overflow"):
        model(_ids(B, T), start_pos=1, cache=model.new_cache(B, max_seq_len=8))


def test_loss_ignores_minus_100_and_is_zero_when_nothing_is_valid():
    model = _model("sinusoidal_gqa_outbias")
    ids = _ids(B, T, seed=3)
    targets = np.asarray(_ids(B, T, seed=4)).copy()
    targets[0, :4] = -100
    targets[1, 5] = -100
    out = model(ids, jnp.asarray(targets))
    logits = np.asarray(out.logits, np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    valid = targets != -100
    want = -np.mean(logp[valid, targets[valid]])  # 11 valid targets
    np.testing.assert_allclose(float(out.loss), want, rtol=1e-6)
    assert float(model(ids, jnp.full((B, T), -100)).loss) == 0.0
    assert model(ids).loss is None
    assert float(out.aux_loss) == 0.0 and float(out.z_loss) == 0.0


def test_aux_and_z_loss_are_scaled_layer_means_and_hidden_states_are_the_layer_outputs():
    spec = SPECS["moe_glu_rms_bias"]
    model = _model("moe_glu_rms_bias")
    ids = _ids(B, T, seed=5)
    out = model(ids, return_hidden=True)
    assert model(ids).hidden_states is None
    x = model.embed(ids)
    hidden = [x]
    balances, zs = [], []
    for layer in model.layers:
        x, b, z, _ = layer(x)
        hidden.append(x)
        balances.append(float(b))
        zs.append(float(z))
    hidden.append(model.final_norm(x))
    assert len(out.hidden_states) == spec.num_layers + 2
    for got, want in zip(out.hidden_states, hidden, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert min(balances) > 0.5 and min(zs) > 0.5
    np.testing.assert_allclose(float(out.aux_loss), spec.router_aux_loss_coef * np.mean(balances), rtol=1e-6)
    np.testing.assert_allclose(float(out.z_loss), spec.router_z_loss_coef * np.mean(zs), rtol=1e-6)


def test_jit_forward_and_jit_decode_step_match_eager():
    model = _model("moe_glu_rms_bias")
    ids, targets = _ids(B, T, seed=6), _ids(B, T, seed=7)
    eager = model(ids, targets)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, ids, targets) -> ModelOutput:
        return nnx.merge(graphdef, state)(ids, targets)

    jitted = forward(state, ids, targets)
    # logits, loss, aux_loss, z_loss, expert_load (an MoE model)
    assert isinstance(jitted, ModelOutput) and len(jax.tree.leaves(jitted)) == 5
    for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)

    # One compiled decode step for every position: start_pos is traced, the cache is state.
    cache_def, cache_state = nnx.split(model.new_cache(B))

    traces = []

    @jax.jit
    def step(state, cache_state, token, pos):
        traces.append(pos)
        cache = nnx.merge(cache_def, cache_state)
        logits = nnx.merge(graphdef, state)(token, cache=cache, start_pos=pos).logits
        return logits, nnx.state(cache)

    logits = []
    for pos in range(T):
        out, cache_state = step(state, cache_state, ids[:, pos:pos + 1], jnp.int32(pos))
        logits.append(np.asarray(out))
    assert len(traces) == 1
    np.testing.assert_allclose(np.concatenate(logits, axis=1), np.asarray(eager.logits), rtol=1e-5, atol=1e-6)


def test_dropout_only_when_not_deterministic():
    spec = SPECS["rope_layernorm"].replace(dropout=0.5)
    model = from_spec(spec, seed=0)
    ids = _ids(B, T, seed=8)
    a, b = np.asarray(model(ids).logits), np.asarray(model(ids, deterministic=True).logits)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, np.asarray(_model("rope_layernorm")(ids).logits), rtol=1e-6, atol=1e-6)
    t1 = np.asarray(model(ids, deterministic=False).logits)
    t2 = np.asarray(model(ids, deterministic=False).logits)
    assert np.abs(t1 - a).max() > 1e-3 and np.abs(t1 - t2).max() > 1e-3  # the stream advances


def test_bfloat16_compute_keeps_float32_params_and_logits():
    spec = SPECS["moe_glu_rms_bias"]
    model = from_spec(spec, dtype=jnp.bfloat16)
    assert {v[...].dtype for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))} == {jnp.dtype("float32")}
    ids = _ids(B, T, seed=9)
    out, ref = model(ids, ids), _model("moe_glu_rms_bias")(ids, ids)
    assert out.logits.dtype == jnp.float32 and out.loss.dtype == jnp.float32
    p, q = jax.nn.softmax(ref.logits), jax.nn.log_softmax(out.logits)
    kl = float(jnp.mean(jnp.sum(p * (jnp.log(p) - q), axis=-1)))
    assert 0 < kl < 1e-2


# ---------------------------------------------------------------------- masks, segments, causal=False
def _mask_spec(**kw) -> ModelSpec:
    return ModelSpec(vocab_size=32, max_seq_len=16, hidden_size=16, num_layers=2, num_heads=4, **kw)


def test_padded_targets_are_ignored_and_padded_rows_are_finite():
    model = from_spec(_mask_spec())
    ids, targets = _ids(2, 8), _ids(2, 8, seed=1)
    mask = jnp.ones((2, 8), jnp.int32).at[0, :3].set(0)
    out = model(ids, targets, attention_mask=mask)
    ignored = targets.at[0, :3].set(-100)
    assert bool(jnp.all(jnp.isfinite(out.logits)))
    assert float(out.loss) == float(model(ids, ignored, attention_mask=mask).loss)
    assert float(out.loss) != float(model(ids, targets).loss)


def test_segments_never_attend_across():
    """Changing the first document changes nothing in the second when segment ids separate them."""
    model = from_spec(_mask_spec(position="learned"))
    ids = _ids(1, 10)
    seg = jnp.asarray([[0] * 4 + [1] * 6])
    other = ids.at[0, :4].set((ids[0, :4] + 1) % 32)
    a, b = model(ids, segment_ids=seg).logits, model(other, segment_ids=seg).logits
    np.testing.assert_array_equal(np.asarray(a[0, 4:]), np.asarray(b[0, 4:]))
    assert not np.allclose(np.asarray(a[0, 4:]), np.asarray(model(other).logits[0, 4:]))


def test_non_causal_attention_sees_the_future_and_windows_both_ways():
    spec = _mask_spec(sliding_window=2)
    attn = MultiHeadAttention(spec, causal=False, rngs=nnx.Rngs(0))
    key = jax.random.key(0)
    for _, p in nnx.to_flat_state(nnx.state(attn, nnx.Param)):
        key, sub = jax.random.split(key)
        p[...] = jax.random.normal(sub, p[...].shape)
    x = jax.random.normal(jax.random.key(1), (1, 6, 16))
    y, y2 = attn(x), attn(x.at[0, 3].add(1.0))  # slot 3 is in the window of slots 2, 3, 4 only
    changed = [bool(jnp.any(y[0, i] != y2[0, i])) for i in range(6)]
    assert changed == [False, False, True, True, True, False]
    assert MultiHeadAttention(spec, rngs=nnx.Rngs(0)).causal is True
    with pytest.raises(ValueError, match="needs causal attention"):
        attn(x, cache=KVCache(spec, 1)[0])


def test_pad_token_id_row_has_zero_gradient():
    ids = jnp.asarray([[0, 0, 5, 6, 7, 0]])
    for pad in (0, None):
        model = from_spec(_mask_spec(pad_token_id=pad))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        grads = jax.grad(lambda p: nnx.merge(graphdef, p, rest)(ids, jnp.roll(ids, -1, 1)).loss)(params)
        row = np.asarray(grads["embed"]["weight"][...])[0]
        assert np.all(row == 0) if pad == 0 else np.any(row != 0)


def test_mask_shape_is_checked():
    with pytest.raises(ValueError, match=r"attention_mask must be \(batch, 8\)"):
        _model("rope_layernorm")(_ids(2, 8), attention_mask=jnp.ones((2, 7)))


@pytest.mark.parametrize("remat", ["full", "selective"])
def test_recomputed_blocks_under_plain_jax_grad_equal_the_plain_model(remat):
    # jax.grad of nnx.merge (how scripts and the benchmark worker train) with remat on: the same
    # loss and gradients as without it, and no write-back of unchanged block state across traces
    ids = _ids(2, 8)
    model = from_spec(_mask_spec())
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    plain = jax.value_and_grad(lambda p: nnx.merge(graphdef, p, rest)(ids, jnp.roll(ids, -1, 1)).loss)(params)
    model.remat = remat
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    recomputed = jax.jit(jax.value_and_grad(lambda p: nnx.merge(graphdef, p, rest)(ids, jnp.roll(ids, -1, 1)).loss))(params)
    np.testing.assert_allclose(recomputed[0], plain[0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(recomputed[1]), jax.tree.leaves(plain[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
