"""Planted bugs: deliberate mistakes in one backend that the CI parity checks must catch.

Each ``Mutant`` patches the model code of ONE backend at test time (pytest's ``monkeypatch``, undone
after the test; ``backends/`` itself is never edited) and names the parity check(s) that must fail
with it (``parity_tests/test_mutants.py`` runs them, ``CHECKS`` there). A mutant is written as a
wrapper around the real method wherever possible, so the bug is the only difference: e.g. LayerNorm
``(y + b) * w`` is the real ``y * w + b`` plus ``b * (w - 1)``.

The catalogue with its checks is in ``docs/architecture.md``, "Planted bugs the parity suite catches".
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import pytest
import torch

import backends.flax.model as fm
import backends.torch.model as tm
from llm.spec import GroupScore, ModelSpec

MODEL = {"torch": tm, "jax": fm}
CALL = {"torch": "forward", "jax": "__call__"}  # the method a module runs when called
LINEAR = {"torch": torch.nn.Linear, "jax": fm.Linear}


@dataclass(frozen=True)
class Mutant:
    name: str
    breaks: str  # what the bug is, in the words of the contract it breaks
    checks: tuple[str, ...]  # keys of test_mutants.CHECKS; each must fail with the mutant
    apply: Callable[[pytest.MonkeyPatch, str], None]  # (monkeypatch, backend "torch" | "jax")
    fast: bool = False  # in the subset ``make test`` runs (there with its first check only)


class _Shim:
    """A module's namespace with a few names replaced, everything else delegated."""

    def __init__(self, base: object, **replaced: object):
        self._base, self._replaced = base, replaced

    def __getattr__(self, name: str) -> object:
        return self._replaced[name] if name in self._replaced else getattr(self._base, name)


def _wrap(mp: pytest.MonkeyPatch, cls: type, method: str, make: Callable[[Callable], Callable]) -> None:
    """Replace ``cls.method`` by ``make(original)``."""
    mp.setattr(cls, method, make(getattr(cls, method)))


def _hold_while_attending(mp: pytest.MonkeyPatch, backend: str, held: dict,
                          what: Callable[[object], dict]) -> None:
    """While a ``MultiHeadAttention`` runs, ``held`` holds ``what(layer)``; it is cleared after."""
    def make(orig):
        def call(self, x, *args, **kwargs):
            held.update(what(self))
            try:
                return orig(self, x, *args, **kwargs)
            finally:
                held.clear()
        return call
    _wrap(mp, MODEL[backend].MultiHeadAttention, CALL[backend], make)


def _patch_spec(mp: pytest.MonkeyPatch, cls: type, backend: str, change: Callable[[ModelSpec], ModelSpec]) -> None:
    """Every ``cls`` module sees ``change(spec)`` as its spec; the rest of the model sees the real one."""
    if backend == "torch":  # the torch modules assign self.spec in __init__: keep it aside
        prop = property(lambda self: change(self.__dict__["_real_spec"]),
                        lambda self, spec: self.__dict__.__setitem__("_real_spec", spec))
    else:  # flax modules read the spec through a property of _SpecModule
        prop = property(lambda self: change(self._spec_ref.spec))
    mp.setattr(cls, "spec", prop, raising=False)  # torch: not a class attribute until now


def _flip_tokens(backend: str, x):
    return x.flip(0) if backend == "torch" else x[::-1]


# ---------------------------------------------------------------------- norms
def layernorm_order(mp, backend):
    def make(orig):
        def call(self, x):  # (y + b) * w = (y * w + b) + b * (w - 1)
            return orig(self, x) + self.bias[...] * (self.weight[...] - 1)
        return call
    _wrap(mp, MODEL[backend].LayerNorm, CALL[backend], make)


def rmsnorm_eps_outside_root(mp, backend):
    def make(orig):
        def call(self, x):  # w * x / (sqrt(ms) + eps) instead of w * x / sqrt(ms + eps)
            ms = (x.float() ** 2).mean(-1, keepdim=True) if backend == "torch" else jnp.mean(x * x, -1, keepdims=True)
            return orig(self, x) * (ms + self.eps) ** 0.5 / (ms ** 0.5 + self.eps)
        return call
    _wrap(mp, MODEL[backend].RMSNorm, CALL[backend], make)


# ---------------------------------------------------------------------- attention
def rope_direction(mp, backend):
    rotate_half = MODEL[backend]._rotate_half
    mp.setattr(MODEL[backend], "_rotate_half", lambda x: -rotate_half(x))  # rotates by -theta


def rope_ignores_start_pos(mp, backend):
    _wrap(mp, MODEL[backend].MultiHeadAttention, "_rope",
          lambda orig: lambda self, x, start_pos, *rest: orig(self, x, 0, *rest))


def attention_scale(mp, backend):
    import math

    mp.setattr(MODEL[backend], "math", _Shim(math, sqrt=lambda v: v))  # scores / head_dim, not / sqrt(head_dim)


def qk_bias_after_rope(mp, backend):
    turn = itertools.cycle(["q_proj", "k_proj"])  # forward rotates q, then k

    def make(orig):
        def rope(self, x, start_pos, *rest):
            bias = getattr(self, next(turn)).bias
            if bias is None:
                return orig(self, x, start_pos, *rest)
            b = bias[...].reshape(-1, self.head_dim)  # (heads, hd)
            return orig(self, x - b, start_pos, *rest) + b  # rope(W x) + b instead of rope(W x + b)
        return rope
    _wrap(mp, MODEL[backend].MultiHeadAttention, "_rope", make)


def k_norm_after_rope(mp, backend):
    """The key norm runs on the rotated keys: norm(rope(k)) instead of rope(norm(k)). The rotation
    keeps each head's mean square, so only a norm weight away from 1 shows it."""
    cls, norm_cls = MODEL[backend].MultiHeadAttention, MODEL[backend].RMSNorm
    norm = getattr(norm_cls, CALL[backend])  # the real norm, kept before the patch below
    held: dict[str, object] = {}
    turn = itertools.cycle(["q", "k"])  # forward rotates q, then k

    def make_norm(orig):
        def call(self, x):
            return x if self is held.get("k_norm") else orig(self, x)  # skipped before the rotation
        return call

    def make_rope(orig):
        def rope(self, x, start_pos, *rest):
            y = orig(self, x, start_pos, *rest)
            return norm(held["k_norm"], y) if next(turn) == "k" and held.get("k_norm") is not None else y
        return rope
    _hold_while_attending(mp, backend, held, lambda layer: {"k_norm": getattr(layer, "k_norm", None)})
    _wrap(mp, norm_cls, CALL[backend], make_norm)
    _wrap(mp, cls, "_rope", make_rope)


def gqa_head_grouping(mp, backend):
    """Query head h reads kv head h % KV instead of h // G: the attention runs on query heads
    reordered so that slot s (which reads kv s // G) holds head (s % G) * KV + s // G, and o_proj
    gets the heads back in order."""
    active: dict[str, object] = {}
    linear = LINEAR[backend]

    def columns(heads: list[int], hd: int) -> list[int]:
        return [h * hd + j for h in heads for j in range(hd)]

    def hold(layer) -> dict:
        H, K, hd = layer.num_heads, layer.num_kv_heads, layer.head_dim
        G = H // K
        perm = [(s % G) * K + s // G for s in range(H)]
        return dict(q=layer.q_proj, o=layer.o_proj, q_cols=columns(perm, hd),
                    o_cols=columns(sorted(range(H), key=perm.__getitem__), hd))

    def make_linear(orig):
        def call(self, x):
            if self is active.get("o"):
                x = x[..., active["o_cols"]]
            y = orig(self, x)
            return y[..., active["q_cols"]] if self is active.get("q") else y
        return call
    _hold_while_attending(mp, backend, active, hold)
    _wrap(mp, linear, CALL[backend], make_linear)


def sliding_window_off_by_one(mp, backend):
    def wider(spec):  # keys j with i - window <= j <= i: window + 1 of them
        return spec if spec.sliding_window is None else spec.replace(sliding_window=spec.sliding_window + 1)
    _patch_spec(mp, MODEL[backend].MultiHeadAttention, backend, wider)


# ---------------------------------------------------------------------- MoE
def moe_renormalisation(mp, backend):
    _patch_spec(mp, MODEL[backend].MoE, backend, lambda spec: spec.replace(norm_topk_prob=not spec.norm_topk_prob))


def moe_ties_to_higher_index(mp, backend):
    """Equal router probabilities go to the higher expert: the top-k runs on the experts reversed."""
    if backend == "torch":
        def sort(x, dim=-1, descending=False, stable=False):
            values, idx = torch.sort(x.flip(dim), dim=dim, descending=descending, stable=stable)
            return values, x.shape[dim] - 1 - idx
        mp.setattr(tm, "torch", _Shim(torch, sort=sort))
    else:
        def top_k(x, k):
            values, idx = jax.lax.top_k(x[..., ::-1], k)
            return values, x.shape[-1] - 1 - idx
        mp.setattr(fm, "jax", _Shim(jax, lax=_Shim(jax.lax, top_k=top_k)))


def group_score_max_for_top2_sum(mp, backend):
    """``router_group_score=top2_sum`` scores each group by its best expert alone (the ``max`` rule)."""
    mp.setattr(MODEL[backend], "GroupScore", _Shim(GroupScore, TOP2_SUM=object()))  # no spec is top2_sum


def selection_bias_in_weights(mp, backend):
    """The selection bias is added to the chosen experts' weights too, not only to their choice."""
    def make(orig):
        def route(self, x):
            combine, idx, logits, probs = orig(self, x)
            if backend == "torch":
                chosen = torch.nn.functional.one_hot(idx, combine.shape[-1]).sum(1).to(combine.dtype)
                return combine + chosen * self.router.selection_bias, idx, logits, probs
            chosen = jax.nn.one_hot(idx, combine.shape[-1], dtype=combine.dtype).sum(1)
            return combine + chosen * self.router.selection_bias[...], idx, logits, probs
        return route
    _wrap(mp, MODEL[backend].MoE, "route", make)


def capacity_drop_order(mp, backend):
    """Capacity keeps the LAST tokens routed to a full expert, not the first (ranks counted from the end)."""
    def make(orig):
        def route(self, x):
            return tuple(_flip_tokens(backend, t) for t in orig(self, _flip_tokens(backend, x)))
        return route
    _wrap(mp, MODEL[backend].MoE, "route", make)


def aux_loss_without_num_experts(mp, backend):
    def make(orig):
        def call(self, x):
            y, balance, z, load = orig(self, x)
            return y, balance / self.spec.num_experts, z, load  # sum_e f_e P_e, missing the factor E
        return call
    _wrap(mp, MODEL[backend].MoE, CALL[backend], make)


def z_loss_summed(mp, backend):
    def make(orig):
        def call(self, x):
            y, balance, z, load = orig(self, x)
            return y, balance, z * (x.shape[0] * x.shape[1]), load  # sum over tokens instead of the mean
        return call
    _wrap(mp, MODEL[backend].MoE, CALL[backend], make)


# ---------------------------------------------------------------------- embeddings and head
def tied_head_detached(mp, backend):
    """The tied output projection carries no gradient to the shared table (only the lookup does)."""
    if backend == "torch":
        tied: dict[str, object] = {}

        def linear(x, weight, bias=None):
            return torch.nn.functional.linear(x, weight.detach() if weight is tied.get("w") else weight, bias)

        def make(orig):
            def call(self, *args, **kwargs):
                tied["w"] = self.embed.weight if self.lm_head is None else None
                try:
                    return orig(self, *args, **kwargs)
                finally:
                    tied.clear()
            return call
        mp.setattr(tm, "F", _Shim(torch.nn.functional, linear=linear))
        _wrap(mp, tm.DecoderModel, "forward", make)
    else:
        def attend(self, x):
            return jnp.einsum("BTD,VD->BTV", x.astype(self.dtype),
                              jax.lax.stop_gradient(self.weight[...]).astype(self.dtype))
        mp.setattr(fm.EmbeddingLayer, "attend", attend)


def position_ignores_start_pos(mp, backend):
    """The absolute position table is read from row 0 on every call: right for a full forward, wrong
    for every cached decoding step."""
    def make(orig):
        def call(self, input_ids, start_pos=0, **kwargs):
            return orig(self, input_ids, 0, **kwargs)
        return call
    _wrap(mp, MODEL[backend].EmbeddingLayer, CALL[backend], make)


MUTANTS = (
    Mutant("layernorm_order", "LayerNorm computes (y + b) * w instead of y * w + b",
           ("component:norm", "model:layernorm"), layernorm_order, fast=True),
    Mutant("rmsnorm_eps_outside_root", "RMSNorm divides by sqrt(ms) + eps instead of sqrt(ms + eps)",
           ("model:rmsnorm",), rmsnorm_eps_outside_root),
    Mutant("rope_direction", "RoPE rotates by -theta (rotate-half with the sign on the wrong half)",
           ("component:attention_rope",), rope_direction, fast=True),
    Mutant("rope_ignores_start_pos", "RoPE rotates every call from position 0, so cached decoding steps "
           "are rotated as position 0", ("decode:rope",), rope_ignores_start_pos),
    Mutant("attention_scale", "attention scores scaled by 1/head_dim instead of 1/sqrt(head_dim)",
           ("component:attention_rope",), attention_scale),
    Mutant("qk_bias_after_rope", "q/k biases added after the rotation instead of before it",
           ("component:attention_rope",), qk_bias_after_rope, fast=True),
    Mutant("k_norm_after_rope", "the key norm (qk_norm) applied after the rotation instead of before it",
           ("component:attention_qk_norm",), k_norm_after_rope, fast=True),
    Mutant("gqa_head_grouping", "query head h reads kv head h % num_kv_heads instead of h // group",
           ("component:attention_gqa",), gqa_head_grouping, fast=True),
    Mutant("sliding_window_off_by_one", "the window admits window + 1 keys (j >= i - window)",
           ("component:attention_window",), sliding_window_off_by_one),
    Mutant("moe_renormalisation", "norm_topk_prob inverted: top-k weights renormalised when they must "
           "not be, and the reverse", ("component:moe", "model:moe"), moe_renormalisation, fast=True),
    Mutant("moe_ties_to_higher_index", "router ties go to the higher expert index",
           ("moe_ties",), moe_ties_to_higher_index),
    Mutant("capacity_drop_order", "a full expert keeps the last tokens routed to it, not the first",
           ("component:moe_capacity",), capacity_drop_order),
    Mutant("group_score_max_for_top2_sum", "group-limited routing scores a group by its best expert where "
           "top2_sum (its two best, DeepSeek-V3) is configured", ("component:moe_routing", "model:moe_routing"),
           group_score_max_for_top2_sum, fast=True),
    Mutant("selection_bias_in_weights", "the router's selection bias added to the chosen experts' weights "
           "as well as to their choice", ("component:moe_routing", "model:moe_routing"),
           selection_bias_in_weights, fast=True),
    Mutant("aux_loss_without_num_experts", "balance loss sum_e f_e P_e, missing the factor E",
           ("model:moe",), aux_loss_without_num_experts),
    Mutant("z_loss_summed", "router z-loss summed over tokens instead of averaged",
           ("model:moe",), z_loss_summed),
    Mutant("tied_head_detached", "the tied output projection passes no gradient to the embedding table",
           ("model:tied",), tied_head_detached),
    Mutant("position_ignores_start_pos", "the learned position table is read from row 0 on every call, "
           "so cached decoding steps get position 0", ("decode:learned",), position_ignores_start_pos),
)
BY_NAME = {m.name: m for m in MUTANTS}
