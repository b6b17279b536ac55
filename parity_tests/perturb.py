"""Weights away from ``init_params``: the parity checks compare the backends there too.

``init_params`` sets every norm weight to 1 and every bias to 0, where a norm written as
``(y + b) * w`` equals ``y * w + b`` and a bias added in the wrong place adds nothing, so a check
run only at the initial weights cannot see those bugs.
"""

from __future__ import annotations

import numpy as np

from llm.spec import ModelSpec

NORM_WEIGHT_STD = 0.3  # norm weights become 1 + 0.3 z: scales spread over about 0.4 .. 1.6
BIAS_STD = 0.1  # of the order of a projection's output at the drawn init stds (0.02 .. 0.3)
REDRAWN = ("mlp.router.weight", "embed.position.weight")  # normal at init; drawn again on top of it


def perturb(spec: ModelSpec, params: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """A copy of ``params`` with seeded noise on the norm weights, the biases, the routers and the
    learned position table; every other tensor is unchanged (the same array objects)."""
    rng = np.random.default_rng([seed, 0x9E37])
    out = dict(params)
    for info in spec.param_table():
        if info.init == "ones":
            std = NORM_WEIGHT_STD
        elif info.init == "zeros":
            std = BIAS_STD
        elif info.name.endswith(REDRAWN):
            std = info.std
        else:
            continue
        out[info.name] = (params[info.name] + std * rng.standard_normal(info.shape)).astype(np.float32)
    return out


def weights_at(spec: ModelSpec, params: dict[str, np.ndarray], seed: int, weights: str) -> dict[str, np.ndarray]:
    """``params`` as they are (``weights="init"``) or perturbed (``"perturbed"``)."""
    if weights not in ("init", "perturbed"):
        raise ValueError(f"weights={weights!r} is not one of: init, perturbed")
    return perturb(spec, params, seed) if weights == "perturbed" else params
