"""The torch halves of the training tasks (``llm.loop.tasks`` holds the backend-agnostic halves).

A torch task half builds the model and computes the loss; the engine does everything else (devices,
AMP, DDP, the optimiser), unless the half brings its own optimiser and scheduler (``build_optimizer``,
``build_scheduler``). ``loss(model, batch)`` returns ``(objective, parts)``: the objective is
what is differentiated, ``parts`` are 0-d tensors to log and must include ``"loss"`` (for the LM the
cross-entropy alone; MoE adds ``aux_loss`` and ``z_loss``). ``model`` may be wrapped (DDP,
``torch.compile``), so call it, do not reach into it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from backends.torch.convert import from_spec, load_canonical, to_canonical
from backends.torch.inference import generate
from llm.loop.engine import EXPERT_LOAD
from llm.loop.tasks import LMTaskHalfBase

__all__ = ["TorchLMTask", "TorchRegressionTask", "TorchTask"]


class TorchTask:
    """Base for torch task halves: ``build_model`` and ``loss`` are required, the rest has defaults."""

    def build_model(self, config: Any, datamodule: Any) -> nn.Module:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def no_decay_names(self, config: Any, model: nn.Module) -> set[str]:
        """Parameters without weight decay: by default every vector (biases, norm scales)."""
        return {name for name, p in model.named_parameters() if p.dim() < 2}

    def build_optimizer(self, config: Any, model: nn.Module) -> torch.optim.Optimizer | None:
        """The task's own optimiser over ``model``'s parameters (the raw module, before DDP and
        ``torch.compile``), or None (the default): the engine's AdamW with ``training.lr_schedule``,
        its two weight-decay groups from ``no_decay_names``. The engine still accumulates, unscales
        (float16), clips (``training.grad_clip``) and checkpoints it; ``training.lr`` and the schedule
        fields are then the task's to read or ignore."""
        return None

    def build_scheduler(self, config: Any, optimizer: torch.optim.Optimizer
                        ) -> torch.optim.lr_scheduler.LRScheduler | None:
        """A scheduler for the task's own optimiser, stepped once after every optimiser step; None
        (the default): the rate stays what the optimiser holds. Only with ``build_optimizer``: the
        engine's AdamW follows ``training.lr_schedule``."""
        return None

    def to_canonical(self, model: nn.Module) -> dict[str, np.ndarray]:
        """Name -> float32 array of every tensor: the checkpoint's ``model.safetensors`` (canonical
        names for a decoder; for another model its ``state_dict`` keys, a named checkpoint)."""
        return to_canonical(model)

    def load_canonical(self, model: nn.Module, params: dict[str, np.ndarray]) -> None:
        load_canonical(model, params)

    def sample(self, model: nn.Module, datamodule: Any, **kwargs: Any) -> str | None:
        """A short text sample from the trained model, when the task has one."""
        return None


class TorchLMTask(LMTaskHalfBase, TorchTask):
    """Causal LM: ``from_spec(config.model, seed)`` (or the ``training.init_from``
    checkpoint's weights, ``LMTaskHalfBase.build_model``); objective ``loss + aux + z``. The loss is
    chunked as ``optimization.loss_chunk_tokens`` says (``OptimizationConfig.loss_chunk``)."""

    def new_model(self, config: Any) -> nn.Module:
        return from_spec(config.model, seed=config.training.seed)

    generate = staticmethod(generate)  # KV-cached decoding, for LMTaskHalfBase.sample

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs, targets, extras = self.model_inputs(batch)  # extras: packed batches' segment_ids, positions
        chunk = self.optimization.loss_chunk(targets.numel(), _spec_of(model).vocab_size,
                                             fused_plain=self.optimization.compile)
        # the loss-only path: no fp32 (B, T, V) copy; chunked: no (B, T, V) logits at all
        out = model(inputs, targets, return_logits=False, loss_chunk_tokens=chunk, **extras)
        parts = {"loss": out.loss}
        if _spec_of(model).use_moe:
            parts.update(aux_loss=out.aux_loss, z_loss=out.z_loss)
        if _spec_of(model).router_bias_update_rate:  # the engine's selection-bias update reads it
            parts[EXPERT_LOAD] = out.expert_load
        return out.loss + out.aux_loss + out.z_loss, parts

    def no_decay_names(self, config: Any, model: nn.Module) -> set[str]:
        return config.model.no_decay_names()  # norms, biases, embedding tables (llm.spec)


def _spec_of(model: nn.Module):
    inner = getattr(model, "module", model)  # DDP
    inner = getattr(inner, "_orig_mod", inner)  # torch.compile
    return inner.spec


class RegressionMLP(nn.Module):
    """``out(gelu(hidden(x)))``: a one-hidden-layer MLP."""

    def __init__(self, in_features: int, out_features: int, hidden: int = 64):
        super().__init__()
        self.hidden = nn.Linear(in_features, hidden)
        self.out = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.gelu(self.hidden(x)))  # (B, out)


class TorchRegressionTask(TorchTask):
    """MSE regression of SyntheticDataModule's ``y = x @ w + noise`` with ``RegressionMLP``."""

    def build_model(self, config: Any, datamodule: Any) -> nn.Module:
        torch.manual_seed(config.training.seed)
        return RegressionMLP(datamodule.in_features, datamodule.out_features)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = batch
        mse = F.mse_loss(model(x).float(), y)
        return mse, {"loss": mse}
