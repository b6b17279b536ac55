"""ModelSpec validation, the parameter table, numpy init and position tables."""

import math

import numpy as np
import pytest

from llm.spec import (
    ModelSpec,
    SpecError,
    check_params,
    init_params,
    mla_softmax_scale,
    rope_attention_factor,
    rope_cos_sin,
    rope_inv_freq,
    sinusoidal_table,
)

_YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(hidden_size=96, num_heads=6, num_kv_heads=4), "num_heads=6 is not divisible by num_kv_heads=4"),
        (dict(hidden_size=100, num_heads=3), "hidden_size=100 is not divisible by num_heads=3"),
        (dict(head_dim=7), "head_dim=7 must be even for position=rope"),
        (dict(position="sinusoidal", hidden_size=63, num_heads=3, head_dim=22), "hidden_size=63 must be even"),
        (dict(activation="swish"), "model.activation: expected one of 'gelu', 'gelu_tanh', 'silu', 'relu', got 'swish'"),
        (dict(norm_type="batchnorm"), "model.norm_type: expected one of 'layernorm', 'rmsnorm', got 'batchnorm'"),
        (dict(position="alibi"), "model.position: expected one of 'rope', 'learned', 'sinusoidal', got 'alibi'"),
        (dict(use_moe=True, num_experts=2, num_experts_per_token=3), "num_experts_per_token=3 exceeds num_experts=2"),
        (dict(use_moe=True, capacity_factor=0.0), "capacity_factor=0.0 must be > 0"),
        (dict(dropout=1.0), "dropout=1.0 must be < 1"),
        (dict(dropout=-0.1), "dropout=-0.1 must be >= 0"),
        (dict(vocab_size=0), "vocab_size=0 must be >= 1"),
        (dict(num_layers=2.5), "model.num_layers: expected int, got 2.5"),
        (dict(use_glu="yes"), "model.use_glu: expected bool, got 'yes'"),
        (dict(qk_norm="maybe"), "model.qk_norm: expected bool, got 'maybe'"),
        (dict(norm_eps=0.0), "norm_eps=0.0 must be > 0"),
        (dict(init_std=float("nan")), "model.init_std: expected a finite float, got nan"),
        (dict(position="learned", rope_scaling={"rope_type": "llama3"}), "model.rope_scaling={'rope_type': 'llama3'} applies to position=rope only, not position=learned"),
        (dict(rope_scaling={"rope_type": "longrope", "factor": 2.0}),
         "model.rope_scaling.rope_type='longrope' is not supported (one of ['llama3', 'yarn'])"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}),
         "model.rope_scaling.original_max_position_embeddings=None is required for rope_type='yarn'"),
        (dict(rope_scaling={**_YARN, "beta_fast": 32, "betafast": 1}), "has unknown key(s) ['betafast'] for rope_type='yarn'"),
        (dict(rope_scaling={**_YARN, "low_freq_factor": 1.0}), "has unknown key(s) ['low_freq_factor']"),
        (dict(rope_scaling={**_YARN, "factor": 0.5}), "model.rope_scaling.factor=0.5 must be a number >= 1"),
        (dict(rope_scaling={**_YARN, "factor": "4"}), "model.rope_scaling.factor='4' must be a number >= 1"),
        (dict(rope_scaling={**_YARN, "original_max_position_embeddings": 16.5}),
         "model.rope_scaling.original_max_position_embeddings=16.5 must be an integer >= 1"),
        (dict(rope_scaling={**_YARN, "beta_slow": 0}), "model.rope_scaling.beta_slow=0 must be a positive number"),
        (dict(rope_scaling={**_YARN, "beta_fast": 2, "beta_slow": 3}), "model.rope_scaling.beta_fast=2 must be > beta_slow=3"),
        (dict(rope_scaling={**_YARN, "beta_fast": 0.5}), "model.rope_scaling.beta_fast=0.5 must be > beta_slow=1"),
        (dict(rope_scaling={**_YARN, "mscale": -1.0}), "model.rope_scaling.mscale=-1.0 must be a number >= 0"),
        (dict(rope_scaling={**_YARN, "mscale_all_dim": True}), "model.rope_scaling.mscale_all_dim=True must be a number"),
        (dict(rope_scaling={**_YARN, "attention_factor": 0.0}),
         "model.rope_scaling.attention_factor=0.0 must be a positive number"),
        (dict(rope_scaling={**_YARN, "truncate": 1}), "model.rope_scaling.truncate=1 must be true or false"),
        (dict(sliding_window=0), "sliding_window=0 must be >= 1"),
        (dict(use_moe=True, first_dense_layers=3), "model.first_dense_layers=3 must be in [0, num_layers=2]"),
        (dict(use_moe=True, first_dense_layers=-1), "model.first_dense_layers=-1 must be in [0, num_layers=2]"),
        (dict(first_dense_layers=1), "model.first_dense_layers=1 needs use_moe=true"),
        (dict(num_shared_experts=1), "model.num_shared_experts=1 needs use_moe=true"),
        (dict(router_scoring="sigmoid"), "model.router_scoring='sigmoid' needs use_moe=true"),
        (dict(moe_intermediate_size=16), "model.moe_intermediate_size=16 needs use_moe=true"),
        (dict(routed_scaling_factor=2.5), "model.routed_scaling_factor=2.5 needs use_moe=true"),
        (dict(use_moe=True, num_shared_experts=-1), "model.num_shared_experts=-1 must be >= 0"),
        (dict(use_moe=True, shared_expert_gate=True),
         "model.shared_expert_gate=True needs num_shared_experts >= 1"),
        (dict(use_moe=True, shared_expert_intermediate_size=8),
         "model.shared_expert_intermediate_size=8 needs num_shared_experts >= 1"),
        (dict(use_moe=True, num_shared_experts=1, shared_expert_intermediate_size=0),
         "model.shared_expert_intermediate_size=0 must be >= 1 or null"),
        (dict(use_moe=True, moe_intermediate_size=0), "model.moe_intermediate_size=0 must be >= 1 or null"),
        (dict(use_moe=True, routed_scaling_factor=0.0), "model.routed_scaling_factor=0.0 must be > 0"),
        (dict(use_moe=True, router_scoring="tanh"),
         "model.router_scoring: expected one of 'softmax', 'sigmoid', got 'tanh'"),
        (dict(num_expert_groups=2), "model.num_expert_groups=2 needs use_moe=true"),
        (dict(router_selection_bias=True), "model.router_selection_bias=True needs use_moe=true"),
        (dict(use_moe=True, num_expert_groups=3), "model.num_expert_groups=3 must divide num_experts=8"),
        (dict(use_moe=True, num_expert_groups=0), "model.num_expert_groups=0 must be >= 1"),
        (dict(use_moe=True, num_expert_groups=4, topk_groups=5), "model.topk_groups=5 must be in [1, num_expert_groups=4]"),
        (dict(use_moe=True, num_expert_groups=4, topk_groups=1, num_experts_per_token=3),
         "model.num_experts_per_token=3 exceeds the 2 experts of topk_groups=1 groups of 2"),
        (dict(use_moe=True, router_group_score="top2_sum"), "model.router_group_score='top2_sum' needs num_expert_groups > 1"),
        (dict(use_moe=True, num_experts=4, num_experts_per_token=1, num_expert_groups=4, router_group_score="top2_sum"),
         "top2_sum needs groups of >= 2 experts"),
        (dict(use_moe=True, router_bias_update_rate=1e-3),
         "model.router_bias_update_rate=0.001 needs router_selection_bias=true"),
        (dict(use_moe=True, router_selection_bias=True, router_bias_update_rate=-1.0),
         "model.router_bias_update_rate=-1.0 must be >= 0"),
    ],
)
def test_invalid_specs_name_field_and_rule(fields, message):
    with pytest.raises(SpecError) as err:
        ModelSpec(**fields)
    assert message in str(err.value)


def test_spec_errors_carry_the_field_key():
    with pytest.raises(SpecError) as err:
        ModelSpec(num_heads=6, num_kv_heads=4, hidden_size=96)
    assert err.value.key == "model.num_heads"
    with pytest.raises(SpecError) as err:
        ModelSpec(rope_scaling={"rope_type": "llama3", "factor": -1.0})
    assert err.value.key == "model.rope_scaling" and "model.rope_scaling.factor=-1.0 must be a positive" in str(err.value)


def test_construction_converts_like_every_config_section():
    spec = ModelSpec(hidden_size="64", num_layers=3.0, activation="SILU", norm_eps="1e-6", attention_out_bias=None)
    assert (spec.hidden_size, spec.num_layers, spec.norm_eps) == (64, 3, 1e-6)
    assert type(spec.num_layers) is int and spec.activation.value == "silu"
    assert ModelSpec(rope_theta=500000).rope_theta == 500000.0 and type(ModelSpec(rope_theta=5).rope_theta) is float


def test_diff_names_the_differing_fields_in_field_order():
    base = ModelSpec()
    assert base.diff(ModelSpec()) == []
    other = ModelSpec(num_layers=3, activation="silu", rope_scaling=None, dropout=0.1)
    assert base.diff(other) == ["num_layers", "activation", "dropout"]
    assert other.diff(base) == ["num_layers", "activation", "dropout"]
    with pytest.raises(TypeError, match="cannot diff a ModelSpec against a dict"):
        base.diff(base.to_dict())  # type: ignore[arg-type]


def test_unknown_field_suggests_nearest():
    with pytest.raises(SpecError, match=r"'model\.num_kv_head'; did you mean 'model\.num_kv_heads'\?"):
        ModelSpec.from_dict({"num_kv_head": 2})


def test_derived_values():
    spec = ModelSpec(hidden_size=96, num_heads=6, num_kv_heads=None)
    assert spec.kv_heads == 6 and spec.dim_head == 16 and spec.ffn_size == 384
    glu = ModelSpec(hidden_size=96, num_heads=6, use_glu=True)
    assert glu.ffn_size == 256 and glu.ffn_size % 8 == 0  # 8/3 * 96 = 256
    odd = ModelSpec(hidden_size=64, num_heads=4, head_dim=24)
    assert odd.param_shapes()["layers.0.attn.q_proj.weight"] == (96, 64)
    assert odd.param_shapes()["layers.0.attn.o_proj.weight"] == (64, 96)


def test_dict_round_trip():
    spec = ModelSpec(use_moe=True, capacity_factor=1.25, position="learned", activation="gelu_tanh")
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    assert spec.to_dict()["activation"] == "gelu_tanh"


def test_param_table_names_and_shapes():
    spec = ModelSpec(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=1,
                     use_moe=True, num_experts=3, use_glu=True, intermediate_size=40,
                     attention_bias=True, attention_out_bias=False, mlp_bias=True,
                     position="learned", max_seq_len=16, norm_type="rmsnorm", tie_embeddings=True)
    shapes = spec.param_shapes()
    assert shapes["embed.weight"] == (50, 32)
    assert shapes["embed.position.weight"] == (16, 32)
    assert shapes["layers.1.attn.k_proj.weight"] == (8, 32)  # MQA: one kv head of 8
    assert shapes["layers.1.attn.k_proj.bias"] == (8,)
    assert "layers.1.attn.o_proj.bias" not in shapes
    assert shapes["layers.0.mlp.router.weight"] == (3, 32)
    assert shapes["layers.0.mlp.experts.gate_proj.weight"] == (3, 40, 32)
    assert shapes["layers.0.mlp.experts.down_proj.weight"] == (3, 32, 40)
    assert shapes["layers.0.mlp.experts.down_proj.bias"] == (3, 32)
    assert "layers.0.attn_norm.bias" not in shapes  # rmsnorm has no bias
    assert "lm_head.weight" not in shapes  # tied
    assert spec.no_decay_names() >= {"embed.weight", "embed.position.weight", "final_norm.weight",
                                     "layers.0.attn.q_proj.bias"}
    assert "layers.0.attn.q_proj.weight" not in spec.no_decay_names()


def test_moe_variant_param_table():
    """Dense first layers, routed experts of their own size, fused shared experts and their gate."""
    spec = ModelSpec(vocab_size=50, hidden_size=32, num_layers=3, num_heads=4, use_moe=True, num_experts=4,
                     use_glu=True, intermediate_size=40, moe_intermediate_size=12, first_dense_layers=1,
                     num_shared_experts=2, shared_expert_gate=True, mlp_bias=True)
    table = {p.name: p for p in spec.param_table()}
    assert table["layers.0.mlp.gate_proj.weight"].shape == (40, 32)  # dense: intermediate_size
    assert not any(n.startswith("layers.0.mlp.") and ("router" in n or "expert" in n or "shared" in n)
                   for n in table)
    assert table["layers.1.mlp.experts.up_proj.weight"].shape == (4, 12, 32)
    assert table["layers.2.mlp.experts.down_proj.bias"].shape == (4, 32)
    # two shared experts of the routed size (null shared_expert_intermediate_size), fused: width 24
    assert table["layers.1.mlp.shared.gate_proj.weight"].shape == (24, 32)
    assert table["layers.1.mlp.shared.down_proj.weight"].shape == (32, 24)
    assert table["layers.1.mlp.shared.up_proj.bias"].shape == (24,)
    assert table["layers.1.mlp.shared.up_proj.weight"].axes == ("mlp", "embed")
    assert table["layers.1.mlp.shared.down_proj.weight"].axes == ("embed", "mlp")
    gate = table["layers.2.mlp.shared_gate.weight"]
    assert (gate.shape, gate.axes, gate.weight_decay) == ((1, 32), ("experts", "embed"), True)
    assert [spec.is_moe_layer(i) for i in range(3)] == [False, True, True] and spec.num_moe_layers == 2
    assert spec.replace(shared_expert_intermediate_size=7).shared_ffn_size == 14
    # active parameters: top-k of the routed experts only; shared experts and dense layers in full
    routed = 3 * 12 * 32 + 2 * 12 + 32  # gate + up + down weights and biases, one expert
    assert spec.num_params() - spec.num_params(active=True) == 2 * (4 - 2) * routed


def test_qk_norm_rows():
    """Two (head_dim,) scales per layer, after o_proj, starting at 1, not decayed, whole on every
    device (logical axis head_dim: no mesh axis), and counted as norms, not matmuls, by the FLOPs."""
    from llm.sharding import MeshShape, param_placements

    base = ModelSpec(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=12, norm_type="rmsnorm")
    spec = base.replace(qk_norm=True)
    table = {p.name: p for p in spec.param_table()}
    added = [n for n in table if n not in base.param_shapes()]
    assert added == [f"layers.{i}.attn.{n}_norm.weight" for i in range(2) for n in "qk"]
    names = list(table)
    assert names.index("layers.0.attn.q_norm.weight") == names.index("layers.0.attn.o_proj.weight") + 1
    for name in added:
        info = table[name]
        assert (info.shape, info.init, info.weight_decay, info.axes) == ((12,), "ones", False, ("head_dim",))
    assert spec.num_params() == base.num_params() + 2 * 2 * 12
    assert spec.flops_per_token() == base.flops_per_token()
    assert set(added) <= spec.no_decay_names()
    np.testing.assert_array_equal(init_params(spec)["layers.1.attn.k_norm.weight"], np.ones(12, np.float32))
    where = param_placements(spec, MeshShape(data=1, fsdp=1, tensor=2))
    assert where["layers.0.attn.q_norm.weight"] == (None,) and where["layers.0.attn.q_proj.weight"][0] == "tensor"


def test_param_counts_gpt2_small():
    spec = ModelSpec(vocab_size=50257, max_seq_len=1024, hidden_size=768, num_layers=12, num_heads=12,
                     activation="gelu_tanh", position="learned", tie_embeddings=True,
                     attention_bias=True, mlp_bias=True)
    assert spec.num_params() == 124_439_808  # the published GPT-2 small count


def test_active_params_moe():
    spec = ModelSpec(hidden_size=32, num_heads=4, use_moe=True, num_experts=4, num_experts_per_token=1,
                     intermediate_size=64)
    expert = 2 * 64 * 32  # up + down per expert
    assert spec.num_params() - spec.num_params(active=True) == spec.num_layers * 3 * expert


def test_flops_per_token_matches_6n_plus_attention():
    spec = ModelSpec(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4, max_seq_len=8)
    matmul = 2 * (4 * 32 * 32 + 2 * 32 * 128) + 100 * 32
    assert spec.flops_per_token() == 6 * matmul + 12 * 2 * 4 * 8 * 8
    # causal accounting: a query at position i attends i + 1 keys, (T + 1) / 2 on average
    assert spec.flops_per_token(causal=True) == 6 * matmul + 12 * 2 * 4 * 8 * 4.5


def test_init_is_seeded_and_follows_table():
    spec = ModelSpec(num_layers=3, attention_bias=True)
    a, b, c = init_params(spec, 0), init_params(spec, 0), init_params(spec, 1)
    check_params(spec, a)
    for k in a:
        assert a[k].dtype == np.float32
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["embed.weight"], c["embed.weight"])
    np.testing.assert_array_equal(a["layers.0.attn_norm.weight"], 1.0)
    np.testing.assert_array_equal(a["layers.0.attn.q_proj.bias"], 0.0)
    assert abs(a["embed.weight"].std() - 0.02) < 0.002
    o_std = a["layers.0.attn.o_proj.weight"].std()
    assert abs(o_std - 0.02 / math.sqrt(6)) < 0.001


def test_threaded_init_draws_what_one_stream_per_row_draws():
    # the thread pool must not change a value: row i is stream i of SeedSequence(seed), drawn in float64
    spec = ModelSpec(num_layers=2, use_moe=True, num_experts=4)
    table = spec.param_table()
    drawn = init_params(spec, 7)
    for info, ss in zip(table, np.random.SeedSequence(7).spawn(len(table)), strict=True):
        if info.init == "normal":
            expected = (np.random.default_rng(ss).standard_normal(info.shape) * info.std).astype(np.float32)
            np.testing.assert_array_equal(drawn[info.name], expected, err_msg=info.name)
    assert list(drawn) == [info.name for info in table]


def test_check_params_lists_every_problem():
    spec = ModelSpec(num_layers=1)
    params = init_params(spec)
    del params["final_norm.weight"]
    params["extra.weight"] = np.zeros(3)
    params["embed.weight"] = np.zeros((3, 3))
    with pytest.raises(SpecError) as err:
        check_params(spec, params)
    for problem in ("missing 1: final_norm.weight", "unexpected 1: extra.weight",
                    "embed.weight: expected (256, 128), got (3, 3)"):
        assert problem in str(err.value), problem


def test_rope_tables():
    spec = ModelSpec(hidden_size=32, num_heads=2, rope_theta=100.0, max_seq_len=5)
    inv = rope_inv_freq(spec)
    np.testing.assert_allclose(inv, 100.0 ** (-np.arange(0, 16, 2) / 16), rtol=1e-6)
    cos, sin = rope_cos_sin(spec)
    assert cos.shape == (5, 16)
    np.testing.assert_allclose(cos[3, 1], np.cos(3 * inv[1]), rtol=1e-6)
    np.testing.assert_allclose(sin[3, 9], np.sin(3 * inv[1]), rtol=1e-6)  # rotate-half: halves repeat


def test_llama3_rope_scaling_bands():
    sc = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=64)
    plain = rope_inv_freq(ModelSpec(hidden_size=128, num_heads=2))
    scaled = rope_inv_freq(ModelSpec(hidden_size=128, num_heads=2, rope_scaling=sc))
    wavelen = 2 * np.pi / plain
    high = wavelen < 64 / 4
    low = wavelen > 64 / 1
    np.testing.assert_array_equal(scaled[high], plain[high])  # high frequencies untouched
    np.testing.assert_allclose(scaled[low], plain[low] / 8.0, rtol=1e-6)  # low ones divided by factor
    mid = ~(high | low)
    assert mid.any() and np.all(scaled[mid] < plain[mid]) and np.all(scaled[mid] > plain[mid] / 8)


@pytest.mark.parametrize("extra, head_dim, theta", [
    ({}, 16, 10000.0),
    (dict(beta_fast=16, beta_slow=2), 32, 500.0),
    (dict(mscale=0.707, mscale_all_dim=0.707), 8, 10000.0),  # DeepSeek-V2-Lite's: attention factor 1
    (dict(mscale=1.0, mscale_all_dim=0.5, factor=40.0, original_max_position_embeddings=8), 64, 10000.0),
    (dict(mscale=1.0), 12, 1e6),  # one mscale alone: the factor from ``factor`` only
    (dict(truncate=False, beta_fast=24), 16, 10000.0),
    (dict(attention_factor=0.9, factor=8.0), 16, 10000.0),
])
def test_yarn_tables_match_transformers(extra, head_dim, theta):
    import torch
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    sc = {**_YARN, **extra}
    spec = ModelSpec(hidden_size=2 * head_dim, num_heads=2, rope_theta=theta, max_seq_len=64, rope_scaling=sc)
    cfg = LlamaConfig(hidden_size=2 * head_dim, num_attention_heads=2, head_dim=head_dim,
                      max_position_embeddings=int(sc["factor"] * sc["original_max_position_embeddings"]),
                      rope_parameters={"rope_theta": theta, **sc})
    ref_inv, ref_factor = ROPE_INIT_FUNCTIONS["yarn"](cfg)
    inv = rope_inv_freq(spec)
    plain = rope_inv_freq(ModelSpec(hidden_size=2 * head_dim, num_heads=2, rope_theta=theta))
    assert np.any(inv < plain * 0.99) and inv[0] == plain[0]  # some pairs interpolated, the fastest kept
    np.testing.assert_allclose(inv, ref_inv.numpy(), rtol=1e-6, atol=0)  # float32 pow: a few ulps
    assert math.isclose(rope_attention_factor(spec), ref_factor, rel_tol=1e-12)
    positions = torch.arange(64, dtype=torch.float32)
    emb = torch.cat([positions[:, None] * ref_inv[None, :]] * 2, dim=-1)
    cos, sin = rope_cos_sin(spec)
    np.testing.assert_allclose(cos, (emb.cos() * ref_factor).numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(sin, (emb.sin() * ref_factor).numpy(), rtol=0, atol=1e-6)


def test_yarn_mla_softmax_scale():
    mla = dict(attention="mla", hidden_size=32, num_heads=2, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=8,
               v_head_dim=4)
    assert mla_softmax_scale(ModelSpec(**mla)) == 1 / math.sqrt(12)
    assert mla_softmax_scale(ModelSpec(**mla, rope_scaling={**_YARN, "mscale": 1.0})) == 1 / math.sqrt(12)
    with_all_dim = ModelSpec(**mla, rope_scaling={**_YARN, "mscale": 1.0, "mscale_all_dim": 0.707})
    assert math.isclose(mla_softmax_scale(with_all_dim), (0.1 * 0.707 * math.log(4) + 1) ** 2 / math.sqrt(12))


def test_sinusoidal_table():
    spec = ModelSpec(hidden_size=8, num_heads=2, position="sinusoidal", max_seq_len=4)
    t = sinusoidal_table(spec)
    assert t.shape == (4, 8)
    np.testing.assert_allclose(t[0], [0, 1] * 4)
    np.testing.assert_allclose(t[2, 2], np.sin(2 / 10000 ** (2 / 8)), rtol=1e-6)
    np.testing.assert_allclose(t[2, 3], np.cos(2 / 10000 ** (2 / 8)), rtol=1e-6)


def test_capacity():
    spec = ModelSpec(use_moe=True, num_experts=4, num_experts_per_token=2, capacity_factor=1.0)
    assert spec.capacity(10) == 5  # ceil(10 * 2 / 4 * 1.0)
    assert ModelSpec(use_moe=True).capacity(10) is None


def test_a_model_too_big_for_memory_is_refused_before_allocation():
    from llm.spec import check_fits_memory, machine_memory

    spec = ModelSpec(hidden_size=262144, num_layers=8, num_heads=4)  # about 6.6 TB of fp32 parameters
    need = 4 * spec.num_params()
    memory = machine_memory()
    assert memory is not None and need > memory
    with pytest.raises(SpecError) as info:
        init_params(spec)  # refused before drawing: no 6.6 TB allocation attempted
    message = str(info.value)
    assert f"{need:,} bytes" in message and f"{memory:,} bytes" in message
    assert "model.hidden_size" in message and "model.num_layers" in message and "\n" not in message
    # the count neither walks a trillion layers nor wraps around int64: per layer 2 layernorms (256),
    # q/k/v/o (4 * 64 * 64) and up/down (2 * 256 * 64) = 49,408; embed + lm_head + final norm = 16,512
    with pytest.raises(SpecError, match="49,408,000,000,016,512 parameters"):
        check_fits_memory(ModelSpec(num_layers=10**12, vocab_size=128, hidden_size=64, num_heads=4), memory)


def test_the_memory_check_counts_exactly_what_init_draws():
    spec = ModelSpec(vocab_size=32, hidden_size=16, num_layers=3, num_heads=2, use_moe=True, num_experts=4)
    need = 4 * sum(a.size for a in init_params(spec).values())
    from llm.spec import check_fits_memory

    check_fits_memory(spec, memory=need)  # exactly enough
    with pytest.raises(SpecError, match=rf"need {need:,} bytes .* has {need - 1:,} bytes.*model.num_experts"):
        check_fits_memory(spec, memory=need - 1)


def test_the_memory_check_counts_dense_first_layers_and_shared_experts():
    spec = ModelSpec(vocab_size=32, hidden_size=16, num_layers=4, num_heads=2, use_moe=True, num_experts=4,
                     first_dense_layers=2, num_shared_experts=1, shared_expert_gate=True, moe_intermediate_size=8)
    need = 4 * sum(a.size for a in init_params(spec).values())
    from llm.spec import check_fits_memory

    check_fits_memory(spec, memory=need)
    with pytest.raises(SpecError, match=rf"need {need:,} bytes"):
        check_fits_memory(spec, memory=need - 1)


def test_norm_position_and_lm_head_bias_fields():
    spec = ModelSpec(vocab_size=16, hidden_size=8, num_heads=2, norm_position="post", lm_head_bias=True)
    names = [p.name for p in spec.param_table()]
    assert names[-2:] == ["lm_head.weight", "lm_head.bias"] and spec.norm_position.value == "post"
    assert "lm_head.bias" in spec.no_decay_names()
    with pytest.raises(SpecError, match=r"model.lm_head_bias.*needs tie_embeddings=false"):
        ModelSpec(lm_head_bias=True, tie_embeddings=True)
    with pytest.raises(SpecError, match=r"model.norm_position: expected one of 'pre', 'post'"):
        ModelSpec(norm_position="middle")


def test_selection_bias_is_untrained_state_in_the_table():
    spec = ModelSpec(use_moe=True, num_experts=4, num_expert_groups=2, topk_groups=1, num_experts_per_token=2,
                     router_group_score="top2_sum", router_selection_bias=True, router_bias_update_rate=1e-3)
    rows = {p.name: p for p in spec.param_table()}
    bias = rows["layers.0.mlp.router.selection_bias"]
    assert (bias.shape, bias.init, bias.trainable, bias.axes) == ((4,), "zeros", False, ("experts",))
    assert all(p.trainable for name, p in rows.items() if not name.endswith("selection_bias"))
    plain = spec.replace(router_selection_bias=False, router_bias_update_rate=0.0)
    assert spec.num_params() == plain.num_params()  # state, not a trained parameter
    assert len(rows) == len(plain.param_table()) + spec.num_layers
