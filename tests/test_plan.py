"""The memory planner: ``llm.memory``'s per-device estimate (numbers worked out by hand for a small
spec), its sharding, the checkpointing policies' order, ``python -m llm.plan`` (table, JSON, one-line
errors), the 8B / 3B presets, and the figures docs/scaling.md quotes."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
from pathlib import Path

import pytest

from llm.config import ActivationCheckpointing, load_config
from llm.memory import PlanError, activation_bytes, estimate, parse_bytes
from llm.plan import main
from llm.sharding import local_shape, param_placements

ROOT = Path(__file__).resolve().parents[1]
SCALING = ROOT / "docs" / "scaling.md"

# vocab 64, D 16, 2 blocks, 4 heads (hd 4), 2 kv heads, GLU F 32, RMSNorm, untied, no biases.
SMALL = ["model.vocab_size=64", "model.max_seq_len=16", "model.hidden_size=16", "model.num_layers=2",
         "model.num_heads=4", "model.num_kv_heads=2", "model.intermediate_size=32", "model.use_glu=true",
         "model.activation=silu", "model.norm_type=rmsnorm", "data.seq_len=8", "training.batch_size=2",
         "training.eval_every=0"]
# Per block: attn_norm 16 + q 16*16 + k 8*16 + v 8*16 + o 16*16 + mlp_norm 16 + gate/up/down 3 * 32*16 = 2336;
# outside: embed 64*16 + final_norm 16 + lm_head 64*16 = 2064; total 2 * 2336 + 2064.
SMALL_PARAMS = 6736


@pytest.fixture(autouse=True)
def _no_env_overrides(monkeypatch):
    for key in [k for k in os.environ if k.startswith("LLM_")]:
        monkeypatch.delenv(key)


def small(*overrides: str):
    return load_config(None, [*SMALL, *overrides], env={})


def test_small_spec_by_hand_weights_gradients_moments_activations_logits():
    config = small()
    assert config.model.num_params() == SMALL_PARAMS
    est = estimate(config, 1)
    assert (est.micro_batch, est.seq_len) == (2, 8)
    # 16 tokens. Per token and block (float32, 4 bytes): none = 4 * (4 D + (H + 2 KV) hd + H hd + 4 F) + 4 H
    # (the float32 log-sum-exp) = 4 * (64 + 32 + 16 + 128) + 16 = 976; plus the final norm's 2 D = 128.
    assert est.parts == {"weights": 4 * 6736, "compute_copy": 0, "gradients": 4 * 6736,
                         "optimizer": 8 * 6736, "activations": 16 * (2 * 976 + 128),
                         "logits": 16 * 64 * (4 + 8)}
    assert est.total == 26944 + 26944 + 53888 + 33280 + 12288


def test_jax_total_overlaps_gradients_with_the_forward_buffers():
    # XLA: weights + optimizer + max(gradients, compute copy + activations + compute-dtype logits)
    config = small()
    jax_est, torch_est = estimate(config, 1, "jax"), estimate(config, 1)
    assert jax_est.parts["logits"] == 16 * 64 * 4 and jax_est.parts["activations"] == torch_est.parts["activations"]
    assert jax_est.total == 26944 + 53888 + max(26944, 0 + 33280 + 16 * 64 * 4)
    full = estimate(small("training.activation_checkpointing=full"), 1, "jax")
    b = full.parts
    assert full.total == b["weights"] + b["optimizer"] + max(b["gradients"], b["activations"] + b["logits"])
    with pytest.raises(PlanError, match="backend='mlx' is not one of: torch, jax"):
        estimate(config, 1, "mlx")


def test_bfloat16_halves_activations_and_adds_a_cast_copy_of_the_weights():
    est = estimate(small("optimization.dtype=bfloat16"), 1)
    assert est.parts["weights"] == 4 * SMALL_PARAMS and est.parts["optimizer"] == 8 * SMALL_PARAMS
    assert est.parts["compute_copy"] == 2 * SMALL_PARAMS
    # none per block: 2 * 240 + 16 = 496; final 2 * 32 = 64
    assert est.parts["activations"] == 16 * (2 * 496 + 64)
    assert est.parts["logits"] == 16 * 64 * (2 + 8)


def test_checkpointing_policies_by_hand_and_ordered_none_selective_full():
    spec = small().model
    got = {p: activation_bytes(spec, p, 16, small().optimization.dtype) for p in ActivationCheckpointing}
    # selective per block: 4 * (2 D + 48 + 2 F) + 16 = 592; full: 2 blocks x 4 D + one block's none (976)
    assert got[ActivationCheckpointing.NONE] == 16 * (2 * 976 + 128)
    assert got[ActivationCheckpointing.SELECTIVE] == 16 * (2 * 592 + 128)
    assert got[ActivationCheckpointing.FULL] == 16 * (2 * 64 + 976 + 128)
    assert got[ActivationCheckpointing.NONE] > got[ActivationCheckpointing.SELECTIVE] > got[ActivationCheckpointing.FULL]
    for preset in ("llama3_8b", "llama_3b", "llama_1b", "gpt2_124m"):
        config = load_config(ROOT / "configs" / f"{preset}.yaml", env={})
        per = [estimate(config.replace(training=config.training.replace(activation_checkpointing=p)), 8)
               .parts["activations"] for p in ("none", "selective", "full")]
        assert per[0] > per[1] > per[2], preset


@pytest.mark.parametrize("fsdp,tensor,devices", [(2, 1, 2), (4, 1, 8), (2, 2, 4), (1, 2, 2), (-1, 1, 4)])
def test_sharding_divides_the_weights_as_the_placements_say(fsdp, tensor, devices):
    config = small(f"distributed.fsdp={fsdp}", f"distributed.tensor={tensor}", "training.batch_size=8")
    est = estimate(config, devices)
    mesh = config.distributed.mesh(devices)
    placed = param_placements(config.model, mesh)
    local = sum(math.prod(local_shape(i.shape, placed[i.name], mesh)) for i in config.model.param_table())
    assert est.parts["weights"] == 4 * local and est.parts["gradients"] == 4 * local
    assert est.parts["optimizer"] == 8 * local
    if tensor == 1:  # every tensor of the small spec has a dimension fsdp divides: an exact split
        assert local * mesh.fsdp == SMALL_PARAMS
    else:  # the norms (embed axis only) are not split by tensor
        norms = 5 * 16
        assert local == (SMALL_PARAMS - norms) // (mesh.fsdp * tensor) + norms // mesh.fsdp


def test_fsdp_gathers_two_units_and_tensor_splits_heads_mlp_and_vocab():
    est = estimate(small("distributed.fsdp=2"), 2)
    assert est.parts["compute_copy"] == 4 * (2336 + 2336)  # float32: the two blocks (2064 outside < 2336)
    assert estimate(small("distributed.fsdp=2", "optimization.dtype=bfloat16"), 2).parts["compute_copy"] == 2 * 4672
    assert est.micro_batch == 1
    tp = estimate(small("distributed.tensor=2"), 2)
    assert tp.micro_batch == 2  # tensor parallel ranks share one batch shard
    # per block: 4 * (4 D + (4 + 4) * 4 / 2 + 16 / 2 + 4 * 32 / 2) + 4 * 4 / 2 = 4 * 152 + 8 = 616
    assert tp.parts["activations"] == 16 * (2 * 616 + 128)
    assert tp.parts["logits"] == 16 * 32 * 12  # vocab-parallel: 32 of the 64 rows


# SMALL with MLA: H 4, q_lora 8, kv_lora 8, nope 4, rope 2, v 4 (every head reads its own k and v).
MLA = ["model.attention=mla", "model.num_kv_heads=null", "model.q_lora_rank=8", "model.kv_lora_rank=8",
       "model.qk_nope_head_dim=4", "model.qk_rope_head_dim=2", "model.v_head_dim=4"]
# SMALL with 3 blocks, the first dense (F 32), then MoE: 4 experts of 8, top 2, one shared expert of 8, gated.
MOE = ["model.num_layers=3", "model.use_moe=true", "model.num_experts=4", "model.num_experts_per_token=2",
       "model.moe_intermediate_size=8", "model.num_shared_experts=1", "model.shared_expert_intermediate_size=8",
       "model.shared_expert_gate=true", "model.first_dense_layers=1"]


@pytest.mark.parametrize("extra", [MLA, MOE, [*MLA, *MOE], [*MOE, "model.first_dense_layers=3"],
                                   [*MOE, "model.router_selection_bias=true"]],
                         ids=["mla", "moe", "mla-moe", "moe-all-dense", "moe-selection-bias"])
def test_the_weights_are_the_specs_own_parameter_count(extra):
    config = small(*extra)
    est = estimate(config, 1)
    assert est.parts["weights"] == 4 * config.model.num_params()
    assert est.parts["optimizer"] == 8 * config.model.num_params()
    sharded = estimate(small(*extra, "distributed.fsdp=2", "training.batch_size=4"), 2)
    placed = param_placements(config.model, sharded.mesh)
    local = sum(math.prod(local_shape(i.shape, placed[i.name], sharded.mesh)) for i in config.model.param_table()
                if i.trainable)  # the selection bias is untrained state: no gradient, no moments
    assert sharded.parts["weights"] == 4 * local < est.parts["weights"]


def test_mla_activations_by_hand():
    spec = small(*MLA).model
    # per token and block: selective keeps q_a 8, q_b H (n + p) = 24, kv_a r + p = 10, kv_b H (n + dv) = 32
    # and the attention output H dv = 16: 90; none adds the two latent norms (8 + 8) and the rotated
    # q and k (2 * 24): 154. GLU MLP: none 4 F = 128, selective 2 F = 64.
    none, selective = 4 * (4 * 16 + 154 + 128) + 16, 4 * (2 * 16 + 90 + 64) + 16  # 1400, 760
    assert activation_bytes(spec, ActivationCheckpointing.NONE, 16, spec_dtype()) == 16 * (2 * none + 128)
    assert activation_bytes(spec, ActivationCheckpointing.SELECTIVE, 16, spec_dtype()) == 16 * (2 * selective + 128)
    # tensor 2 halves what is per head: 8 + 12 + 10 + 16 + 8 = 54 selective, 54 + 16 + 24 = 94 none
    assert activation_bytes(spec, ActivationCheckpointing.NONE, 16, spec_dtype(), tensor=2) == \
        16 * (2 * (4 * (64 + 94 + 64) + 8) + 128)


def test_moe_activations_count_the_routed_and_shared_experts_and_the_first_dense_layers_by_hand():
    spec = small(*MOE).model
    # dense block (F 32): none 976, selective 592 (as SMALL). MoE block: a token runs 2 experts of 8
    # and the shared 8, W = 24: none 4 * (4 D + 48 + 4 W) + 4 H + 8 E = 4 * 208 + 48 = 880,
    # selective 4 * (2 D + 48 + 2 W) + 48 = 560.
    got = {p: activation_bytes(spec, p, 16, spec_dtype()) for p in ActivationCheckpointing}
    assert got[ActivationCheckpointing.NONE] == 16 * (976 + 2 * 880 + 128)
    assert got[ActivationCheckpointing.SELECTIVE] == 16 * (592 + 2 * 560 + 128)
    assert got[ActivationCheckpointing.FULL] == 16 * (3 * 64 + 976 + 128)  # the larger block recomputed
    # FSDP gathers the two largest units: the MoE blocks (4 * 8 * 16 * 3 experts' + ... > the dense one)
    est = estimate(small(*MOE, "distributed.fsdp=2", "training.batch_size=4"), 2)
    moe_block = sum(i.size for i in spec.param_table() if i.name.startswith("layers.1."))
    dense_block = sum(i.size for i in spec.param_table() if i.name.startswith("layers.0."))
    assert moe_block > dense_block and est.parts["compute_copy"] == 4 * 2 * moe_block


def spec_dtype():
    return small().optimization.dtype


def test_a_batch_that_does_not_split_over_the_shards_names_the_key():
    with pytest.raises(PlanError, match=r"training.batch_size=2 does not split over the 4 data-parallel") as e:
        estimate(small(), 4)
    assert e.value.key == "training.batch_size"


@pytest.mark.parametrize("text,size", [("80GB", 80 * 10**9), ("141 GB", 141 * 10**9), ("96GiB", 96 * 2**30),
                                       ("1.5TB", 15 * 10**11), ("512MiB", 2**29), ("1000", 1000)])
def test_memory_sizes(text, size):
    assert parse_bytes(text) == size


def test_presets_have_the_published_parameter_counts():
    l8 = load_config(ROOT / "configs" / "llama3_8b.yaml", env={}).model
    assert l8.num_params() == 8_030_261_248  # Llama-3-8B
    assert (l8.vocab_size, l8.num_layers, l8.hidden_size, l8.num_heads, l8.kv_heads, l8.ffn_size,
            l8.rope_theta, l8.tie_embeddings, l8.max_seq_len) == (128256, 32, 4096, 32, 8, 14336, 500000.0, False, 8192)
    l3 = load_config(ROOT / "configs" / "llama_3b.yaml", env={}).model
    assert l3.num_params() == 3_212_749_824  # Llama-3.2-3B
    assert (l3.num_layers, l3.hidden_size, l3.num_heads, l3.kv_heads, l3.ffn_size, l3.tie_embeddings) == (
        28, 3072, 24, 8, 8192, True)
    assert l3.rope_scaling["factor"] == 32 and l3.rope_scaling["rope_type"] == "llama3"


def test_the_8b_preset_comment_holds_fsdp_2_is_the_least_that_fits_a_141gb_card():
    config = load_config(ROOT / "configs" / "llama3_8b.yaml", env={})
    card = parse_bytes("141GB")
    assert estimate(config, 1).total > card >= estimate(config, 2).total


# ---------------------------------------------------------------------- the CLI
def _tiny_yaml(tmp_path: Path) -> str:
    path = tmp_path / "small.yaml"
    path.write_text(small().to_yaml())
    return str(path)


def test_cli_table(tmp_path, capsys):
    path = _tiny_yaml(tmp_path)
    assert main(["--config", path, "--device-memory", "1MB"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{path} on 1 device: mesh data=1 fsdp=1 tensor=1"
    assert out[1].startswith("6,736 parameters; micro-batch 2 x 8 tokens per data-parallel shard; float32")
    rows = {line[:34].strip(): int(line[34:52].replace(",", "")) for line in out[3:10]}
    assert rows["weights (float32 master)"] == 26944 and rows["activations"] == 33280
    assert rows["total"] == 153344
    assert out[-1] == "device memory 1MB = 0.00 GiB: fits (15% of it)"
    assert main(["--config", path, "--device-memory", "100KB"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith(": does NOT fit (153% of it)")
    assert main(["--config", path]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("fits: unknown (no --device-memory given")
    assert main(["--config", path, "--backend", "jax"]) == 0
    total = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("total"))
    assert int(total[34:52].replace(",", "")) == estimate(load_config(path, []), 1, "jax").total
    assert total.endswith("(jax: weights + optimizer + max(gradients, the rest))")


def test_cli_json(tmp_path, capsys):
    path = _tiny_yaml(tmp_path)
    assert main(["--config", path, "--devices", "2", "--set", "distributed.fsdp=2", "--device-memory", "1MB",
                 "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["mesh"] == {"data": 1, "fsdp": 2, "tensor": 1} and got["micro_batch"] == 1
    assert got["bytes"]["weights"] == 4 * SMALL_PARAMS // 2 and got["total"] == sum(got["bytes"].values())
    assert got["device_memory"] == 10**6 and got["fits"] is True and got["parameters"] == SMALL_PARAMS
    assert got["placements"]["embed.weight"] == ["-", "fsdp"]
    assert got["placements"]["layers.0.attn.o_proj.weight"] == ["fsdp", "-"]


@pytest.mark.parametrize("argv,message", [
    (["--config", "configs/no_such.yaml"], "config file not found: configs/no_such.yaml"),
    (["--device-memory", "80XB"], "--device-memory '80XB' is not a memory size"),
    (["--device-memory", "0GB"], "--device-memory '0GB': the memory size must be > 0"),
    (["--devices", "0"], "--devices 0: must be >= 1"),
    (["--devices", "3", "--set", "distributed.fsdp=2"], "distributed.fsdp=2 x distributed.tensor=1 = 2 does not "
                                                        "divide the 3 devices"),
    (["--devices", "4"], "training.batch_size=2 does not split over the 4 data-parallel shards"),
    (["--set", "distributed.tensor=3", "--devices", "3"], "model.num_heads=4 is not divisible by distributed.tensor=3"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    if "--config" not in argv:
        argv = ["--config", _tiny_yaml(tmp_path), *argv]
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llm.plan: error: ") and message in err[0], err
    assert captured.out == ""


# ---------------------------------------------------------------------- docs/scaling.md
def _doc_outputs() -> list[tuple[list[str], str]]:
    """(argv, the output printed under it) of every ``$ python -m llm.plan`` block of the doc."""
    text = SCALING.read_text(encoding="utf-8")
    found = []
    for block in re.findall(r"^```text\n(.*?)^```", text, re.S | re.M):
        first, _, rest = block.partition("\n")
        if first.startswith("$ python -m llm.plan "):
            found.append((shlex.split(first)[4:], rest.rstrip("\n")))
    return found


def _doc_table_rows() -> list[tuple[list[str], list[str]]]:
    """(argv, the cells after the command) of every row of the doc's summary tables."""
    rows = []
    for line in SCALING.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\| `python -m llm\.plan ([^`]*)` \|(.*)\|$", line)
        if m:
            rows.append((shlex.split(m.group(1)), [c.strip() for c in m.group(2).split("|")]))
    return rows


def test_scaling_doc_outputs_are_the_planners(capsys):
    outputs = _doc_outputs()
    assert len(outputs) >= 2
    for argv, printed in outputs:
        assert main(argv) == 0, argv
        assert capsys.readouterr().out.rstrip("\n") == printed, " ".join(argv)


def test_scaling_doc_tables_are_the_planners(capsys):
    rows = _doc_table_rows()
    configs = {argv[argv.index("--config") + 1] for argv, _ in rows}
    assert configs == {"configs/llama3_8b.yaml"} and len(rows) >= 7  # the 8B and the 70B (--set) figures
    assert any("model.num_layers=80" in argv for argv, _ in rows)
    for argv, cells in rows:
        assert main([*argv, "--json"]) == 0
        got = json.loads(capsys.readouterr().out)
        b = got["bytes"]
        mesh = got["mesh"]
        want = [f"{mesh['data']} / {mesh['fsdp']} / {mesh['tensor']}",
                f"{(b['weights'] + b['compute_copy'] + b['gradients'] + b['optimizer']) / 2**30:.2f}",
                f"{b['activations'] / 2**30:.2f}", f"{b['logits'] / 2**30:.2f}", f"{got['total'] / 2**30:.2f}",
                "yes" if got["fits"] else "no"]
        assert cells == want, " ".join(argv)
