"""The JAX chunked linear + cross-entropy (``backends/flax/loss.py``): the plain loss's number and
gradients without the (N, V) logits (the compiled program's temp bytes say so); the model and the
engine use it when the config says."""

from __future__ import annotations

import engine_checks as checks
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.flax.convert import from_spec
from backends.flax.engine import TrainingEngine
from backends.flax.loss import chunked_cross_entropy
from backends.flax.model import cross_entropy
from llm.spec import ModelSpec

jax.config.update("jax_default_matmul_precision", "highest")


def _rel(a, b) -> float:
    return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))


def _case(n, d, v, ignored, seed):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, v)) * 0.5, jnp.float32)  # the lm_head layout (D, V)
    b = jnp.asarray(rng.normal(size=(v,)), jnp.float32)
    t = rng.integers(0, v, n)
    t[np.asarray(ignored)] = -100
    return h, w, b, jnp.asarray(t)


def _plain(h, w, b, t):
    return cross_entropy(h @ w + (0.0 if b is None else b), t)


@settings(max_examples=4, deadline=None)
@given(n=st.integers(1, 40), d=st.integers(1, 12), v=st.integers(2, 60), chunk=st.integers(1, 48),
       bias=st.booleans(), tied=st.booleans(), seed=st.integers(0, 2**16), data=st.data())
def test_chunked_equals_plain_loss_and_gradients(n, d, v, chunk, bias, tied, seed, data):
    ignored = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    ignored[:min(chunk, n)] = [True] * min(chunk, n)  # the first chunk ignored entirely
    ignored[-1] = False  # something to compare
    h, w, b, t = _case(n, d, v, ignored, seed)
    b = b if bias else None
    want = jax.value_and_grad(_plain, argnums=(0, 1, 2))(h, w, b, t)
    if tied:  # the token table's layout (V, D): read as stored, no transpose
        got = jax.value_and_grad(lambda h, wt, b: chunked_cross_entropy(h, wt, b, t, chunk, weight_layout="VD"),
                                 argnums=(0, 1, 2))(h, jnp.asarray(np.asarray(w).T), b)
        got = (got[0], (got[1][0], jnp.asarray(np.asarray(got[1][1]).T), got[1][2]))
    else:
        got = jax.value_and_grad(lambda h, w, b: chunked_cross_entropy(h, w, b, t, chunk), argnums=(0, 1, 2))(h, w, b)
    assert _rel(got[0], want[0]) <= 1e-6
    for name, g_, r in zip(("hidden", "weight", "bias"), got[1], want[1]):
        if r is not None:  # float32 summation order only (worst drawn on torch's side: 1.3e-6 at D = 1)
            assert _rel(g_, r) <= 5e-6, (name, _rel(g_, r))


def test_nothing_valid_gives_zero_loss_and_zero_gradients():
    h, w, b, t = _case(10, 4, 7, [True] * 10, 0)
    loss, grads = jax.value_and_grad(lambda *a: chunked_cross_entropy(*a, t, 3), argnums=(0, 1, 2))(h, w, b)
    assert float(loss) == 0.0 and all(float(jnp.abs(g).max()) == 0.0 for g in grads)


def test_bfloat16_stays_near_the_plain_bfloat16_loss():
    h, w, _, t = _case(300, 32, 500, [False] * 300, 1)
    hb = h.astype(jnp.bfloat16)
    want = jax.value_and_grad(lambda h, w: _plain(h, w.astype(jnp.bfloat16), None, t), argnums=(0, 1))(hb, w)
    got = jax.value_and_grad(lambda h, w: chunked_cross_entropy(h, w, None, t, 64), argnums=(0, 1))(hb, w)
    assert got[1][0].dtype == jnp.bfloat16 and got[1][1].dtype == jnp.float32
    # measured 3e-6 (loss) and <= 4e-3 (gradients) on an H200: the chunked weight gradient sums in float32
    assert _rel(got[0], want[0]) <= 1e-4
    for g_, r in zip(got[1], want[1]):
        assert _rel(g_.astype(jnp.float32), r.astype(jnp.float32)) <= 2e-2


def test_compiled_memory_holds_no_full_logits():
    n, d, v = 2048, 32, 4096  # N * V * 4 = 32 MiB of float32 logits
    h, w = jnp.zeros((n, d)), jnp.zeros((d, v))
    t = jnp.zeros((n,), jnp.int32)

    def temp_bytes(fn):
        return jax.jit(jax.grad(fn, argnums=(0, 1))).lower(h, w).compile().memory_analysis().temp_size_in_bytes

    chunked = temp_bytes(lambda h, w: chunked_cross_entropy(h, w, None, t, 128))
    plain = temp_bytes(lambda h, w: cross_entropy(h @ w, t))
    assert plain >= n * v * 4  # the plain program does hold the logits
    assert chunked <= n * v * 4 / 8, (chunked, plain)  # 128-token chunks: 1/16 of them, plus slack


def test_bad_chunk_layout_and_shapes_are_named():
    h, w, b, t = _case(6, 4, 5, [False] * 6, 0)
    with pytest.raises(ValueError, match="chunk_tokens must be an int >= 1, got 0"):
        chunked_cross_entropy(h, w, b, t, 0)
    with pytest.raises(ValueError, match="weight_layout='VV' is not one of: DV, VD"):
        chunked_cross_entropy(h, w, b, t, 2, weight_layout="VV")
    with pytest.raises(ValueError, match="must share the leading shape"):
        chunked_cross_entropy(h, w, b, t[:5], 2)


@pytest.mark.parametrize("tied", [True, False])
def test_model_call_chunked_equals_plain(tied):
    spec = ModelSpec(vocab_size=61, max_seq_len=16, hidden_size=16, num_layers=1, num_heads=2,
                     tie_embeddings=tied, lm_head_bias=not tied)
    model = from_spec(spec, seed=0)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 61, (3, 11)))
    tgt = jnp.roll(ids, -1, axis=1).at[0].set(-100)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, chunk):
        return nnx.merge(graphdef, params, rest)(ids, tgt, return_logits=False, loss_chunk_tokens=chunk).loss

    (plain, plain_g), (chunked, chunked_g) = (jax.value_and_grad(loss)(params, c) for c in (0, 7))
    assert _rel(chunked, plain) <= 1e-6
    flat_p, flat_c = jax.tree.leaves(plain_g), jax.tree.leaves(chunked_g)
    assert any(float(jnp.abs(g).sum()) > 0 for g in flat_p)
    for g_, r in zip(flat_c, flat_p):  # tied: the head's gradient adds to the embedding lookup's
        assert _rel(g_, r) <= 1e-5
    with pytest.raises(ValueError, match="loss_chunk_tokens needs return_logits=False"):
        model(ids, tgt, loss_chunk_tokens=4)


def test_a_training_run_with_a_chunked_loss_has_the_plain_run_losses(tmp_path):
    checks.chunked_loss_has_the_plain_losses(TrainingEngine, tmp_path)
