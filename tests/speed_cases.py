"""The spec, batches and MoE variants both backends' fast-path tests use (no framework imports)."""

from __future__ import annotations

import numpy as np

from llm.spec import ModelSpec

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
