"""Hypothesis strategies that draw model specs over the whole ModelSpec space (small sizes)."""

from __future__ import annotations

import os

from hypothesis import settings
from hypothesis import strategies as st

from llm.spec import ModelSpec

LLAMA3_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8)
WEIGHTS = ("init", "perturbed")  # where the backends are compared: init_params, or perturb() of it


def examples(ci: int) -> int:
    """Drawn examples for a test: ``ci`` under the ci profile (tests whose every example compiles a
    new JAX program), the profile's own count under any other (thorough draws its 150)."""
    if os.environ.get("HYPOTHESIS_PROFILE", "ci") == "ci":
        return ci
    return settings().max_examples


@st.composite
def specs(draw, *, moe: bool | None = None, mla: bool | None = None, max_layers: int = 3,
          max_seq_len: int | tuple[int, int] = (12, 24)) -> ModelSpec:
    """Every field and every choice: GQA/MQA ratios, odd head_dim, GLU, norms, q/k norms, positions, MLA, MoE
    and its variants (dense first layers, routed expert size, shared experts and their gate, sigmoid
    routing, routed scaling, group-limited routing and the selection bias: ``routings``).

    ``max_seq_len`` is fixed (an int) or drawn from an inclusive (lo, hi) range; the position tables
    (RoPE cos/sin, learned, sinusoidal) are sized by it. Odd head sizes (3, 5, 7) are drawn only
    without RoPE: rotate-half pairs dimension i with i + head_dim/2, so RoPE needs an even head_dim.
    Dropout is not drawn: the parity checks run in eval mode, where it is off, and the backends draw
    different masks in training, so a drawn rate would only pretend to be compared.

    ``mla`` (None = drawn, about one spec in three) gives ``attention=mla`` (RoPE, one kv head per
    head, no head_dim) with its own head sizes and query compression on or off (``mlas``).
    """
    if mla is None:
        mla = draw(st.sampled_from([False, False, True]))
    if mla:
        return draw(mlas(moe=moe, max_layers=max_layers, max_seq_len=max_seq_len))
    num_kv_heads = draw(st.sampled_from([1, 2, 3]))
    num_heads = num_kv_heads * draw(st.sampled_from([1, 2, 4]))
    position = draw(st.sampled_from(["rope", "learned", "sinusoidal"]))
    head_dim = draw(st.sampled_from([4, 6, 8] if position == "rope" else [3, 4, 5, 6, 7, 8]))
    if draw(st.booleans()) or (position == "sinusoidal" and num_heads * head_dim % 2):
        # head_dim that does not divide hidden_size, set explicitly (sinusoidal needs an even hidden)
        hidden_size = draw(st.sampled_from([8, 12, 20, 32]))
        explicit_head_dim: int | None = head_dim
    else:
        hidden_size = num_heads * head_dim
        explicit_head_dim = None
    use_moe = draw(st.booleans()) if moe is None else moe
    num_experts = draw(st.integers(2, 8))
    k = draw(st.integers(1, num_experts))
    seq_len = max_seq_len if isinstance(max_seq_len, int) else draw(st.integers(*max_seq_len))
    tie = draw(st.booleans())
    num_layers = draw(st.integers(1, max_layers))
    # MoE variants (only with use_moe; the spec refuses them otherwise). At least one layer stays
    # MoE, so layer 0 is the MoE the one-layer component draws compare.
    shared = draw(st.sampled_from([0, 0, 1, 2])) if use_moe else 0
    variants = dict(
        moe_intermediate_size=draw(st.sampled_from([None, 4, 12])),
        first_dense_layers=draw(st.integers(0, num_layers - 1)),
        num_shared_experts=shared,
        shared_expert_intermediate_size=draw(st.sampled_from([None, 6])) if shared else None,
        shared_expert_gate=draw(st.booleans()) if shared else False,
        router_scoring=draw(st.sampled_from(["softmax", "sigmoid"])),
        routed_scaling_factor=draw(st.sampled_from([1.0, 1.0, 2.5])),
        **draw(routings(num_experts, k)),
    ) if use_moe else {}
    return ModelSpec(
        vocab_size=draw(st.integers(5, 48)),
        max_seq_len=seq_len,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=draw(st.sampled_from([None, num_kv_heads])) if num_kv_heads == num_heads else num_kv_heads,
        head_dim=explicit_head_dim,
        intermediate_size=draw(st.sampled_from([None, 8, 20, 36])),
        activation=draw(st.sampled_from(["gelu", "gelu_tanh", "silu", "relu"])),
        use_glu=draw(st.booleans()),
        norm_type=draw(st.sampled_from(["layernorm", "rmsnorm"])),
        norm_eps=draw(st.sampled_from([1e-5, 1e-6])),
        norm_position=draw(st.sampled_from(["pre", "post"])),
        position=position,
        rope_theta=draw(st.sampled_from([10000.0, 500.0, 1e6])),
        rope_scaling=draw(st.sampled_from([None, LLAMA3_SCALING])) if position == "rope" else None,
        tie_embeddings=tie,
        lm_head_bias=False if tie else draw(st.booleans()),  # a tied head has no bias of its own
        attention_bias=draw(st.booleans()),
        attention_out_bias=draw(st.sampled_from([None, True, False])),
        qk_norm=draw(st.booleans()),
        sliding_window=draw(st.sampled_from([None, None, 1, 3, 8])),
        mlp_bias=draw(st.booleans()),
        use_moe=use_moe,
        num_experts=num_experts,
        num_experts_per_token=k,
        norm_topk_prob=draw(st.booleans()),
        capacity_factor=draw(st.sampled_from([None, None, 0.5, 1.0, 1.5])),
        router_aux_loss_coef=draw(st.sampled_from([0.0, 0.01, 0.1])),
        router_z_loss_coef=draw(st.sampled_from([0.0, 0.001])),
        init_std=draw(st.sampled_from([0.02, 0.1, 0.3])),
        scale_residual_init=draw(st.booleans()),
        **variants,
    )


@st.composite
def routings(draw, num_experts: int, k: int) -> dict:
    """Group-limited routing and the selection bias for ``num_experts`` experts, top-``k``: a group
    count dividing E (1 = none), enough kept groups to hold k experts, the group score (top2_sum
    needs groups of two), the bias (perturbed weights make it nonzero) and its update rate."""
    groups = draw(st.sampled_from([g for g in range(1, num_experts + 1) if num_experts % g == 0]))
    per_group = num_experts // groups
    kept = draw(st.integers(-(-k // per_group), groups))  # ceil(k / per_group) .. groups
    score = draw(st.sampled_from(["max", "top2_sum"] if groups > 1 and per_group >= 2 else ["max"]))
    bias = draw(st.booleans())
    return dict(num_expert_groups=groups, topk_groups=kept, router_group_score=score,
                router_selection_bias=bias,
                router_bias_update_rate=draw(st.sampled_from([0.0, 1e-2])) if bias else 0.0)


@st.composite
def mlas(draw, *, moe: bool | None = None, max_layers: int = 3,
         max_seq_len: int | tuple[int, int] = (12, 24)) -> ModelSpec:
    """``attention=mla`` specs: every other field drawn as ``specs`` draws it for a RoPE model, the
    latent ranks and head sizes small and unequal (odd nope and value sizes included), and
    ``q_lora_rank`` null (one q_proj) or a rank (q_a_proj -> q_a_layernorm -> q_b_proj)."""
    base = draw(specs(moe=moe, mla=False, max_layers=max_layers, max_seq_len=max_seq_len).filter(
        lambda s: s.position.value == "rope"))
    num_heads = draw(st.sampled_from([1, 2, 3, 4]))
    return base.replace(
        attention="mla", num_heads=num_heads, num_kv_heads=None, head_dim=None, qk_norm=False,
        hidden_size=draw(st.sampled_from([8, 12, 20, 32])),  # MLA heads need not divide it
        q_lora_rank=draw(st.sampled_from([None, 3, 8])),
        kv_lora_rank=draw(st.sampled_from([2, 5, 8])),
        qk_nope_head_dim=draw(st.sampled_from([1, 3, 4])),
        qk_rope_head_dim=draw(st.sampled_from([2, 4, 6])),
        v_head_dim=draw(st.sampled_from([2, 3, 5])),
    )


def batch_shapes(max_seq_len: int = 16):
    """(batch, seq) including 1 in both."""
    return st.tuples(st.integers(1, 3), st.integers(1, max_seq_len))


@st.composite
def cases(draw, *, moe: bool | None = None, mla: bool | None = None,
          max_layers: int = 3) -> tuple[ModelSpec, tuple[int, int], str]:
    """(spec, (batch, seq), weights): a spec with a drawn max_seq_len (1..24), a batch shape that fits
    it, and where to compare (``WEIGHTS``)."""
    spec = draw(specs(moe=moe, mla=mla, max_layers=max_layers, max_seq_len=(1, 24)))
    return spec, draw(batch_shapes(spec.max_seq_len)), draw(st.sampled_from(WEIGHTS))
