"""Generation with the flax backend: the shared cases of ``tests/generate_cases.py``, the
compile-once property of the jitted decoding steps, and ``llm.api`` models on JAX.

The torch half is ``tests/test_torch_generate.py``; what needs no framework is
``tests/test_generate.py``. Never imports torch.
"""

from __future__ import annotations

import numpy as np
import pytest
from generate_cases import *  # noqa: F403 -- the shared cases, collected here for flax
from generate_cases import NEW, SPECS, T0, Backend, prompt

import backends.flax.inference as flax_gen
from backends.flax.convert import from_canonical
from llm.api import from_params
from llm.spec import init_params


@pytest.fixture(scope="module")
def backend() -> Backend:
    return Backend(flax_gen, from_canonical)


def test_flax_decode_step_compiles_once_for_32_tokens():
    spec = SPECS["rope_gqa"].replace(max_seq_len=48)  # a new cache length, so nothing is cached yet
    model = from_canonical(spec, init_params(spec, 1))
    before = dict(flax_gen.TRACES)
    out = flax_gen.generate(model, prompt(batch=1), 32)
    assert out.shape == (1, T0 + 32)
    assert flax_gen.TRACES["decode_step"] - before.get("decode_step", 0) == 1
    assert flax_gen.TRACES["prefill"] - before.get("prefill", 0) == 1
    np.testing.assert_array_equal(flax_gen.generate(model, prompt(seed=5, batch=1), 32)[:, :T0],
                                  prompt(seed=5, batch=1))
    assert flax_gen.TRACES["decode_step"] - before.get("decode_step", 0) == 1  # reused across calls
    # Sampling values are traced: new temperature / top-k / top-p values reuse one compiled step.
    for kwargs in (dict(temperature=0.5, top_k=3), dict(temperature=1.5, top_k=7, top_p=0.8), dict(top_p=0.3)):
        flax_gen.generate(model, prompt(batch=1), 32, **{"temperature": 1.0, **kwargs})
    assert flax_gen.TRACES["decode_step"] - before.get("decode_step", 0) == 2


def test_from_params_jax_matches_direct_model(backend):
    spec = SPECS["moe_dropless"]
    model = from_params(spec, init_params(spec, 1), "jax")
    ids = prompt()
    direct = flax_gen.generate(backend.model("moe_dropless"), ids, NEW)
    np.testing.assert_array_equal(model.generate(ids, NEW), direct)
