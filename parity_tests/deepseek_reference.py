"""The transformers reference for ``attention: mla``: a tiny DeepseekV3ForCausalLM holding a spec's
canonical weights, every layer dense (``first_k_dense_replace = num_layers``) so only the MLA
attention is DeepSeek's and the rest is the project's RMSNorm + SiLU-GLU block. The spec must be
``norm_type=rmsnorm, activation=silu, use_glu=true``, untied, no MLP bias (what DeepseekV3 is)."""

from __future__ import annotations

import numpy as np
import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from llm.spec import ModelSpec

__all__ = ["hf_config", "hf_model", "hf_state_dict", "mla_spec"]


def hf_config(spec: ModelSpec, *, rope_interleave: bool = False) -> DeepseekV3Config:
    """The DeepseekV3 config of ``spec``: dense MLP in every layer (first_k_dense_replace = num_layers)."""
    return DeepseekV3Config(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.ffn_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_heads,
        q_lora_rank=spec.q_lora_rank, kv_lora_rank=spec.kv_lora_rank, qk_nope_head_dim=spec.qk_nope_head_dim,
        qk_rope_head_dim=spec.qk_rope_head_dim, v_head_dim=spec.v_head_dim, attention_bias=spec.attention_bias,
        first_k_dense_replace=spec.num_layers, rms_norm_eps=spec.norm_eps, max_position_embeddings=spec.max_seq_len,
        rope_theta=spec.rope_theta, rope_interleave=rope_interleave, tie_word_embeddings=False,
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, n_group=1, topk_group=1,
        attn_implementation="eager")


def hf_state_dict(params: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Canonical names -> transformers' DeepseekV3ForCausalLM names (the attention names are HF's)."""
    fixed = {"embed.weight": "model.embed_tokens.weight", "final_norm.weight": "model.norm.weight",
             "lm_head.weight": "lm_head.weight"}
    out = {}
    for name, value in params.items():
        hf = fixed.get(name) or ("model." + name.replace(".attn.", ".self_attn.")
                                 .replace("attn_norm", "input_layernorm").replace("mlp_norm", "post_attention_layernorm"))
        out[hf] = torch.from_numpy(value)
    return out


def hf_model(spec: ModelSpec, params: dict[str, np.ndarray], **config) -> DeepseekV3ForCausalLM:
    """The reference model in eval mode with ``params`` loaded strictly; ``config`` goes to hf_config."""
    model = DeepseekV3ForCausalLM(hf_config(spec, **config)).eval()
    model.load_state_dict(hf_state_dict(params), strict=True)
    return model


def mla_spec(**overrides) -> ModelSpec:
    """A tiny MLA spec in DeepseekV3's form (RMSNorm, SiLU-GLU, untied) with unequal head sizes and
    weights large enough (init_std 0.2) for a wrong path to show in the logits."""
    fields = dict(vocab_size=64, max_seq_len=24, hidden_size=32, num_layers=2, num_heads=4,
                  attention="mla", q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=6,
                  v_head_dim=5, norm_type="rmsnorm", norm_eps=1e-6, activation="silu", use_glu=True,
                  intermediate_size=40, init_std=0.2, rope_theta=500.0)
    fields.update(overrides)
    return ModelSpec(**fields)
