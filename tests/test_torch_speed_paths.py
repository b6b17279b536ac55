"""The torch fast paths the benchmark uses compute what the reference paths compute.

* ``forward(..., return_logits=False)``: same loss and gradients, no logits returned.
* ``moe_impl = "blocked"``: the sort-based dispatch gives the dense path's outputs and gradients.

The flax half is ``tests/test_flax_speed_paths.py``; the cross-backend check of the blocked paths
is ``parity_tests/test_speed_paths_parity.py``.
"""

from __future__ import annotations

import pytest
import torch
from speed_cases import MOE_SPECS, SPEC, batch

from backends.torch import from_spec


@pytest.mark.parametrize("autocast", [False, True])
def test_torch_loss_only_path_matches(autocast):
    ids, tgt = (torch.as_tensor(a) for a in batch())
    grads = []
    losses = []
    for return_logits in (True, False):
        model = from_spec(SPEC, seed=1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(ids, tgt, return_logits=return_logits)
        assert (out.logits is None) == (not return_logits)
        if return_logits:
            assert out.logits.dtype == torch.float32
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert torch.equal(losses[0], losses[1])
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


def test_torch_loss_only_needs_targets():
    model = from_spec(SPEC)
    with pytest.raises(ValueError, match="needs targets"):
        model(torch.zeros((1, 4), dtype=torch.long), return_logits=False)


def test_block_rows_and_padding():
    from llm.moe_dispatch import block_rows, padded_rows

    assert block_rows(16384 * 2, 8) == 1024 and block_rows(10, 8) == 16 and block_rows(10**9, 2) == 2048
    for a, e in [(72, 4), (32768, 8), (5, 3)]:
        b = block_rows(a, e)
        p = padded_rows(a, e, b)
        assert p % b == 0 and p >= a + e * (b - 1) and p - (a + e * (b - 1)) < b


@pytest.mark.parametrize("name", list(MOE_SPECS))
def test_torch_blocked_moe_matches_dense(name):
    spec = MOE_SPECS[name]
    ids, tgt = (torch.as_tensor(a) for a in batch(seed=7))
    outs = {}
    for impl in ("dense", "blocked"):
        model = from_spec(spec, seed=2).double()
        for m in model.modules():
            if hasattr(m, "moe_impl"):
                m.moe_impl = impl
        out = model(ids, tgt)
        (out.loss + out.aux_loss + out.z_loss).backward()
        outs[impl] = (out, {n: p.grad.clone() for n, p in model.named_parameters()})
    (a, ga), (b, gb) = outs["dense"], outs["blocked"]
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-12, atol=0)
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-9, atol=1e-13, msg=n)
    model.layers[0].mlp.moe_impl = "sparse"
    with pytest.raises(ValueError, match="not one of: dense, blocked"):
        model(ids, tgt)
