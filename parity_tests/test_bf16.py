"""bf16 is compared against the float32 reference (KL <= 1e-2), not backend against backend."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from backends.flax.convert import from_canonical as flax_from
from backends.torch.convert import from_canonical as torch_from
from llm.parity import make_batch, mean_kl
from llm.spec import ModelSpec, init_params

SPECS = {
    "llama": ModelSpec(vocab_size=96, max_seq_len=32, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       use_glu=True, activation="silu", norm_type="rmsnorm", init_std=0.05),
    "gpt2_moe": ModelSpec(vocab_size=96, max_seq_len=32, hidden_size=64, num_layers=2, num_heads=4,
                          position="learned", activation="gelu_tanh", attention_bias=True, mlp_bias=True,
                          use_moe=True, num_experts=4, num_experts_per_token=2, init_std=0.05),
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_bf16_close_to_fp32_reference(name):
    spec = SPECS[name]
    params = init_params(spec, 0)
    ids, _ = make_batch(spec, 2, 32, 0)
    ref = torch_from(spec, params).eval()(torch.from_numpy(ids)).logits.detach().numpy()

    model = torch_from(spec, params).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch_bf16 = model(torch.from_numpy(ids)).logits.float().detach().numpy()
    flax_bf16 = np.asarray(flax_from(spec, params, dtype=jnp.bfloat16)(jnp.asarray(ids)).logits, np.float32)

    for label, logits in (("torch bf16", torch_bf16), ("jax bf16", flax_bf16)):
        kl = mean_kl(ref, logits)
        assert kl <= 1e-2, f"{label}: KL to fp32 reference {kl:.3e}"
        assert kl > 0, f"{label}: identical to fp32 -- bf16 compute was not used"
