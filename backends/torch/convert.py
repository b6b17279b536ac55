"""Canonical weights (``dict[str, np.ndarray]``, float32) to and from torch modules.

The canonical layout is the torch layout: linear weights are ``(out, in)``, stacked experts
``(E, out, in)``, and every module's ``state_dict()`` key is its canonical name. So this file has
no transpose list -- conversion is a copy plus strict name and shape checks (``llm.spec.check_names``:
every missing, unexpected and mis-shaped name listed in one ``SpecError``), for parameters,
gradients and AdamW moments alike. Names are relative to the module given, so a component (a
norm, one ``TransformerBlock``) converts on its own.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn as nn

from backends.torch.model import DecoderModel
from llm.spec import ModelSpec, check_names, init_params

__all__ = ["from_canonical", "from_spec", "grads_to_canonical", "load_canonical", "moments_from_canonical",
           "moments_to_canonical", "to_canonical"]


def to_canonical(module: nn.Module) -> dict[str, np.ndarray]:
    """Float32 numpy copies of every parameter, keyed by canonical name relative to ``module``."""
    return {name: t.detach().to("cpu", torch.float32).numpy().copy()
            for name, t in module.state_dict().items()}


def load_canonical(module: nn.Module, params: dict[str, np.ndarray]) -> None:
    """Copy ``params`` into ``module`` in place, cast to each parameter's dtype and device.

    Strict: every missing, unexpected and mis-shaped name is listed in one ``llm.spec.SpecError``
    (a ValueError), and nothing is written unless all of them match.
    """
    expected = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    check_names(expected, params, where=f"parameters for {type(module).__name__}")
    with torch.no_grad():
        for name, target in module.state_dict().items():
            target.copy_(torch.as_tensor(np.asarray(params[name])))


def from_canonical(spec: ModelSpec, params: Mapping[str, np.ndarray], *, seed: int = 0) -> DecoderModel:
    """A ``DecoderModel`` for ``spec`` holding ``params`` (``seed`` is unused: torch draws dropout
    masks from its global generator). The constructor allocates zeros; this fills them."""
    model = DecoderModel(spec)
    load_canonical(model, dict(params))
    return model


def from_spec(spec: ModelSpec, seed: int = 0) -> DecoderModel:
    """A ``DecoderModel`` holding ``init_params(spec, seed)``, the weights both backends start from."""
    return from_canonical(spec, init_params(spec, seed), seed=seed)


def _to_numpy(module: nn.Module, values: Mapping[str, torch.Tensor | None], what: str) -> dict[str, np.ndarray]:
    """``values`` (canonical name -> tensor, None for zeros) as float32 numpy copies; strict about
    names and shapes against ``module``'s parameters."""
    shapes = {name: tuple(p.shape) for name, p in module.named_parameters()}
    # None reads as zeros of the parameter's shape; an unknown name gets (0,) and is listed below.
    out = {name: (np.zeros(shapes.get(name, (0,)), np.float32) if v is None
                  else v.detach().to("cpu", torch.float32).numpy().copy()) for name, v in values.items()}
    check_names(shapes, out, where=f"{what} for {type(module).__name__}")
    return out


def grads_to_canonical(module: nn.Module, grads: Mapping[str, torch.Tensor | None] | None = None
                       ) -> dict[str, np.ndarray]:
    """Gradients by canonical name as float32 numpy: ``grads`` (name -> tensor), by default each
    parameter's ``.grad``; a parameter without one gets zeros of its shape. Strict: a missing,
    unexpected or mis-shaped name is a ``SpecError`` listing it."""
    if grads is None:
        grads = {name: p.grad for name, p in module.named_parameters()}
    return _to_numpy(module, grads, "gradients")


def moments_to_canonical(module: nn.Module, moments: Mapping[str, torch.Tensor | None]) -> dict[str, np.ndarray]:
    """One AdamW moment (canonical name -> tensor, None before the first step) as canonical float32
    numpy (zeros where None). The torch layout is the canonical layout: a copy and a strict check."""
    return _to_numpy(module, moments, "optimizer moments")


def moments_from_canonical(module: nn.Module, moments: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Canonical moments (name -> array) as tensors on each parameter's device and dtype, checked
    against the parameters' names and shapes."""
    params = dict(module.named_parameters())
    check_names({name: tuple(p.shape) for name, p in params.items()}, dict(moments),
                where=f"optimizer moments for {type(module).__name__}")
    return {name: torch.from_numpy(np.array(m, np.float32)).to(params[name].device, params[name].dtype)
            for name, m in moments.items()}
