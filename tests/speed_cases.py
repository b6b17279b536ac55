"""The spec, batches, MoE variants and drawn MoE layers both backends' fast-path tests use (no
framework imports)."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from llm.spec import ModelSpec, init_params

SPEC = ModelSpec(vocab_size=97, max_seq_len=16, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                 use_glu=True, activation="silu", norm_type="rmsnorm", position="rope")

MOE_SPECS = {
    "glu_top2": SPEC.replace(use_moe=True, num_experts=4, num_experts_per_token=2, router_z_loss_coef=1e-3),
    "plain_bias_top1_capacity": SPEC.replace(use_moe=True, num_experts=3, num_experts_per_token=1, use_glu=False,
                                             activation="gelu", mlp_bias=True, capacity_factor=0.7),
    "top3_of_5_capacity": SPEC.replace(use_moe=True, num_experts=5, num_experts_per_token=3, capacity_factor=1.0,
                                       norm_topk_prob=False),
}


def batch(seed: int = 0, B: int = 3, T: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """(ids, targets) of shape (B, T) for ``SPEC``'s vocabulary, the first row's first 4 targets ignored."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, SPEC.vocab_size, (B, T))
    tgt = rng.integers(0, SPEC.vocab_size, (B, T))
    tgt[0, :4] = -100
    return ids, tgt


@st.composite
def moe_layer_cases(draw) -> tuple[ModelSpec, np.ndarray, dict[str, np.ndarray]]:
    """(spec, x (N, D) float32, one MoE layer's canonical params without the ``layers.0.mlp.`` prefix).

    Top-k 1..3 of 2..5 experts, GLU or not, biases or not, capacity drops (factors low enough to
    drop), and exact router ties: some router rows are copies of others, so those experts' logits
    are equal on every token and the lower index must win in every implementation.
    """
    num_experts = draw(st.integers(2, 5))
    spec = ModelSpec(hidden_size=8, num_heads=2, intermediate_size=12, use_moe=True, num_experts=num_experts,
                     num_experts_per_token=draw(st.integers(1, min(3, num_experts))),
                     use_glu=draw(st.booleans()), activation="silu", mlp_bias=draw(st.booleans()),
                     norm_topk_prob=draw(st.booleans()),
                     capacity_factor=draw(st.one_of(st.none(), st.sampled_from([0.3, 0.6, 1.0, 1.5]))))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    params = {name[len("layers.0.mlp."):]: rng.standard_normal(value.shape).astype(np.float32) * 0.5
              for name, value in init_params(spec, 0).items() if name.startswith("layers.0.mlp.")}
    router = params["router.weight"]  # (E, D)
    for dst, src in draw(st.lists(st.tuples(st.integers(1, num_experts - 1), st.integers(0, num_experts - 2)),
                                  max_size=2)):
        router[dst] = router[min(src, dst - 1)]  # expert dst ties with a lower one
    x = rng.standard_normal((draw(st.integers(1, 12)), spec.hidden_size)).astype(np.float32)
    return spec, x, params
