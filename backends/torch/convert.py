"""Canonical weights (``dict[str, np.ndarray]``, float32) to and from torch modules.

The canonical layout is the torch layout: linear weights are ``(out, in)``, stacked experts
``(E, out, in)``, and every module's ``state_dict()`` key is its canonical name. So this file has
no transpose list -- conversion is a copy plus strict name and shape checks. Names are relative
to the module given, so a component (a norm, one ``TransformerBlock``) converts on its own.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from backends.torch.model import DecoderModel
from llm.spec import ModelSpec, check_names

__all__ = ["to_canonical", "load_canonical", "from_canonical"]


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


def from_canonical(spec: ModelSpec, params: dict[str, np.ndarray]) -> DecoderModel:
    """A ``DecoderModel`` for ``spec`` holding ``params``."""
    model = DecoderModel(spec)
    load_canonical(model, params)
    return model
