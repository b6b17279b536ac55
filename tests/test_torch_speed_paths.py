"""The torch fast paths the benchmark uses compute what the reference paths compute.

* ``forward(..., return_logits=False)``: same loss and gradients, no logits returned.
* ``moe_impl`` ``"blocked"`` and ``"grouped"``: the sort-based dispatches give the dense path's
  outputs and every gradient (router included), on fixed models and on drawn MoE layers with top-k
  1..3, capacity drops and exact router ties; ``grouped_mm``'s run-by-run fallback is
  ``torch._grouped_mm``'s function; ``resolve_moe_impl`` picks per backend, device and dtype; the
  engine builds the impl ``optimization.moe_impl`` resolves to.

The flax half is ``tests/test_flax_speed_paths.py``; the cross-backend check of the blocked paths
is ``parity_tests/test_speed_paths_parity.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from speed_cases import MOE_SPECS, SPEC, batch, moe_layer_cases

from backends.torch import from_spec
from backends.torch.convert import load_canonical
from backends.torch.model import MoE, grouped_mm, set_moe_impl
from llm.moe_dispatch import resolve_moe_impl


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


@pytest.mark.parametrize("impl", ["blocked", "grouped"])
@pytest.mark.parametrize("name", list(MOE_SPECS))
def test_torch_sparse_moe_matches_dense(name, impl):
    spec = MOE_SPECS[name]
    ids, tgt = (torch.as_tensor(a) for a in batch(seed=7))
    outs = {}
    for mode in ("dense", impl):
        model = from_spec(spec, seed=2).double()
        set_moe_impl(model, mode)
        out = model(ids, tgt)
        (out.loss + out.aux_loss + out.z_loss).backward()
        outs[mode] = (out, {n: p.grad.clone() for n, p in model.named_parameters()})
    (a, ga), (b, gb) = outs["dense"], outs[impl]
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-12, atol=0)
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-9, atol=1e-13, msg=n)
    model.layers[0].mlp.moe_impl = "sparse"
    with pytest.raises(ValueError, match="not one of: dense, blocked, grouped"):
        model(ids, tgt)
    with pytest.raises(ValueError, match="moe_impl='auto' is not one of: dense, blocked, grouped"):
        set_moe_impl(model, "auto")  # auto is resolved before it reaches a model


def _moe_layer(spec, x, params, impl):
    """y (1, N, D) and the gradients of ``sum(y * g) + balance + z`` (fixed g) wrt x and every param."""
    layer = MoE(spec)
    load_canonical(layer, params)
    layer.moe_impl = impl
    xt = torch.tensor(x[None], requires_grad=True)
    y, balance, z, _ = layer(xt)
    g = torch.from_numpy(np.random.default_rng(5).standard_normal(tuple(y.shape)).astype(np.float32))
    ((y * g).sum() + balance + z).backward()
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in layer.named_parameters()}
    return y.detach(), {"x": xt.grad, **grads}


@settings(max_examples=25, deadline=None)
@given(case=moe_layer_cases())
def test_torch_moe_impls_equal_dense_on_drawn_layers(case):
    spec, x, params = case
    y_ref, g_ref = _moe_layer(spec, x, params, "dense")
    for impl in ("blocked", "grouped"):
        y, grads = _moe_layer(spec, x, params, impl)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5 * float(y_ref.abs().max()) + 1e-7)
        for n, want in g_ref.items():
            torch.testing.assert_close(grads[n], want, rtol=1e-5, atol=1e-5 * float(want.abs().max()) + 1e-7,
                                       msg=f"{impl}: {n}")


def test_grouped_mm_fallback_is_the_grouped_kernels_function():
    """Run e of x times weight[e].T, empty runs included: the fallback, torch._grouped_mm (its CPU
    path, forward, on 16-byte-aligned rows) and a matmul per slice agree."""
    rng = np.random.default_rng(6)
    x = torch.from_numpy(rng.standard_normal((10, 8)).astype(np.float32))
    weight = torch.from_numpy(rng.standard_normal((4, 16, 8)).astype(np.float32))
    offsets = torch.tensor([3, 3, 10, 10], dtype=torch.int32)  # runs 0:3, empty, 3:10, empty
    want = torch.cat([x[:3] @ weight[0].T, x[3:] @ weight[2].T])
    torch.testing.assert_close(grouped_mm(x, weight, offsets), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch._grouped_mm(x, weight.transpose(-2, -1), offs=offsets), want,
                               rtol=1e-6, atol=1e-6)


def test_resolve_moe_impl():
    # the H200 measurement (llm/moe_dispatch.py): blocked beats grouped in both frameworks on GPU
    assert resolve_moe_impl("auto", "torch", "cuda", "bfloat16") == "blocked"
    assert resolve_moe_impl("auto", "torch", "cuda", "float32") == "blocked"
    assert resolve_moe_impl("auto", "torch", "cpu", "bfloat16") == "blocked"
    assert resolve_moe_impl("auto", "jax", "gpu", "float32") == "blocked"
    assert resolve_moe_impl("auto", "jax", "cuda", "bfloat16") == "blocked"
    assert resolve_moe_impl("auto", "jax", "tpu", "bfloat16") == "grouped"
    assert resolve_moe_impl("auto", "jax", "cpu", "float32") == "blocked"
    for impl in ("dense", "blocked", "grouped"):
        assert resolve_moe_impl(impl, "torch", "cpu", "float32") == impl
    with pytest.raises(ValueError, match="moe_impl='sparse' is not one of: auto, dense, blocked, grouped"):
        resolve_moe_impl("sparse", "torch", "cpu", "float32")
    with pytest.raises(ValueError, match="backend='mlx'"):
        resolve_moe_impl("auto", "mlx", "cpu", "float32")


@pytest.mark.parametrize("setting,built", [("auto", "blocked"), ("grouped", "grouped"), ("dense", "dense")])
def test_torch_engine_builds_the_resolved_moe_impl(tmp_path, setting, built):
    from engine_checks import tiny

    from backends.torch import TrainingEngine

    config = tiny(tmp_path, "model.use_moe=true", "model.num_experts=4", "model.num_experts_per_token=2",
                  f"optimization.moe_impl={setting}")
    with TrainingEngine(config, run_dir=tmp_path / "run") as engine:
        assert [m.moe_impl for m in engine.model.modules() if isinstance(m, MoE)] == [built]
