"""The PyTorch backend against ``docs/architecture.md``: names, loading, and the math on small inputs.

Every model here is tiny (V=32, D=16, T<=16) so the whole file runs in seconds; the single
``torch.compile`` test is marked ``slow`` and should stay the only one (a cold compile costs ~15 s
on a 2-core CPU).
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backends.torch import DecoderModel, from_canonical, from_spec, load_canonical, to_canonical
from backends.torch.convert import grads_to_canonical, moments_from_canonical, moments_to_canonical
from backends.torch.model import (
    MLP,
    KVCache,
    LayerNorm,
    MoE,
    MultiHeadAttention,
    RMSNorm,
    TransformerBlock,
    build_norm,
)
from llm.spec import ModelSpec, Position, SpecError, init_params, rope_cos_sin


def tiny(**changes) -> ModelSpec:
    base = dict(vocab_size=32, max_seq_len=16, hidden_size=16, num_layers=2, num_heads=4)
    return ModelSpec(**{**base, **changes})


MOE = dict(use_moe=True, num_experts=4, num_experts_per_token=2)

SPECS = {
    "default": tiny(),
    "tied_learned_rms": tiny(tie_embeddings=True, position="learned", norm_type="rmsnorm"),
    "sinusoidal_biases_glu": tiny(position="sinusoidal", attention_bias=True, attention_out_bias=False,
                                  mlp_bias=True, use_glu=True, activation="silu"),
    "gqa_headdim": tiny(num_kv_heads=2, head_dim=6, attention_out_bias=True),
    "moe_glu_bias": tiny(**MOE, use_glu=True, mlp_bias=True, num_kv_heads=1, norm_type="rmsnorm"),
    "moe_plain_tied": tiny(**MOE, tie_embeddings=True, position="learned", capacity_factor=1.0),
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randomised(module: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """``module`` holding seeded N(0, std) numbers in every parameter (constructors hold zeros)."""
    rng = np.random.default_rng(seed)
    load_canonical(module, {k: (std * rng.standard_normal(v.shape)).astype(np.float32)
                            for k, v in to_canonical(module).items()})
    return module


# ---------------------------------------------------------------------- names and conversion
@pytest.mark.parametrize("name", SPECS)
def test_state_dict_is_the_param_table(name):
    spec = SPECS[name]
    sd = DecoderModel(spec).state_dict()
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == [(p.name, p.shape) for p in spec.param_table()]


@pytest.mark.parametrize("name", ["moe_glu_bias", "tied_learned_rms", "sinusoidal_biases_glu"])
def test_round_trip_is_bitwise(name):
    spec = SPECS[name]
    params = init_params(spec, seed=3)
    back = to_canonical(from_canonical(spec, params))
    assert list(back) == list(params)
    for k in params:
        assert back[k].dtype == np.float32
        np.testing.assert_array_equal(back[k], params[k], err_msg=k)
    for k, v in to_canonical(from_spec(spec, seed=3)).items():
        np.testing.assert_array_equal(v, params[k], err_msg=k)


@pytest.mark.parametrize("name", ["moe_glu_bias", "tied_learned_rms"])
def test_constructor_draws_nothing_and_from_spec_is_init_params(name):
    spec = SPECS[name]
    before = torch.get_rng_state()
    model = DecoderModel(spec)
    assert torch.equal(torch.get_rng_state(), before)  # no draw from the global generator
    assert all(torch.count_nonzero(p) == 0 for p in model.parameters())  # allocated, never initialised
    with torch.device("meta"):  # the allocation follows the device context
        assert {p.device.type for p in DecoderModel(spec).parameters()} == {"meta"}
    want = init_params(spec, seed=5)
    got = to_canonical(from_spec(spec, seed=5))
    assert {k: v.tobytes() for k, v in got.items()} == {k: v.tobytes() for k, v in want.items()}


def test_grads_and_moments_convert_exactly_and_strictly():
    spec = SPECS["moe_glu_bias"]
    model = from_spec(spec, seed=0)
    model(torch.randint(0, 32, (2, 6)), torch.randint(0, 32, (2, 6))).loss.backward()
    grads = grads_to_canonical(model)
    assert list(grads) == [p.name for p in spec.param_table()]
    for name, p in model.named_parameters():
        assert grads[name].tobytes() == p.grad.numpy().tobytes(), name
    assert np.abs(grads["layers.0.attn.q_proj.weight"]).max() > 0

    moment = {k: (v + 1.5).astype(np.float32) for k, v in init_params(spec, seed=1).items()}
    held = moments_from_canonical(model, moment)
    assert all(held[n].dtype == p.dtype and held[n].shape == p.shape for n, p in model.named_parameters())
    back = moments_to_canonical(model, held)
    assert {k: v.tobytes() for k, v in back.items()} == {k: v.tobytes() for k, v in moment.items()}
    zeros = moments_to_canonical(model, {n: None for n, _ in model.named_parameters()})  # before a step
    assert all(v.shape == moment[k].shape and not v.any() for k, v in zeros.items())

    bad = dict(moment)
    del bad["final_norm.weight"]
    bad["layers.0.attn.o_proj.weight"] = np.zeros((16, 8), np.float32)
    for convert, values in ((moments_from_canonical, bad),
                            (moments_to_canonical, {k: torch.from_numpy(v) for k, v in bad.items()}),
                            (grads_to_canonical, {k: torch.from_numpy(v) for k, v in bad.items()})):
        with pytest.raises(SpecError) as err:
            convert(model, values)
        assert "missing 1: final_norm.weight" in str(err.value), convert.__name__
        assert "layers.0.attn.o_proj.weight: expected (16, 16), got (16, 8)" in str(err.value), convert.__name__
    with pytest.raises(SpecError, match="unexpected 1: layers.9.attn.q_proj.weight"):
        moments_to_canonical(model, {**held, "layers.9.attn.q_proj.weight": None})


def test_to_canonical_returns_copies():
    model = from_spec(SPECS["default"])
    to_canonical(model)["final_norm.weight"][:] = 7.0
    assert torch.all(model.final_norm.weight == 1.0)


def test_strict_loading_names_every_bad_key_and_writes_nothing():
    spec = SPECS["default"]
    model = from_spec(spec, seed=0)
    params = init_params(spec, seed=1)
    del params["final_norm.bias"]
    params["layers.0.attn.extra.weight"] = np.zeros(3, np.float32)
    params["layers.1.attn.q_proj.weight"] = np.zeros((16, 8), np.float32)
    with pytest.raises(SpecError) as err:
        load_canonical(model, params)
    msg = str(err.value)
    assert "missing 1: final_norm.bias" in msg
    assert "unexpected 1: layers.0.attn.extra.weight" in msg
    assert "layers.1.attn.q_proj.weight: expected (16, 16), got (16, 8)" in msg
    assert isinstance(err.value, ValueError)
    np.testing.assert_array_equal(to_canonical(model)["embed.weight"], init_params(spec, 0)["embed.weight"])


def test_components_load_alone():
    spec = SPECS["moe_glu_bias"]
    params = init_params(spec, seed=2)
    model = from_canonical(spec, params)

    prefix = "layers.1."
    block = TransformerBlock(spec, 1)
    load_canonical(block, {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)})
    x = torch.randn(2, 5, 16)
    for got, want in zip(block(x), model.layers[1](x), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)

    norm = build_norm(tiny())  # layernorm: weight and bias
    load_canonical(norm, {"weight": np.full(16, 2.0, np.float32), "bias": np.ones(16, np.float32)})
    assert torch.all(norm.weight == 2.0) and torch.all(norm.bias == 1.0)
    with pytest.raises(SpecError, match="missing 1: bias"):
        load_canonical(norm, {"weight": np.ones(16, np.float32)})


# ---------------------------------------------------------------------- norms
def test_rmsnorm_by_hand():
    norm = RMSNorm(4, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    # mean of squares of (3, 4, 0, 0) is 6.25, so the RMS is 2.5
    y = norm(torch.tensor([[3.0, 4.0, 0.0, 0.0]]))
    torch.testing.assert_close(y, torch.tensor([[1.2, 3.2, 0.0, 0.0]]), rtol=1e-6, atol=1e-6)
    assert norm(torch.ones(2, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_layernorm_by_hand():
    norm = LayerNorm(4, eps=1e-6)
    with torch.no_grad():
        norm.weight.fill_(1.0)
        norm.bias.fill_(0.5)
    y = norm(torch.tensor([1.0, 2.0, 3.0, 4.0]))  # mean 2.5, variance 1.25
    want = (torch.tensor([1.0, 2.0, 3.0, 4.0]) - 2.5) / math.sqrt(1.25 + 1e-6) + 0.5
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("activation, glu", [("gelu", False), ("gelu_tanh", False), ("relu", True)])
def test_mlp_activation_by_hand(activation, glu):
    # identity projections make the MLP its bare activation (times the gate input for GLU)
    mlp = MLP(tiny(hidden_size=4, num_heads=1, intermediate_size=4, activation=activation, use_glu=glu))
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.eye(4))
    x = torch.tensor([-1.5, -0.5, 0.5, 2.0])
    erf = torch.tensor([math.erf(v / math.sqrt(2)) for v in x.tolist()])
    tanh = torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))
    want = {"gelu": 0.5 * x * (1 + erf), "gelu_tanh": 0.5 * x * (1 + tanh), "relu": x.clamp(min=0) * x}
    torch.testing.assert_close(mlp(x), want[activation], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------- attention
def naive_attention(attn: MultiHeadAttention, x: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """Float64 attention written straight from the contract, without the fused kernel."""
    B, T, _ = x.shape
    H, KV, hd = spec.num_heads, spec.kv_heads, spec.dim_head
    x = x.double()

    def lin(layer, inp):
        y = inp @ layer.weight.double().T
        return y if layer.bias is None else y + layer.bias.double()

    q = lin(attn.q_proj, x).view(B, T, H, hd)
    k, v = lin(attn.k_proj, x).view(B, T, KV, hd), lin(attn.v_proj, x).view(B, T, KV, hd)
    if spec.position is Position.ROPE:
        cos, sin = (torch.from_numpy(t).double()[:T, None, :] for t in rope_cos_sin(spec))

        def rot(t):
            return t * cos + torch.cat([-t[..., hd // 2:], t[..., :hd // 2]], -1) * sin

        q, k = rot(q), rot(k)
    kv_of_head = [h // (H // KV) for h in range(H)]
    k, v = k[:, :, kv_of_head], v[:, :, kv_of_head]  # (B, T, H, hd)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = j <= i
    if spec.sliding_window is not None:
        allowed &= j > i - spec.sliding_window
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    y = torch.einsum("bhts,bshd->bthd", probs, v).reshape(B, T, H * hd)
    return lin(attn.o_proj, y).float()


@pytest.mark.parametrize("spec", [
    tiny(attention_bias=True),
    tiny(num_kv_heads=2, sliding_window=3),
    tiny(num_kv_heads=1, head_dim=6, position="learned", sliding_window=5),
], ids=["mha_bias", "gqa_window", "mqa_nope_window"])
def test_attention_matches_naive_reference(spec):
    attn = randomised(MultiHeadAttention(spec))
    x = torch.randn(2, 9, 16)
    torch.testing.assert_close(attn(x), naive_attention(attn, x, spec), rtol=1e-5, atol=1e-6)


def test_gqa_equals_mha_with_duplicated_kv_heads():
    gqa_spec, mha_spec = tiny(num_kv_heads=2, attention_bias=True), tiny(attention_bias=True)
    gqa, mha = randomised(MultiHeadAttention(gqa_spec)), MultiHeadAttention(mha_spec)
    params = to_canonical(gqa)
    hd = gqa_spec.dim_head
    for name in ("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias"):
        p = params[name]
        heads = p.reshape(2, hd, *p.shape[1:])  # (KV, hd, ...)
        params[name] = np.repeat(heads, 2, axis=0).reshape(4 * hd, *p.shape[1:])  # head h <- kv h // 2
    load_canonical(mha, params)
    x = torch.randn(2, 7, 16)
    torch.testing.assert_close(mha(x), gqa(x), rtol=1e-5, atol=1e-6)


def test_sliding_window_hides_tokens_outside_the_window():
    attn = randomised(MultiHeadAttention(tiny(sliding_window=3)))
    x = torch.randn(1, 8, 16)
    x2 = x.clone()
    x2[:, 0] += 1.0
    y, y2 = attn(x), attn(x2)
    torch.testing.assert_close(y[:, 3:], y2[:, 3:], rtol=0, atol=1e-6)  # position 3 sees 1..3 only
    assert (y[:, 2] - y2[:, 2]).abs().max() > 1e-3  # position 2 still sees position 0


def test_causal_future_tokens_do_not_change_earlier_logits():
    model = from_spec(tiny(num_kv_heads=2), seed=0).eval()
    ids = torch.randint(0, 32, (2, 10))
    ids2 = ids.clone()
    ids2[:, 6] = (ids[:, 6] + 1) % 32
    a, b = model(ids).logits, model(ids2).logits
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=1e-6)
    assert (a[:, 6:] - b[:, 6:]).abs().amax(dim=-1).min() > 1e-5


# ---------------------------------------------------------------------- MoE
def test_moe_topk_ties_go_to_the_lower_index():
    moe = MoE(tiny(**MOE))
    patterns = torch.tensor([[1.0, 2.0, 2.0, 0.0],   # tie for first place
                             [2.0, 1.0, 2.0, 2.0],   # three-way tie, two slots
                             [0.0, 0.0, 0.0, 0.0],   # all equal
                             [3.0, 3.0, 3.0, 5.0]])  # tie for second place
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[:, :4] = patterns.T  # token n = unit vector e_n has logits patterns[n]
    combine, idx, logits, _ = moe.route(torch.eye(16)[:4])
    torch.testing.assert_close(logits, patterns)
    assert idx.tolist() == [[1, 2], [0, 2], [0, 1], [3, 0]]
    torch.testing.assert_close(combine[0], torch.tensor([0.0, 0.5, 0.5, 0.0]))  # renormalised top-2


def naive_moe(moe: MoE, x: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """Token by token, expert by expert, as the contract's steps 1, 2 and 4 read (dropless)."""
    ex, k = moe.experts, spec.num_experts_per_token
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        p = torch.softmax(moe.router.weight @ x[n], -1)
        chosen = sorted(range(spec.num_experts), key=lambda e: (-p[e].item(), e))[:k]
        w = p[chosen] / p[chosen].sum() if spec.norm_topk_prob else p[chosen]
        for wi, e in zip(w, chosen, strict=True):
            up = ex.up_proj.weight[e] @ x[n] + ex.up_proj.bias[e]
            gate = ex.gate_proj.weight[e] @ x[n] + ex.gate_proj.bias[e]
            h = F.silu(gate) * up
            out[n] += wi * (ex.down_proj.weight[e] @ h + ex.down_proj.bias[e])
    return out


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_moe_matches_per_token_loop_and_loss_formulas(norm_topk_prob):
    spec = tiny(**MOE, use_glu=True, mlp_bias=True, activation="silu", norm_topk_prob=norm_topk_prob)
    moe = MoE(spec)
    with torch.no_grad():
        moe.router.weight.normal_(std=1.0)  # well-separated router probabilities
        for p in moe.experts.parameters():
            p.normal_(std=0.3)
    x = torch.randn(2, 5, 16)
    xf = x.reshape(10, 16)
    with torch.no_grad():
        y, balance, z, _ = moe(x)
        torch.testing.assert_close(y.reshape(10, 16), naive_moe(moe, xf, spec), rtol=1e-5, atol=1e-6)
        logits = (xf @ moe.router.weight.T).double().numpy()
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.argsort(-probs, axis=-1, kind="stable")[:, :2]
    f = np.bincount(top.ravel(), minlength=4) / top.size
    np.testing.assert_allclose(balance.item(), 4 * np.sum(f * probs.mean(0)), rtol=1e-5)
    lse = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(z.item(), np.mean(lse**2), rtol=1e-5)


def _all_to_expert_zero(spec: ModelSpec) -> tuple[MoE, torch.Tensor]:
    """A MoE whose router prefers expert 0, then 1, ... for every (positive) input (random experts)."""
    moe = randomised(MoE(spec))
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[:, 0] = torch.arange(spec.num_experts, 0, -1).float()
    x = torch.rand(2, 4, 16) + 0.5
    return moe, x


def test_moe_capacity_drops_later_tokens():
    # E=2, k=1, N=8: capacity = ceil(8 * 1 / 2 * 0.25) = 1, and every token wants expert 0.
    spec = tiny(use_moe=True, num_experts=2, num_experts_per_token=1, capacity_factor=0.25)
    assert spec.capacity(8) == 1
    moe, x = _all_to_expert_zero(spec)
    y, balance, _, _ = moe(x)
    y = y.reshape(8, 16)
    assert y[0].abs().max() > 1e-4  # the first token (batch 0, position 0) gets the one slot
    assert torch.all(y[1:] == 0)  # the rest pass through the residual untouched
    probs0 = torch.softmax(x.reshape(8, 16)[:, :1] @ moe.router.weight[:, :1].T, -1)[:, 0]
    torch.testing.assert_close(balance, 2 * probs0.mean())  # f = (1, 0): counted before drops

    full = MoE(spec.replace(capacity_factor=None))
    load_canonical(full, to_canonical(moe))
    assert full(x)[0].reshape(8, 16).abs().amax(-1).min() > 1e-4


def test_moe_capacity_ranks_assignments_token_major():
    # E=2, k=2, N=3: every token uses both experts; capacity = ceil(3 * 2 / 2 * 0.5) = 2.
    spec = tiny(use_moe=True, num_experts=2, num_experts_per_token=2, capacity_factor=0.5,
                norm_topk_prob=False)
    moe, x = _all_to_expert_zero(spec)
    combine, _, _, probs = moe.route(x.reshape(8, 16)[:3])
    torch.testing.assert_close(combine[:2], probs[:2])  # both slots kept, weights not renormalised
    assert torch.all(combine[2] == 0)


def test_model_aux_and_z_loss_are_scaled_layer_means():
    spec = tiny(**MOE, router_aux_loss_coef=0.1, router_z_loss_coef=0.01)
    model = from_spec(spec, seed=0)
    seen = []
    for layer in model.layers:
        layer.mlp.register_forward_hook(lambda mod, args, out: seen.append(out[1:]))
    out = model(torch.randint(0, 32, (2, 6)))
    torch.testing.assert_close(out.aux_loss, 0.1 * (seen[0][0] + seen[1][0]) / 2)
    torch.testing.assert_close(out.z_loss, 0.01 * (seen[0][1] + seen[1][1]) / 2)
    dense = from_spec(tiny(), seed=0)(torch.randint(0, 32, (1, 4)))
    assert dense.aux_loss.item() == 0.0 and dense.z_loss.item() == 0.0


# ---------------------------------------------------------------------- KV cache
@pytest.mark.parametrize("spec", [
    tiny(num_kv_heads=2, sliding_window=4, norm_type="rmsnorm", use_glu=True, activation="silu"),
    tiny(position="learned", attention_bias=True),
    tiny(**MOE, position="sinusoidal", num_kv_heads=1),
], ids=["rope_gqa_window", "learned", "moe_sinusoidal_mqa"])
def test_kv_cache_decoding_matches_full_forward(spec):
    model = from_spec(spec, seed=1).eval()
    ids = torch.randint(0, 32, (2, 12))
    full = model(ids).logits
    cache = model.new_cache(2)
    steps = [model(ids[:, :5], cache=cache, start_pos=0).logits]  # prefill
    steps += [model(ids[:, t:t + 1], cache=cache, start_pos=t).logits for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_positions_past_max_seq_len_are_errors():
    model = from_spec(tiny(), seed=0)
    with pytest.raises(ValueError, match="max_seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len=16"):
        model(torch.zeros(1, 2, dtype=torch.long), start_pos=15)
    cache = model.new_cache(1, max_seq_len=4)
    with pytest.raises(ValueError, match="cache length 4"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


# ---------------------------------------------------------------------- loss, dropout, precision
def test_loss_ignores_minus_100():
    model = from_spec(tiny(), seed=0)
    ids = torch.randint(0, 32, (2, 6))
    targets = torch.randint(0, 32, (2, 6))
    targets[0, :3] = -100
    targets[1, 5] = -100
    out = model(ids, targets)
    valid = targets != -100
    logp = torch.log_softmax(out.logits[valid], -1)
    want = -logp.gather(1, targets[valid][:, None]).mean()
    torch.testing.assert_close(out.loss, want)
    assert out.logits.dtype == torch.float32
    assert model(ids, torch.full_like(targets, -100)).loss.item() == 0.0
    assert model(ids).loss is None


def test_dropout_only_in_training():
    model = from_spec(tiny(dropout=0.5), seed=0)
    ids = torch.randint(0, 32, (1, 8))
    model.eval()
    torch.testing.assert_close(model(ids).logits, model(ids).logits, rtol=0, atol=0)
    model.train()
    assert (model(ids).logits - model(ids).logits).abs().max() > 1e-3


def test_bf16_autocast_stays_close_to_fp32():
    spec = SPECS["moe_glu_bias"]
    model = from_spec(spec, seed=0)
    ids = torch.randint(0, 32, (2, 8))
    ref = model(ids, ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(ids, ids)
    assert low.logits.dtype == torch.float32 and low.loss.dtype == torch.float32
    kl = F.kl_div(torch.log_softmax(low.logits, -1), torch.log_softmax(ref.logits, -1),
                  log_target=True, reduction="none").sum(-1).mean()
    assert kl.item() < 1e-2
    low.loss.backward()  # the mixed-precision graph is differentiable end to end


def test_backend_never_imports_jax():
    code = ("import sys, backends.torch; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('jax', 'flax')]; "
            "assert not bad, bad")
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root,
                   env={**os.environ, "PYTHONPATH": str(root)})


# ---------------------------------------------------------------------- torch.compile
# the deprecation warning is raised inside inductor, not by this code
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compile_fullgraph_moe_matches_eager():
    """The one compile test (keep it that way: ~15 s cold on CPU): MoE with capacity, no graph breaks."""
    spec = tiny(**MOE, num_layers=1, num_heads=2, num_kv_heads=1, capacity_factor=1.0, use_glu=True,
                activation="silu", norm_type="rmsnorm")
    model = from_spec(spec, seed=0).eval()
    ids = torch.randint(0, 32, (2, 8))
    with torch.no_grad():
        eager = model(ids, ids)
        compiled = torch.compile(model, fullgraph=True)(ids, ids)
    torch.testing.assert_close(compiled.logits, eager.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled.loss, eager.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled.aux_loss, eager.aux_loss, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------- masks, segments, causal=False
def _mask_spec(**kw) -> ModelSpec:
    return ModelSpec(vocab_size=32, max_seq_len=16, hidden_size=16, num_layers=2, num_heads=4, **kw)


def test_padded_targets_are_ignored_and_padded_rows_are_finite():
    spec = _mask_spec()
    model = from_spec(spec, seed=0).eval()
    ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    targets = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(1))
    out = model(ids, targets, attention_mask=mask)
    ignored = targets.clone()
    ignored[0, :3] = -100
    assert torch.isfinite(out.logits).all()
    torch.testing.assert_close(out.loss, model(ids, ignored, attention_mask=mask).loss, rtol=0, atol=0)
    assert not torch.allclose(out.loss, model(ids, targets).loss)


def test_segments_never_attend_across():
    """Changing the first document changes nothing in the second when segment ids separate them."""
    spec = _mask_spec(position="learned")
    model = from_spec(spec, seed=0).eval()
    ids = torch.randint(0, 32, (1, 10), generator=torch.Generator().manual_seed(0))
    seg = torch.tensor([[0] * 4 + [1] * 6])
    other = ids.clone()
    other[0, :4] = (other[0, :4] + 1) % 32
    with torch.no_grad():
        a, b = model(ids, segment_ids=seg).logits, model(other, segment_ids=seg).logits
        c = model(other).logits
    torch.testing.assert_close(a[0, 4:], b[0, 4:], rtol=0, atol=0)
    assert not torch.allclose(a[0, 4:], c[0, 4:])


def test_non_causal_attention_sees_the_future_and_windows_both_ways():
    spec = _mask_spec(sliding_window=2)
    attn = MultiHeadAttention(spec, causal=False)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(generator=torch.Generator().manual_seed(0))
    x = torch.randn(1, 6, 16, generator=torch.Generator().manual_seed(1))
    y = attn(x)
    x2 = x.clone()
    x2[0, 3] += 1.0  # slot 3 is in the |i - j| < 2 window of slots 2, 3, 4 only
    y2 = attn(x2)
    changed = [(y[0, i] - y2[0, i]).abs().max().item() > 0 for i in range(6)]
    assert changed == [False, False, True, True, True, False]
    assert MultiHeadAttention(spec).causal is True
    with pytest.raises(ValueError, match="needs causal attention"):
        attn(x, cache=KVCache(spec, 1)[0])


def test_pad_token_id_row_has_zero_gradient_and_is_validated():
    spec = _mask_spec(pad_token_id=0)
    ids = torch.tensor([[0, 0, 5, 6, 7, 0]])
    for pad in (0, None):
        model = from_spec(spec.replace(pad_token_id=pad), seed=0)
        model(ids, ids.roll(-1, 1)).loss.backward()
        row = model.embed.weight.grad[0]
        assert (row == 0).all() if pad == 0 else (row != 0).any()
    with pytest.raises(SpecError, match="model.pad_token_id"):
        _mask_spec(pad_token_id=32)


def test_mask_shape_is_checked():
    model = from_spec(_mask_spec(), seed=0)
    with pytest.raises(ValueError, match=r"attention_mask must be \(batch, 8\)"):
        model(torch.zeros(2, 8, dtype=torch.long), attention_mask=torch.ones(2, 7))
