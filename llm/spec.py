"""The backend-agnostic model spec: one frozen dataclass, its parameter table and its numpy init.

Everything both backends must agree on lives here, so it is written once:

* ``ModelSpec`` -- the ``model:`` section of every config; validated at construction by the same
  typed-section machinery as the other sections (``llm.fields``).
* ``ModelSpec.param_table()`` -- every canonical parameter name with its shape and init.
* ``init_params(spec, seed)`` -- the one source of starting weights (numpy, float32).
* ``rope_inv_freq`` / ``sinusoidal_table`` -- position tables, computed in float64 numpy and
  handed to both backends as float32 constants so neither re-derives them.
* ``num_params`` / ``flops_per_token`` -- for logs and MFU.

Canonical layout: every linear weight is stored ``(out_features, in_features)`` (the PyTorch
``nn.Linear`` and Hugging Face layout); stacked MoE experts add a leading expert axis, e.g.
``layers.0.mlp.experts.up_proj.weight`` is ``(E, intermediate, hidden)``. Embedding tables are
``(rows, hidden)``. The Flax backend transposes linears in ``backends/flax/convert.py`` and only there.

This module must not import torch or jax.
"""

from __future__ import annotations

import concurrent.futures
import enum
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from llm.fields import FieldError, Section

__all__ = [
    "Activation",
    "Attention",
    "MLA_LATENT_NORM_EPS",
    "NormPosition",
    "NormType",
    "Position",
    "GroupScore",
    "RouterScoring",
    "ParamInfo",
    "ModelSpec",
    "SpecError",
    "check_fits_memory",
    "init_params",
    "machine_memory",
    "check_params",
    "check_names",
    "rope_inv_freq",
    "rope_cos_sin",
    "rope_attention_factor",
    "mla_softmax_scale",
    "sinusoidal_table",
]


class SpecError(FieldError):
    """An invalid model spec or parameter dict; the message names the field(s) and the rule, and
    ``key`` the spec field at fault (``"model.num_heads"``) when there is one."""


class Activation(str, enum.Enum):
    GELU = "gelu"  # exact (erf)
    GELU_TANH = "gelu_tanh"  # tanh approximation (GPT-2 "gelu_new")
    SILU = "silu"
    RELU = "relu"


class NormType(str, enum.Enum):
    LAYERNORM = "layernorm"  # weight and bias
    RMSNORM = "rmsnorm"  # weight only


class NormPosition(str, enum.Enum):
    PRE = "pre"  # x + f(norm(x)) (GPT-2, Llama); a final_norm after the last block
    POST = "post"  # norm(x + f(x)) (the original Transformer, BERT; torch's norm_first=False)


class Attention(str, enum.Enum):
    MHA = "mha"  # q/k/v projections per head, grouped-query when num_kv_heads < num_heads
    MLA = "mla"  # DeepSeek-V2/V3 multi-head latent attention: k and v from a compressed latent


# DeepSeek's latent norms (q_a_layernorm, kv_a_layernorm) are RMSNorms built with their class's
# default eps, not the config's rms_norm_eps (transformers' DeepseekV3Attention does the same).
MLA_LATENT_NORM_EPS = 1e-6


class Position(str, enum.Enum):
    ROPE = "rope"  # rotate-half (Llama / HF convention), applied to q and k
    LEARNED = "learned"  # a (max_seq_len, hidden) table added to the token embedding
    SINUSOIDAL = "sinusoidal"  # fixed table added to the token embedding; no parameters


class RouterScoring(str, enum.Enum):
    SOFTMAX = "softmax"  # a distribution over all experts (Mixtral, Qwen2-MoE)
    SIGMOID = "sigmoid"  # an independent score per expert (DeepSeek-V3)


class GroupScore(str, enum.Enum):
    """How group-limited routing scores a group of experts (``num_expert_groups`` > 1)."""

    MAX = "max"  # its best expert's score (DeepSeek-V2 ``group_limited_greedy``)
    TOP2_SUM = "top2_sum"  # the sum of its two best selection scores, bias included (DeepSeek-V3 ``noaux_tc``)


@dataclass(frozen=True)
class ParamInfo:
    """One row of the parameter table."""

    name: str
    shape: tuple[int, ...]
    init: str  # "normal", "zeros" or "ones"
    std: float = 0.0  # for "normal"
    weight_decay: bool = False  # matrices decay; norms, biases and embeddings do not
    # One logical axis name per dimension (``vocab``, ``embed``, ``heads``, ``kv_heads``, ``mlp``,
    # ``experts``, ``positions``, ``head_dim``, MLA's ``q_lora`` and ``kv_lora``); ``llm.sharding.RULES``
    # maps them to mesh axes.
    axes: tuple[str, ...] = ()
    # False: state the model reads but no gradient updates (the router's selection bias, moved by
    # the engines' balancing rule after each optimizer step); still converted, sharded and saved.
    trainable: bool = True

    @property
    def size(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1


# rope_type -> (required keys, optional keys) of ``ModelSpec.rope_scaling``; the YaRN defaults
# (beta_fast 32, beta_slow 1, truncate true, attention_factor from mscale) are transformers'.
_ROPE_SCALING_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "llama3": (("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"), ()),
    "yarn": (("factor", "original_max_position_embeddings"),
             ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate")),
}


@dataclass(frozen=True)
class ModelSpec(Section):
    """A decoder-only transformer, independent of any framework.

    Field names are the keys of the ``model:`` section in YAML configs; the section machinery of
    ``llm.fields`` (shared with every config section) converts and checks them at construction and
    gives ``from_dict``, ``to_dict``, ``replace`` and ``diff``; a bad value is a ``SpecError`` that
    names ``model.<field>``, the value and the rule. ``None`` means "derive":
    ``num_kv_heads`` = ``num_heads``; ``head_dim`` = ``hidden_size // num_heads``;
    ``intermediate_size`` = ``4 * hidden`` (plain MLP) or ``8/3 * hidden`` rounded up to a multiple
    of 8 (GLU, the same parameter count as the plain MLP); ``capacity_factor`` = dropless;
    ``moe_intermediate_size`` = ``intermediate_size`` (as derived); ``shared_expert_intermediate_size``
    = the routed experts' size.

    MoE variants (``docs/architecture.md``, MoE): ``first_dense_layers`` = k makes layers 0..k-1 dense
    MLPs of ``intermediate_size`` (DeepSeek's ``first_k_dense_replace``); ``num_shared_experts`` = s
    adds one dense MLP of width ``s * shared_expert_intermediate_size`` run on every token beside the
    routed experts (the s shared experts fused, as DeepSeek stores them), scaled per token by
    ``sigmoid(x @ shared_gate.weight.T)`` when ``shared_expert_gate`` (Qwen2-MoE);
    ``router_scoring`` picks softmax or sigmoid scores (top-k on them, renormalised when
    ``norm_topk_prob``); ``routed_scaling_factor`` multiplies the routed output.

    Group-limited routing (DeepSeek-V2/V3): ``num_expert_groups`` = g splits the experts into g equal
    groups, each scored by ``router_group_score``; a token picks among the experts of its
    ``topk_groups`` best groups only. ``router_selection_bias`` adds a per-expert (E,) bias
    (``mlp.router.selection_bias``, not trained by the gradient) to the scores for choosing the top-k
    and for scoring groups, never to the weights the chosen experts get (DeepSeek-V3's
    ``e_score_correction_bias``); ``router_bias_update_rate`` = u > 0 is DeepSeek-V3's aux-loss-free
    balancing: after each optimizer step the engines move each layer's bias by ``u * sign(mean load -
    load)`` from the step's expert loads (tokens routed to each expert over the whole global batch).

    ``attention=mla`` is DeepSeek-V2/V3 multi-head latent attention: the ``q_lora_rank``,
    ``kv_lora_rank``, ``qk_nope_head_dim``, ``qk_rope_head_dim`` and ``v_head_dim`` fields apply
    (and only then); ``num_kv_heads`` and ``head_dim`` must stay null, RoPE rotates the
    ``qk_rope_head_dim`` part of each query and the one shared rope key.
    """

    SECTION = "model"
    ERROR = SpecError

    vocab_size: int = 256
    max_seq_len: int = 256
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int | None = None
    activation: Activation = Activation.GELU
    use_glu: bool = False
    norm_type: NormType = NormType.LAYERNORM
    norm_eps: float = 1e-5
    norm_position: NormPosition = NormPosition.PRE
    position: Position = Position.ROPE
    rope_theta: float = 10000.0
    # Frequency scaling; None = plain RoPE. Llama-3: {"rope_type": "llama3", "factor",
    # "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}. YaRN: {"rope_type":
    # "yarn", "factor", "original_max_position_embeddings", optional "beta_fast", "beta_slow",
    # "mscale", "mscale_all_dim", "attention_factor", "truncate"} (``rope_inv_freq``).
    rope_scaling: dict[str, Any] | None = None
    tie_embeddings: bool = False
    lm_head_bias: bool = False  # a (vocab,) bias on the output projection (needs an untied lm_head)
    # The padding token: its embedding row gets no gradient from the lookup (torch
    # ``nn.Embedding(padding_idx=)``); with tie_embeddings the output projection still trains it.
    pad_token_id: int | None = None
    attention: Attention = Attention.MHA
    # MLA only. Query: x -> q_a_proj (q_lora_rank) -> q_a_layernorm -> q_b_proj (H * (nope + rope));
    # null q_lora_rank = one q_proj, no compression. Key/value: x -> kv_a_proj_with_mqa
    # (kv_lora_rank + rope) -> latent through kv_a_layernorm -> kv_b_proj (H * (nope + v)); the
    # rope part is one key shared by every head.
    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    attention_bias: bool = False  # bias on q/k/v projections (MLA: on q_a_proj and kv_a_proj_with_mqa)
    attention_out_bias: bool | None = None  # bias on o_proj; None = same as attention_bias
    # RMSNorm (weight only, norm_eps) over each query and key head after the projection and before
    # RoPE (Qwen3); whatever norm_type the blocks use.
    qk_norm: bool = False
    sliding_window: int | None = None  # query i sees keys j with i - window < j <= i
    mlp_bias: bool = False
    dropout: float = 0.0
    use_moe: bool = False
    num_experts: int = 8
    num_experts_per_token: int = 2
    norm_topk_prob: bool = True
    capacity_factor: float | None = None
    moe_intermediate_size: int | None = None
    first_dense_layers: int = 0
    num_shared_experts: int = 0
    shared_expert_intermediate_size: int | None = None
    shared_expert_gate: bool = False
    router_scoring: RouterScoring = RouterScoring.SOFTMAX
    routed_scaling_factor: float = 1.0
    num_expert_groups: int = 1  # 1 = no group limit
    topk_groups: int = 1
    router_group_score: GroupScore = GroupScore.MAX
    router_selection_bias: bool = False
    router_bias_update_rate: float = 0.0
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.0
    init_std: float = 0.02
    # scale the std of residual-output projections (o_proj, down_proj) by 1/sqrt(2*num_layers)
    scale_residual_init: bool = True

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        # Fields already hold their annotated types (llm.fields.Section coerces them); these are the rules.
        need = self._need
        for name in ("vocab_size", "max_seq_len", "hidden_size", "num_layers", "num_heads"):
            need(getattr(self, name) >= 1, name, "must be >= 1")
        for name in ("num_kv_heads", "head_dim", "intermediate_size", "sliding_window", "moe_intermediate_size",
                     "shared_expert_intermediate_size"):
            need(getattr(self, name) is None or getattr(self, name) >= 1, name, "must be >= 1 or null")
        if self.pad_token_id is not None:
            need(0 <= self.pad_token_id < self.vocab_size, "pad_token_id",
                 f"must be in [0, vocab_size={self.vocab_size}) or null")
        need(self.norm_eps > 0, "norm_eps", "must be > 0")
        need(self.rope_theta > 0, "rope_theta", "must be > 0")
        need(self.dropout >= 0, "dropout", "must be >= 0")
        need(self.dropout < 1, "dropout", "must be < 1")
        need(self.init_std > 0, "init_std", "must be > 0")
        need(self.router_aux_loss_coef >= 0, "router_aux_loss_coef", "must be >= 0")
        need(self.router_z_loss_coef >= 0, "router_z_loss_coef", "must be >= 0")

        if self.attention is Attention.MLA:
            self._validate_mla()
            need(not self.qk_norm, "qk_norm", "applies to attention=mha only (MLA normalises its latents instead)")
        kv = self.kv_heads
        need(self.num_heads % kv == 0, "num_heads", f"is not divisible by num_kv_heads={kv}")
        if self.head_dim is None and not self.is_mla:
            need(self.hidden_size % self.num_heads == 0, "hidden_size",
                 f"is not divisible by num_heads={self.num_heads} "
                 "(set head_dim explicitly to use a head size that does not divide hidden_size)")
        if self.position is Position.ROPE and self.attention is Attention.MHA:
            need(self.dim_head % 2 == 0, "head_dim", "must be even for position=rope (rotate-half pairs)",
                 value=self.dim_head)
        if self.position is Position.SINUSOIDAL:
            need(self.hidden_size % 2 == 0, "hidden_size", "must be even for position=sinusoidal")
        if self.rope_scaling is not None:
            need(self.position is Position.ROPE, "rope_scaling",
                 f"applies to position=rope only, not position={self.position.value}")
            self._validate_rope_scaling()
        need(not (self.lm_head_bias and self.tie_embeddings), "lm_head_bias",
             "needs tie_embeddings=false (a tied head is embed.weight alone, it has no bias of its own)")
        if self.use_moe:
            need(self.num_experts >= 1, "num_experts", "must be >= 1")
            need(self.num_experts_per_token >= 1, "num_experts_per_token", "must be >= 1")
            need(self.num_experts_per_token <= self.num_experts, "num_experts_per_token",
                 f"exceeds num_experts={self.num_experts}")
            need(self.capacity_factor is None or self.capacity_factor > 0, "capacity_factor",
                 "must be > 0 or null (dropless)")
            need(0 <= self.first_dense_layers <= self.num_layers, "first_dense_layers",
                 f"must be in [0, num_layers={self.num_layers}]")
            need(self.num_shared_experts >= 0, "num_shared_experts", "must be >= 0 (0 = none)")
            need(self.routed_scaling_factor > 0, "routed_scaling_factor", "must be > 0")
            self._validate_routing_groups()
        else:
            # Each of these shapes an MoE layer; set without use_moe it would silently do nothing.
            for name, off in (("first_dense_layers", 0), ("num_shared_experts", 0),
                              ("moe_intermediate_size", None), ("shared_expert_intermediate_size", None),
                              ("shared_expert_gate", False), ("router_scoring", RouterScoring.SOFTMAX),
                              ("routed_scaling_factor", 1.0), ("num_expert_groups", 1), ("topk_groups", 1),
                              ("router_group_score", GroupScore.MAX), ("router_selection_bias", False),
                              ("router_bias_update_rate", 0.0)):
                value = getattr(self, name)
                need(value == off, name, "needs use_moe=true (it configures the MoE layers)",
                     value=value.value if isinstance(value, enum.Enum) else value)
        if self.num_shared_experts == 0:
            need(self.shared_expert_intermediate_size is None, "shared_expert_intermediate_size",
                 "needs num_shared_experts >= 1 (there is no shared expert to size)")
            need(not self.shared_expert_gate, "shared_expert_gate",
                 "needs num_shared_experts >= 1 (there is no shared expert to gate)")

    def _validate_routing_groups(self) -> None:
        need, g = self._need, self.num_expert_groups
        need(g >= 1, "num_expert_groups", "must be >= 1 (1 = no group limit)")
        need(self.num_experts % g == 0, "num_expert_groups", f"must divide num_experts={self.num_experts}")
        need(1 <= self.topk_groups <= g, "topk_groups", f"must be in [1, num_expert_groups={g}]")
        per_group = self.num_experts // g
        need(self.num_experts_per_token <= self.topk_groups * per_group, "num_experts_per_token",
             f"exceeds the {self.topk_groups * per_group} experts of topk_groups={self.topk_groups} groups of "
             f"{per_group}")
        if g == 1:
            need(self.router_group_score is GroupScore.MAX, "router_group_score",
                 "needs num_expert_groups > 1 (there are no groups to score)", value=self.router_group_score.value)
        else:
            need(self.router_group_score is not GroupScore.TOP2_SUM or per_group >= 2, "router_group_score",
                 f"top2_sum needs groups of >= 2 experts (num_experts / num_expert_groups = {per_group})",
                 value=self.router_group_score.value)
        need(self.router_bias_update_rate >= 0, "router_bias_update_rate", "must be >= 0 (0 = the bias stays fixed)")
        need(self.router_bias_update_rate == 0 or self.router_selection_bias, "router_bias_update_rate",
             "needs router_selection_bias=true (there is no bias to update)")

    def _validate_rope_scaling(self) -> None:
        sc, need = self.rope_scaling, self._need
        rope_type = sc.get("rope_type")
        need(rope_type in _ROPE_SCALING_KEYS, "rope_scaling.rope_type",
             f"is not supported (one of {sorted(_ROPE_SCALING_KEYS)})", value=rope_type)
        required, optional = _ROPE_SCALING_KEYS[rope_type]
        unknown = set(sc) - {"rope_type", *required, *optional}
        need(not unknown, "rope_scaling",
             f"has unknown key(s) {sorted(unknown)} for rope_type={rope_type!r}; "
             f"expected {sorted({'rope_type', *required, *optional})}")

        def number(key: str) -> bool:
            value = sc.get(key)
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        if rope_type == "llama3":
            for key in required:
                need(number(key) and sc[key] > 0, f"rope_scaling.{key}", "must be a positive number")
            need(sc["high_freq_factor"] > sc["low_freq_factor"], "rope_scaling.high_freq_factor",
                 f"must be > rope_scaling.low_freq_factor={sc['low_freq_factor']!r}")
            return
        for key in required:
            need(key in sc, f"rope_scaling.{key}", f"is required for rope_type={rope_type!r}")
        need(number("factor") and sc["factor"] >= 1, "rope_scaling.factor", "must be a number >= 1")
        old_len = sc["original_max_position_embeddings"]
        need(isinstance(old_len, int) and not isinstance(old_len, bool) and old_len >= 1,
             "rope_scaling.original_max_position_embeddings", "must be an integer >= 1")
        for key in ("beta_fast", "beta_slow", "attention_factor"):
            if key in sc:
                need(number(key) and sc[key] > 0, f"rope_scaling.{key}", "must be a positive number")
        for key in ("mscale", "mscale_all_dim"):  # 0 = unset, as in transformers
            if key in sc:
                need(number(key) and sc[key] >= 0, f"rope_scaling.{key}", "must be a number >= 0")
        beta_fast, beta_slow = sc.get("beta_fast", 32), sc.get("beta_slow", 1)
        need(beta_fast > beta_slow, "rope_scaling.beta_fast", f"must be > beta_slow={beta_slow!r}",
             value=beta_fast)
        if "truncate" in sc:
            need(isinstance(sc["truncate"], bool), "rope_scaling.truncate", "must be true or false")

    def _validate_mla(self) -> None:
        need = self._need
        need(self.q_lora_rank is None or self.q_lora_rank >= 1, "q_lora_rank",
             "must be >= 1 or null (no query compression)")
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            need(getattr(self, name) >= 1, name, "must be >= 1")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "must be even (rotate-half pairs)")
        need(self.position is Position.ROPE, "position",
             "must be rope for attention=mla (the decoupled rope key is MLA's only position signal)",
             value=self.position.value)
        need(self.num_kv_heads is None or self.num_kv_heads == self.num_heads, "num_kv_heads",
             f"must be null or num_heads={self.num_heads} for attention=mla (every head reads its own "
             "key and value from the shared latent)")
        need(self.head_dim is None, "head_dim",
             "must be null for attention=mla (qk_nope_head_dim, qk_rope_head_dim and v_head_dim size the heads)")

    # ------------------------------------------------------------------ derived values
    @property
    def is_mla(self) -> bool:
        return self.attention is Attention.MLA

    @property
    def qk_head_dim(self) -> int:
        """Size of one query/key head: ``qk_nope_head_dim + qk_rope_head_dim`` (MLA), else head_dim."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.is_mla else self.dim_head

    @property
    def value_head_dim(self) -> int:
        """Size of one value head: ``v_head_dim`` (MLA), else head_dim."""
        return self.v_head_dim if self.is_mla else self.dim_head

    @property
    def rope_dim(self) -> int:
        """How many dimensions of a query/key head RoPE rotates: the rope part (MLA), else all."""
        return self.qk_rope_head_dim if self.is_mla else self.dim_head

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def dim_head(self) -> int:
        return self.hidden_size // self.num_heads if self.head_dim is None else self.head_dim

    @property
    def ffn_size(self) -> int:
        if self.intermediate_size is not None:
            return self.intermediate_size
        if self.use_glu:
            return 8 * ((8 * self.hidden_size // 3 + 7) // 8)
        return 4 * self.hidden_size

    @property
    def expert_ffn_size(self) -> int:
        """Each routed expert's intermediate size."""
        return self.ffn_size if self.moe_intermediate_size is None else self.moe_intermediate_size

    @property
    def shared_ffn_size(self) -> int:
        """Width of the one dense MLP the shared experts form (0 without shared experts)."""
        size = self.expert_ffn_size if self.shared_expert_intermediate_size is None \
            else self.shared_expert_intermediate_size
        return self.num_shared_experts * size

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx`` has an MoE MLP (else the dense MLP of ``intermediate_size``)."""
        return self.use_moe and layer_idx >= self.first_dense_layers

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.first_dense_layers if self.use_moe else 0

    @property
    def out_bias(self) -> bool:
        """Whether o_proj has a bias."""
        return self.attention_bias if self.attention_out_bias is None else self.attention_out_bias

    @property
    def norm_has_bias(self) -> bool:
        return self.norm_type is NormType.LAYERNORM

    @property
    def is_gqa(self) -> bool:
        return self.kv_heads != self.num_heads

    def capacity(self, num_tokens: int) -> int | None:
        """Per-expert capacity for a batch of ``num_tokens`` tokens; None when dropless."""
        if not self.use_moe or self.capacity_factor is None:
            return None
        return max(1, math.ceil(num_tokens * self.num_experts_per_token / self.num_experts
                                * self.capacity_factor))

    # ------------------------------------------------------------------ parameter table
    def param_table(self) -> list[ParamInfo]:
        """Every canonical parameter, in a fixed order. The single source of names and shapes."""
        d, v, std = self.hidden_size, self.vocab_size, self.init_std
        h, kv, hd, f = self.num_heads, self.kv_heads, self.dim_head, self.ffn_size
        out_std = std / math.sqrt(2 * self.num_layers) if self.scale_residual_init else std
        rows: list[ParamInfo] = []

        def linear(prefix: str, out_dim: int, in_dim: int, bias: bool, w_std: float,
                   axes: tuple[str, str], experts: bool = False) -> None:
            lead, lead_axes = ((self.num_experts,), ("experts",)) if experts else ((), ())
            rows.append(ParamInfo(f"{prefix}.weight", (*lead, out_dim, in_dim), "normal", w_std,
                                  weight_decay=True, axes=(*lead_axes, *axes)))
            if bias:
                rows.append(ParamInfo(f"{prefix}.bias", (*lead, out_dim), "zeros",
                                      axes=(*lead_axes, axes[0])))

        def ffn(prefix: str, width: int, experts: bool = False) -> None:
            if self.use_glu:
                linear(f"{prefix}.gate_proj", width, d, self.mlp_bias, std, ("mlp", "embed"), experts)
            linear(f"{prefix}.up_proj", width, d, self.mlp_bias, std, ("mlp", "embed"), experts)
            linear(f"{prefix}.down_proj", d, width, self.mlp_bias, out_std, ("embed", "mlp"), experts)

        def norm(prefix: str) -> None:
            rows.append(ParamInfo(f"{prefix}.weight", (d,), "ones", axes=("embed",)))
            if self.norm_has_bias:
                rows.append(ParamInfo(f"{prefix}.bias", (d,), "zeros", axes=("embed",)))

        rows.append(ParamInfo("embed.weight", (v, d), "normal", std, axes=("vocab", "embed")))
        if self.position is Position.LEARNED:
            rows.append(ParamInfo("embed.position.weight", (self.max_seq_len, d), "normal", std,
                                  axes=("positions", "embed")))
        for i in range(self.num_layers):
            p = f"layers.{i}"
            norm(f"{p}.attn_norm")
            if self.is_mla:
                self._mla_rows(rows, f"{p}.attn", linear, std, out_std)
            else:
                linear(f"{p}.attn.q_proj", h * hd, d, self.attention_bias, std, ("heads", "embed"))
                linear(f"{p}.attn.k_proj", kv * hd, d, self.attention_bias, std, ("kv_heads", "embed"))
                linear(f"{p}.attn.v_proj", kv * hd, d, self.attention_bias, std, ("kv_heads", "embed"))
                linear(f"{p}.attn.o_proj", d, h * hd, self.out_bias, out_std, ("embed", "heads"))
                if self.qk_norm:
                    # one (hd,) scale shared by every head: whole on every tensor-parallel rank
                    rows.append(ParamInfo(f"{p}.attn.q_norm.weight", (hd,), "ones", axes=("head_dim",)))
                    rows.append(ParamInfo(f"{p}.attn.k_norm.weight", (hd,), "ones", axes=("head_dim",)))
            norm(f"{p}.mlp_norm")
            if not self.is_moe_layer(i):
                ffn(f"{p}.mlp", f)
                continue
            rows.append(ParamInfo(f"{p}.mlp.router.weight", (self.num_experts, d), "normal",
                                  std, weight_decay=True, axes=("experts", "embed")))
            if self.router_selection_bias:
                rows.append(ParamInfo(f"{p}.mlp.router.selection_bias", (self.num_experts,), "zeros",
                                      axes=("experts",), trainable=False))
            ffn(f"{p}.mlp.experts", self.expert_ffn_size, experts=True)
            if self.num_shared_experts:
                ffn(f"{p}.mlp.shared", self.shared_ffn_size)
            if self.shared_expert_gate:
                # (1, D): a one-row router whose sigmoid scales the shared experts' output
                rows.append(ParamInfo(f"{p}.mlp.shared_gate.weight", (1, d), "normal", std,
                                      weight_decay=True, axes=("experts", "embed")))
        norm("final_norm")
        if not self.tie_embeddings:
            linear("lm_head", v, d, self.lm_head_bias, std, ("vocab", "embed"))
        return rows

    def _mla_rows(self, rows: list[ParamInfo], prefix: str, linear: Any, std: float, out_std: float) -> None:
        """The MLA attention's rows, named and biased as transformers' DeepseekV3Attention: only the
        projections from the hidden state (q_a_proj, kv_a_proj_with_mqa) and o_proj have biases;
        the latent norms are RMSNorms (weight only) whatever ``norm_type`` says."""
        d, h, bias = self.hidden_size, self.num_heads, self.attention_bias
        q_out = h * self.qk_head_dim
        if self.q_lora_rank is None:
            linear(f"{prefix}.q_proj", q_out, d, False, std, ("heads", "embed"))
        else:
            linear(f"{prefix}.q_a_proj", self.q_lora_rank, d, bias, std, ("q_lora", "embed"))
            rows.append(ParamInfo(f"{prefix}.q_a_layernorm.weight", (self.q_lora_rank,), "ones", axes=("q_lora",)))
            linear(f"{prefix}.q_b_proj", q_out, self.q_lora_rank, False, std, ("heads", "q_lora"))
        linear(f"{prefix}.kv_a_proj_with_mqa", self.kv_lora_rank + self.qk_rope_head_dim, d, bias, std,
               ("kv_lora", "embed"))
        rows.append(ParamInfo(f"{prefix}.kv_a_layernorm.weight", (self.kv_lora_rank,), "ones", axes=("kv_lora",)))
        linear(f"{prefix}.kv_b_proj", h * (self.qk_nope_head_dim + self.v_head_dim), self.kv_lora_rank, False,
               std, ("heads", "kv_lora"))
        linear(f"{prefix}.o_proj", d, h * self.v_head_dim, self.out_bias, out_std, ("embed", "heads"))

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {p.name: p.shape for p in self.param_table()}

    def no_decay_names(self) -> set[str]:
        """Trained parameters excluded from weight decay: norms, biases, embeddings (untrained state,
        ``trainable=False``, is in no optimiser group at all)."""
        return {p.name for p in self.param_table() if not p.weight_decay and p.trainable}

    def num_params(self, *, active: bool = False, embedding: bool = True) -> int:
        """Trainable parameter count (the router's selection bias is state, not counted).
        ``active=True`` counts only the experts a token uses (top-k of E).

        ``embedding=False`` leaves out the token/position tables (a tied lm_head is not counted
        twice either way).
        """
        total = 0
        for p in self.param_table():
            if not p.trainable or (not embedding and p.name.startswith("embed.")):
                continue
            n = p.size
            if active and ".mlp.experts." in p.name:
                n = n // self.num_experts * self.num_experts_per_token
            total += n
        return total

    def flops_per_token(self, seq_len: int | None = None, *, causal: bool = False) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B accounting.

        ``6 * N`` for every matmul parameter a token touches (active experts only; the lm_head
        counted even when tied; the router included) plus ``6 * L * H * (qk_head_dim + value_head_dim)
        * T`` (``12 * L * H * head_dim * T`` when both are head_dim) for the attention score and value
        products. By default with no causal discount and no
        sliding-window discount: the convention nanoGPT and most MFU reports use, which counts the
        masked upper triangle as work. ``causal=True`` counts only the lower triangle a causal
        kernel computes, ``T`` replaced by ``(T + 1) / 2`` (the figure torchtitan-style causal
        accounting reports); both are in the benchmark results.
        """
        t = self.max_seq_len if seq_len is None else seq_len
        n = self.num_params(active=True, embedding=False)
        norms = sum(p.size for p in self.param_table()
                    if ("norm" in p.name or p.name.endswith(".bias")) and not p.name.startswith("embed."))
        n = n - norms
        if self.tie_embeddings:
            n += self.vocab_size * self.hidden_size  # the lm_head matmul still happens
        attended = (t + 1) / 2 if causal else t  # mean keys per query under the causal mask
        # scores over the query/key head size, the value product over the value head size
        attn = 6 * self.num_layers * self.num_heads * (self.qk_head_dim + self.value_head_dim) * attended
        return float(6 * n + attn)


# ---------------------------------------------------------------------- weights
def machine_memory() -> int | None:
    """Physical memory of this machine in bytes; None where the OS does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def check_fits_memory(spec: ModelSpec, memory: int | None = None) -> None:
    """Raise SpecError when the float32 parameters alone exceed ``memory`` (default: this machine's).

    Counted from the tables of 1- and 2-layer models (one per kind of layer: the first dense layers,
    then the rest, each kind of one shape), in Python
    ints, so a huge ``num_layers`` or shape neither loops nor wraps around int64 on the way.
    """
    memory = machine_memory() if memory is None else memory
    if memory is None:
        return
    def table_size(num_layers: int, first_dense: int) -> int:
        rows = spec.replace(num_layers=num_layers, first_dense_layers=first_dense).param_table()
        return sum(math.prod(p.shape) for p in rows)

    one, two = table_size(1, 0), table_size(2, 0)
    layer = two - one  # a layer of the kind after the first dense ones
    outside = one - layer  # embeddings, final norm, head
    dense = table_size(1, 1) - outside if spec.first_dense_layers else 0
    count = outside + spec.first_dense_layers * dense + (spec.num_layers - spec.first_dense_layers) * layer
    need = 4 * count
    if need <= memory:
        return
    lower = ["hidden_size", "num_layers", "vocab_size", "intermediate_size"]
    if spec.use_moe:
        lower.append("num_experts")
    raise SpecError(f"model: the parameters need {need:,} bytes in float32 ({count:,} parameters x 4 bytes, "
                    f"{need / 2**30:,.1f} GiB) but this machine has {memory:,} bytes "
                    f"({memory / 2**30:,.1f} GiB) of memory; lower "
                    f"{', '.join('model.' + n for n in lower[:-1])} or model.{lower[-1]}")


def init_params(spec: ModelSpec, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded float32 weights for every row of the table: the one source of starting weights.

    Each parameter draws from its own stream keyed by (seed, its index in the table), so a weight's
    value does not depend on which other parameters exist before it only through the table order.
    The streams are independent, so the rows are drawn on a thread pool (numpy's generators release
    the GIL while filling an array): the same values as drawing them one by one, in a fraction of
    the time for a billion-parameter model. A model whose parameters cannot fit in memory is
    refused before anything is allocated (``check_fits_memory``).
    """
    check_fits_memory(spec)
    table = spec.param_table()
    streams = np.random.SeedSequence(seed).spawn(len(table))
    workers = min(len(table), os.cpu_count() or 1, 16)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        drawn = list(pool.map(_draw_param, table, streams))
    return {info.name: value for info, value in zip(table, drawn, strict=True)}


def _draw_param(info: ParamInfo, stream: np.random.SeedSequence) -> np.ndarray:
    """One row's starting value from its own stream (float64 draws scaled, then float32)."""
    if info.init == "zeros":
        return np.zeros(info.shape, np.float32)
    if info.init == "ones":
        return np.ones(info.shape, np.float32)
    value = np.random.default_rng(stream).standard_normal(info.shape)
    value *= info.std
    return value.astype(np.float32)


def check_names(expected: dict[str, tuple[int, ...]], params: dict[str, Any], *,
                where: str = "params") -> None:
    """Raise SpecError listing every missing, unexpected and mis-shaped name against ``expected``.

    The one strict-matching rule: both backends' loaders and the checkpoint reader call it.
    ``params`` values need only a ``.shape``.
    """
    missing = sorted(set(expected) - set(params))
    unexpected = sorted(set(params) - set(expected))
    misshaped = sorted(
        f"{k}: expected {tuple(expected[k])}, got {tuple(params[k].shape)}"
        for k in set(expected) & set(params) if tuple(params[k].shape) != tuple(expected[k])
    )
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {', '.join(unexpected)}")
        if misshaped:
            parts.append(f"mis-shaped {len(misshaped)}: {'; '.join(misshaped)}")
        raise SpecError(f"{where} do not match -- " + " | ".join(parts))


def check_params(spec: ModelSpec, params: dict[str, Any], *, where: str = "params") -> None:
    """Raise SpecError listing every missing, unexpected and mis-shaped canonical name."""
    check_names(spec.param_shapes(), params, where=f"{where} (spec)")


# ---------------------------------------------------------------------- position tables
def rope_inv_freq(spec: ModelSpec) -> np.ndarray:
    """Inverse frequencies (rope_dim // 2,) as float32, with Llama-3 or YaRN scaling when configured."""
    hd = spec.rope_dim
    inv = 1.0 / (spec.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    sc = spec.rope_scaling
    if sc is None:
        pass
    elif sc["rope_type"] == "llama3":
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old_len = sc["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / lo, old_len / hi
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    else:  # yarn: interpolate (inv / factor) the slow pairs, keep the fast ones, a linear ramp between
        low, high = _yarn_ramp_bounds(spec)
        if low == high:
            high += 0.001  # transformers' guard against a zero-width ramp
        ramp = np.clip((np.arange(hd // 2, dtype=np.float32) - low) / (high - low), 0, 1)  # (hd/2,)
        inv = inv / sc["factor"] * ramp + inv * (1 - ramp)
    return inv.astype(np.float32)


def _yarn_ramp_bounds(spec: ModelSpec) -> tuple[float, float]:
    """The (low, high) pair indices between which YaRN's ramp runs: the dimensions whose wavelength
    turns ``beta_fast`` and ``beta_slow`` times over ``original_max_position_embeddings``."""
    sc, hd = spec.rope_scaling, spec.rope_dim
    old_len = sc["original_max_position_embeddings"]

    def dim_of(rotations: float) -> float:
        return hd * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(spec.rope_theta))

    low, high = dim_of(sc.get("beta_fast", 32)), dim_of(sc.get("beta_slow", 1))
    if sc.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, hd - 1)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_attention_factor(spec: ModelSpec) -> float:
    """The factor both RoPE tables are multiplied by: YaRN's ``attention_factor`` when given, else
    ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)`` when both are set (non-zero), else
    ``mscale(factor)``; 1.0 without YaRN. ``mscale(s, m) = 0.1 * m * ln(s) + 1`` (1 for s <= 1)."""
    sc = spec.rope_scaling
    if sc is None or sc["rope_type"] != "yarn":
        return 1.0
    if "attention_factor" in sc:
        return float(sc["attention_factor"])
    factor, mscale, mscale_all_dim = sc["factor"], sc.get("mscale"), sc.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
    return _yarn_mscale(factor)


def mla_softmax_scale(spec: ModelSpec) -> float:
    """MLA's softmax scale: ``1 / sqrt(qk_nope_head_dim + qk_rope_head_dim)``, times
    ``mscale(factor, mscale_all_dim)^2`` under YaRN with a non-zero ``mscale_all_dim`` (DeepSeek's
    attention; ``rope_attention_factor`` has the ``mscale`` rule)."""
    scale = 1.0 / math.sqrt(spec.qk_head_dim)
    sc = spec.rope_scaling
    if sc is not None and sc["rope_type"] == "yarn" and sc.get("mscale_all_dim"):
        scale *= _yarn_mscale(sc["factor"], sc["mscale_all_dim"]) ** 2
    return scale


def rope_cos_sin(spec: ModelSpec, positions: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin tables (T, rope_dim) for rotate-half RoPE, float32, times ``rope_attention_factor``.

    Angles are formed from the float32 inverse frequencies times float32 positions, which is what
    the reference implementations do, then cos/sin taken (and scaled) in float64 and rounded once.
    """
    if positions is None:
        positions = np.arange(spec.max_seq_len)
    inv = rope_inv_freq(spec)
    angles = positions.astype(np.float32)[:, None] * inv[None, :]  # (T, hd/2) in fp32
    emb = np.concatenate([angles, angles], axis=-1).astype(np.float64)  # (T, hd)
    factor = rope_attention_factor(spec)
    return (factor * np.cos(emb)).astype(np.float32), (factor * np.sin(emb)).astype(np.float32)


def sinusoidal_table(spec: ModelSpec) -> np.ndarray:
    """(max_seq_len, hidden) table: pe[p, 2i] = sin(p / 10000^(2i/D)), pe[p, 2i+1] = cos(...)."""
    d = spec.hidden_size
    pos = np.arange(spec.max_seq_len, dtype=np.float64)[:, None]
    div = np.power(10000.0, np.arange(0, d, 2, dtype=np.float64) / d)
    table = np.zeros((spec.max_seq_len, d), np.float64)
    table[:, 0::2] = np.sin(pos / div)
    table[:, 1::2] = np.cos(pos / div)
    return table.astype(np.float32)

