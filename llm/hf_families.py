"""Hugging Face model families <-> ``ModelSpec``: config fields and weight names, both directions.

One ``Family`` per transformers architecture (``gpt2``, ``llama``, ``mistral``, ``qwen2``,
``mixtral``, ``qwen2_moe``, ``qwen3``, ``qwen3_moe``, ``deepseek_v2``, ``deepseek_v3``) holds three things,
each written once and used by import and export alike:

* ``Family.to_spec(cfg)`` -- a transformers ``config.json`` dict to ``ModelSpec`` fields. Every key
  is either *mapped* (read into a spec field), *checked* (only a value the spec can honour is
  accepted, e.g. ``router_jitter_noise=0``), or *ignored* (metadata, runtime switches, generation
  defaults: nothing that changes the function the weights compute). Any other key, and any checked
  key with a value we cannot honour, is collected; all of them are raised at once in one
  ``HFError`` that lists every field. Absent keys take transformers' default for that family.
* ``Family.to_config(spec)`` -- the reverse; a spec field the family cannot express is collected
  the same way and raised as one ``HFError`` naming every field.
* ``Family.weight_groups(spec, names)`` -- canonical names <-> HF tensor names, as groups with a
  function each way (renames, GPT-2's Conv1D transposes and fused ``c_attn``, Mixtral's per-expert
  ``w1/w2/w3`` or transformers-5 fused ``gate_up_proj``). The set of HF names the groups expect is
  the strict check for a weights file: missing and unexpected names are errors.

The numerics each family is mapped onto (``docs/architecture.md`` is our side):

* GPT-2: pre-norm LayerNorm (``layer_norm_epsilon``), learned positions (``wpe``), ``gelu_new`` =
  our ``gelu_tanh``, biases everywhere, scale ``1/sqrt(head_dim)``, tied ``wte``; Conv1D weights
  are stored ``(in, out)`` and transposed here; ``c_attn`` is q|k|v concatenated on the out axis.
* Llama / Mistral / Qwen2 / Mixtral / Qwen3: RMSNorm (fp32 statistics, ``weight * x.to(dtype)``), GLU MLP,
  rotate-half RoPE with ``rope_theta`` (Llama-3 and YaRN scaling supported: these families apply
  YaRN's attention factor to cos/sin only, as ``llm.spec.rope_cos_sin`` does), GQA. transformers'
  sliding window lets query ``i`` see key ``j`` iff ``i - window < j <= i`` (``masking_utils``:
  ``kv_idx > q_idx - sliding_window``), exactly ``ModelSpec.sliding_window``: the value maps 1:1.
  Qwen2: q/k/v bias, no o_proj bias. Qwen3: ``qk_norm`` (an RMSNorm of ``rms_norm_eps`` over each
  query and key head, after the projection, before RoPE), ``attention_bias`` on q/k/v and o_proj
  alike (as Llama), an explicit ``head_dim`` (default 128, not hidden/heads), Qwen2's sliding-window
  keys. Mixtral router: fp32 softmax over all experts, top-k,
  always renormalised (``norm_topk_prob=True``), no capacity limit. Qwen2-MoE: the same softmax
  router with ``norm_topk_prob`` as configured (default false), experts of ``moe_intermediate_size``,
  one shared expert of ``shared_expert_intermediate_size`` gated by ``sigmoid(x @ shared_expert_gate)``
  (our ``num_shared_experts=1`` + ``shared_expert_gate``), dense ``mlp_only_layers`` = our
  ``first_dense_layers`` when they are the first k layers (with ``decoder_sparse_step``: layer i
  is dense iff listed or ``(i + 1) % step != 0``; only a prefix of dense layers is expressible).
  Qwen3-MoE: Qwen3's attention and Qwen2-MoE's experts and layer rule, no shared expert, a window
  on every layer or none.
* DeepSeek-V2 / V2-Lite: our ``attention: mla`` (``q_lora_rank`` null = V2-Lite's single
  ``q_proj``); transformers rotates interleaved rope pairs, so the rope rows of the query
  projection and of ``kv_a_proj_with_mqa`` are reordered to rotate-half here (``_mla_groups``).
  Router: float32 softmax, greedy top-k (``group_limited_greedy``: among the experts of the
  ``topk_group`` groups with the best max score = our ``num_expert_groups`` / ``topk_groups`` /
  ``router_group_score=max``), never renormalised (transformers ignores ``norm_topk_prob``; true is
  refused), times ``routed_scaling_factor``; ``n_shared_experts`` ungated experts of
  ``moe_intermediate_size``, fused; ``first_k_dense_replace`` = ``first_dense_layers``.
* DeepSeek-V3: V2's attention (``rope_interleave`` true: the same row reordering), experts and dense
  layers; the ``noaux_tc`` router: float32 sigmoid scores, ``e_score_correction_bias`` = our
  ``router_selection_bias`` (added for choosing groups and experts only), groups by the sum of their
  two best biased scores (``router_group_score=top2_sum``), weights renormalised when
  ``norm_topk_prob``, times ``routed_scaling_factor``. The bias update rate is a training setting
  with no config field (imported as 0). The multi-token-prediction modules are dropped on import.
* Every family refuses post-norm blocks, an ``lm_head`` bias and an attention kind it does not have.

This module must not import torch, jax or transformers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from llm.spec import (
    Activation,
    Attention,
    GroupScore,
    ModelSpec,
    NormPosition,
    NormType,
    Position,
    RouterScoring,
    SpecError,
)

__all__ = ["FAMILIES", "Family", "HFError", "WeightGroup", "family_for_config", "get_family",
           "GENERIC_IGNORED_KEYS"]


class HFError(ValueError):
    """A Hugging Face directory, config or spec that cannot be mapped; the message lists every field."""


# Keys any transformers config may carry that do not change what the weights compute: metadata,
# runtime/output switches, generation defaults, heads other than the causal LM head. Ignored.
GENERIC_IGNORED_KEYS = frozenset({
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    "_name_or_path", "name_or_path", "return_dict", "output_hidden_states", "output_attentions",
    "torchscript", "use_bfloat16", "tf_legacy_loss", "is_decoder", "id2label", "label2id",
    "num_labels", "problem_type", "finetuning_task", "task_specific_params", "prefix",
    "tokenizer_class", "chunk_size_feed_forward", "attn_implementation", "_attn_implementation",
    "_attn_implementation_autoset", "_commit_hash", "auto_map",
    # generation defaults (generation_config.json's business; the model function is unchanged)
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens",
})

# Keys whose presence (or a non-default value) changes the model in a way no spec expresses.
_GENERIC_CHECKED = {
    "is_encoder_decoder": (False, "encoder-decoder models are not decoder-only LMs"),
    "add_cross_attention": (False, "cross-attention layers have no ModelSpec equivalent"),
    "tie_encoder_decoder": (False, "encoder-decoder models are not decoder-only LMs"),
    "pruned_heads": ({}, "pruned attention heads (per-layer head counts) are not representable"),
    "cross_attention_hidden_size": (None, "cross-attention layers have no ModelSpec equivalent"),
}

class ConfigReader:
    """Reads a config dict key by key, remembering what was read and every problem found."""

    def __init__(self, cfg: dict[str, Any], family: str):
        self.cfg = cfg
        self.family = family
        self.used: set[str] = set()
        self.problems: list[str] = []

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key`` (an explicit null stays None), or ``default`` when the key is absent."""
        self.used.add(key)
        return self.cfg.get(key, default)

    def has(self, key: str) -> bool:
        return key in self.cfg

    def check(self, key: str, ok: Callable[[Any], bool], default: Any, why: str) -> Any:
        """Read ``key``; a value ``ok`` rejects is recorded as a problem (with ``why``)."""
        value = self.get(key, default)
        if not ok(value):
            self.problems.append(f"{key}={value!r}: {why}")
        return value

    def problem(self, msg: str) -> None:
        self.problems.append(msg)

    def finish(self) -> None:
        for key, (ok_value, why) in _GENERIC_CHECKED.items():
            if key in self.cfg:
                self.check(key, lambda v, ok_value=ok_value: v == ok_value or (ok_value == {} and not v),
                           ok_value, why)
        if "quantization_config" in self.cfg:
            self.used.add("quantization_config")
            self.problems.append("quantization_config: quantized weights are not supported "
                                 "(dequantize to float16/bfloat16/float32 safetensors first)")
        unknown = sorted(set(self.cfg) - self.used - GENERIC_IGNORED_KEYS)
        for key in unknown:
            self.problems.append(f"{key}={self.cfg[key]!r}: not a {self.family} config field this importer "
                                 "knows, so it cannot tell whether it changes the model")
        if self.problems:
            raise HFError(f"cannot honour {len(self.problems)} {self.family} config field(s):\n  - "
                          + "\n  - ".join(self.problems))


class SpecChecker:
    """Collects the spec fields a family cannot express (``Family.to_config``)."""

    def __init__(self, spec: ModelSpec, family: str):
        self.spec = spec
        self.family = family
        self.problems: list[str] = []

    def need(self, ok: bool, field: str, why: str) -> None:
        if not ok:
            value = getattr(self.spec, field)
            value = value.value if hasattr(value, "value") else value
            self.problems.append(f"{field}={value!r}: {why}")

    def finish(self) -> None:
        if self.problems:
            raise HFError(f"the {self.family} family cannot express {len(self.problems)} spec field(s):\n  - "
                          + "\n  - ".join(self.problems))


# ---------------------------------------------------------------------- weight groups
@dataclass(frozen=True)
class WeightGroup:
    """Canonical tensors <-> HF tensors, with the conversion each way (arrays in the listed order)."""

    canonical: tuple[str, ...]
    hf: tuple[str, ...]
    to_hf: Callable[[list[np.ndarray]], list[np.ndarray]]
    from_hf: Callable[[list[np.ndarray]], list[np.ndarray]]


def _same(xs: list[np.ndarray]) -> list[np.ndarray]:
    return list(xs)


def _rename(canonical: str, hf: str) -> WeightGroup:
    return WeightGroup((canonical,), (hf,), _same, _same)


def _transposed(canonical: str, hf: str) -> WeightGroup:
    """A GPT-2 Conv1D weight: HF stores ``(in, out)``, canonical is ``(out, in)``."""
    return WeightGroup((canonical,), (hf,), lambda xs: [xs[0].T], lambda xs: [xs[0].T])


def _concat(canonical: tuple[str, ...], hf: str, axis: int, transpose: bool = False) -> WeightGroup:
    """Several canonical tensors stored as one HF tensor, concatenated on ``axis`` (of the HF layout)."""

    def to_hf(xs: list[np.ndarray]) -> list[np.ndarray]:
        return [np.concatenate([x.T if transpose else x for x in xs], axis=axis)]

    def from_hf(xs: list[np.ndarray]) -> list[np.ndarray]:
        if xs[0].shape[axis] % len(canonical):
            raise HFError(f"{hf}: axis {axis} of shape {xs[0].shape} does not split into {len(canonical)} "
                          "equal parts")
        parts = np.split(xs[0], len(canonical), axis=axis)
        return [p.T if transpose else p for p in parts]

    return WeightGroup(canonical, (hf,), to_hf, from_hf)


def _stacked(canonical: str, hf: tuple[str, ...]) -> WeightGroup:
    """A canonical ``(E, ...)`` stack stored as one HF tensor per expert."""
    return WeightGroup((canonical,), hf, lambda xs: list(xs[0]), lambda xs: [np.stack(xs)])


def _slice_rows(canonical: str, hf: str, rows: int) -> WeightGroup:
    """A position table that may be cut to fewer rows on import (``--max-seq-len``)."""
    return WeightGroup((canonical,), (hf,), _same, lambda xs: [xs[0][:rows]])


# ---------------------------------------------------------------------- activations and RoPE
_HF_ACTIVATIONS = {"gelu_new": Activation.GELU_TANH, "gelu_pytorch_tanh": Activation.GELU_TANH,
                   "gelu": Activation.GELU, "relu": Activation.RELU, "silu": Activation.SILU,
                   "swish": Activation.SILU}


def _activation(r: ConfigReader, key: str, default: str) -> Activation | None:
    name = r.get(key, default)
    if name not in _HF_ACTIVATIONS:
        r.problem(f"{key}={name!r}: not one of the activations with a ModelSpec equivalent "
                  f"({', '.join(sorted(_HF_ACTIVATIONS))})")
        return None
    return _HF_ACTIVATIONS[name]


_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
_YARN_OPTIONAL = ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate")
_YARN_UNSET_IF_NONE = ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor")


def _read_rope(r: ConfigReader, default_theta: float, max_positions: int) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from transformers-5 ``rope_parameters`` or the older
    ``rope_theta`` + ``rope_scaling`` (``rope_scaling`` wins when both are set, as in transformers)."""
    params, legacy = r.get("rope_parameters"), r.get("rope_scaling")
    top_theta = r.get("rope_theta")
    top_partial = r.get("partial_rotary_factor")
    source = "rope_scaling" if legacy else "rope_parameters"
    p = dict(legacy or params or {})
    rope_type = p.pop("rope_type", None)
    legacy_type = p.pop("type", None)
    rope_type = rope_type or legacy_type or "default"
    theta = p.pop("rope_theta", None)
    if theta is None:
        theta = (params or {}).get("rope_theta") if legacy else None
    theta = float(theta if theta is not None else top_theta if top_theta is not None else default_theta)
    partial = p.pop("partial_rotary_factor", top_partial)
    if partial is not None and partial != 1.0:
        r.problem(f"partial_rotary_factor={partial!r}: RoPE on part of each head is not implemented "
                  "(ModelSpec rotates the whole head)")
    scaling = None
    if rope_type == "default":
        pass
    elif rope_type == "llama3":
        p.setdefault("original_max_position_embeddings", max_positions)
        missing = [k for k in _LLAMA3_KEYS if k not in p]
        if missing:
            r.problem(f"{source}: llama3 scaling without {missing}")
        else:
            scaling = {"rope_type": "llama3", **{k: p.pop(k) for k in _LLAMA3_KEYS}}
    elif rope_type == "yarn":
        p.setdefault("original_max_position_embeddings", max_positions)
        for key in _YARN_UNSET_IF_NONE:  # transformers reads None as absent for these
            if key in p and p[key] is None:
                del p[key]
        keys = [k for k in ("factor", "original_max_position_embeddings", *_YARN_OPTIONAL) if k in p]
        scaling = {"rope_type": "yarn", **{k: p.pop(k) for k in keys}}
    else:
        r.problem(f"{source}.rope_type={rope_type!r}: only 'default', 'llama3' and 'yarn' RoPE "
                  "are implemented")
        p.clear()
    if p:
        r.problem(f"{source} has key(s) {sorted(p)} that {rope_type!r} RoPE does not use; refusing to guess")
    return theta, scaling


def _write_rope(spec: ModelSpec) -> dict[str, Any]:
    """transformers-5 ``rope_parameters`` plus the older ``rope_theta`` / ``rope_scaling`` keys."""
    params: dict[str, Any] = {"rope_theta": spec.rope_theta, "rope_type": "default"}
    scaling = None
    if spec.rope_scaling is not None:
        scaling = dict(spec.rope_scaling)
        params = {"rope_theta": spec.rope_theta, **scaling}
    return {"rope_parameters": params, "rope_theta": spec.rope_theta, "rope_scaling": scaling}


def _head_dim(hidden: int, heads: int, head_dim: Any) -> int | None:
    """Our ``head_dim``: None when it is the derived ``hidden // heads``."""
    if head_dim is None or (hidden % heads == 0 and head_dim == hidden // heads):
        return None
    return int(head_dim)


def _is_zero(value: Any) -> bool:
    return value is None or value == 0


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


# ---------------------------------------------------------------------- the family record
@dataclass(frozen=True)
class Family:
    """One transformers architecture (see the module docstring)."""

    name: str
    model_type: str
    architecture: str
    spec_from_config: Callable[[ConfigReader], dict[str, Any]]
    config_fields: Callable[[ModelSpec, SpecChecker], dict[str, Any]]
    weight_groups: Callable[[ModelSpec, set[str] | None], list[WeightGroup]]
    ignored_weight: Callable[[str], bool] = lambda name: False
    normalise_names: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] = lambda t: t

    def to_spec(self, cfg: dict[str, Any]) -> ModelSpec:
        """The ModelSpec of a config dict; one HFError lists every field that cannot be honoured."""
        r = ConfigReader(cfg, self.name)
        fields = self.spec_from_config(r)
        r.finish()
        try:
            return ModelSpec(**fields)
        except SpecError as e:
            raise HFError(f"{self.name} config maps to an invalid spec: {e}") from None

    def to_config(self, spec: ModelSpec, *, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """A transformers config.json dict for ``spec``; one HFError names every inexpressible field."""
        c = SpecChecker(spec, self.name)
        fields = self.config_fields(spec, c)
        c.finish()
        cfg = {"architectures": [self.architecture], "model_type": self.model_type, **fields,
               "initializer_range": spec.init_std, "dtype": "float32", "use_cache": True}
        cfg.update(extra or {})
        return dict(sorted(cfg.items()))

    def can_express(self, spec: ModelSpec) -> list[str]:
        """The problems ``to_config`` would raise (empty when the family can express ``spec``)."""
        c = SpecChecker(spec, self.name)
        self.config_fields(spec, c)
        return c.problems


# ---------------------------------------------------------------------- GPT-2
def _gpt2_spec(r: ConfigReader) -> dict[str, Any]:
    d, heads = r.get("n_embd", 768), r.get("n_head", 12)
    positions = r.get("n_positions", 1024)
    if r.has("n_ctx"):
        r.check("n_ctx", lambda v: v == positions, positions,
                f"differs from n_positions={positions} (the position table has n_positions rows)")
    drops = {k: r.get(k, 0.1) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
    if len(set(drops.values())) > 1:
        r.problem(f"resid_pdrop/embd_pdrop/attn_pdrop={tuple(drops.values())}: ModelSpec has one dropout "
                  "rate for embeddings, residuals and attention probabilities")
    r.check("scale_attn_weights", lambda v: v is True, True,
            "unscaled attention scores are not implemented (scale is 1/sqrt(head_dim))")
    r.check("scale_attn_by_inverse_layer_idx", lambda v: v is False, False,
            "scaling attention by 1/(layer+1) is not implemented")
    r.get("reorder_and_upcast_attn")  # how fp16 scores are accumulated; identical in float32
    for key in ("summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels",
                "summary_first_dropout"):
        r.get(key)  # the double-heads / classification head; not part of the causal LM
    return dict(
        vocab_size=r.get("vocab_size", 50257), max_seq_len=positions, hidden_size=d,
        num_layers=r.get("n_layer", 12), num_heads=heads, intermediate_size=r.get("n_inner") or 4 * d,
        activation=_activation(r, "activation_function", "gelu_new") or Activation.GELU_TANH,
        use_glu=False, norm_type=NormType.LAYERNORM, norm_eps=float(r.get("layer_norm_epsilon", 1e-5)),
        position=Position.LEARNED, tie_embeddings=bool(r.get("tie_word_embeddings", True)),
        attention_bias=True, attention_out_bias=True, mlp_bias=True,
        dropout=float(drops["resid_pdrop"]), init_std=float(r.get("initializer_range", 0.02)),
        scale_residual_init=True,  # transformers' GPT-2 init scales c_proj by 1/sqrt(2 * n_layer) too
    )


_GPT2_ACT_NAMES = {Activation.GELU_TANH: "gelu_new", Activation.GELU: "gelu", Activation.RELU: "relu",
                   Activation.SILU: "silu"}


def _gpt2_config(spec: ModelSpec, c: SpecChecker) -> dict[str, Any]:
    _standard_block(spec, c, "gpt2")
    c.need(spec.position is Position.LEARNED, "position", "GPT-2 uses a learned position table (wpe)")
    c.need(spec.norm_type is NormType.LAYERNORM, "norm_type", "GPT-2 uses LayerNorm with bias")
    c.need(not spec.use_glu, "use_glu", "GPT-2's MLP is c_fc -> act -> c_proj (no gate)")
    c.need(not spec.use_moe, "use_moe", "GPT-2 has dense MLPs")
    c.need(spec.attention_bias, "attention_bias", "GPT-2's c_attn always has a bias")
    c.need(spec.out_bias, "attention_out_bias", "GPT-2's attention c_proj always has a bias")
    c.need(spec.mlp_bias, "mlp_bias", "GPT-2's c_fc / c_proj always have biases")
    c.need(spec.kv_heads == spec.num_heads, "num_kv_heads", "GPT-2 has no grouped-query attention")
    c.need(spec.head_dim is None or spec.head_dim * spec.num_heads == spec.hidden_size, "head_dim",
           "GPT-2's head size is n_embd / n_head")
    c.need(spec.sliding_window is None, "sliding_window", "GPT-2 attends to the whole prefix")
    c.need(spec.rope_scaling is None, "rope_scaling", "GPT-2 has no RoPE")
    c.need(not spec.qk_norm, "qk_norm", "GPT-2 has no q/k norms")
    return {"vocab_size": spec.vocab_size, "n_positions": spec.max_seq_len, "n_embd": spec.hidden_size,
            "n_layer": spec.num_layers, "n_head": spec.num_heads,
            "n_inner": None if spec.ffn_size == 4 * spec.hidden_size else spec.ffn_size,
            "activation_function": _GPT2_ACT_NAMES[spec.activation], "layer_norm_epsilon": spec.norm_eps,
            "resid_pdrop": spec.dropout, "embd_pdrop": spec.dropout, "attn_pdrop": spec.dropout,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False, "add_cross_attention": False,
            "tie_word_embeddings": spec.tie_embeddings}


def _gpt2_weights(spec: ModelSpec, names: set[str] | None = None) -> list[WeightGroup]:
    t = "transformer"
    groups = [_rename("embed.weight", f"{t}.wte.weight"),
              _slice_rows("embed.position.weight", f"{t}.wpe.weight", spec.max_seq_len)]
    for i in range(spec.num_layers):
        h, p = f"{t}.h.{i}", f"layers.{i}"
        qkv = tuple(f"{p}.attn.{n}_proj" for n in "qkv")
        groups += [
            _rename(f"{p}.attn_norm.weight", f"{h}.ln_1.weight"),
            _rename(f"{p}.attn_norm.bias", f"{h}.ln_1.bias"),
            _concat(tuple(f"{n}.weight" for n in qkv), f"{h}.attn.c_attn.weight", axis=1, transpose=True),
            _concat(tuple(f"{n}.bias" for n in qkv), f"{h}.attn.c_attn.bias", axis=0),
            _transposed(f"{p}.attn.o_proj.weight", f"{h}.attn.c_proj.weight"),
            _rename(f"{p}.attn.o_proj.bias", f"{h}.attn.c_proj.bias"),
            _rename(f"{p}.mlp_norm.weight", f"{h}.ln_2.weight"),
            _rename(f"{p}.mlp_norm.bias", f"{h}.ln_2.bias"),
            _transposed(f"{p}.mlp.up_proj.weight", f"{h}.mlp.c_fc.weight"),
            _rename(f"{p}.mlp.up_proj.bias", f"{h}.mlp.c_fc.bias"),
            _transposed(f"{p}.mlp.down_proj.weight", f"{h}.mlp.c_proj.weight"),
            _rename(f"{p}.mlp.down_proj.bias", f"{h}.mlp.c_proj.bias"),
        ]
    groups += [_rename("final_norm.weight", f"{t}.ln_f.weight"), _rename("final_norm.bias", f"{t}.ln_f.bias")]
    if not spec.tie_embeddings:
        groups.append(_rename("lm_head.weight", "lm_head.weight"))
    return groups


def _gpt2_ignored(name: str) -> bool:
    # the causal-mask buffers older GPT-2 checkpoints carry (attn.bias is 4-D, c_attn.bias is not)
    return name.endswith((".attn.bias", ".attn.masked_bias"))


def _gpt2_normalise(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The original GPT-2 files name weights without the ``transformer.`` prefix (``h.0.ln_1.weight``)."""
    out = {}
    for name, value in tensors.items():
        bare = name.split(".")[0] in ("wte", "wpe", "h", "ln_f")
        out[f"transformer.{name}" if bare else name] = value
    return out


# ---------------------------------------------------------------------- the Llama-style families
_LLAMA_DEFAULTS = {
    # transformers' defaults for absent keys: (max_position_embeddings, rms_norm_eps, rope_theta,
    # num_key_value_heads, vocab_size, intermediate_size)
    "llama": (2048, 1e-6, 10000.0, None, 32000, 11008),
    "mistral": (4096 * 32, 1e-6, 10000.0, 8, 32000, 14336),
    "qwen2": (32768, 1e-6, 10000.0, 32, 151936, 22016),
    "mixtral": (4096 * 32, 1e-5, 1e6, 8, 32000, 14336),
    "qwen2_moe": (32768, 1e-6, 10000.0, 16, 151936, 5632),
    "qwen3": (32768, 1e-6, 10000.0, 32, 151936, 22016),
    "qwen3_moe": (32768, 1e-6, 10000.0, 4, 151936, 6144),
}
# transformers' head_dim for an absent key where it is not hidden_size // num_attention_heads
_HEAD_DIM_DEFAULTS = {"qwen3": 128}


def _llama_like_spec(r: ConfigReader) -> dict[str, Any]:
    max_pos, eps, theta, kv_default, vocab, ffn = _LLAMA_DEFAULTS[r.family]
    d, heads = r.get("hidden_size", 4096), r.get("num_attention_heads", 32)
    kv = r.get("num_key_value_heads", kv_default)
    max_pos = r.get("max_position_embeddings", max_pos)
    rope_theta, rope_scaling = _read_rope(r, theta, max_pos)
    r.check("attention_dropout", _is_zero, 0.0,
            "ModelSpec.dropout also drops embeddings and residuals; attention-only dropout is not "
            "implemented")
    return dict(
        vocab_size=r.get("vocab_size", vocab), max_seq_len=max_pos,
        hidden_size=d, num_layers=r.get("num_hidden_layers", 32), num_heads=heads,
        num_kv_heads=None if kv is None or kv == heads else kv,
        head_dim=_head_dim(d, heads, r.get("head_dim", _HEAD_DIM_DEFAULTS.get(r.family))),
        intermediate_size=r.get("intermediate_size", ffn),
        activation=_activation(r, "hidden_act", "silu") or Activation.SILU, use_glu=True,
        norm_type=NormType.RMSNORM, norm_eps=float(r.get("rms_norm_eps", eps)), position=Position.ROPE,
        rope_theta=rope_theta, rope_scaling=rope_scaling,
        tie_embeddings=bool(r.get("tie_word_embeddings", False)), dropout=0.0,
        init_std=float(r.get("initializer_range", 0.02)), scale_residual_init=False,
    )


def _uniform_window(r: ConfigReader, window: Any, sliding_layers: list[bool]) -> int | None:
    """One window for every layer, or a problem when layers differ (per-layer windows)."""
    if window is not None and not _positive_int(window):
        r.problem(f"sliding_window={window!r}: must be a positive integer or null")
        return None
    if window is None or not any(sliding_layers):
        return None
    if not all(sliding_layers):
        r.problem(f"layer_types: sliding-window attention on some layers only "
                  f"({sum(sliding_layers)} of {len(sliding_layers)}); ModelSpec.sliding_window applies to "
                  "every layer")
    return window


def _layer_types(r: ConfigReader, num_layers: int, default: list[str]) -> list[str]:
    types = r.get("layer_types", None)
    if types is None:
        return default
    allowed = {"full_attention", "sliding_attention"}
    if not isinstance(types, list) or len(types) != num_layers or not set(types) <= allowed:
        r.problem(f"layer_types={types!r}: expected {num_layers} entries of {sorted(allowed)}")
        return default
    return types


def _llama_spec(r: ConfigReader) -> dict[str, Any]:
    fields = _llama_like_spec(r)
    bias = r.check("attention_bias", lambda v: isinstance(v, bool), False, "must be true or false")
    fields.update(attention_bias=bool(bias), attention_out_bias=None,
                  mlp_bias=bool(r.check("mlp_bias", lambda v: isinstance(v, bool), False, "must be true or false")))
    r.get("pretraining_tp")  # split matmuls of the original Llama code: the same function
    return fields


def _mistral_spec(r: ConfigReader) -> dict[str, Any]:
    fields = _llama_like_spec(r)
    layers = fields["num_layers"]
    window = r.get("sliding_window", 4096)
    # transformers' Mistral applies its window to every layer; per-layer types are the ministral family
    uniform = ["sliding_attention" if window is not None else "full_attention"] * layers
    if r.has("layer_types") and _layer_types(r, layers, uniform) != uniform:
        r.problem(f"layer_types={r.cfg['layer_types']!r}: per-layer attention types (the ministral family) "
                  "are not supported; ModelSpec.sliding_window applies to every layer")
    fields["sliding_window"] = _uniform_window(r, window, [True] * layers)
    return fields


def _mixtral_spec(r: ConfigReader) -> dict[str, Any]:
    fields = _llama_like_spec(r)
    window = r.get("sliding_window", None)
    fields["sliding_window"] = _uniform_window(r, window, [True] * fields["num_layers"])
    experts = r.get("num_local_experts", 8)
    fields.update(use_moe=True, num_experts=experts, num_experts_per_token=r.get("num_experts_per_tok", 2),
                  norm_topk_prob=True, capacity_factor=None,
                  router_aux_loss_coef=float(r.get("router_aux_loss_coef", 0.001)), router_z_loss_coef=0.0)
    r.check("router_jitter_noise", _is_zero, 0.0,
            "multiplicative router jitter during training is not implemented")
    r.get("output_router_logits")  # an output switch; the aux loss coefficient is mapped above
    return fields


def _qwen_window(r: ConfigReader, layers: int) -> int | None:
    """Qwen2 / Qwen3 windows: ``use_sliding_window``, ``sliding_window`` from layer
    ``max_window_layers`` on, or per-layer ``layer_types``."""
    use_window = r.check("use_sliding_window", lambda v: isinstance(v, bool), False, "must be true or false")
    window = r.get("sliding_window", 4096)
    first = r.get("max_window_layers", 28)
    window = window if use_window else None  # what transformers' Qwen2Config / Qwen3Config do
    default = ["sliding_attention" if window is not None and i >= first else "full_attention"
               for i in range(layers)]
    types = _layer_types(r, layers, default)
    return _uniform_window(r, window, [t == "sliding_attention" for t in types])


def _qwen2_spec(r: ConfigReader) -> dict[str, Any]:
    fields = _llama_like_spec(r)
    fields["sliding_window"] = _qwen_window(r, fields["num_layers"])
    fields.update(attention_bias=True, attention_out_bias=False, mlp_bias=False)
    return fields


def _switched_window(r: ConfigReader) -> Any:
    """``sliding_window`` when ``use_sliding_window`` is on, else None (what the Qwen-MoE configs
    do; Qwen2MoeConfig stores 0 when the window is off)."""
    use_window = r.check("use_sliding_window", lambda v: isinstance(v, bool), False, "must be true or false")
    window = r.get("sliding_window", 4096)
    return window if use_window else None


def _qwen2_moe_spec(r: ConfigReader) -> dict[str, Any]:
    fields = _llama_like_spec(r)
    layers = fields["num_layers"]
    window = _switched_window(r)
    first = r.get("max_window_layers", 28)
    # Qwen2MoeConfig's own default: a window on the even layers below max_window_layers
    default = ["sliding_attention" if window is not None and i % 2 == 0 and i < first else "full_attention"
               for i in range(layers)]
    types = _layer_types(r, layers, default)
    fields["sliding_window"] = _uniform_window(r, window, [t == "sliding_attention" for t in types])
    experts = r.check("num_experts", _positive_int, 60, "must be >= 1 (a model without experts is qwen2)")
    shared = r.check("shared_expert_intermediate_size", lambda v: isinstance(v, int) and v >= 0, 5632,
                     "must be an integer >= 0")
    fields.update(attention_bias=bool(r.check("qkv_bias", lambda v: isinstance(v, bool), True,
                                              "must be true or false")),
                  attention_out_bias=False, mlp_bias=False, use_moe=True,
                  num_experts=experts if _positive_int(experts) else 1,
                  num_experts_per_token=r.get("num_experts_per_tok", 4),
                  norm_topk_prob=bool(r.get("norm_topk_prob", False)), capacity_factor=None,
                  moe_intermediate_size=r.get("moe_intermediate_size", 1408),
                  first_dense_layers=_qwen_moe_dense_layers(r, layers), router_aux_loss_coef=float(r.get("router_aux_loss_coef", 0.001)), router_z_loss_coef=0.0)
    if isinstance(shared, int) and shared > 0:  # 0: no shared expert (its gate multiplies an empty MLP)
        fields.update(num_shared_experts=1, shared_expert_intermediate_size=shared, shared_expert_gate=True)
    r.get("output_router_logits")  # an output switch; the aux loss coefficient is mapped above
    return fields


def _qwen_moe_dense_layers(r: ConfigReader, layers: int) -> int:
    """``first_dense_layers`` from the Qwen-MoE layer rule (layer i is dense iff it is in
    ``mlp_only_layers`` or ``(i + 1) % decoder_sparse_step != 0``): the dense layers must be the first k."""
    step = r.check("decoder_sparse_step", _positive_int, 1, "must be an integer >= 1")
    step = step if _positive_int(step) else 1
    only = r.get("mlp_only_layers", None) or []
    if not isinstance(only, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in only):
        r.problem(f"mlp_only_layers={only!r}: must be a list of layer indices")
        return 0
    by_step = [i for i in range(layers) if (i + 1) % step]
    dense = sorted(set(by_step) | {i for i in only if 0 <= i < layers})
    if dense == list(range(len(dense))):
        return len(dense)
    if by_step != list(range(len(by_step))):
        r.problem(f"decoder_sparse_step={step!r}: MoE on every {step}-th layer makes layers {dense} dense; "
                  "ModelSpec.first_dense_layers makes only the first k layers dense")
    else:
        r.problem(f"mlp_only_layers={only!r}: dense MLPs on layers other than the first k (0..k-1, "
                  "ModelSpec.first_dense_layers) are not supported")
    return 0


def _qwen3_spec(r: ConfigReader) -> dict[str, Any]:
    fields = _qwen3_spec_attention(r)
    fields["sliding_window"] = _qwen_window(r, fields["num_layers"])
    return fields


def _qwen3_moe_spec(r: ConfigReader) -> dict[str, Any]:
    fields = _qwen3_spec_attention(r)
    layers = fields["num_layers"]
    window = _switched_window(r)
    first = r.get("max_window_layers", None)
    if window is not None and first not in (None, 0):
        # transformers 5's Qwen3-MoE windows every layer and never reads max_window_layers
        r.problem(f"max_window_layers={first!r}: with use_sliding_window, transformers' qwen3_moe windows every "
                  "layer; a window from layer max_window_layers on is ambiguous (set 0)")
    fields["sliding_window"] = _uniform_window(r, window, [True] * layers)
    experts = _qwen3_moe_experts(r)
    fields.update(use_moe=True, num_experts=experts if _positive_int(experts) else 1,
                  num_experts_per_token=r.get("num_experts_per_tok", 8),
                  norm_topk_prob=bool(r.check("norm_topk_prob", lambda v: isinstance(v, bool), False,
                                              "must be true or false")),
                  capacity_factor=None, moe_intermediate_size=r.get("moe_intermediate_size", 768),
                  first_dense_layers=_qwen_moe_dense_layers(r, layers),
                  router_aux_loss_coef=float(r.get("router_aux_loss_coef", 0.001)), router_z_loss_coef=0.0)
    r.get("output_router_logits")  # an output switch; the aux loss coefficient is mapped above
    return fields


def _qwen3_spec_attention(r: ConfigReader) -> dict[str, Any]:
    """The Llama-style fields with Qwen3's attention: per-head q/k norms, attention_bias on q/k/v/o."""
    fields = _llama_like_spec(r)
    bias = r.check("attention_bias", lambda v: isinstance(v, bool), False, "must be true or false")
    fields.update(attention_bias=bool(bias), attention_out_bias=None, mlp_bias=False, qk_norm=True)
    return fields


def _qwen3_moe_experts(r: ConfigReader) -> Any:
    """``num_experts`` (the released configs) or ``num_local_experts`` (transformers 5 writes its
    attribute_map target); both present must agree."""
    why = "must be >= 1 (a model without experts is qwen3)"
    if r.has("num_local_experts"):
        local = r.check("num_local_experts", _positive_int, 128, why)
        if r.has("num_experts") and r.get("num_experts") != local:
            r.problem(f"num_experts={r.get('num_experts')!r}: differs from num_local_experts={local!r} "
                      "(one is an alias of the other)")
        return local
    return r.check("num_experts", _positive_int, 128, why)


# transformers' defaults for absent keys: (vocab_size, hidden_size, intermediate_size, num_hidden_layers,
# num_attention_heads, max_position_embeddings, n_routed_experts, num_experts_per_tok, moe_intermediate_size,
# n_shared_experts, routed_scaling_factor, first_k_dense_replace)
_DEEPSEEK_DEFAULTS = {
    "deepseek_v2": (102400, 4096, 11008, 32, 32, 2048, 64, 6, 1407, 2, 1.0, 0),
    "deepseek_v3": (129280, 7168, 18432, 61, 128, 4096, 256, 8, 2048, 1, 2.5, 3),
}


def _deepseek_spec(r: ConfigReader) -> dict[str, Any]:
    """DeepSeek-V2 / V3 as transformers computes them (see the module docstring): the MLA attention,
    the dense MLPs and the expert sizes both share; the router is the family's."""
    vocab, d, ffn, layers, heads, max_pos, experts, top_k, expert_ffn, shared, scale, dense = \
        _DEEPSEEK_DEFAULTS[r.family]
    heads, layers = r.get("num_attention_heads", heads), r.get("num_hidden_layers", layers)
    max_pos = r.get("max_position_embeddings", max_pos)
    rope_theta, rope_scaling = _read_rope(r, 10000.0, max_pos)
    nope, rope = r.get("qk_nope_head_dim", 128), r.get("qk_rope_head_dim", 64)
    r.check("num_key_value_heads", lambda v: v is None or v == heads, None,
            f"MLA reads every head's key and value from the shared latent (must be num_attention_heads={heads})")
    r.check("head_dim", lambda v: v is None or v == rope, rope, f"the config sets it to qk_rope_head_dim={rope}")
    r.check("qk_head_dim", lambda v: v is None or v == nope + rope, nope + rope,
            f"must be qk_nope_head_dim + qk_rope_head_dim = {nope + rope}")
    r.check("attention_dropout", _is_zero, 0.0, "attention-only dropout is not implemented")
    r.check("mlp_bias", lambda v: v is False, False, f"MLP biases are not mapped for {r.family} (its experts have none)")
    r.check("moe_layer_freq", lambda v: v == 1, 1,
            "MoE on every moe_layer_freq-th layer only is not supported (only 1: every layer after "
            "first_k_dense_replace)")
    r.get("pretraining_tp")  # split matmuls of the original code: the same function
    r.get("ep_size")  # the original code's expert-parallel degree: placement, not the function
    r.get("seq_aux")  # the original code's per-sequence aux loss: training only, never the logits
    r.get("output_router_logits")
    dense = r.check("first_k_dense_replace", lambda v: isinstance(v, int) and v >= 0, dense, "must be an integer >= 0")
    dense = dense if isinstance(dense, int) and dense >= 0 else 0
    fields = dict(
        vocab_size=r.get("vocab_size", vocab), max_seq_len=max_pos, hidden_size=r.get("hidden_size", d),
        num_layers=layers, num_heads=heads, attention=Attention.MLA, q_lora_rank=r.get("q_lora_rank", 1536),
        kv_lora_rank=r.get("kv_lora_rank", 512), qk_nope_head_dim=nope, qk_rope_head_dim=rope,
        v_head_dim=r.get("v_head_dim", 128), intermediate_size=r.get("intermediate_size", ffn),
        activation=_activation(r, "hidden_act", "silu") or Activation.SILU, use_glu=True,
        norm_type=NormType.RMSNORM, norm_eps=float(r.get("rms_norm_eps", 1e-6)), position=Position.ROPE,
        rope_theta=rope_theta, rope_scaling=rope_scaling,
        attention_bias=bool(r.check("attention_bias", lambda v: isinstance(v, bool), False, "must be true or false")),
        attention_out_bias=None, mlp_bias=False, tie_embeddings=bool(r.get("tie_word_embeddings", False)),
        dropout=0.0, init_std=float(r.get("initializer_range", 0.02)), scale_residual_init=False)
    shared = r.check("n_shared_experts", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, shared,
                     "must be an integer >= 0")
    scaling = r.check("routed_scaling_factor", lambda v: isinstance(v, (int, float)) and v > 0, scale, "must be > 0")
    experts = r.check("n_routed_experts", _positive_int, experts, "must be an integer >= 1")
    moe = dict(num_experts=experts if _positive_int(experts) else 1,
               num_experts_per_token=r.get("num_experts_per_tok", top_k),
               moe_intermediate_size=r.get("moe_intermediate_size", expert_ffn),
               routed_scaling_factor=float(scaling) if isinstance(scaling, (int, float)) else 1.0)
    if isinstance(shared, int) and shared > 0:  # 0: transformers still builds the shared MLP, 0 wide
        moe["num_shared_experts"] = shared
    routing = _deepseek_v2_routing if r.family == "deepseek_v2" else _deepseek_v3_routing
    moe.update(routing(r, moe["num_experts"]))
    if dense < layers:  # first_k_dense_replace >= num_hidden_layers: every layer dense, no expert is built
        fields.update(use_moe=True, first_dense_layers=dense, capacity_factor=None, router_z_loss_coef=0.0, **moe)
    return fields


def _deepseek_v3_spec(r: ConfigReader) -> dict[str, Any]:
    # True: the rope rows are stored in interleaved pairs, reordered to rotate-half here (as deepseek_v2)
    r.check("rope_interleave", lambda v: v is True, True,
            "rope rows stored in rotate-half order are not mapped (the released checkpoints interleave)")
    # the multi-token-prediction modules draft tokens for speculative decoding; the causal LM's
    # logits never read them (their weights, model.layers.{i} for i >= num_hidden_layers, are ignored)
    r.get("num_nextn_predict_layers")
    r.get("num_mtp_layers")
    return _deepseek_spec(r)


def _expert_groups(r: ConfigReader, experts: int, method: str) -> dict[str, Any]:
    """``n_group`` / ``topk_group`` as our ``num_expert_groups`` / ``topk_groups`` (checked under the
    HF names: ``method`` names the routing that reads them)."""
    groups = r.check("n_group", lambda v: _positive_int(v) and experts % v == 0, None,
                     f"{method} needs an integer >= 1 that divides n_routed_experts={experts}")
    groups = groups if _positive_int(groups) and experts % groups == 0 else 1
    top = r.check("topk_group", lambda v: _positive_int(v) and v <= groups, None,
                  f"{method} needs an integer in [1, n_group={groups}]")
    return dict(num_expert_groups=groups, topk_groups=top if _positive_int(top) and top <= groups else 1)


def _deepseek_v2_routing(r: ConfigReader, experts: int) -> dict[str, Any]:
    """DeepSeek-V2's router in transformers: a float32 softmax, top-k -- greedy over all experts, or
    ``group_limited_greedy`` over the experts of the ``topk_group`` groups with the best max score --
    never renormalised, times ``routed_scaling_factor``."""
    r.check("scoring_func", lambda v: v == "softmax", "softmax",
            "transformers' deepseek_v2 routes by softmax (sigmoid scoring is deepseek_v3)")
    method = r.check("topk_method", lambda v: v in ("greedy", "group_limited_greedy"), "greedy",
                     "only 'greedy' and 'group_limited_greedy' are implemented (noaux_tc is deepseek_v3)")
    r.check("norm_topk_prob", lambda v: v is False or v is None, False,
            "transformers' deepseek_v2 never renormalises the top-k weights (the original code did when "
            "true); refusing to guess")
    fields = dict(norm_topk_prob=False,
                  # the original code's router_aux_loss_coef; seq_aux (its per-sequence variant) and
                  # output_router_logits only change the training loss, never the logits
                  router_aux_loss_coef=float(r.get("aux_loss_alpha", 0.001)))
    if method == "group_limited_greedy":
        fields.update(_expert_groups(r, experts, "topk_method='group_limited_greedy'"))  # group score: max
    else:  # greedy never reads the groups
        r.get("n_group")
        r.get("topk_group")
    return fields


def _deepseek_v3_routing(r: ConfigReader, experts: int) -> dict[str, Any]:
    """DeepSeek-V3's router in transformers: float32 sigmoid scores; the experts of the ``topk_group``
    groups whose two best ``score + e_score_correction_bias`` sum highest; top-k on the biased scores;
    the unbiased scores as weights, renormalised when ``norm_topk_prob``, times ``routed_scaling_factor``."""
    r.check("scoring_func", lambda v: v == "sigmoid", "sigmoid", "transformers' deepseek_v3 routes by sigmoid")
    r.check("topk_method", lambda v: v == "noaux_tc", "noaux_tc",
            "transformers' deepseek_v3 routes by noaux_tc (group top-2 sums, biased selection)")
    norm = r.check("norm_topk_prob", lambda v: isinstance(v, bool), True, "must be true or false")
    fields = dict(router_scoring=RouterScoring.SIGMOID, norm_topk_prob=bool(norm), router_selection_bias=True,
                  router_bias_update_rate=0.0,
                  # transformers' deepseek_v3 has no aux loss; the original config's aux_loss_alpha is its
                  # per-sequence balance loss (training only, never the logits)
                  router_aux_loss_coef=float(r.get("aux_loss_alpha", 0.0)),
                  **_expert_groups(r, experts, "noaux_tc routing"))
    per_group = experts // fields["num_expert_groups"]
    if per_group < 2:
        r.problem(f"n_group={fields['num_expert_groups']}: deepseek_v3 scores each group by its two best experts "
                  f"(n_routed_experts / n_group = {per_group} < 2)")
    if fields["num_expert_groups"] > 1:
        fields["router_group_score"] = GroupScore.TOP2_SUM
    return fields


def _standard_block(spec: ModelSpec, c: SpecChecker, family: str, *, attention: Attention = Attention.MHA) -> None:
    """What every family shares: pre-norm blocks, an lm_head without bias, and one attention kind."""
    c.need(spec.norm_position is NormPosition.PRE, "norm_position", f"{family} normalises before each sublayer")
    c.need(not spec.lm_head_bias, "lm_head_bias", f"{family}'s lm_head has no bias")
    c.need(spec.attention is attention, "attention",
           f"{family} attends by multi-head latent attention (attention=mla)" if attention is Attention.MLA
           else f"{family} has q/k/v projections per head (multi-head latent attention is deepseek_v2)")


def _llama_like_config(spec: ModelSpec, c: SpecChecker, family: str, *, qk_norm: bool = False) -> dict[str, Any]:
    _standard_block(spec, c, family)
    c.need(spec.position is Position.ROPE, "position", f"{family} uses RoPE")
    c.need(spec.qk_norm == qk_norm, "qk_norm", f"{family} always normalises q and k per head" if qk_norm
           else f"{family} has no q/k norms (qwen3 and qwen3_moe have)")
    c.need(spec.norm_type is NormType.RMSNORM, "norm_type", f"{family} uses RMSNorm")
    c.need(spec.use_glu, "use_glu", f"{family}'s MLP is gated (down(act(gate(x)) * up(x)))")
    c.need(spec.activation in _LLAMA_ACT_NAMES, "activation", "no transformers activation name")
    return {"vocab_size": spec.vocab_size, "hidden_size": spec.hidden_size,
            "intermediate_size": spec.ffn_size, "num_hidden_layers": spec.num_layers,
            "num_attention_heads": spec.num_heads, "num_key_value_heads": spec.kv_heads,
            "head_dim": spec.dim_head, "hidden_act": _LLAMA_ACT_NAMES.get(spec.activation, "silu"),
            "max_position_embeddings": spec.max_seq_len, "rms_norm_eps": spec.norm_eps,
            "attention_dropout": 0.0, "tie_word_embeddings": spec.tie_embeddings, **_write_rope(spec)}


_LLAMA_ACT_NAMES = {Activation.SILU: "silu", Activation.GELU: "gelu", Activation.GELU_TANH: "gelu_pytorch_tanh",
                    Activation.RELU: "relu"}


def _dense_only(spec: ModelSpec, c: SpecChecker, family: str) -> None:
    c.need(not spec.use_moe, "use_moe", f"{family} has dense MLPs (mixtral, qwen2_moe, qwen3_moe and "
           "deepseek_v2 have experts)")


def _softmax_routing(spec: ModelSpec, c: SpecChecker, family: str, *, scaled: bool = False,
                     groups: bool = False) -> None:
    """The router the softmax MoE families share: softmax top-k over all experts (over the best
    groups by their max score when ``groups``), no selection bias, dropless; unscaled unless ``scaled``."""
    c.need(spec.router_scoring is RouterScoring.SOFTMAX, "router_scoring",
           f"{family} routes by softmax (sigmoid scoring is deepseek_v3)")
    c.need(not spec.router_selection_bias, "router_selection_bias",
           f"{family} selects by the scores alone (deepseek_v3 adds e_score_correction_bias)")
    if groups:
        c.need(spec.router_group_score is GroupScore.MAX, "router_group_score",
               f"{family} scores a group by its best expert (max; top2_sum is deepseek_v3)")
    else:
        c.need(spec.num_expert_groups == 1, "num_expert_groups",
               f"{family} routes over all experts (group-limited routing is deepseek_v2 and deepseek_v3)")
    if not scaled:
        c.need(spec.routed_scaling_factor == 1.0, "routed_scaling_factor",
               f"{family} does not scale the routed output (deepseek_v2 does)")
    c.need(spec.capacity_factor is None, "capacity_factor",
           f"{family} is dropless (capacity dropping changes the outputs)")


def _llama_config(spec: ModelSpec, c: SpecChecker) -> dict[str, Any]:
    cfg = _llama_like_config(spec, c, "llama")
    _dense_only(spec, c, "llama")
    c.need(spec.out_bias == spec.attention_bias, "attention_out_bias",
           "llama's attention_bias covers q/k/v and o_proj alike (qwen2 has q/k/v bias only)")
    c.need(spec.sliding_window is None, "sliding_window", "llama attends to the whole prefix (mistral has a window)")
    cfg.update(attention_bias=spec.attention_bias, mlp_bias=spec.mlp_bias, pretraining_tp=1)
    return cfg


def _no_biases(spec: ModelSpec, c: SpecChecker, family: str) -> None:
    c.need(not spec.attention_bias, "attention_bias", f"{family} has no q/k/v biases")
    c.need(not spec.out_bias, "attention_out_bias", f"{family} has no o_proj bias")
    c.need(not spec.mlp_bias, "mlp_bias", f"{family} has no MLP biases")


def _mistral_config(spec: ModelSpec, c: SpecChecker) -> dict[str, Any]:
    cfg = _llama_like_config(spec, c, "mistral")
    _dense_only(spec, c, "mistral")
    _no_biases(spec, c, "mistral")
    cfg["sliding_window"] = spec.sliding_window
    return cfg


def _qwen2_config(spec: ModelSpec, c: SpecChecker) -> dict[str, Any]:
    cfg = _llama_like_config(spec, c, "qwen2")
    _dense_only(spec, c, "qwen2")
    c.need(spec.attention_bias, "attention_bias", "qwen2 always has q/k/v biases")
    c.need(not spec.out_bias, "attention_out_bias", "qwen2 has no o_proj bias")
    c.need(not spec.mlp_bias, "mlp_bias", "qwen2 has no MLP biases")
    cfg.update(_qwen_window_config(spec))
    return cfg


def _qwen_window_config(spec: ModelSpec) -> dict[str, Any]:
    """``sliding_window`` as Qwen2 / Qwen3 write it: on every layer or none."""
    window = spec.sliding_window
    return dict(use_sliding_window=window is not None, sliding_window=window,
                max_window_layers=0 if window is not None else spec.num_layers,
                layer_types=["sliding_attention" if window is not None else "full_attention"] * spec.num_layers)


def _qwen3_config(spec: ModelSpec, c: SpecChecker) -> dict[str, Any]:
    cfg = _llama_like_config(spec, c, "qwen3", qk_norm=True)
    _dense_only(spec, c, "qwen3")
    c.need(spec.out_bias == spec.attention_bias, "attention_out_bias",
           "qwen3's attention_bias covers q/k/v and o_proj alike")
    c.need(not spec.mlp_bias, "mlp_bias", "qwen3 has no MLP biases")
    cfg.update(attention_bias=spec.attention_bias, **_qwen_window_config(spec))
    return cfg


def _mixtral_config(spec: ModelSpec, c: SpecChecker) -> dict[str, Any]:
    cfg = _llama_like_config(spec, c, "mixtral")
    _no_biases(spec, c, "mixtral")
    c.need(spec.use_moe, "use_moe", "mixtral's MLPs are mixtures of experts")
    if spec.use_moe:
        c.need(spec.norm_topk_prob, "norm_topk_prob", "mixtral always renormalises the top-k weights")
        _softmax_routing(spec, c, "mixtral")
        c.need(spec.first_dense_layers == 0, "first_dense_layers", "every mixtral layer is MoE (qwen2_moe has "
               "mlp_only_layers)")
        c.need(spec.num_shared_experts == 0, "num_shared_experts", "mixtral has no shared experts (qwen2_moe has one)")
        c.need(spec.moe_intermediate_size in (None, spec.ffn_size), "moe_intermediate_size",
               "mixtral's experts are intermediate_size wide")
    cfg.update(sliding_window=spec.sliding_window, num_local_experts=spec.num_experts,
               num_experts_per_tok=spec.num_experts_per_token, router_aux_loss_coef=spec.router_aux_loss_coef,
               router_jitter_noise=0.0, output_router_logits=False)
    return cfg


def _qwen2_moe_config(spec: ModelSpec, c: SpecChecker) -> dict[str, Any]:
    cfg = _llama_like_config(spec, c, "qwen2_moe")
    c.need(spec.use_moe, "use_moe", "qwen2_moe's MLPs are mixtures of experts (a dense model is qwen2)")
    c.need(not spec.out_bias, "attention_out_bias", "qwen2_moe has no o_proj bias")
    c.need(not spec.mlp_bias, "mlp_bias", "qwen2_moe has no MLP biases")
    c.need(spec.sliding_window is None, "sliding_window",
           "qwen2_moe's window pattern (even layers only) has no uniform ModelSpec equivalent")
    if spec.use_moe:
        _softmax_routing(spec, c, "qwen2_moe")
        c.need(spec.shared_expert_gate or not spec.num_shared_experts, "shared_expert_gate",
               "qwen2_moe always gates its shared expert by sigmoid(shared_expert_gate(x))")
    cfg.update(qkv_bias=spec.attention_bias, use_sliding_window=False, sliding_window=None,
               max_window_layers=spec.num_layers, layer_types=["full_attention"] * spec.num_layers,
               decoder_sparse_step=1, mlp_only_layers=list(range(spec.first_dense_layers)),
               num_experts=spec.num_experts, num_experts_per_tok=spec.num_experts_per_token,
               norm_topk_prob=spec.norm_topk_prob, moe_intermediate_size=spec.expert_ffn_size,
               # the shared experts are one fused MLP, so one qwen2_moe shared expert of their width
               shared_expert_intermediate_size=spec.shared_ffn_size,
               router_aux_loss_coef=spec.router_aux_loss_coef, output_router_logits=False)
    return cfg


def _qwen3_moe_config(spec: ModelSpec, c: SpecChecker) -> dict[str, Any]:
    cfg = _llama_like_config(spec, c, "qwen3_moe", qk_norm=True)
    c.need(spec.use_moe, "use_moe", "qwen3_moe's MLPs are mixtures of experts (a dense model is qwen3)")
    c.need(spec.out_bias == spec.attention_bias, "attention_out_bias",
           "qwen3_moe's attention_bias covers q/k/v and o_proj alike")
    c.need(not spec.mlp_bias, "mlp_bias", "qwen3_moe has no MLP biases")
    if spec.use_moe:
        _softmax_routing(spec, c, "qwen3_moe")
        c.need(spec.num_shared_experts == 0, "num_shared_experts",
               "qwen3_moe has no shared experts (qwen2_moe and deepseek_v2 have)")
    cfg.update(attention_bias=spec.attention_bias, use_sliding_window=spec.sliding_window is not None,
               sliding_window=spec.sliding_window, decoder_sparse_step=1,
               mlp_only_layers=list(range(spec.first_dense_layers)), num_experts=spec.num_experts,
               num_experts_per_tok=spec.num_experts_per_token, norm_topk_prob=spec.norm_topk_prob,
               moe_intermediate_size=spec.expert_ffn_size, router_aux_loss_coef=spec.router_aux_loss_coef,
               output_router_logits=False)
    return cfg


def _deepseek_config(spec: ModelSpec, c: SpecChecker, f: str) -> dict[str, Any]:
    """What deepseek_v2 and deepseek_v3 share: MLA, RMSNorm, a SiLU-GLU MLP without biases, ungated
    shared experts of the expert width, dense first layers; the router is each family's."""
    _standard_block(spec, c, f, attention=Attention.MLA)
    c.need(spec.norm_type is NormType.RMSNORM, "norm_type", f"{f} uses RMSNorm")
    c.need(spec.use_glu, "use_glu", f"{f}'s MLP is gated (down(act(gate(x)) * up(x)))")
    c.need(spec.activation in _LLAMA_ACT_NAMES, "activation", "no transformers activation name")
    c.need(spec.out_bias == spec.attention_bias, "attention_out_bias",
           f"{f}'s attention_bias covers q_a_proj, kv_a_proj_with_mqa and o_proj alike")
    c.need(not spec.mlp_bias, "mlp_bias", f"{f} has no MLP biases")
    c.need(spec.sliding_window is None, "sliding_window", f"{f} attends to the whole prefix")
    c.need(not spec.qk_norm, "qk_norm", f"{f} has no q/k norms")
    shared = 0
    if spec.use_moe:
        c.need(not spec.shared_expert_gate, "shared_expert_gate", f"{f}'s shared experts are ungated (qwen2_moe gates)")
        shared, rest = divmod(spec.shared_ffn_size, spec.expert_ffn_size)
        c.need(rest == 0, "shared_expert_intermediate_size",
               f"{f}'s shared experts are n_shared_experts * moe_intermediate_size={spec.expert_ffn_size} wide")
    return {"vocab_size": spec.vocab_size, "hidden_size": spec.hidden_size, "intermediate_size": spec.ffn_size,
            "num_hidden_layers": spec.num_layers, "num_attention_heads": spec.num_heads,
            "num_key_value_heads": spec.num_heads, "hidden_act": _LLAMA_ACT_NAMES.get(spec.activation, "silu"),
            "max_position_embeddings": spec.max_seq_len, "rms_norm_eps": spec.norm_eps,
            "tie_word_embeddings": spec.tie_embeddings, **_write_rope(spec), "attention_bias": spec.attention_bias,
            "attention_dropout": 0.0, "pretraining_tp": 1, "q_lora_rank": spec.q_lora_rank,
            "kv_lora_rank": spec.kv_lora_rank, "qk_nope_head_dim": spec.qk_nope_head_dim,
            "qk_rope_head_dim": spec.qk_rope_head_dim, "v_head_dim": spec.v_head_dim,
            "head_dim": spec.qk_rope_head_dim,
            # a dense spec: every layer dense (no expert is built; the expert fields are inert)
            "first_k_dense_replace": spec.first_dense_layers if spec.use_moe else spec.num_layers,
            "n_routed_experts": spec.num_experts, "num_experts_per_tok": spec.num_experts_per_token,
            "n_shared_experts": shared, "moe_intermediate_size": spec.expert_ffn_size,
            "routed_scaling_factor": spec.routed_scaling_factor, "n_group": spec.num_expert_groups,
            "topk_group": spec.topk_groups, "norm_topk_prob": spec.norm_topk_prob, "moe_layer_freq": 1,
            "aux_loss_alpha": spec.router_aux_loss_coef, "output_router_logits": False}


def _deepseek_v2_config(spec: ModelSpec, c: SpecChecker) -> dict[str, Any]:
    f = "deepseek_v2"
    cfg = _deepseek_config(spec, c, f)
    if spec.use_moe:
        _softmax_routing(spec, c, f, scaled=True, groups=True)
        c.need(not spec.norm_topk_prob, "norm_topk_prob", f"{f} never renormalises the top-k weights")
    grouped = spec.num_expert_groups > 1
    cfg.update(mlp_bias=False, scoring_func="softmax", norm_topk_prob=False,
               topk_method="group_limited_greedy" if grouped else "greedy")
    return cfg


def _deepseek_v3_config(spec: ModelSpec, c: SpecChecker) -> dict[str, Any]:
    f = "deepseek_v3"
    cfg = _deepseek_config(spec, c, f)
    if spec.use_moe:
        c.need(spec.capacity_factor is None, "capacity_factor",
               f"{f} is dropless (capacity dropping changes the outputs)")
        c.need(spec.router_scoring is RouterScoring.SIGMOID, "router_scoring", f"{f} routes by sigmoid scores")
        c.need(spec.router_selection_bias, "router_selection_bias",
               f"{f} always selects by score + e_score_correction_bias (its zeros would import as "
               "router_selection_bias=true)")
        c.need(spec.num_expert_groups == 1 or spec.router_group_score is GroupScore.TOP2_SUM, "router_group_score",
               f"{f} scores a group by the sum of its two best biased scores (top2_sum)")
        c.need(spec.num_experts // spec.num_expert_groups >= 2, "num_expert_groups",
               f"{f} scores each group by its two best experts (num_experts / num_expert_groups must be >= 2)")
    # router_bias_update_rate is a training setting (how the engines move the bias): not exported
    cfg.update(scoring_func="sigmoid", topk_method="noaux_tc", rope_interleave=True, num_nextn_predict_layers=0)
    return cfg


def _llama_weights(spec: ModelSpec, names: set[str] | None = None, *,
                   experts: Callable[..., list[WeightGroup]] | None = None,
                   attention: Callable[[ModelSpec, str, str], list[WeightGroup]] | None = None) -> list[WeightGroup]:
    """The Llama-style names; an MoE layer's MLP by ``experts`` (default: mixtral's), the attention
    by ``attention`` (default: q/k/v/o projections)."""
    experts = _mixtral_expert_groups if experts is None else experts
    attention = _mha_groups if attention is None else attention
    groups = [_rename("embed.weight", "model.embed_tokens.weight")]
    for i in range(spec.num_layers):
        h, p = f"model.layers.{i}", f"layers.{i}"
        groups += [_rename(f"{p}.attn_norm.weight", f"{h}.input_layernorm.weight"),
                   _rename(f"{p}.mlp_norm.weight", f"{h}.post_attention_layernorm.weight")]
        groups += attention(spec, f"{p}.attn", f"{h}.self_attn")
        if spec.is_moe_layer(i):
            groups += experts(spec, p, h, names)
        else:
            for n in ("gate", "up", "down"):
                groups.append(_rename(f"{p}.mlp.{n}_proj.weight", f"{h}.mlp.{n}_proj.weight"))
                if spec.mlp_bias:
                    groups.append(_rename(f"{p}.mlp.{n}_proj.bias", f"{h}.mlp.{n}_proj.bias"))
    groups.append(_rename("final_norm.weight", "model.norm.weight"))
    if not spec.tie_embeddings:
        groups.append(_rename("lm_head.weight", "lm_head.weight"))
    return groups


def _mha_groups(spec: ModelSpec, p: str, h: str) -> list[WeightGroup]:
    """q/k/v/o projections (biases as the spec has them) and Qwen3's per-head q/k norms."""
    groups = []
    for n in "qkvo":
        groups.append(_rename(f"{p}.{n}_proj.weight", f"{h}.{n}_proj.weight"))
        if (spec.out_bias if n == "o" else spec.attention_bias):
            groups.append(_rename(f"{p}.{n}_proj.bias", f"{h}.{n}_proj.bias"))
    if spec.qk_norm:
        groups += [_rename(f"{p}.{n}_norm.weight", f"{h}.{n}_norm.weight") for n in "qk"]
    return groups


def _interleaved_rope_order(spec: ModelSpec, rows_before: int, block: int, blocks: int) -> np.ndarray:
    """Row order taking DeepSeek-V2's interleaved rope rows to our rotate-half layout: in each of
    ``blocks`` blocks of ``block`` rows, the ``qk_rope_head_dim`` rows after ``rows_before`` go from
    pairs (2i, 2i+1) to halves (i, i + p/2), i.e. rows 0, 2, 4, ..., 1, 3, 5, ... of the rope part."""
    rope = spec.qk_rope_head_dim
    within = np.concatenate([np.arange(rows_before), rows_before + np.arange(0, rope, 2),
                             rows_before + np.arange(1, rope, 2), np.arange(rows_before + rope, block)])
    return np.concatenate([b * block + within for b in range(blocks)])


def _reordered_rows(canonical: str, hf: str, order: np.ndarray) -> WeightGroup:
    """A tensor whose canonical rows are the HF rows taken in ``order`` (weights and biases alike)."""
    inverse = np.argsort(order)
    return WeightGroup((canonical,), (hf,), lambda xs: [xs[0][inverse]], lambda xs: [xs[0][order]])


def _mla_groups(spec: ModelSpec, p: str, h: str) -> list[WeightGroup]:
    """DeepSeek-V2's MLA names (ours are the same); the rope rows of the query projection and of
    ``kv_a_proj_with_mqa`` reordered from interleaved pairs to rotate-half (the q.k products, so the
    logits, are unchanged: queries and keys get the same order)."""
    heads, n, r = spec.num_heads, spec.qk_nope_head_dim, spec.kv_lora_rank
    q_order = _interleaved_rope_order(spec, n, spec.qk_head_dim, heads)
    if spec.q_lora_rank is None:
        groups = [_reordered_rows(f"{p}.q_proj.weight", f"{h}.q_proj.weight", q_order)]
    else:
        groups = [_rename(f"{p}.q_a_proj.weight", f"{h}.q_a_proj.weight"),
                  _rename(f"{p}.q_a_layernorm.weight", f"{h}.q_a_layernorm.weight"),
                  _reordered_rows(f"{p}.q_b_proj.weight", f"{h}.q_b_proj.weight", q_order)]
        if spec.attention_bias:
            groups.append(_rename(f"{p}.q_a_proj.bias", f"{h}.q_a_proj.bias"))
    kv_order = _interleaved_rope_order(spec, r, r + spec.qk_rope_head_dim, 1)
    groups += [_reordered_rows(f"{p}.kv_a_proj_with_mqa.{w}", f"{h}.kv_a_proj_with_mqa.{w}", kv_order)
               for w in ("weight", "bias")[:1 + spec.attention_bias]]
    groups += [_rename(f"{p}.{name}.weight", f"{h}.{name}.weight")
               for name in ("kv_a_layernorm", "kv_b_proj", "o_proj")]
    if spec.out_bias:
        groups.append(_rename(f"{p}.o_proj.bias", f"{h}.o_proj.bias"))
    return groups


def _mixtral_expert_groups(spec: ModelSpec, p: str, h: str, names: set[str] | None) -> list[WeightGroup]:
    """Mixtral experts: per-expert ``block_sparse_moe.experts.{e}.w1/w2/w3`` (the on-disk format every
    transformers version writes and reads; w1 = gate, w3 = up, w2 = down), or the transformers-5
    in-memory layout ``mlp.experts.gate_up_proj`` (E, 2F, D; gate rows first) + ``down_proj``,
    chosen by which names the file holds. Export writes the per-expert format."""
    e = range(spec.num_experts)
    if names is not None and f"{h}.mlp.experts.gate_up_proj" in names:
        return [_rename(f"{p}.mlp.router.weight", f"{h}.mlp.gate.weight"),
                _concat((f"{p}.mlp.experts.gate_proj.weight", f"{p}.mlp.experts.up_proj.weight"),
                        f"{h}.mlp.experts.gate_up_proj", axis=1),
                _rename(f"{p}.mlp.experts.down_proj.weight", f"{h}.mlp.experts.down_proj")]
    m = f"{h}.block_sparse_moe"
    return [_rename(f"{p}.mlp.router.weight", f"{m}.gate.weight"),
            _stacked(f"{p}.mlp.experts.gate_proj.weight", tuple(f"{m}.experts.{j}.w1.weight" for j in e)),
            _stacked(f"{p}.mlp.experts.up_proj.weight", tuple(f"{m}.experts.{j}.w3.weight" for j in e)),
            _stacked(f"{p}.mlp.experts.down_proj.weight", tuple(f"{m}.experts.{j}.w2.weight" for j in e))]


def _routed_expert_groups(spec: ModelSpec, p: str, m: str, names: set[str] | None) -> list[WeightGroup]:
    """The router ``{m}.gate`` and the experts of the Qwen-MoE and DeepSeek files: per-expert
    ``{m}.experts.{e}.{gate,up,down}_proj`` on disk, or the transformers-5 in-memory
    ``{m}.experts.gate_up_proj`` (E, 2F, D; gate rows first) + ``down_proj`` (chosen by the names,
    as for mixtral). Export writes the per-expert format."""
    groups = [_rename(f"{p}.mlp.router.weight", f"{m}.gate.weight")]
    if names is not None and f"{m}.experts.gate_up_proj" in names:
        return groups + [_concat((f"{p}.mlp.experts.gate_proj.weight", f"{p}.mlp.experts.up_proj.weight"),
                                 f"{m}.experts.gate_up_proj", axis=1),
                         _rename(f"{p}.mlp.experts.down_proj.weight", f"{m}.experts.down_proj")]
    return groups + [_stacked(f"{p}.mlp.experts.{n}_proj.weight",
                              tuple(f"{m}.experts.{j}.{n}_proj.weight" for j in range(spec.num_experts)))
                     for n in ("gate", "up", "down")]


def _shared_mlp_groups(spec: ModelSpec, p: str, shared: str, *, gate: str | None = None) -> list[WeightGroup]:
    """The fused shared experts ``{shared}.{gate,up,down}_proj`` (and a sigmoid gate ``gate``). A file
    without shared experts still holds them at width 0 (and the gate on nothing): exported as
    such, ignored on import."""
    hf = tuple(f"{shared}.{n}_proj.weight" for n in ("gate", "up", "down"))
    if spec.num_shared_experts:
        groups = [_rename(f"{p}.mlp.shared.{n}_proj.weight", name)
                  for n, name in zip(("gate", "up", "down"), hf, strict=True)]
        return groups + ([_rename(f"{p}.mlp.shared_gate.weight", gate)] if gate else [])
    d = spec.hidden_size
    empty = [np.zeros((0, d), np.float32), np.zeros((0, d), np.float32), np.zeros((d, 0), np.float32)]
    if gate:
        hf, empty = (*hf, gate), [*empty, np.zeros((1, d), np.float32)]
    return [WeightGroup((), hf, lambda xs: empty, lambda xs: [])]


def _qwen2_moe_expert_groups(spec: ModelSpec, p: str, h: str, names: set[str] | None) -> list[WeightGroup]:
    """Qwen2-MoE: the routed experts, one shared expert ``mlp.shared_expert.*`` gated by
    ``mlp.shared_expert_gate``."""
    m = f"{h}.mlp"
    return (_routed_expert_groups(spec, p, m, names)
            + _shared_mlp_groups(spec, p, f"{m}.shared_expert", gate=f"{m}.shared_expert_gate.weight"))


def _qwen3_moe_expert_groups(spec: ModelSpec, p: str, h: str, names: set[str] | None) -> list[WeightGroup]:
    return _routed_expert_groups(spec, p, f"{h}.mlp", names)


def _deepseek_v2_expert_groups(spec: ModelSpec, p: str, h: str, names: set[str] | None) -> list[WeightGroup]:
    """DeepSeek-V2: the routed experts and the ungated fused ``mlp.shared_experts.*``."""
    return _routed_expert_groups(spec, p, f"{h}.mlp", names) + _shared_mlp_groups(spec, p, f"{h}.mlp.shared_experts")


def _deepseek_v3_expert_groups(spec: ModelSpec, p: str, h: str, names: set[str] | None) -> list[WeightGroup]:
    """DeepSeek-V3: DeepSeek-V2's experts and the router's ``e_score_correction_bias`` (our selection bias)."""
    return ([_rename(f"{p}.mlp.router.selection_bias", f"{h}.mlp.gate.e_score_correction_bias")]
            + _deepseek_v2_expert_groups(spec, p, h, names))


def _mtp_groups(spec: ModelSpec, names: set[str] | None) -> list[WeightGroup]:
    """The multi-token-prediction modules of a DeepSeek-V3 file (``model.layers.{i}`` past the last
    decoder layer, each with an ``eh_proj``): read and dropped on import (the causal LM never uses
    them), never written."""
    layers = {int(n.split(".")[2]) for n in names or () if n.startswith("model.layers.") and n.endswith(".eh_proj.weight")}
    mtp = tuple(sorted(n for n in names or () if n.startswith("model.layers.")
                       and int(n.split(".")[2]) in layers and int(n.split(".")[2]) >= spec.num_layers))
    return [WeightGroup((), mtp, lambda xs: [], lambda xs: [])] if mtp else []


def _qwen2_moe_weights(spec: ModelSpec, names: set[str] | None = None) -> list[WeightGroup]:
    return _llama_weights(spec, names, experts=_qwen2_moe_expert_groups)


def _qwen3_moe_weights(spec: ModelSpec, names: set[str] | None = None) -> list[WeightGroup]:
    return _llama_weights(spec, names, experts=_qwen3_moe_expert_groups)


def _deepseek_v2_weights(spec: ModelSpec, names: set[str] | None = None) -> list[WeightGroup]:
    return _llama_weights(spec, names, experts=_deepseek_v2_expert_groups, attention=_mla_groups)


def _deepseek_v3_weights(spec: ModelSpec, names: set[str] | None = None) -> list[WeightGroup]:
    return (_llama_weights(spec, names, experts=_deepseek_v3_expert_groups, attention=_mla_groups)
            + _mtp_groups(spec, names))


def _llama_ignored(name: str) -> bool:
    return name.endswith("rotary_emb.inv_freq")  # a buffer some older checkpoints saved


# ---------------------------------------------------------------------- the registry
FAMILIES: dict[str, Family] = {
    f.name: f for f in (
        Family("gpt2", "gpt2", "GPT2LMHeadModel", _gpt2_spec, _gpt2_config, _gpt2_weights,
               _gpt2_ignored, _gpt2_normalise),
        Family("llama", "llama", "LlamaForCausalLM", _llama_spec, _llama_config, _llama_weights, _llama_ignored),
        Family("mistral", "mistral", "MistralForCausalLM", _mistral_spec, _mistral_config, _llama_weights,
               _llama_ignored),
        Family("qwen2", "qwen2", "Qwen2ForCausalLM", _qwen2_spec, _qwen2_config, _llama_weights, _llama_ignored),
        Family("mixtral", "mixtral", "MixtralForCausalLM", _mixtral_spec, _mixtral_config, _llama_weights,
               _llama_ignored),
        Family("qwen2_moe", "qwen2_moe", "Qwen2MoeForCausalLM", _qwen2_moe_spec, _qwen2_moe_config,
               _qwen2_moe_weights, _llama_ignored),
        Family("qwen3", "qwen3", "Qwen3ForCausalLM", _qwen3_spec, _qwen3_config, _llama_weights, _llama_ignored),
        Family("qwen3_moe", "qwen3_moe", "Qwen3MoeForCausalLM", _qwen3_moe_spec, _qwen3_moe_config,
               _qwen3_moe_weights, _llama_ignored),
        Family("deepseek_v2", "deepseek_v2", "DeepseekV2ForCausalLM", _deepseek_spec, _deepseek_v2_config,
               _deepseek_v2_weights, _llama_ignored),
        Family("deepseek_v3", "deepseek_v3", "DeepseekV3ForCausalLM", _deepseek_v3_spec, _deepseek_v3_config,
               _deepseek_v3_weights, _llama_ignored),
    )
}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise HFError(f"unknown family {name!r}; supported: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_for_config(cfg: dict[str, Any]) -> Family:
    """The family of a config.json dict, from ``model_type`` (or ``architectures``)."""
    model_type = cfg.get("model_type")
    for f in FAMILIES.values():
        if model_type == f.model_type:
            return f
    archs = cfg.get("architectures") or []
    for f in FAMILIES.values():
        if f.architecture in archs:
            return f
    raise HFError(f"model_type={model_type!r} (architectures={archs}) is not a supported family; "
                  f"supported model_type values: {', '.join(f.model_type for f in FAMILIES.values())}")


def infer_family(spec: ModelSpec, preferred: Iterable[str] = ()) -> Family:
    """The first family (``preferred`` first, then the ``FAMILIES`` order) that can
    express ``spec``; one HFError with every family's reasons when none can."""
    order = [*preferred, *FAMILIES]
    reasons = []
    for name in dict.fromkeys(order):
        if name not in FAMILIES:
            continue
        problems = FAMILIES[name].can_express(spec)
        if not problems:
            return FAMILIES[name]
        reasons.append(f"{name}: " + "; ".join(problems))
    raise HFError("no supported family can express this spec:\n  - " + "\n  - ".join(reasons))

