"""Hugging Face interop (``llm.hf``): tiny random transformers models built here, saved, imported.

For every family and several shapes (GQA ratios, MQA, tied/untied, a head_dim that is not
hidden/heads, sliding windows, biases, Llama-3 RoPE scaling, MoE top-1/top-2, Qwen3's per-head q/k
norms), in float32 on CPU:

* our torch and flax logits against transformers': max-abs <= 1e-4 and mean KL <= 1e-8;
* greedy generation of 32 tokens identical to transformers' ``generate`` (both backends);
* import -> export -> ``AutoModelForCausalLM.from_pretrained``: no missing/unexpected keys, no
  warnings, the same logits, and re-importing the export gives the same spec.

Plus the tokenizer (imported, used by ``python -m llm.generate``, exported back), config fields that
cannot be honoured (one error listing them all), export errors, and ``--init-from`` training.
Weights use ``initializer_range=0.2`` so logits spread over a few units and greedy choices are not
near-ties that 1e-6 rounding could flip.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers  # a test dependency: a broken import must fail these tests, not skip them

import llm
from llm.hf import HFError, export_hf, import_hf, read_hf_weights
from llm.hf_families import FAMILIES
from llm.spec import ModelSpec, mla_softmax_scale, rope_attention_factor

MAX_ABS, MAX_KL = 1e-4, 1e-8
VOCAB = 160
TOK_VOCAB = 300  # the model that carries a byte-level BPE (256 byte symbols + merges + specials)
NEW_TOKENS = 32
LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=16)
YARN = dict(rope_theta=10000.0, rope_type="yarn", factor=4.0, original_max_position_embeddings=16)
NO_SPECIALS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)  # no early stop in generate

# what the DeepSeek-V2 shapes share
_DEEPSEEK = dict(hidden_size=32, num_hidden_layers=2, max_position_embeddings=64)

# id -> (transformers config class name, model class name, config kwargs)
CASES = {
    "gpt2-tied": ("GPT2Config", "GPT2LMHeadModel",
                  dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "gpt2-untied-hd12-gelu": ("GPT2Config", "GPT2LMHeadModel",
                              dict(n_embd=36, n_layer=2, n_head=3, n_positions=64, n_inner=80,
                                   activation_function="gelu", layer_norm_epsilon=1e-6,
                                   tie_word_embeddings=False)),
    "llama-gqa2-tied-hd12-llama3rope": ("LlamaConfig", "LlamaForCausalLM",
                                        dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                                             max_position_embeddings=64, tie_word_embeddings=True,
                                             rope_scaling=LLAMA3)),
    "llama-mqa-bias": ("LlamaConfig", "LlamaForCausalLM",
                       dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
                            num_key_value_heads=1, max_position_embeddings=64, attention_bias=True,
                            mlp_bias=True, rope_theta=500.0)),
    "mistral-mqa-window5": ("MistralConfig", "MistralForCausalLM",
                            dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=1, max_position_embeddings=64, sliding_window=5)),
    "qwen2-gqa2-tied": ("Qwen2Config", "Qwen2ForCausalLM",
                        dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)),
    "qwen2-gqa4-window6": ("Qwen2Config", "Qwen2ForCausalLM",
                           dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=8,
                                num_key_value_heads=2, max_position_embeddings=64, use_sliding_window=True,
                                sliding_window=6, max_window_layers=0)),
    "mixtral-e4-top2": ("MixtralConfig", "MixtralForCausalLM",
                        dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=64, num_local_experts=4,
                             num_experts_per_tok=2)),
    "mixtral-e3-top1-mqa-window7": ("MixtralConfig", "MixtralForCausalLM",
                                    dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64,
                                         num_local_experts=3, num_experts_per_tok=1, sliding_window=7)),
    "qwen2moe-e4-top2-shared-dense0": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                                       dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                                            shared_expert_intermediate_size=40, mlp_only_layers=[0])),
    "qwen2moe-e3-top1-noshared-norm-tied": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                                            dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=4,
                                                 max_position_embeddings=64, num_experts=3, num_experts_per_tok=2,
                                                 moe_intermediate_size=16, shared_expert_intermediate_size=0,
                                                 norm_topk_prob=True, tie_word_embeddings=True)),
    # Qwen3's head_dim is its own field (default 128, not hidden / heads)
    "qwen3-gqa2-untied-hd12": ("Qwen3Config", "Qwen3ForCausalLM",
                               dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=12, max_position_embeddings=64)),
    "qwen3-mqa-tied-hd12-bias": ("Qwen3Config", "Qwen3ForCausalLM",
                                dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
                                     num_key_value_heads=1, head_dim=12, max_position_embeddings=64,
                                     tie_word_embeddings=True, attention_bias=True, rms_norm_eps=1e-5)),
    "qwen3-gqa4-window6": ("Qwen3Config", "Qwen3ForCausalLM",
                           dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=8,
                                num_key_value_heads=2, head_dim=4, max_position_embeddings=64, use_sliding_window=True,
                                sliding_window=6, max_window_layers=0)),
    # Qwen3-MoE: Qwen3's attention, Qwen2-MoE's router without the shared expert
    "qwen3moe-gqa2-e4-top2-dense1-hd12": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, mlp_only_layers=[0], hidden_size=32,
        intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
        max_position_embeddings=64)),
    "qwen3moe-mqa-e3-top2-norm-tied-bias-window6": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                                                    dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                                         num_attention_heads=6, num_key_value_heads=1, head_dim=8,
                                                         max_position_embeddings=64, num_experts=3,
                                                         num_experts_per_tok=2, moe_intermediate_size=24,
                                                         norm_topk_prob=True, tie_word_embeddings=True,
                                                         attention_bias=True, use_sliding_window=True,
                                                         sliding_window=6)),
    # decoder_sparse_step=2 on 2 layers: layer 0 dense, layer 1 MoE (first_dense_layers=1)
    "qwen3moe-gqa4-step2-hd4": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                                dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=8,
                                     num_key_value_heads=2, head_dim=4, max_position_embeddings=64, num_experts=4,
                                     num_experts_per_tok=1, moe_intermediate_size=16, decoder_sparse_step=2)),
    # DeepSeek-V2: MLA (rope rows stored interleaved), shared experts, dense first layers, scaled routing
    "deepseekv2-lite-noqlora-shared2-dense1": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        _DEEPSEEK, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, q_lora_rank=None,
        kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=6, v_head_dim=5, n_routed_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=8, n_shared_experts=2, first_k_dense_replace=1)),
    "deepseekv2-qlora-noshared-tied-bias-scaled": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        _DEEPSEEK, intermediate_size=40, num_attention_heads=2, q_lora_rank=12, kv_lora_rank=10, qk_nope_head_dim=6,
        qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=3, num_experts_per_tok=2, moe_intermediate_size=12,
        n_shared_experts=0, tie_word_embeddings=True, attention_bias=True, routed_scaling_factor=1.7,
        rope_theta=500.0)),
    "deepseekv2-qlora-shared1-onegroup-llama3rope": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        _DEEPSEEK, intermediate_size=48, num_attention_heads=4, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=4,
        qk_rope_head_dim=8, v_head_dim=4, n_routed_experts=4, num_experts_per_tok=1, moe_intermediate_size=8,
        n_shared_experts=1, topk_method="group_limited_greedy", n_group=1, topk_group=1,
        rope_parameters=dict(rope_theta=10000.0, **LLAMA3))),
    # group_limited_greedy: the 2 best of 3 groups (by their best expert) hold the top-2
    "deepseekv2-qlora-shared1-g3top2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        _DEEPSEEK, intermediate_size=40, num_attention_heads=2, q_lora_rank=12, kv_lora_rank=8, qk_nope_head_dim=4,
        qk_rope_head_dim=4, v_head_dim=6, n_routed_experts=6, num_experts_per_tok=2, moe_intermediate_size=8,
        n_shared_experts=1, topk_method="group_limited_greedy", n_group=3, topk_group=2)),
    # DeepSeek-V3: sigmoid scores, a drawn e_score_correction_bias (build_hf), group top-2 sums
    # (transformers keeps num_key_value_heads at its default 128 unless given)
    "deepseekv3-noqlora-shared2-dense1-g4top2": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        _DEEPSEEK, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
        q_lora_rank=None, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=6, v_head_dim=5, n_routed_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=8, n_shared_experts=2, first_k_dense_replace=1, n_group=4,
        topk_group=2)),
    "deepseekv3-qlora-shared1-dense0-onegroup-tied-bias-scaled": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        _DEEPSEEK, intermediate_size=40, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=12, kv_lora_rank=10,
        qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=12, n_shared_experts=1, first_k_dense_replace=0, n_group=1, topk_group=1,
        norm_topk_prob=False, routed_scaling_factor=1.7, tie_word_embeddings=True, attention_bias=True,
        rope_theta=500.0)),
    # YaRN (factor 4 over 16 original positions, max 64): positions past 16 are the scaled ones.
    # mscale == mscale_all_dim (V2-Lite's rule): cos/sin unscaled, the MLA softmax scale times mscale^2
    "deepseekv2-lite-noqlora-yarn4-mscale-alldim": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        _DEEPSEEK, intermediate_size=48, num_attention_heads=4, q_lora_rank=None, kv_lora_rank=8,
        qk_nope_head_dim=4, qk_rope_head_dim=8, v_head_dim=5, n_routed_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=8, n_shared_experts=1, first_k_dense_replace=1,
        rope_parameters=dict(YARN, mscale=0.707, mscale_all_dim=0.707))),
    # no mscale: cos/sin times mscale(4) = 1.139, the softmax scale plain; a ramp over several pairs
    "deepseekv2-qlora-yarn4-plain-ramp": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        _DEEPSEEK, intermediate_size=40, num_attention_heads=2, q_lora_rank=12, kv_lora_rank=8, qk_nope_head_dim=6,
        qk_rope_head_dim=8, v_head_dim=6, n_routed_experts=3, num_experts_per_tok=2, moe_intermediate_size=8,
        n_shared_experts=1, rope_parameters=dict(YARN, rope_theta=100.0, beta_fast=8, beta_slow=0.5,
                                                 truncate=False))),
    # mscale != mscale_all_dim: both the cos/sin factor and the softmax scale move
    "deepseekv3-noqlora-yarn4-mscale1-alldim08": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        _DEEPSEEK, intermediate_size=48, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None,
        kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=6, v_head_dim=5, n_routed_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=8, n_shared_experts=1, first_k_dense_replace=1, n_group=4,
        topk_group=2, rope_parameters=dict(YARN, mscale=1.0, mscale_all_dim=0.8))),
    "deepseekv3-qlora-yarn4-plain": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        _DEEPSEEK, intermediate_size=40, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=12,
        kv_lora_rank=10, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=12, n_shared_experts=1, n_group=1, topk_group=1,
        rope_parameters=dict(YARN))),
    # Qwen2 (Llama's rotary): the attention factor on cos/sin only, mscale_all_dim leaves the softmax alone
    "qwen2-gqa2-yarn4-mscale1-alldim05": ("Qwen2Config", "Qwen2ForCausalLM",
                                          dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2,
                                               max_position_embeddings=64,
                                               rope_parameters=dict(YARN, mscale=1.0, mscale_all_dim=0.5))),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build_hf(case: str, seed: int = 0):
    cfg_name, model_name, kwargs = CASES[case]
    cfg = getattr(transformers, cfg_name)(vocab_size=VOCAB, initializer_range=0.2, **NO_SPECIALS, **kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg).eval()
    with torch.no_grad():  # transformers starts q_norm / k_norm at ones: drawn scales make a swap show
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.copy_(1 + 0.3 * torch.randn(p.shape))
        for name, b in model.named_buffers():  # transformers starts DeepSeek-V3's selection bias at zeros
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn(b.shape))
    return model


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """case -> (HF model, HF dir, canonical checkpoint dir), built and imported once per case."""
    cache: dict[str, tuple] = {}

    def get(case: str):
        if case not in cache:
            root = tmp_path_factory.mktemp(case)
            model = build_hf(case)
            # one case exercises sharded files (model.safetensors.index.json)
            model.save_pretrained(root / "hf", max_shard_size="20KB" if case == "llama-mqa-bias" else "1GB")
            import_hf(root / "hf", root / "ckpt")
            cache[case] = (model, root / "hf", root / "ckpt")
        return cache[case]

    return get


def _compare(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """(max-abs, mean KL(ref || got)) over positions, in float64."""
    a, b = ref.astype(np.float64), got.astype(np.float64)
    la = a - np.log(np.exp(a - a.max(-1, keepdims=True)).sum(-1, keepdims=True)) - a.max(-1, keepdims=True)
    lb = b - np.log(np.exp(b - b.max(-1, keepdims=True)).sum(-1, keepdims=True)) - b.max(-1, keepdims=True)
    kl = (np.exp(la) * (la - lb)).sum(-1).mean()
    return float(np.abs(a - b).max()), float(kl)


# ---------------------------------------------------------------------- logits and generation
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, imported):
    model, _, ckpt = imported(case)
    ids = np.random.default_rng(1).integers(0, VOCAB, size=(2, 40))  # longer than every window
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.float().numpy()
    assert np.abs(ref).max() > 1.0  # a model whose logits are not all ~0 (the check could fail)
    for backend in ("torch", "jax"):
        got = llm.load(ckpt, backend=backend).logits(ids)
        max_abs, kl = _compare(ref, got)
        print(f"{case} {backend}: max-abs {max_abs:.2e} KL {kl:.2e}")
        assert max_abs <= MAX_ABS and kl <= MAX_KL, (case, backend, max_abs, kl)


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_generation_matches_transformers(case, imported):
    model, _, ckpt = imported(case)
    prompt = np.random.default_rng(2).integers(0, VOCAB, size=(2, 8))
    with torch.no_grad():
        ref = model.generate(torch.from_numpy(prompt), max_new_tokens=NEW_TOKENS, do_sample=False).numpy()
    assert ref.shape == (2, 8 + NEW_TOKENS)
    for backend in ("torch", "jax"):
        got = llm.load(ckpt, backend=backend).generate(prompt, NEW_TOKENS)
        np.testing.assert_array_equal(got, ref, err_msg=f"{case} {backend}")


# ---------------------------------------------------------------------- round trip
class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_export_loads_in_transformers(case, imported, tmp_path):
    model, hf_dir, ckpt = imported(case)
    res = export_hf(ckpt, tmp_path / "out")
    assert res.family == FAMILIES[json.loads((hf_dir / "config.json").read_text())["model_type"]].name
    handler = _Records()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        again, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    finally:
        logger.removeHandler(handler)
    assert type(again) is type(model)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    assert handler.messages == []
    ids = torch.from_numpy(np.random.default_rng(3).integers(0, VOCAB, size=(2, 40)))
    with torch.no_grad():
        np.testing.assert_array_equal(again.eval()(ids).logits.numpy(), model(ids).logits.numpy())
    import_hf(tmp_path / "out", tmp_path / "again")
    assert llm.checkpoint.load_checkpoint(tmp_path / "again").spec == llm.checkpoint.load_checkpoint(ckpt).spec


def test_spec_mapping_examples(imported):
    """The mapped fields are the documented ones (a regression check of the table in docs/hf_interop.md)."""
    spec = llm.checkpoint.load_checkpoint(imported("qwen2-gqa4-window6")[2]).spec
    assert (spec.attention_bias, spec.out_bias, spec.sliding_window, spec.kv_heads) == (True, False, 6, 2)
    spec = llm.checkpoint.load_checkpoint(imported("llama-gqa2-tied-hd12-llama3rope")[2]).spec
    assert spec.head_dim == 12 and spec.tie_embeddings and spec.rope_scaling["rope_type"] == "llama3"
    spec = llm.checkpoint.load_checkpoint(imported("gpt2-untied-hd12-gelu")[2]).spec
    assert (spec.position.value, spec.activation.value, spec.norm_eps, spec.ffn_size, spec.dropout) == \
        ("learned", "gelu", 1e-6, 80, 0.1)
    spec = llm.checkpoint.load_checkpoint(imported("mixtral-e3-top1-mqa-window7")[2]).spec
    assert (spec.use_moe, spec.num_experts, spec.num_experts_per_token, spec.norm_topk_prob,
            spec.router_aux_loss_coef) == (True, 3, 1, True, 0.001)
    spec = llm.checkpoint.load_checkpoint(imported("qwen3-mqa-tied-hd12-bias")[2]).spec
    assert (spec.qk_norm, spec.head_dim, spec.kv_heads, spec.attention_bias, spec.out_bias, spec.tie_embeddings,
            spec.norm_eps) == (True, 12, 1, True, True, True, 1e-5)
    spec = llm.checkpoint.load_checkpoint(imported("qwen3-gqa4-window6")[2]).spec
    assert (spec.qk_norm, spec.sliding_window, spec.attention_bias, spec.out_bias) == (True, 6, False, False)


def test_qwen3_head_dim_defaults_to_128():
    """An absent ``head_dim`` is transformers' Qwen3 default 128, not hidden / heads (a llama reads 8)."""
    cfg = build_hf("qwen3-gqa2-untied-hd12").config.to_dict()
    cfg.update(hidden_size=64, num_attention_heads=8)
    del cfg["head_dim"]
    assert FAMILIES["qwen3"].to_spec(cfg).dim_head == 128
    llama = build_hf("llama-mqa-bias").config.to_dict()
    del llama["head_dim"]
    assert FAMILIES["llama"].to_spec(llama).dim_head == 48 // 6


def test_qk_norm_exports_as_qwen3_only(imported, tmp_path):
    """A qk_norm spec goes to qwen3 by default; naming another family fails on qk_norm; a qwen3
    checkpoint without qk_norm is refused by qwen3."""
    from llm.checkpoint import save_checkpoint
    from llm.spec import init_params

    spec = llm.checkpoint.load_checkpoint(imported("qwen3-gqa2-untied-hd12")[2]).spec
    save_checkpoint(tmp_path / "c", init_params(spec), {"model": spec.to_dict()})
    assert export_hf(tmp_path / "c", tmp_path / "out").family == "qwen3"
    for family in ("llama", "qwen2", "gpt2"):
        with pytest.raises(HFError, match="qk_norm=True"):
            export_hf(tmp_path / "c", tmp_path / "x", family=family)
    plain = spec.replace(qk_norm=False)
    save_checkpoint(tmp_path / "d", init_params(plain), {"model": plain.to_dict()})
    with pytest.raises(HFError, match="qk_norm=False: qwen3 always normalises q and k per head"):
        export_hf(tmp_path / "d", tmp_path / "y", family="qwen3")
    assert export_hf(tmp_path / "d", tmp_path / "z").family == "llama"


def test_qwen2_moe_mapping(imported, tmp_path):
    """The shared expert, its gate, the expert size and the dense first layer map to the variant fields;
    what qwen2_moe (or mixtral) cannot express is refused by name."""
    spec = llm.checkpoint.load_checkpoint(imported("qwen2moe-e4-top2-shared-dense0")[2]).spec
    assert (spec.num_shared_experts, spec.shared_expert_intermediate_size, spec.shared_expert_gate,
            spec.moe_intermediate_size, spec.first_dense_layers, spec.norm_topk_prob) == (1, 40, True, 24, 1, False)
    spec = llm.checkpoint.load_checkpoint(imported("qwen2moe-e3-top1-noshared-norm-tied")[2]).spec
    assert (spec.num_shared_experts, spec.shared_expert_gate, spec.norm_topk_prob) == (0, False, True)
    fam = FAMILIES["qwen2_moe"]
    base = spec.replace(num_shared_experts=2, shared_expert_intermediate_size=5, shared_expert_gate=True)
    assert fam.to_config(base)["shared_expert_intermediate_size"] == 10  # two shared experts, fused
    problems = fam.can_express(base.replace(shared_expert_gate=False, router_scoring="sigmoid",
                                            routed_scaling_factor=2.0))
    assert {p.split("=")[0] for p in problems} == {"router_scoring", "routed_scaling_factor", "shared_expert_gate"}
    problems = FAMILIES["mixtral"].can_express(base.replace(first_dense_layers=1))
    assert {"first_dense_layers", "num_shared_experts", "moe_intermediate_size"} <= {p.split("=")[0] for p in problems}


@pytest.mark.parametrize("case,released,mscale_all_dim", [
    ("deepseekv2-lite-noqlora-shared2-dense1", {"type": "yarn", "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                                                "beta_fast": 32, "beta_slow": 1,
                                                "original_max_position_embeddings": 4096}, 0.707),
    ("deepseekv3-noqlora-shared2-dense1-g4top2", {"type": "yarn", "rope_type": "yarn", "factor": 40, "mscale": 1.0,
                                                  "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1,
                                                  "original_max_position_embeddings": 4096}, 1.0),
])
def test_released_deepseek_yarn_rope_scaling_imports(case, released, mscale_all_dim, imported, tmp_path):
    """The legacy ``rope_scaling`` block of the released DeepSeek-V2-Lite / V3 config.json files."""
    _, hf_dir, _ = imported(case)
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg.update(rope_parameters=None, rope_scaling=released, rope_theta=10000)
    src = _write_config(tmp_path / "released", cfg)
    for weights in hf_dir.glob("*.safetensors"):
        shutil.copy(weights, src / weights.name)
    import_hf(src, tmp_path / "out")
    spec = llm.checkpoint.load_checkpoint(tmp_path / "out").spec
    assert spec.rope_scaling == {"rope_type": "yarn", **{k: v for k, v in released.items() if k != "type"}}
    assert rope_attention_factor(spec) == 1.0  # mscale == mscale_all_dim
    assert math.isclose(mla_softmax_scale(spec),
                        (0.1 * mscale_all_dim * math.log(40) + 1) ** 2 / math.sqrt(spec.qk_head_dim))


def test_qwen3_moe_and_deepseek_v2_mapping(imported):
    """The layer rule, experts, shared experts and MLA sizes map to the documented spec fields."""
    load = lambda case: llm.checkpoint.load_checkpoint(imported(case)[2]).spec  # noqa: E731
    spec = load("qwen3moe-gqa2-e4-top2-dense1-hd12")
    assert (spec.qk_norm, spec.head_dim, spec.kv_heads, spec.first_dense_layers, spec.moe_intermediate_size,
            spec.num_shared_experts, spec.norm_topk_prob) == (True, 12, 2, 1, 16, 0, False)
    assert load("qwen3moe-gqa4-step2-hd4").first_dense_layers == 1  # decoder_sparse_step=2 on 2 layers
    spec = load("qwen3moe-mqa-e3-top2-norm-tied-bias-window6")
    assert (spec.sliding_window, spec.out_bias, spec.norm_topk_prob, spec.tie_embeddings) == (6, True, True, True)
    spec = load("deepseekv2-lite-noqlora-shared2-dense1")
    assert (spec.attention.value, spec.q_lora_rank, spec.kv_lora_rank, spec.qk_nope_head_dim, spec.qk_rope_head_dim,
            spec.v_head_dim, spec.first_dense_layers, spec.num_shared_experts, spec.shared_ffn_size,
            spec.norm_topk_prob, spec.router_aux_loss_coef) == ("mla", None, 8, 4, 6, 5, 1, 2, 16, False, 0.001)
    spec = load("deepseekv2-qlora-noshared-tied-bias-scaled")
    assert (spec.q_lora_rank, spec.num_shared_experts, spec.routed_scaling_factor, spec.attention_bias,
            spec.out_bias) == (12, 0, 1.7, True, True)
    assert load("deepseekv2-qlora-shared1-onegroup-llama3rope").rope_scaling["rope_type"] == "llama3"
    spec = load("deepseekv2-qlora-shared1-g3top2")
    assert (spec.num_expert_groups, spec.topk_groups, spec.router_group_score.value, spec.router_selection_bias) == \
        (3, 2, "max", False)


def test_deepseek_v3_mapping(imported):
    """Sigmoid scoring, the selection bias (imported, its update rate 0), groups scored by top-2 sums."""
    load = lambda case: llm.checkpoint.load_checkpoint(imported(case)[2])  # noqa: E731
    ckpt = load("deepseekv3-noqlora-shared2-dense1-g4top2")
    spec = ckpt.spec
    assert (spec.router_scoring.value, spec.router_selection_bias, spec.router_bias_update_rate, spec.num_expert_groups,
            spec.topk_groups, spec.router_group_score.value, spec.norm_topk_prob, spec.routed_scaling_factor,
            spec.num_shared_experts, spec.first_dense_layers, spec.q_lora_rank, spec.router_aux_loss_coef) == \
        ("sigmoid", True, 0.0, 4, 2, "top2_sum", True, 2.5, 2, 1, None, 0.0)
    model = imported("deepseekv3-noqlora-shared2-dense1-g4top2")[0]
    np.testing.assert_array_equal(ckpt.params["layers.2.mlp.router.selection_bias"],
                                  model.model.layers[2].mlp.gate.e_score_correction_bias.numpy())
    spec = load("deepseekv3-qlora-shared1-dense0-onegroup-tied-bias-scaled").spec
    assert (spec.num_expert_groups, spec.router_group_score.value, spec.norm_topk_prob, spec.routed_scaling_factor,
            spec.tie_embeddings, spec.out_bias, spec.first_dense_layers) == (1, "max", False, 1.7, True, True, 0)


def _loaded_and_reference(imported, case: str, *, batch: int):
    """(the imported checkpoint, token ids (batch, 40), transformers' logits on them)."""
    model, _, ckpt = imported(case)
    ids = np.random.default_rng(1).integers(0, VOCAB, size=(batch, 40))
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()
    return llm.checkpoint.load_checkpoint(ckpt), ids, ref


def test_deepseek_v3_selection_bias_changes_the_routing(imported):
    """Without the imported e_score_correction_bias the logits leave transformers' (the bias is used)."""
    from llm.api import from_params

    loaded, ids, ref = _loaded_and_reference(imported, "deepseekv3-noqlora-shared2-dense1-g4top2", batch=2)
    zeroed = {k: (np.zeros_like(v) if k.endswith("selection_bias") else v) for k, v in loaded.params.items()}
    assert _compare(ref, from_params(loaded.spec, loaded.params).logits(ids))[0] <= MAX_ABS
    assert _compare(ref, from_params(loaded.spec, zeroed).logits(ids))[0] > 100 * MAX_ABS


def test_deepseek_v3_bias_update_rate_is_a_training_setting(imported, tmp_path):
    """The rate imports as 0 unless given; export writes no field for it (and refuses nothing about it)."""
    _, hf_dir, _ = imported("deepseekv3-qlora-shared1-dense0-onegroup-tied-bias-scaled")
    assert llm.hf.main(["import", str(hf_dir), str(tmp_path / "c"), "--router-bias-update-rate", "0.001"]) == 0
    spec = llm.checkpoint.load_checkpoint(tmp_path / "c").spec
    assert spec.router_bias_update_rate == 0.001
    res = export_hf(tmp_path / "c", tmp_path / "out")
    assert res.family == "deepseek_v3" and not any("rate" in k for k in res.config)
    import_hf(tmp_path / "out", tmp_path / "again")
    assert llm.checkpoint.load_checkpoint(tmp_path / "again").spec == spec.replace(router_bias_update_rate=0.0)
    _, v2_dir, _ = imported("deepseekv2-qlora-shared1-g3top2")
    with pytest.raises(HFError, match="router_bias_update_rate=0.001: .*needs router_selection_bias=true"):
        import_hf(v2_dir, tmp_path / "v2", router_bias_update_rate=0.001)


def test_deepseek_v3_mtp_modules_are_dropped_on_import(imported, tmp_path):
    """A file's multi-token-prediction layer (model.layers.{num_layers}, with eh_proj) is not the causal
    LM's: imported without it; a stray extra layer without eh_proj is still an unexpected name."""
    from safetensors.numpy import save_file

    model, hf_dir, _ = imported("deepseekv3-qlora-shared1-dense0-onegroup-tied-bias-scaled")
    weights = read_hf_weights(hf_dir)
    extra = {f"model.layers.2.{n}": np.ones((4, 4), np.float32)
             for n in ("eh_proj.weight", "enorm.weight", "self_attn.kv_b_proj.weight")}
    for name, extras in (("mtp", extra), ("stray", {"model.layers.2.enorm.weight": np.ones(4, np.float32)})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text((hf_dir / "config.json").read_text())
        save_file({**weights, **extras}, str(tmp_path / name / "model.safetensors"))
    import_hf(tmp_path / "mtp", tmp_path / "ckpt")
    ids = np.random.default_rng(4).integers(0, VOCAB, size=(1, 24))
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()
    assert _compare(ref, llm.load(tmp_path / "ckpt").logits(ids))[0] <= MAX_ABS
    with pytest.raises(HFError, match="unexpected 1: model.layers.2.enorm.weight"):
        import_hf(tmp_path / "stray", tmp_path / "out")


def test_deepseek_v3_export_refuses_what_it_cannot_hold():
    """Each spec field deepseek_v3 cannot hold is named (and every other family refuses the
    selection bias and the top-2-sum group score)."""
    base = _case_spec("deepseekv3-noqlora-shared2-dense1-g4top2")
    fam = FAMILIES["deepseek_v3"]
    for change, field in ((dict(router_scoring="softmax"), "router_scoring"),
                          (dict(router_selection_bias=False), "router_selection_bias"),
                          (dict(router_group_score="max"), "router_group_score"),
                          (dict(num_expert_groups=8, topk_groups=2, router_group_score="max"), "num_expert_groups"),
                          (dict(capacity_factor=1.25), "capacity_factor"),
                          (dict(shared_expert_gate=True), "shared_expert_gate"),
                          (dict(sliding_window=8), "sliding_window")):
        problems = fam.can_express(base.replace(**change))
        assert field in {p.split("=")[0] for p in problems}, (change, problems)
    assert fam.can_express(base.replace(router_bias_update_rate=0.01)) == []
    v2 = FAMILIES["deepseek_v2"].can_express(base.replace(router_scoring="softmax", norm_topk_prob=False))
    assert {p.split("=")[0] for p in v2} == {"router_selection_bias", "router_group_score"}


@pytest.mark.parametrize("case", ["deepseekv2-lite-noqlora-shared2-dense1", "deepseekv3-noqlora-shared2-dense1-g4top2"])
def test_deepseek_rope_rows_are_reordered_from_interleaved_pairs(case, imported):
    """DeepSeek stores each rope pair (2i, 2i+1) side by side; our rotate-half pairs (i, i + p/2)."""
    from llm.checkpoint import load_checkpoint

    model, _, ckpt = imported(case)
    params = load_checkpoint(ckpt).params
    attn = model.model.layers[0].self_attn
    nope, rope, rank = 4, 6, 8
    hf_q = attn.q_proj.weight.detach().numpy().reshape(4, nope + rope, -1)
    ours_q = params["layers.0.attn.q_proj.weight"].reshape(4, nope + rope, -1)
    np.testing.assert_array_equal(ours_q[:, :nope], hf_q[:, :nope])
    np.testing.assert_array_equal(ours_q[:, nope:], hf_q[:, nope + np.array([0, 2, 4, 1, 3, 5])])
    hf_kv = attn.kv_a_proj_with_mqa.weight.detach().numpy()
    np.testing.assert_array_equal(params["layers.0.attn.kv_a_proj_with_mqa.weight"],
                                  hf_kv[np.r_[0:rank, rank + np.array([0, 2, 4, 1, 3, 5])]])


# field -> (the families that hold it, the spec change); an MoE field is tried on the MoE families
# (a dense family refuses use_moe itself, tested below). A family without shared experts may refuse
# the shared expert's gate and size through num_shared_experts, the field they depend on; one without
# expert groups the group score through num_expert_groups.
_HOLDERS = {
    "attention": ({"deepseek_v2", "deepseek_v3"}, dict(attention="mla", num_kv_heads=None, head_dim=None, qk_norm=False,
                                         position="rope", sliding_window=None)),
    "qk_norm": ({"qwen3", "qwen3_moe"}, dict(qk_norm=True)),
    "norm_position": (set(), dict(norm_position="post")),
    "lm_head_bias": (set(), dict(lm_head_bias=True, tie_embeddings=False)),
    "num_shared_experts": ({"qwen2_moe", "deepseek_v2", "deepseek_v3"}, dict(num_shared_experts=1)),
    "shared_expert_gate": ({"qwen2_moe"}, dict(num_shared_experts=1, shared_expert_gate=True)),
    "shared_expert_intermediate_size": ({"qwen2_moe"}, dict(num_shared_experts=1, shared_expert_gate=True,
                                                            shared_expert_intermediate_size=3)),
    "first_dense_layers": ({"qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"}, dict(first_dense_layers=1)),
    "router_scoring": ({"deepseek_v3"}, dict(router_scoring="sigmoid")),
    "routed_scaling_factor": ({"deepseek_v2", "deepseek_v3"}, dict(routed_scaling_factor=2.5)),
    "moe_intermediate_size": ({"qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"}, dict(moe_intermediate_size=7)),
    "num_expert_groups": ({"deepseek_v2", "deepseek_v3"}, dict(num_expert_groups=2, topk_groups=1)),
    "router_group_score": ({"deepseek_v3"}, dict(num_expert_groups=2, topk_groups=1, router_group_score="top2_sum")),
    "router_selection_bias": ({"deepseek_v3"}, dict(router_selection_bias=True)),
}
_MOE_FIELDS = {"num_shared_experts", "shared_expert_gate", "shared_expert_intermediate_size", "first_dense_layers",
               "router_scoring", "routed_scaling_factor", "moe_intermediate_size", "num_expert_groups",
               "router_group_score", "router_selection_bias"}
_FAMILY_CASE = {"gpt2": "gpt2-tied", "llama": "llama-mqa-bias", "mistral": "mistral-mqa-window5",
                "qwen2": "qwen2-gqa2-tied", "mixtral": "mixtral-e4-top2", "qwen2_moe": "qwen2moe-e4-top2-shared-dense0",
                "qwen3": "qwen3-gqa2-untied-hd12", "qwen3_moe": "qwen3moe-gqa2-e4-top2-dense1-hd12",
                "deepseek_v2": "deepseekv2-lite-noqlora-shared2-dense1",
                "deepseek_v3": "deepseekv3-noqlora-shared2-dense1-g4top2"}


def _case_spec(case: str) -> ModelSpec:
    cfg_name, _, kwargs = CASES[case]
    cfg = getattr(transformers, cfg_name)(vocab_size=VOCAB, initializer_range=0.2, **NO_SPECIALS, **kwargs)
    return FAMILIES[cfg.model_type].to_spec(cfg.to_dict())


def test_every_family_refuses_each_field_it_cannot_hold():
    assert set(_FAMILY_CASE) == set(FAMILIES)
    for family, case in _FAMILY_CASE.items():
        base = _case_spec(case)
        assert FAMILIES[family].can_express(base) == [], family
        if not base.use_moe:
            problems = FAMILIES[family].can_express(base.replace(use_moe=True))
            assert any(p.startswith("use_moe=True") for p in problems), family
        for field, (holders, change) in _HOLDERS.items():
            if field in _MOE_FIELDS and not base.use_moe:
                continue
            if field == "qk_norm" and base.is_mla:
                continue  # the spec itself refuses qk_norm with MLA
            names = {p.split("=")[0] for p in FAMILIES[family].can_express(base.replace(**change))}
            if family in holders:
                assert field not in names, (family, field, names)
            else:
                via = ({"num_shared_experts"} if field.startswith("shared_expert")
                       else {"num_expert_groups"} if field == "router_group_score" else set())
                assert names & ({field} | via), (family, field, names)


def test_sliding_window_maps_one_to_one(imported):
    """transformers' window W is our sliding_window W: W - 1 or W + 1 would not match its logits."""
    from llm.api import from_params

    loaded, ids, ref = _loaded_and_reference(imported, "mistral-mqa-window5", batch=1)
    errors = {w: _compare(ref, from_params(loaded.spec.replace(sliding_window=w), loaded.params).logits(ids))[0]
              for w in (4, 5, 6)}
    assert errors[5] <= MAX_ABS < min(errors[4], errors[6]), errors


def test_fused_mixtral_experts_and_bf16_weights(tmp_path):
    """transformers-5 in-memory names (mlp.experts.gate_up_proj, mlp.gate) and bfloat16 files import too."""
    from safetensors.torch import save_file

    model = build_hf("mixtral-e4-top2")
    model.config.save_pretrained(tmp_path / "fused")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "fused" / "model.safetensors"))
    assert any("gate_up_proj" in k for k in read_hf_weights(tmp_path / "fused"))
    import_hf(tmp_path / "fused", tmp_path / "ckpt")
    ids = np.random.default_rng(4).integers(0, VOCAB, size=(1, 24))
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()
    assert _compare(ref, llm.load(tmp_path / "ckpt").logits(ids))[0] <= MAX_ABS

    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    weights = read_hf_weights(tmp_path / "bf16")
    w = weights["model.layers.0.self_attn.q_proj.weight"]
    assert w.dtype == np.float32
    np.testing.assert_array_equal(w, model.model.layers[0].self_attn.q_proj.weight.detach().float().numpy())


# ---------------------------------------------------------------------- tokenizer
def _hf_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOK_VOCAB - 8, special_tokens=["<s>", "</s>", "<pad>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = "the quick brown fox jumps over the lazy dog. " * 30 + "hello world, hello there. " * 30
    tok.train_from_iterator([text], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>")


@pytest.fixture(scope="module")
def llama_with_tokenizer(tmp_path_factory):
    """A tiny Llama saved with a tokenizers-library BPE (tokenizer.json + tokenizer_config.json), imported."""
    root = tmp_path_factory.mktemp("llama_tok")
    hf_tok = _hf_tokenizer()
    cfg = transformers.LlamaConfig(vocab_size=TOK_VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
                                   initializer_range=0.2, bos_token_id=hf_tok.bos_token_id,
                                   eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id)
    torch.manual_seed(5)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(root / "hf")
    hf_tok.save_pretrained(root / "hf")
    assert llm.hf.main(["import", str(root / "hf"), str(root / "ckpt")]) == 0
    return model, hf_tok, root


def test_tokenizer_imported_and_used_by_generate_cli(llama_with_tokenizer, capsys):
    from llm.generate import main as generate_main
    from llm.tokenization import HFTokenizer, load_tokenizer

    model, hf_tok, root = llama_with_tokenizer
    tok = load_tokenizer(root / "ckpt" / "tokenizer.json")
    assert isinstance(tok, HFTokenizer)
    text = "the lazy fox says hello there"
    assert tok.encode(text) == hf_tok(text).input_ids  # post-processor included: <s> first
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id)

    prompt = "the quick brown"
    capsys.readouterr()
    assert generate_main(["--checkpoint", str(root / "ckpt"), "--prompt", prompt, "--greedy",
                          "--max-new-tokens", "24"]) == 0
    out = capsys.readouterr().out.rstrip("\n")
    ids = hf_tok(prompt, return_tensors="pt").input_ids
    # The model's table (TOK_VOCAB rows) is padded past the tokenizer's ids; text generation never
    # proposes an id without text (llm.sampling's vocab_limit), transformers' suppress_tokens likewise
    no_text = list(range(len(hf_tok), TOK_VOCAB))
    assert no_text  # the case the rule is for
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=24, do_sample=False, suppress_tokens=no_text)[0, ids.shape[1]:]
    assert int(ref.max()) < len(hf_tok)
    expected = prompt + hf_tok.decode(ref, skip_special_tokens=True)
    assert out == expected


def test_tokenizer_exported_loads_in_transformers(llama_with_tokenizer, tmp_path):
    _, hf_tok, root = llama_with_tokenizer
    assert llm.hf.main(["export", str(root / "ckpt"), str(tmp_path / "out")]) == 0
    again = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    text = "hello world, the quick dog"
    assert again(text).input_ids == hf_tok(text).input_ids
    assert (again.bos_token, again.eos_token, again.pad_token) == ("<s>", "</s>", "<pad>")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (hf_tok.bos_token_id, hf_tok.eos_token_id)


def test_original_gpt2_layout_and_vocab_merges_tokenizer(tmp_path):
    """The original GPT-2 files: names without ``transformer.``, bool ``attn.bias`` mask buffers, and a
    slow tokenizer (vocab.json + merges.txt, no tokenizer.json)."""
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    cfg = transformers.GPT2Config(vocab_size=TOK_VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  initializer_range=0.2, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(6)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.config.save_pretrained(tmp_path / "hf")
    weights = {k.removeprefix("transformer."): v.numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    for i in range(2):
        weights[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), bool))
    save_file(weights, str(tmp_path / "hf" / "model.safetensors"))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=TOK_VOCAB - 10, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["hello world, the quick brown fox. " * 50], trainer=trainer)
    bpe.model.save(str(tmp_path / "hf"))  # vocab.json + merges.txt

    res = import_hf(tmp_path / "hf", tmp_path / "ckpt")
    ids = np.random.default_rng(7).integers(0, TOK_VOCAB, size=(1, 30))
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()
    assert _compare(ref, llm.load(tmp_path / "ckpt").logits(ids))[0] <= MAX_ABS
    slow = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in ("hello world", "the quick  brown fox<|endoftext|>x", "naïve 🙂 text"):
        assert res.tokenizer.encode(text) == slow(text).input_ids, text
    assert res.tokenizer.eos_id == 0 and res.tokenizer.decode(res.tokenizer.encode("naïve 🙂")) == "naïve 🙂"


def test_import_needs_neither_torch_nor_transformers(imported, tmp_path):
    _, hf_dir, _ = imported("llama-gqa2-tied-hd12-llama3rope")
    code = (f"import sys, llm.hf; rc = llm.hf.main(['import', {str(hf_dir)!r}, {str(tmp_path / 'c')!r}]); "
            "print(rc, sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'jax', 'flax', 'transformers'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip().splitlines()[-1] == "0 []"


# ---------------------------------------------------------------------- errors
def _write_config(path: Path, cfg: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def test_unhonourable_config_fields_are_listed_together(tmp_path):
    cfg = build_hf("llama-mqa-bias").config.to_dict()
    cfg.update(attention_dropout=0.1, rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 1e4},
               my_new_field=3, pruned_heads={"0": [1]})
    with pytest.raises(HFError) as e:
        import_hf(_write_config(tmp_path / "a", cfg), tmp_path / "out")
    msg = str(e.value)
    assert "cannot honour 4 llama config field(s)" in msg
    for field in ("attention_dropout=0.1", "rope_type='dynamic'", "my_new_field=3", "pruned_heads"):
        assert field in msg, field
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case,change,needle", [
    ("mixtral-e4-top2", {"router_jitter_noise": 0.1}, "router_jitter_noise=0.1"),
    ("gpt2-tied", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True"),
    ("gpt2-tied", {"attn_pdrop": 0.0}, "one dropout rate"),
    ("qwen2-gqa4-window6", {"layer_types": ["full_attention", "sliding_attention"]}, "some layers only"),
    ("qwen3-gqa4-window6", {"layer_types": ["full_attention", "sliding_attention"]}, "some layers only"),
    ("qwen3-gqa2-untied-hd12", {"attention_bias": "yes"}, "attention_bias='yes': must be true or false"),
    ("mistral-mqa-window5", {"layer_types": ["full_attention", "sliding_attention"]}, "ministral"),
    ("llama-mqa-bias", {"hidden_act": "gelu_fast"}, "hidden_act='gelu_fast'"),
    ("qwen2moe-e4-top2-shared-dense0", {"decoder_sparse_step": 2}, "decoder_sparse_step=2"),
    ("qwen2moe-e4-top2-shared-dense0", {"mlp_only_layers": [1]}, "layers other than the first k"),
    ("qwen3moe-gqa2-e4-top2-dense1-hd12", {"decoder_sparse_step": 2}, "decoder_sparse_step=2"),
    ("qwen3moe-gqa2-e4-top2-dense1-hd12", {"mlp_only_layers": [0, 2]}, "layers other than the first k"),
    ("qwen3moe-mqa-e3-top2-norm-tied-bias-window6", {"max_window_layers": 1}, "max_window_layers=1"),
    ("qwen3moe-gqa2-e4-top2-dense1-hd12", {"num_experts": 5}, "num_experts=5: differs from num_local_experts=4"),
    ("deepseekv2-lite-noqlora-shared2-dense1", {"n_group": 3, "topk_group": 1, "topk_method": "group_limited_greedy"},
     "n_group=3: topk_method='group_limited_greedy' needs an integer >= 1 that divides n_routed_experts=4"),
    ("deepseekv2-qlora-shared1-g3top2", {"n_group": None}, "n_group=None: topk_method='group_limited_greedy' needs"),
    ("deepseekv2-qlora-shared1-g3top2", {"topk_group": 4}, "topk_group=4: topk_method='group_limited_greedy' needs"),
    ("deepseekv2-lite-noqlora-shared2-dense1", {"topk_method": "noaux_tc"}, "topk_method='noaux_tc'"),
    ("deepseekv2-lite-noqlora-shared2-dense1", {"scoring_func": "sigmoid"}, "scoring_func='sigmoid'"),
    ("deepseekv2-lite-noqlora-shared2-dense1", {"norm_topk_prob": True}, "norm_topk_prob=True"),
    ("deepseekv2-lite-noqlora-shared2-dense1", {"moe_layer_freq": 2}, "moe_layer_freq=2"),
    ("deepseekv2-lite-noqlora-shared2-dense1", {"num_key_value_heads": 2}, "num_key_value_heads=2"),
    ("deepseekv2-lite-noqlora-shared2-dense1", {"rope_interleave": False}, "rope_interleave=False: not a"),
    ("deepseekv2-lite-noqlora-shared2-dense1", {"rope_parameters": None, "rope_scaling": {
        "type": "longrope", "factor": 4.0}}, "rope_scaling.rope_type='longrope'"),
    ("deepseekv2-lite-noqlora-shared2-dense1", {"rope_parameters": None, "rope_scaling": {
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fastest": 64}},
     "rope_scaling has key(s) .'beta_fastest'. that 'yarn' RoPE does not use"),
    ("deepseekv3-noqlora-shared2-dense1-g4top2", {"scoring_func": "softmax"}, "scoring_func='softmax'"),
    ("deepseekv3-noqlora-shared2-dense1-g4top2", {"topk_method": "group_limited_greedy"},
     "topk_method='group_limited_greedy'"),
    ("deepseekv3-noqlora-shared2-dense1-g4top2", {"rope_interleave": False}, "rope_interleave=False: rope rows"),
    ("deepseekv3-noqlora-shared2-dense1-g4top2", {"n_group": 3}, "n_group=3: noaux_tc routing needs"),
    ("deepseekv3-noqlora-shared2-dense1-g4top2", {"topk_group": 5}, "topk_group=5: noaux_tc routing needs"),
    ("deepseekv3-noqlora-shared2-dense1-g4top2", {"n_group": 8, "topk_group": 2}, "n_group=8: deepseek_v3 scores"),
    ("deepseekv3-noqlora-shared2-dense1-g4top2", {"norm_topk_prob": None}, "norm_topk_prob=None"),
    ("deepseekv3-noqlora-shared2-dense1-g4top2", {"moe_layer_freq": 2}, "moe_layer_freq=2"),
    ("deepseekv3-noqlora-shared2-dense1-g4top2", {"num_key_value_heads": 128}, "num_key_value_heads=128"),
    ("deepseekv3-noqlora-shared2-dense1-g4top2", {"rope_parameters": None, "rope_scaling": {
        "type": "yarn", "factor": 0.5, "original_max_position_embeddings": 16}}, "rope_scaling.factor=0.5 must be"),
    ("qwen3-gqa2-untied-hd12", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
     "rope_parameters.rope_type='dynamic'"),
])
def test_each_family_rejects_what_it_cannot_honour(case, change, needle, tmp_path):
    cfg = build_hf(case).config.to_dict()
    cfg.update(change)
    with pytest.raises(HFError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        import_hf(_write_config(tmp_path / "a", cfg), tmp_path / "out")


@pytest.mark.parametrize("case,drop,add", [
    ("qwen2-gqa2-tied", "model.layers.1.self_attn.k_proj.bias", "model.layers.0.self_attn.o_proj.bias"),
    ("qwen3-gqa2-untied-hd12", "model.layers.1.self_attn.k_norm.weight", "model.layers.0.self_attn.v_norm.weight"),
])
def test_weight_names_are_checked_strictly(case, drop, add, imported, tmp_path):
    from safetensors.numpy import save_file

    _, hf_dir, _ = imported(case)
    weights = read_hf_weights(hf_dir)
    weights.pop(drop)
    weights[add] = np.zeros(32, np.float32)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text((hf_dir / "config.json").read_text())
    save_file(weights, str(tmp_path / "bad" / "model.safetensors"))
    with pytest.raises(HFError, match=rf"missing 1: {re.escape(drop)} \| unexpected 1: {re.escape(add)}"):
        import_hf(tmp_path / "bad", tmp_path / "out")


def test_export_errors_name_the_fields(tmp_path, capsys):
    from llm.checkpoint import save_checkpoint
    from llm.spec import init_params

    spec = ModelSpec(vocab_size=32, max_seq_len=16, hidden_size=16, num_layers=1, num_heads=2,
                     position="sinusoidal", dropout=0.1)
    save_checkpoint(tmp_path / "c", init_params(spec), {"model": spec.to_dict()})
    with pytest.raises(HFError) as e:
        export_hf(tmp_path / "c", tmp_path / "out")
    msg = str(e.value)
    assert all(f"{name}: " in msg for name in FAMILIES) and "position='sinusoidal'" in msg
    with pytest.raises(HFError, match="(?s)norm_type='layernorm'.*use_glu=False"):
        export_hf(tmp_path / "c", tmp_path / "out", family="llama")

    learned = spec.replace(position="learned", use_glu=True, activation="silu", norm_type="rmsnorm",
                           num_kv_heads=1)
    save_checkpoint(tmp_path / "d", init_params(learned), {"model": learned.to_dict()})
    assert llm.hf.main(["export", str(tmp_path / "d"), str(tmp_path / "out"), "--family", "gpt2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the gpt2 family cannot express 6 spec field(s)")
    for field in ("norm_type", "use_glu", "attention_bias", "attention_out_bias", "mlp_bias", "num_kv_heads"):
        assert f"{field}=" in err

    llama = ModelSpec(vocab_size=32, max_seq_len=16, hidden_size=16, num_layers=1, num_heads=2, use_glu=True,
                      activation="silu", norm_type="rmsnorm", dropout=0.1)
    save_checkpoint(tmp_path / "e", init_params(llama), {"model": llama.to_dict()})
    with pytest.raises(HFError, match="(?s)training-only setting.*dropout=0.1.*--drop-training-settings"):
        export_hf(tmp_path / "e", tmp_path / "out")
    res = export_hf(tmp_path / "e", tmp_path / "out", drop_training_settings=True)
    assert res.family == "llama" and any("dropout=0.1" in n for n in res.notes)


# ---------------------------------------------------------------------- --init-from
def _train_from(backend: str, ckpt: Path, source: Path, tmp_path: Path):
    """3 steps of ``python -m llm.train --init-from ckpt`` on ``source``: (config, datamodule, metric rows)."""
    from llm.loop.tasks import get_task
    from llm.train import build_parser, main, resolve_config

    argv = ["--backend", backend, "--init-from", str(ckpt), "--run-dir", str(tmp_path / "run"), "--max-steps", "3",
            "--batch-size", "2", "--lr", "1e-3", "--sample-tokens", "0",
            "--set", f"data.source={source}", "--set", "data.seq_len=16", "--set", f"data.cache_dir={tmp_path}/cache",
            "--set", "training.eval_every=0", "--set", "training.warmup_steps=0",
            "--set", "logging.every_steps=1", "--set", "logging.progress=false"]
    assert main(argv) == 0
    config = resolve_config(build_parser().parse_args(argv))
    dm = get_task("lm").build_datamodule(config)
    dm.prepare_data()
    dm.setup()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return config, dm, rows


def _check_first_step_loss_and_training(model, dm, rows, vocab: int) -> None:
    """The step-1 loss is ``model``'s (transformers') cross-entropy on batch 0; the loss then moves."""
    inputs, targets = dm.batch_at(0)
    with torch.no_grad():
        logits = model(torch.from_numpy(inputs)).logits
        expected = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), torch.from_numpy(targets).reshape(-1))
    first = next(r for r in rows if r.get("step") == 1 and "loss" in r)
    assert first["loss"] == pytest.approx(expected.item(), rel=1e-5)
    last = next(r for r in reversed(rows) if "loss" in r)
    assert last["step"] == 3 and last["loss"] != first["loss"]  # it trained


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_init_from_an_imported_model_continues_training(backend, llama_with_tokenizer, tmp_path):
    """3 steps of ``python -m llm.train --init-from``: the step-1 loss is the imported model's loss on
    that batch (computed by transformers), and the run uses the imported tokenizer."""
    from llm.tokenization import load_tokenizer

    model, _, root = llama_with_tokenizer
    corpus = tmp_path / "mine.txt"
    corpus.write_text("the quick brown fox says hello to the lazy dog.\n" * 40, encoding="utf-8")
    config, dm, rows = _train_from(backend, root / "ckpt", corpus, tmp_path)
    assert config.model == llm.checkpoint.load_checkpoint(root / "ckpt").spec
    assert dm.tokenizer == load_tokenizer(root / "ckpt" / "tokenizer.json")
    assert load_tokenizer(tmp_path / "run" / "tokenizer.json") == dm.tokenizer
    _check_first_step_loss_and_training(model, dm, rows, TOK_VOCAB)


@pytest.mark.parametrize("backend", ["torch", "jax"])
@pytest.mark.parametrize("case", ["qwen3moe-gqa2-e4-top2-dense1-hd12", "deepseekv2-lite-noqlora-shared2-dense1",
                                  "deepseekv3-noqlora-shared2-dense1-g4top2"])
def test_init_from_an_imported_moe_model_trains(case, backend, imported, tmp_path):
    """The MoE families train from their import in both engines (a token file: they carry no tokenizer)."""
    model, _, ckpt = imported(case)
    np.save(tmp_path / "train.npy", np.random.default_rng(8).integers(0, VOCAB, 4000).astype(np.int32))
    config, dm, rows = _train_from(backend, ckpt, tmp_path / "train.npy", tmp_path)
    assert config.model == llm.checkpoint.load_checkpoint(ckpt).spec
    _check_first_step_loss_and_training(model, dm, rows, VOCAB)
