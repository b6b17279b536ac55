"""Canonical parameter dicts <-> Flax NNX modules: the one place where layouts are transposed.

The transpose rule
------------------
A parameter is a *linear weight* iff its canonical name ends with ``_proj.weight``,
``kv_a_proj_with_mqa.weight`` (MLA, transformers' name), ``router.weight``, ``shared_gate.weight`` or ``lm_head.weight``. Canonical (PyTorch / Hugging Face) layout stores those
``(out, in)`` -- ``(E, out, in)`` for stacked experts -- and the Flax modules store them
``(in, out)`` / ``(E, in, out)``, so converting either way swaps the last two axes. Every other
parameter (embedding tables, norms, biases) has the same layout on both sides and is copied as is.

Names are dotted paths relative to the module converted (``layers.0.attn.q_proj.weight`` for a
``DecoderModel``, ``attn.q_proj.weight`` for a ``TransformerBlock``, ``weight`` for a norm). A module
converted on its own cannot see its own name, so for a root-level ``weight`` the owner's type
decides (a ``Linear`` or ``ExpertLinear`` is a linear weight); everywhere else the name rule
decides and the owner's type is checked against it, so a new layer that breaks the naming
contract fails loudly instead of loading transposed.

Every conversion is strict (``llm.spec.check_names``, the rule every loader shares): every
missing, unexpected and mis-shaped name is listed in one ``SpecError``, shapes read in the layout
of the input (canonical for ``load_canonical`` / ``moments_from_canonical``, flax for gradients and
``moments_to_canonical``), and a load writes nothing unless all match. Values round-trip bitwise
(float32 in, float32 out; transposes are exact). The same functions serve parameters, gradients
and AdamW moments, so the engine never needs the transpose rule itself.

Weights (``to_canonical``, ``load_canonical``) are every ``nnx.Param`` and the untrained state
(``SelectionBias``, the rows ``ParamInfo.trainable=False`` marks); gradients and moments are the
Params alone: nothing differentiates or optimises that state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from backends.flax.model import DecoderModel, ExpertLinear, Linear, SelectionBias
from llm.spec import ModelSpec, SpecError, check_names, check_params, init_params

__all__ = ["LINEAR_SUFFIXES", "WEIGHTS", "flax_placement", "from_canonical", "from_spec", "grads_to_canonical",
           "is_linear_weight", "load_canonical", "moments_from_canonical", "moments_to_canonical", "read_flax_slice",
           "to_canonical", "to_canonical_array"]

LINEAR_SUFFIXES = ("_proj.weight", "kv_a_proj_with_mqa.weight", "router.weight", "shared_gate.weight", "lm_head.weight")


def is_linear_weight(name: str) -> bool:
    """The transpose rule on a canonical name (see the module docstring)."""
    return name.endswith(LINEAR_SUFFIXES)


def flax_placement(name: str, where: tuple[Any, ...]) -> tuple[Any, ...]:
    """A per-dimension tuple of the canonical layout of ``name`` (``llm.sharding.placement``: one
    mesh axis or None per dimension) in the flax layout: the transpose rule applied to the tuple."""
    return (*where[:-2], where[-1], where[-2]) if is_linear_weight(name) else tuple(where)


def to_canonical_array(name: str, value: Any) -> np.ndarray:
    """One flax-layout array of parameter ``name`` (or of a moment of it) as a canonical float32
    copy (owned: no device buffer shares it)."""
    return _swap(np.array(value, np.float32, copy=True), is_linear_weight(name))


def read_flax_slice(read: Callable[[tuple[Any, ...]], np.ndarray], name: str, index: tuple[Any, ...]) -> np.ndarray:
    """The flax-layout ``index`` (one slice per dimension) of the canonical tensor ``name``, read as
    ``read(canonical index)``: a device's shard straight from a checkpoint's slice."""
    return _swap(np.asarray(read(flax_placement(name, tuple(index))), np.float32), is_linear_weight(name))


def _name(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path)


def _natural_key(name: str) -> tuple:
    # layers.2 before layers.10
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))


# What a checkpoint's weights hold: the trained Params and the untrained state beside them.
WEIGHTS = (nnx.Param, SelectionBias)


def _params(module: nnx.Module, kinds: Any = nnx.Param) -> dict[str, tuple[nnx.Variable, bool]]:
    """Canonical name -> (the variable, whether it is a linear weight), in natural name order:
    ``kinds`` of variable (the Params, or ``WEIGHTS``)."""
    nodes = dict(nnx.iter_graph(module))
    found: dict[str, tuple[nnx.Variable, bool]] = {}
    for path, node in nodes.items():
        if not isinstance(node, kinds):
            continue
        name = _name(path)
        by_type = path[-1] == "weight" and isinstance(nodes[path[:-1]], (Linear, ExpertLinear))
        if len(path) == 1:
            linear = by_type  # the module is the layer itself; its own name is not known here
        else:
            linear = is_linear_weight(name)
            if linear != by_type:
                owner = type(nodes[path[:-1]]).__name__
                raise SpecError(f"{name}: the transpose rule says linear={linear} but it is held by "
                                f"a {owner}; rename the attribute or extend LINEAR_SUFFIXES")
        found[name] = (node, linear)
    return {k: found[k] for k in sorted(found, key=_natural_key)}


def _flax_shapes(params: Mapping[str, tuple[nnx.Param, bool]]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(param[...].shape) for name, (param, _) in params.items()}


def _canonical_shapes(params: Mapping[str, tuple[nnx.Param, bool]]) -> dict[str, tuple[int, ...]]:
    """The shapes the canonical layout gives ``params``: linears' last two axes swapped."""
    out = _flax_shapes(params)
    return {name: (*out[name][:-2], out[name][-1], out[name][-2]) if linear else out[name]
            for name, (_, linear) in params.items()}


def _swap(value: np.ndarray, linear: bool) -> np.ndarray:
    """The transpose rule on one array, either way: a linear's last two axes swapped, else as is."""
    return np.ascontiguousarray(np.swapaxes(value, -1, -2) if linear else value)


def _to_canonical_layout(module: nnx.Module, values: Mapping[str, Any], what: str) -> dict[str, np.ndarray]:
    """``values`` (name -> array in the flax layout, one per Param of ``module``) as canonical
    float32 numpy in natural name order; strict about names and (flax-layout) shapes."""
    params = _params(module)
    arrays = {k: np.asarray(v[...] if isinstance(v, nnx.Variable) else v, np.float32) for k, v in values.items()}
    check_names(_flax_shapes(params), arrays, where=f"{what} for {type(module).__name__}")
    return {name: _swap(arrays[name], linear) for name, (_, linear) in params.items()}


def _to_flax_layout(module: nnx.Module, values: Mapping[str, Any], what: str, kinds: Any = nnx.Param
                    ) -> dict[str, np.ndarray]:
    """Canonical ``values`` (name -> ``(out, in)`` arrays) in the flax layout as float32 numpy;
    strict about names and (canonical) shapes of ``module``'s ``kinds`` of variable."""
    params = _params(module, kinds)
    arrays = {k: np.asarray(v, np.float32) for k, v in values.items()}
    check_names(_canonical_shapes(params), arrays, where=f"{what} for {type(module).__name__}")
    return {name: _swap(arrays[name], linear) for name, (_, linear) in params.items()}


def to_canonical(module: nnx.Module) -> dict[str, np.ndarray]:
    """Every ``nnx.Param`` and ``SelectionBias`` of ``module`` as canonical float32 numpy, linears
    ``(out, in)``."""
    return {name: _swap(np.asarray(param[...], np.float32), linear)
            for name, (param, linear) in _params(module, WEIGHTS).items()}


def grads_to_canonical(module: nnx.Module, grads: nnx.State) -> dict[str, np.ndarray]:
    """Gradients w.r.t. ``module``'s Params (what ``nnx.grad`` returns) as canonical float32 numpy.

    Strict: a missing, unexpected or mis-shaped (flax-layout) name is a ``SpecError`` listing it.
    """
    flat = {_name(path): value for path, value in nnx.to_flat_state(grads)}
    return _to_canonical_layout(module, flat, "gradients")


def load_canonical(module: nnx.Module, params: Mapping[str, Any]) -> None:
    """Copy canonical ``params`` into ``module`` in place; strict about names and shapes.

    Raises ``SpecError`` (a ``ValueError``) listing every missing, unexpected and mis-shaped name
    before anything is written, so a failed load leaves the module untouched.
    """
    values = _to_flax_layout(module, params, "parameters", WEIGHTS)
    for name, (param, _) in _params(module, WEIGHTS).items():
        param[...] = jnp.asarray(values[name], dtype=param[...].dtype)


def from_canonical(spec: ModelSpec, params: Mapping[str, Any], *, dtype: Any = jnp.float32,
                   seed: int = 0) -> DecoderModel:
    """A ``DecoderModel`` holding canonical ``params`` (``seed`` only seeds the dropout streams)."""
    check_params(spec, dict(params))
    model = DecoderModel(spec, rngs=nnx.Rngs(seed), dtype=dtype)
    load_canonical(model, params)
    return model


def from_spec(spec: ModelSpec, seed: int = 0, *, dtype: Any = jnp.float32) -> DecoderModel:
    """A ``DecoderModel`` holding ``init_params(spec, seed)`` (dropout streams seeded by ``seed`` too)."""
    return from_canonical(spec, init_params(spec, seed), dtype=dtype, seed=seed)


def moments_to_canonical(module: nnx.Module, moments: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """One AdamW moment (canonical name -> array in the flax layout) as canonical float32 numpy,
    linear weights transposed back to ``(out, in)``. Strict like ``grads_to_canonical``."""
    return _to_canonical_layout(module, moments, "optimizer moments")


def moments_from_canonical(module: nnx.Module, moments: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Canonical moments (name -> ``(out, in)`` arrays) in the flax layout, float32 numpy, checked
    against the module's parameter names and (canonical) shapes."""
    return _to_flax_layout(module, moments, "optimizer moments")
