"""The torch chunked linear + cross-entropy (``backends/torch/loss.py``): the plain loss's number
and gradients without the (N, V) logits; the model and the engine use it when the config says;
``optimization.loss_chunk_tokens`` and its auto rule."""

from __future__ import annotations

import engine_checks as checks
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.torch.convert import from_spec
from backends.torch.engine import TrainingEngine
from backends.torch.loss import chunked_cross_entropy
from llm.config import ConfigError, OptimizationConfig
from llm.spec import ModelSpec


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _case(n: int, d: int, v: int, bias: bool, ignored: list[bool], seed: int):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, requires_grad=True)
    w = (torch.randn(v, d, generator=g) * 0.5).requires_grad_()
    b = torch.randn(v, generator=g, requires_grad=True) if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    t[torch.tensor(ignored)] = -100
    return h, w, b, t


def _loss_and_grads(fn, h, w, b, t):
    inputs = [h, w] + ([b] if b is not None else [])
    loss = fn(h, w, b, t)
    return [loss.detach(), *torch.autograd.grad(loss, inputs)]


def _plain(h, w, b, t):
    return F.cross_entropy(F.linear(h, w, b).float(), t, ignore_index=-100)


@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 40), d=st.integers(1, 12), v=st.integers(2, 60), chunk=st.integers(1, 48),
       bias=st.booleans(), seed=st.integers(0, 2**16), data=st.data())
def test_chunked_equals_plain_loss_and_gradients(n, d, v, chunk, bias, seed, data):
    ignored = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    ignored[:min(chunk, n)] = [True] * min(chunk, n)  # the first chunk ignored entirely
    ignored[-1] = False  # something to compare
    h, w, b, t = _case(n, d, v, bias, ignored, seed)
    want = _loss_and_grads(_plain, h, w, b, t)
    got = _loss_and_grads(lambda *a: chunked_cross_entropy(*a, chunk), h, w, b, t)
    # float32 summation order only: the loss within 1e-6; a gradient within 5e-6 (worst drawn 1.3e-6,
    # at D = 1, where each entry of the hidden gradient is one product)
    for name, g_, r in zip(("loss", "hidden", "weight", "bias"), got, want):
        assert _rel(g_, r) <= (1e-6 if name == "loss" else 5e-6), (name, _rel(g_, r))


def test_nothing_valid_gives_zero_loss_and_zero_gradients():
    h, w, b, t = _case(10, 4, 7, True, [True] * 10, 0)
    loss, *grads = _loss_and_grads(lambda *a: chunked_cross_entropy(*a, 3), h, w, b, t)
    assert float(loss) == 0.0 and all(float(g.abs().max()) == 0.0 for g in grads)


def test_bfloat16_autocast_stays_near_the_plain_bfloat16_loss():
    h, w, b, t = _case(300, 32, 500, False, [False] * 300, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _loss_and_grads(_plain, h, w, b, t)
        got = _loss_and_grads(lambda *a: chunked_cross_entropy(*a, 64), h, w, b, t)
    assert got[1].dtype == h.dtype and got[2].dtype == w.dtype
    # measured 0 (loss) and <= 2e-3 (gradients) on CPU and an H200; bf16 rounding of each chunk's product
    for name, g_, r in zip(("loss", "hidden", "weight"), got, want):
        assert _rel(g_, r) <= 1e-2, (name, _rel(g_, r))


def test_compiles_without_a_graph_break():
    h, w, b, t = _case(50, 8, 30, True, [False] * 50, 2)
    compiled = torch.compile(lambda *a: chunked_cross_entropy(*a, 16), backend="aot_eager", fullgraph=True)
    want = _loss_and_grads(_plain, h, w, b, t)
    got = _loss_and_grads(compiled, h, w, b, t)
    assert all(_rel(g_, r) <= 1e-6 for g_, r in zip(got, want))


def test_bad_chunk_and_shapes_are_named():
    h, w, b, t = _case(6, 4, 5, False, [False] * 6, 0)
    with pytest.raises(ValueError, match="chunk_tokens must be an int >= 1, got 0"):
        chunked_cross_entropy(h, w, b, t, 0)
    with pytest.raises(ValueError, match="must share the leading shape"):
        chunked_cross_entropy(h, w, b, t[:5], 2)


@pytest.mark.parametrize("tied", [True, False])
def test_model_forward_chunked_equals_plain(tied):
    spec = ModelSpec(vocab_size=61, max_seq_len=16, hidden_size=16, num_layers=1, num_heads=2,
                     tie_embeddings=tied, lm_head_bias=not tied)
    model = from_spec(spec, seed=0)
    ids = torch.randint(0, 61, (3, 11), generator=torch.Generator().manual_seed(0))
    tgt = ids.roll(-1, 1)
    tgt[0] = -100
    runs = []
    for chunk in (0, 7):
        model.zero_grad()
        out = model(ids, tgt, return_logits=False, loss_chunk_tokens=chunk)
        out.loss.backward()
        runs.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (plain, plain_g), (chunked, chunked_g) = runs
    assert _rel(chunked, plain) <= 1e-6
    assert float(plain_g["embed.weight"].abs().sum()) > 0
    for name in plain_g:  # tied: the head's gradient adds to the embedding lookup's
        assert _rel(chunked_g[name], plain_g[name]) <= 1e-5, name
    with pytest.raises(ValueError, match="loss_chunk_tokens needs return_logits=False"):
        model(ids, tgt, loss_chunk_tokens=4)


def test_a_training_run_with_a_chunked_loss_has_the_plain_run_losses(tmp_path):
    checks.chunked_loss_has_the_plain_losses(TrainingEngine, tmp_path)


def test_config_field_and_auto_rule():
    o = OptimizationConfig()
    assert o.loss_chunk_tokens is None
    assert o.loss_chunk(32 * 1024, 50304) == 0  # GPT-2's benchmark batch stays plain
    assert o.loss_chunk(32 * 1024, 128256) == 2048  # Llama-3 vocab, 32k tokens: chunked
    assert o.loss_chunk(32 * 1024, 128256, fused_plain=True) == 0  # torch.compile'd plain loss
    assert o.loss_chunk(1 << 30, 10 ** 7) == OptimizationConfig.LOSS_CHUNK_MULTIPLE  # never below one tile
    assert OptimizationConfig(loss_chunk_tokens=0).loss_chunk(1 << 20, 1 << 20) == 0
    assert OptimizationConfig(loss_chunk_tokens=96).loss_chunk(8, 8) == 96
    with pytest.raises(ConfigError, match=r"optimization.loss_chunk_tokens=-1 must be >= 0 \(0 = never chunk\)"):
        OptimizationConfig(loss_chunk_tokens=-1)
