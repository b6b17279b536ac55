"""Every YAML file in configs/ loads through the full config path and round-trips; the presets keep their shapes."""

from pathlib import Path

import pytest

from llm.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def test_the_required_presets_exist():
    names = {p.stem for p in CONFIGS}
    assert {"tiny", "default", "gpt2_124m", "llama_1b", "moe", "deepseek_tiny", "deepseek_1b"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_loads_and_round_trips(path):
    config = load_config(path, env={})
    assert config.model.num_params() > 0
    again = type(config).from_dict(config.to_dict())
    assert again == config


def test_presets_have_the_issue_shapes():
    gpt2 = load_config(CONFIGS[0].parent / "gpt2_124m.yaml", env={})
    assert (gpt2.model.num_layers, gpt2.model.hidden_size, gpt2.model.num_heads, gpt2.model.vocab_size) == (12, 768, 12, 50304)
    assert (gpt2.data.seq_len, gpt2.training.batch_size) == (1024, 32)
    llama = load_config(CONFIGS[0].parent / "llama_1b.yaml", env={}).model
    assert llama.num_heads // llama.kv_heads == 4 and llama.use_glu and llama.norm_type.value == "rmsnorm"
    assert 0.9e9 < llama.num_params() < 1.3e9
    moe = load_config(CONFIGS[0].parent / "moe.yaml", env={}).model
    assert moe.use_moe and moe.num_experts == 8 and moe.num_experts_per_token == 2 and moe.capacity_factor is None


def test_deepseek_presets_route_like_deepseek_v3():
    for name in ("deepseek_tiny", "deepseek_1b"):
        spec = load_config(CONFIGS[0].parent / f"{name}.yaml", env={}).model
        assert spec.attention.value == "mla" and spec.num_shared_experts == 1, name
        assert spec.router_scoring.value == "sigmoid" and spec.router_group_score.value == "top2_sum", name
        assert spec.num_expert_groups > 1 and spec.router_selection_bias and spec.router_bias_update_rate > 0, name
    big = load_config(CONFIGS[0].parent / "deepseek_1b.yaml", env={}).model
    assert 0.9e9 < big.num_params(active=True) < 1.2e9 and big.num_params() > 4 * big.num_params(active=True)
