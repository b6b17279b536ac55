"""The one map from a backend's name to its package, looked up lazily.

``backend("torch")`` imports ``backends.torch``, ``backend("jax")`` (alias ``"flax"``) imports
``backends.flax``, each only when asked, so nothing in the core, the loop or a config resolution
pulls in a framework. Every backend package exposes the same surface, ``SURFACE`` (a test checks
both, with the same signatures):

    DecoderModel                          the model class (``backends/<name>/model.py``)
    from_spec(spec, seed, ...)            a model holding ``init_params(spec, seed)``
    from_canonical(spec, params, ...)     a model holding canonical weights
    to_canonical(module)                  canonical float32 numpy weights of a module
    load_canonical(module, params)        canonical weights into a module, in place, strict
    grads_to_canonical(module, grads)     gradients in canonical names and layout
    moments_to_canonical(module, moments) AdamW moments (a backend's tree) in canonical layout
    moments_from_canonical(module, moments) canonical AdamW moments in the backend's layout
    load_model(spec, params, ...)         an eval-mode model on a device and dtype (``llm.load``)
    logits(model, ids)                    float32 numpy logits
    generate(model, ids, n, ...)          KV-cached decoding under ``llm.sampling``'s rules
    TrainingEngine                        the engine (``llm.loop.engine.BaseTrainingEngine``)
    TaskHalf, LMTaskHalf, RegressionTaskHalf   the framework halves of tasks (``llm.loop.tasks``)

This module never imports torch or jax itself.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

__all__ = ["ALIASES", "NAMES", "PACKAGES", "SURFACE", "BackendError", "backend", "canonical_name"]

PACKAGES = {"torch": "backends.torch", "jax": "backends.flax"}  # canonical name -> package
ALIASES = {"torch": "torch", "jax": "jax", "flax": "jax"}  # accepted name -> canonical name
NAMES = tuple(PACKAGES)

SURFACE = ("DecoderModel", "from_spec", "from_canonical", "to_canonical", "load_canonical", "grads_to_canonical",
           "moments_to_canonical", "moments_from_canonical", "load_model", "logits", "generate",
           "TrainingEngine", "TaskHalf", "LMTaskHalf", "RegressionTaskHalf")


class BackendError(ValueError):
    """An unknown backend name, or a backend whose framework is not installed."""


def canonical_name(name: Any) -> str:
    """``"torch"`` or ``"jax"`` for any accepted spelling; a ``BackendError`` otherwise."""
    found = ALIASES.get(name.lower()) if isinstance(name, str) else None
    if found is None:
        raise BackendError(f"unknown backend {name!r}; choose one of: torch, jax (alias flax)")
    return found


def backend(name: Any) -> ModuleType:
    """The package of backend ``name``, imported on first use."""
    package = PACKAGES[canonical_name(name)]
    try:
        return importlib.import_module(package)
    except ModuleNotFoundError as e:
        if e.name and package.startswith(e.name):
            raise BackendError(f"backend {name!r}: its package {package} is missing") from None
        if e.name and e.name.split(".")[0] in ("torch", "jax", "flax", "optax", "jaxlib"):
            raise BackendError(f"backend {name!r} needs {e.name.split('.')[0]}, which is not installed "
                               "(run `make init`)") from None
        raise
