"""``model.norm_position`` (pre / post) and ``model.lm_head_bias`` in both backends: the same logits
and gradients at weights drawn away from their init (norm weights, biases, the head's bias), where a
mistake in how a norm or a bias is applied shows, and the post-norm block is ``norm(x + f(x))``."""

from __future__ import annotations

import numpy as np
import pytest

from llm.parity import Tolerances, compare, flax_pass, make_batch, torch_pass
from llm.spec import ModelSpec, init_params

BASE = dict(vocab_size=40, max_seq_len=16, hidden_size=16, num_layers=2, num_heads=4, num_kv_heads=2)


def _perturbed(spec: ModelSpec, seed: int) -> dict[str, np.ndarray]:
    """``init_params`` with every norm weight, bias and the head bias moved off 1 / 0."""
    rng = np.random.default_rng(seed)
    params = init_params(spec, seed)
    for name, value in params.items():
        if name.endswith("norm.weight"):
            params[name] = (value + rng.normal(0, 0.3, value.shape)).astype(np.float32)
        elif name.endswith(".bias"):
            params[name] = rng.normal(0, 0.3, value.shape).astype(np.float32)
    return params


# every pair of (norm type, norm position, head bias) once
@pytest.mark.parametrize("norm_type,norm_position,lm_head_bias", [
    ("layernorm", "pre", False), ("layernorm", "post", True), ("rmsnorm", "pre", True), ("rmsnorm", "post", False)])
def test_norm_position_and_head_bias_agree_across_backends(norm_type, norm_position, lm_head_bias):
    spec = ModelSpec(**BASE, norm_type=norm_type, norm_position=norm_position, lm_head_bias=lm_head_bias,
                     attention_bias=True, mlp_bias=True)
    params = _perturbed(spec, 3)
    ids, targets = make_batch(spec, 2, 12, 3)
    report = compare(spec, torch_pass(spec, params, ids, targets), flax_pass(spec, params, ids, targets))
    assert report["ok"], {k: report[k] for k in ("logits_rel_err", "grad_max_rel_err", "grad_worst_param")}
    if lm_head_bias:
        assert report["grads"]["lm_head.bias"]["norm"] > 0


def test_post_norm_is_not_pre_norm_and_the_head_bias_is_added():
    pre = ModelSpec(**BASE, lm_head_bias=True)
    post = pre.replace(norm_position="post")
    params = _perturbed(pre, 5)
    ids, targets = make_batch(pre, 1, 8, 5)
    a, b = torch_pass(pre, params, ids, targets), torch_pass(post, params, ids, targets)
    assert np.abs(a.logits - b.logits).max() > 1e-2  # the two orders are different functions
    shifted = dict(params, **{"lm_head.bias": params["lm_head.bias"] + 1.0})
    c = torch_pass(pre, shifted, ids, targets)
    np.testing.assert_allclose(c.logits - a.logits, 1.0, atol=1e-5)
    assert Tolerances().logits_rel <= 1e-5
