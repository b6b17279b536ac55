"""The JAX/Flax halves of the training tasks (``llm.loop.tasks`` holds the backend-agnostic halves).

Mirrors ``backends/torch/tasks.py``: a flax task half builds the model and computes the loss; the
engine does everything else (the mesh, mixed precision, the optimiser, jit), unless the half
brings its own optax optimiser (``build_optimizer``). Differences forced by JAX:

* ``build_model`` gets the compute dtype from ``config.optimization.dtype`` (flax modules take a
  ``dtype``; parameters stay float32), where torch uses autocast around an fp32 model.
* ``loss(model, batch, *, deterministic)`` is traced inside the jitted step: ``deterministic=False``
  in training (dropout on), True in evaluation. It returns ``(objective, parts)`` like torch:
  ``parts`` are 0-d arrays and must include ``"loss"``.
* A task half must be stateless beyond plain attributes: the engine passes it to ``jax.jit`` as a
  static argument, so halves compare (and hash) by class and attributes, which lets two engines of
  the same task share compiled steps.

This module never imports torch.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from backends.flax.convert import from_spec, load_canonical, to_canonical
from backends.flax.inference import generate
from llm.loop.engine import EXPERT_LOAD
from llm.loop.tasks import LMTaskHalfBase

__all__ = ["COMPUTE_DTYPES", "FlaxLMTask", "FlaxRegressionTask", "FlaxTask", "RegressionMLP",
           "compute_dtype", "param_names"]

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def compute_dtype(config: Any) -> Any:
    """The flax compute dtype of ``config.optimization.dtype``."""
    return COMPUTE_DTYPES[str(getattr(config.optimization.dtype, "value", config.optimization.dtype))]


def param_names(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    """Dotted ``nnx.Param`` paths -> shapes (for a ``DecoderModel`` these are the canonical names)."""
    return {".".join(str(k) for k in path): tuple(v[...].shape)
            for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


class FlaxTask:
    """Base for flax task halves: ``build_model`` and ``loss`` are required, the rest has defaults."""

    def build_model(self, config: Any, datamodule: Any) -> nnx.Module:
        raise NotImplementedError

    def loss(self, model: nnx.Module, batch: tuple[jax.Array, jax.Array], *, deterministic: bool
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
        raise NotImplementedError

    def no_decay_names(self, config: Any, model: nnx.Module) -> set[str]:
        """Parameters without weight decay: by default every vector (biases, norm scales)."""
        return {name for name, shape in param_names(model).items() if len(shape) < 2}

    def build_optimizer(self, config: Any, model: nnx.Module) -> optax.GradientTransformation | None:
        """The task's own optimiser, or None (the default): the engine's torch-exact AdamW with
        ``training.lr_schedule`` (``backends/flax/optim.py``). The transformation sees the params as
        ``{dotted nnx.Param path: array}`` and is applied to the accumulated, unscaled (float16) and
        clipped (``training.grad_clip``) gradient, with the params: ``update(grads, state, params)``.
        A schedule goes inside it as optax does (``optax.sgd(optax.exponential_decay(...))``); built
        with ``optax.inject_hyperparams`` its ``learning_rate`` is what metrics log as ``lr``."""
        return None

    def build_scheduler(self, config: Any, optimizer: Any) -> None:
        """Not used on this backend: an optax schedule is a function of the update count folded into
        the transformation itself, so there is no separate object to step (torch's
        ``build_scheduler`` has no counterpart here). Kept so both halves have the same surface."""
        return None

    def to_canonical(self, model: nnx.Module) -> dict[str, np.ndarray]:
        """Name -> float32 array of every ``nnx.Param``: the checkpoint's ``model.safetensors``
        (canonical names for a decoder; for another model its NNX paths, a named checkpoint)."""
        return to_canonical(model)

    def load_canonical(self, model: nnx.Module, params: dict[str, np.ndarray]) -> None:
        load_canonical(model, params)

    def sample(self, model: nnx.Module, datamodule: Any, **kwargs: Any) -> str | None:
        """A short text sample from the trained model, when the task has one."""
        return None

    # static argument of jax.jit: equal when the class and the attributes are
    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and vars(other) == vars(self)

    def __hash__(self) -> int:
        return hash(type(self))


class FlaxLMTask(LMTaskHalfBase, FlaxTask):
    """Causal LM: ``from_spec(config.model, seed)`` in the compute dtype (or the ``training.init_from``
    checkpoint's weights, ``LMTaskHalfBase.build_model``); objective ``loss + aux + z``. The loss is
    chunked as ``optimization.loss_chunk_tokens`` says (``OptimizationConfig.loss_chunk``)."""

    def new_model(self, config: Any) -> nnx.Module:
        return from_spec(config.model, seed=config.training.seed, dtype=compute_dtype(config))

    generate = staticmethod(generate)  # KV-cached decoding, for LMTaskHalfBase.sample

    def loss(self, model: nnx.Module, batch: tuple[jax.Array, jax.Array], *, deterministic: bool
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
        inputs, targets, extras = self.model_inputs(batch)  # extras: packed batches' segment_ids, positions
        chunk = self.optimization.loss_chunk(targets.size, model.spec.vocab_size)  # static: shapes are
        # The loss-only path: no float32 (B, T, V) logits, forward or backward (lean_cross_entropy);
        # chunked: no (B, T, V) logits at all (backends/flax/loss.py).
        out = model(inputs, targets, deterministic=deterministic, return_logits=False,
                    loss_chunk_tokens=chunk, **extras)
        parts = {"loss": out.loss}
        if model.spec.use_moe:
            parts.update(aux_loss=out.aux_loss, z_loss=out.z_loss)
        if model.spec.router_bias_update_rate:  # the engine's selection-bias update reads it
            parts[EXPERT_LOAD] = out.expert_load
        return out.loss + out.aux_loss + out.z_loss, parts

    def no_decay_names(self, config: Any, model: nnx.Module) -> set[str]:
        return config.model.no_decay_names()  # norms, biases, embedding tables (llm.spec)


class RegressionMLP(nnx.Module):
    """``out(gelu(hidden(x)))``: a one-hidden-layer MLP (``backends.torch.tasks.RegressionMLP``)."""

    def __init__(self, in_features: int, out_features: int, hidden: int = 64, *, dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        self.hidden = nnx.Linear(in_features, hidden, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.out = nnx.Linear(hidden, out_features, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(jax.nn.gelu(self.hidden(x), approximate=False))  # (B, out)


class FlaxRegressionTask(FlaxTask):
    """MSE regression of SyntheticDataModule's ``y = x @ w + noise`` with ``RegressionMLP``."""

    def build_model(self, config: Any, datamodule: Any) -> nnx.Module:
        return RegressionMLP(datamodule.in_features, datamodule.out_features, dtype=compute_dtype(config),
                             rngs=nnx.Rngs(config.training.seed))

    def loss(self, model: nnx.Module, batch: tuple[jax.Array, jax.Array], *, deterministic: bool
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
        x, y = batch
        mse = jnp.mean(jnp.square(model(x).astype(jnp.float32) - y))
        return mse, {"loss": mse}
