"""The router's selection bias as untrained state, in each backend's model and engine: no gradient,
no optimiser group, no weight decay, no moments; moved only by the balancing rule after a step;
saved in checkpoints under its table name and resumed exactly."""

from __future__ import annotations

import numpy as np
import pytest

from llm.backend import backend
from llm.checkpoint import load_checkpoint
from llm.parity.trajectory import trajectory_config
from llm.spec import ModelSpec, init_params

BIAS = "layers.0.mlp.router.selection_bias"
SPEC = ModelSpec(vocab_size=32, max_seq_len=16, hidden_size=16, num_layers=1, num_heads=2, use_moe=True,
                 num_experts=4, num_experts_per_token=2, num_expert_groups=2, topk_groups=1,
                 router_group_score="top2_sum", router_scoring="sigmoid", router_selection_bias=True,
                 router_bias_update_rate=0.05, init_std=0.1)
START = np.array([0.3, -0.2, 0.1, -0.4], np.float32)


def _config(spec: ModelSpec, steps: int):
    return trajectory_config(spec, steps=steps, seed=1, batch_size=4, seq_len=8, grad_accum=2, weight_decay=0.5)


def _engine(name: str, config, run_dir, **kwargs):
    engine = backend(name).TrainingEngine(config, run_dir=run_dir, callback_names=(), **kwargs)
    if not kwargs.get("resume"):  # start from a nonzero bias: weight decay would shrink it
        params = engine.impl.to_canonical(engine.model)
        params[BIAS] = START
        engine._restore(run_dir, params, {}, 0, None)
    return engine


def _bias(engine) -> np.ndarray:
    return engine.impl.to_canonical(engine.model)[BIAS]


@pytest.mark.parametrize("name", ["torch", "jax"])
def test_the_bias_is_no_parameter_and_gets_no_gradient(name):
    b = backend(name)
    params = init_params(SPEC, 0)
    params[BIAS] = START
    model = b.from_canonical(SPEC, params)
    assert BIAS in b.to_canonical(model)
    ids = np.random.default_rng(0).integers(0, SPEC.vocab_size, (2, 8))
    if name == "torch":
        import torch

        assert BIAS not in dict(model.named_parameters())
        out = model(torch.from_numpy(ids), torch.from_numpy(ids))
        (out.loss + out.aux_loss).backward()
        assert model.layers[0].mlp.router.selection_bias.grad is None
        grads = b.grads_to_canonical(model)
    else:
        import jax
        import jax.numpy as jnp
        from flax import nnx

        graphdef, weights, rest = nnx.split(model, nnx.Param, ...)

        def objective(w):
            out = nnx.merge(graphdef, w, rest)(jnp.asarray(ids), jnp.asarray(ids))
            return out.loss + out.aux_loss

        grads = b.grads_to_canonical(model, jax.grad(objective)(weights))
    assert BIAS not in grads and "layers.0.mlp.router.weight" in grads
    assert float(np.abs(grads["layers.0.mlp.router.weight"]).max()) > 0


@pytest.mark.parametrize("name", ["torch", "jax"])
def test_a_fixed_bias_stays_put_under_weight_decay(name, tmp_path):
    """u = 0: three AdamW steps with weight decay 0.5 leave the bias exactly where it started, and
    no moment is kept for it."""
    config = _config(SPEC.replace(router_bias_update_rate=0.0), 3)
    with _engine(name, config, tmp_path) as engine:
        engine.fit()
        np.testing.assert_array_equal(_bias(engine), START)
        assert not any(BIAS in key for key in engine.moments())
        assert BIAS not in engine._param_names()


@pytest.mark.parametrize("name", ["torch", "jax"])
def test_the_update_moves_the_bias_by_multiples_of_the_rate(name, tmp_path):
    steps, u = 4, SPEC.router_bias_update_rate
    with _engine(name, _config(SPEC, steps), tmp_path) as engine:
        engine.fit()
        moved = (_bias(engine) - START) / u
    np.testing.assert_allclose(moved, np.round(moved), atol=1e-4)
    assert np.abs(moved).max() <= steps + 1e-4
    assert np.count_nonzero(np.round(moved)) >= 2, moved  # balancing pushes some experts up, some down


@pytest.mark.parametrize("name", ["torch", "jax"])
def test_checkpoint_holds_the_bias_and_resume_is_exact(name, tmp_path):
    """Two steps, a checkpoint, two more on a resumed engine: the bias (and every weight) equals
    four uninterrupted steps bit for bit."""
    with _engine(name, _config(SPEC, 4), tmp_path / "full") as engine:
        engine.fit()
        full = engine.impl.to_canonical(engine.model)
    with _engine(name, _config(SPEC, 2), tmp_path / "cut") as engine:
        engine.fit()
        path = engine.save_checkpoint("test")
        half = _bias(engine)
    ckpt = load_checkpoint(path)
    np.testing.assert_array_equal(ckpt.params[BIAS], half)
    assert not np.array_equal(half, START)
    assert not any(BIAS in key for key in ckpt.state_tensors)  # no moments for untrained state
    with backend(name).TrainingEngine(_config(SPEC, 4), run_dir=tmp_path / "cut", callback_names=(),
                                      resume=path) as engine:
        engine.fit()
        resumed = engine.impl.to_canonical(engine.model)
    assert resumed.keys() == full.keys()
    for key, value in full.items():
        np.testing.assert_array_equal(resumed[key], value, err_msg=key)
