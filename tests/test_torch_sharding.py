"""The torch backend's sharded path (FSDP2, tensor parallel over DTensor) and activation checkpointing.

The runs launch ``tests/dist_torch_worker.py`` under ``torchrun --standalone`` on the CPU (gloo) and
hold a sharded run to the single-process run of the same config step by step. Two small cases
read one 2-process fsdp 2 run (its trajectory, and the checkpoint both ranks write in several files,
resumed from slices) and run by default; the sweep (fsdp / tensor / fsdp x tensor on 2 and 4 processes,
drawn specs with GQA, MoE and tied embeddings, the resume of a checkpoint on another mesh) runs
with ``LLM_TEST_DIST=1`` (``make test-dist``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_checks import TINY  # tests/ is on the path (pytest's rootdir conftest)
from torch.utils._python_dispatch import TorchDispatchMode

from backends.torch.convert import from_spec
from backends.torch.parallel import apply_activation_checkpointing
from llm.checkpoint import open_tensors, plan_shards
from llm.config import ActivationCheckpointing, load_config

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_torch_worker.py"
SWEEP = pytest.mark.dist  # make test-dist

# engine_checks.TINY with two layers, warmup, weight decay, clipping and accumulation 2.
BASE = [*TINY, "model.num_layers=2", "data.source=synthetic", "training.warmup_steps=3",
        "training.grad_accum_steps=2", "training.weight_decay=0.1", "training.grad_clip=0.5"]

# Drawn specs: GQA (4 query heads over 2 kv heads), MoE (4 experts, top 2), tied embeddings with
# a layernorm and biases, full multi-head attention with learned positions, q/k norm.
SPECS = {
    "gqa": [],
    # The balance loss is a product of two batch means, so per-shard balances average to another
    # number than the whole batch's (DDP alike): held at 0 here; the z loss is a token mean and stays.
    "moe": ["model.use_moe=true", "model.num_experts=4", "model.num_experts_per_token=2",
            "model.router_aux_loss_coef=0", "model.router_z_loss_coef=1e-3"],
    "tied": ["model.tie_embeddings=true", "model.norm_type=layernorm", "model.attention_bias=true",
             "model.mlp_bias=true"],
    "mha_learned": ["model.num_kv_heads=4", "model.position=learned", "model.use_glu=false",
                    "model.activation=gelu"],
    # per-head q/k RMSNorm: under tensor parallel each rank norms its own heads
    "qk_norm": ["model.qk_norm=true"],
}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_")}
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def run(tmp_path: Path, name: str, procs: int, *overrides: str, resume: Path | None = None) -> dict:
    """One worker run (``procs`` > 1: under torchrun) and what its process 0 wrote."""
    out, run_dir = tmp_path / f"{name}.json", tmp_path / name
    args = [str(out), str(run_dir), *BASE, f"data.cache_dir={tmp_path / 'cache'}", *overrides]
    if resume is not None:
        args.append(f"--resume={resume}")
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
              if procs > 1 else [sys.executable])
    done = subprocess.run([*launch, str(WORKER), *args], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return json.loads(out.read_text())


def assert_same_trajectory(sharded: dict, single: dict, rel: float = 1e-5) -> None:
    got, want = sharded["rows"], single["rows"]
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=rel), (a, b)
        # the clip's norm is sqrt of a float32 sum of squares taken per shard and then across
        # shards: another summation order than one process's (measured: 1.0e-5 at step 16, tensor 2)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=3 * rel), (a, b)
    for name, value in single["final"].items():
        np.testing.assert_allclose(sharded["final"][name], value, rtol=1e-3, atol=1e-4, err_msg=name)


def assert_placed_as_the_table_says(result: dict) -> None:
    """Every parameter is split where ``llm.sharding.placement`` puts it; a parameter the table
    leaves whole over fsdp is FSDP's default ``Shard(0)`` (and the tensor split, if any, stays)."""
    mesh = result["mesh"]
    for name, want in result["expected"].items():
        got = result["placements"][name]
        if mesh["fsdp"] > 1 and "fsdp" not in want and want[0] is None:
            want = ["fsdp", *want[1:]]  # a tensor split of dim 0 hides FSDP's strided one there
        assert got == want, (name, got, want)
    assert any("tensor" in w for w in result["placements"].values()) == (mesh["tensor"] > 1)
    assert any("fsdp" in w for w in result["placements"].values()) == (mesh["fsdp"] > 1)


SHARD_BYTES = 8192  # the checkpoint file size of these runs: the tiny model's tensors in several files
CHECKPOINTED = ["training.max_steps=6", "checkpoint.every_steps=3", f"--max-shard-bytes={SHARD_BYTES}"]


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory) -> tuple[Path, dict]:
    """One fsdp 2 run over two processes, 6 steps, a multi-file checkpoint at step 3: (its directory,
    its result). The trajectory test and the checkpoint test both read it (each torchrun launch
    costs seconds of process start-up)."""
    root = tmp_path_factory.mktemp("fsdp2")
    return root, run(root, "whole", 2, *CHECKPOINTED, "distributed.fsdp=2")


def test_fsdp_over_two_processes_follows_the_single_process_run(tmp_path, fsdp2_run):
    single = run(tmp_path, "single", 1, *CHECKPOINTED)
    sharded = fsdp2_run[1]
    assert sharded["mesh"] == {"data": 1, "fsdp": 2, "tensor": 1} and sharded["data_shards"] == 2
    assert_placed_as_the_table_says(sharded)
    assert sharded["placements"]["layers.0.attn.q_proj.weight"] == [None, "fsdp"]  # (heads, embed): embed
    assert_same_trajectory(sharded, single)


def assert_resumed(resumed: dict, whole: dict, name: str) -> None:
    """The resumed run's steps 4..6 have the losses of the uninterrupted run."""
    assert [r["step"] for r in resumed["rows"]] == [4, 5, 6]
    for a, b in zip(resumed["rows"], whole["rows"][3:], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (name, a, b)


def assert_slices_only(tmp_path: Path, name: str, procs: int) -> None:
    """Every rank of a sharded resume read each sharded tensor's local shard only (its local
    shape, never the whole tensor), and read every parameter and moment once."""
    sliced = 0
    for rank in range(procs):
        reads = json.loads((tmp_path / f"{name}.json.reads{rank}.json").read_text())
        names = [r[0] for r in reads]
        assert len(names) == len(set(names)) and any(n.startswith("exp_avg_sq.") for n in names), names
        for tensor, index, shape, local in reads:
            if local is not None:  # a DTensor: its shard alone
                assert index is not None and shape == local, (rank, tensor, index, shape, local)
                sliced += 1
    assert sliced > 0


def test_two_ranks_write_a_multi_file_checkpoint_that_resumes_from_slices_and_on_one_process(tmp_path, fsdp2_run):
    steps = CHECKPOINTED
    root, whole = fsdp2_run
    checkpoint = root / "whole" / "checkpoints" / "step_3"
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    files = set()
    for part in ("model", "state"):
        index = json.loads((checkpoint / f"{part}.safetensors.index.json").read_text())["weight_map"]
        files |= set(index.values())
    sizes = {part: {n: 4 * int(np.prod(open_tensors(checkpoint, part=part).shape(n)))
                    for n in open_tensors(checkpoint, part=part).names} for part in ("model", "state")}
    plan = plan_shards(sizes["model"], 2, state_sizes=sizes["state"], max_shard_bytes=SHARD_BYTES)
    assert {f.name for f in plan} == files and len(files) >= 6
    assert files <= set(manifest["files"]) and all((checkpoint / f).is_file() for f in files)
    assert {f.writer for f in plan} == {0, 1}  # both ranks wrote files (rank 0 holds none of rank 1's)
    assert not [p.name for p in checkpoint.iterdir() if p.name.startswith(".")]  # no digest left behind
    resumed = run(tmp_path, "fsdp2", 2, *steps, "distributed.fsdp=2", resume=checkpoint)
    assert_resumed(resumed, whole, "fsdp2")
    assert_slices_only(tmp_path, "fsdp2", 2)
    assert_resumed(run(tmp_path, "one", 1, *steps, resume=checkpoint), whole, "one")


TP_WORKER = ROOT / "tests" / "dist_torch_tp_worker.py"
TP_SPEC = {"vocab_size": 64, "max_seq_len": 16, "hidden_size": 32, "num_layers": 2, "num_heads": 4,
           "num_kv_heads": 2, "norm_type": "rmsnorm", "use_glu": True, "activation": "silu"}


# MoE with biases (the down projection's is added once, after the partial sums), a shared expert
# and a first dense layer, on each sparse dispatch.
TP_MOE = {"use_moe": True, "num_experts": 4, "num_experts_per_token": 2, "moe_intermediate_size": 16,
          "num_shared_experts": 1, "first_dense_layers": 1, "mlp_bias": True}


@pytest.mark.parametrize("extra", [{"qk_norm": True}, {"tie_embeddings": True, "qk_norm": True},
                                   {**TP_MOE, "moe_impl": "blocked"}, {**TP_MOE, "moe_impl": "grouped"}],
                         ids=["qk_norm-untied", "qk_norm-tied", "moe-blocked", "moe-grouped"])
def test_tensor_parallel_loss_parallel_qk_norm_and_moe_equal_the_whole_model_over_two_processes(tmp_path, extra):
    """Over tensor=2 the training path's cross entropy runs on vocab-split logits (loss_parallel) and
    the gathered path's on whole ones; both have the unsplit model's loss and gradients: the per-head
    q/k norm weights' (summed over the ranks' heads), and the experts' split on their mlp dimension
    under the blocked and grouped dispatches, among them."""
    out = tmp_path / "tp.json"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(TP_WORKER), str(out), json.dumps({**TP_SPEC, **extra})],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    result = json.loads(out.read_text())
    assert result["vocab_split"] == [False, True, False]
    want_loss, want_grads = result["whole"]
    assert result["unheld_loss"] == pytest.approx(want_loss, rel=1e-6)
    for path in ("training", "gathered"):
        loss, grads = result[path]
        assert loss == pytest.approx(want_loss, rel=1e-6), path
        assert grads.keys() == want_grads.keys()
        for name, g in want_grads.items():
            np.testing.assert_allclose(grads[name], g, rtol=1e-5, atol=1e-7, err_msg=f"{path}: {name}")
    # the gradients checked are not zeros (a missing sum over the ranks would fail above)
    checked = "layers.0.attn.q_norm.weight" if extra.get("qk_norm") else "layers.1.mlp.experts.down_proj.bias"
    assert np.abs(np.array(want_grads[checked])).max() > 1e-4


# ---------------------------------------------------------------------- the sweep (make test-dist)
MESHES = [(2, ["distributed.fsdp=2"]), (4, ["distributed.fsdp=4"]), (2, ["distributed.tensor=2"]),
          (4, ["distributed.fsdp=2", "distributed.tensor=2"]), (4, ["distributed.tensor=2"])]  # last: data 2 x tensor 2


@SWEEP
@pytest.mark.parametrize("spec", sorted(SPECS))
@pytest.mark.parametrize("procs,mesh", MESHES, ids=lambda m: m if isinstance(m, int) else "-".join(m))
def test_sharded_trajectory_equals_the_single_process_run(tmp_path, spec, procs, mesh):
    steps = ["training.max_steps=20", *SPECS[spec]]
    single = run(tmp_path, "single", 1, *steps)
    sharded = run(tmp_path, "sharded", procs, *steps, *mesh)
    assert_placed_as_the_table_says(sharded)
    assert_same_trajectory(sharded, single)


@SWEEP
@pytest.mark.parametrize("mesh", [["distributed.fsdp=2"], ["distributed.tensor=2"]], ids=["fsdp2", "tensor2"])
def test_blocks_compiled_under_fsdp2_or_tensor_parallel_follow_the_eager_single_process_run(tmp_path, mesh):
    # optimization.compile on the sharded path compiles each block in place (torchtitan's way):
    # the same trajectory as one eager process, and the canonical names and placements unchanged
    steps = ["training.max_steps=6", *SPECS["gqa"]]
    single = run(tmp_path, "single", 1, *steps)
    compiled = run(tmp_path, "compiled", 2, *steps, *mesh, "optimization.compile=true")
    assert_placed_as_the_table_says(compiled)
    assert_same_trajectory(compiled, single)


@SWEEP
def test_a_checkpoint_of_fsdp2_x_tensor2_resumes_on_fsdp2_and_on_one_process(tmp_path):
    steps = ["training.max_steps=6", "checkpoint.every_steps=3", *SPECS["tied"]]
    whole = run(tmp_path, "whole", 4, *steps, "distributed.fsdp=2", "distributed.tensor=2")
    checkpoint = tmp_path / "whole" / "checkpoints" / "step_3"
    assert checkpoint.is_dir(), sorted(p.name for p in (tmp_path / "whole" / "checkpoints").iterdir())
    later = whole["rows"][3:]
    for name, procs, mesh in (("fsdp2", 2, ["distributed.fsdp=2"]), ("one", 1, [])):
        resumed = run(tmp_path, name, procs, *steps, *mesh, resume=checkpoint)
        assert [r["step"] for r in resumed["rows"]] == [4, 5, 6]
        for a, b in zip(resumed["rows"], later, strict=True):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (name, a, b)


def resume_in_jax(tmp_path: Path, checkpoint: Path, overrides: list[str], fsdp: int, tensor: int) -> dict[int, float]:
    """The JAX engine's losses continuing ``checkpoint`` on 8 host devices as (fsdp, tensor)."""
    env = {**_env(), "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    job = {"overrides": overrides, "checkpoint": str(checkpoint), "fsdp": fsdp, "tensor": tensor}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "dist_jax_worker.py"), "resume_from", json.dumps(job),
                           str(tmp_path / "jax")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return {int(k): v for k, v in json.loads(done.stdout.split("RESULT", 1)[1])["losses"].items()}


@SWEEP
def test_a_two_writer_checkpoint_resumes_from_slices_on_fsdp2_x_tensor2_and_in_jax_on_fsdp4_x_tensor2(tmp_path):
    steps = ["training.max_steps=6", "checkpoint.every_steps=3", *SPECS["gqa"]]
    whole = run(tmp_path, "whole", 2, *steps, "distributed.fsdp=2", f"--max-shard-bytes={SHARD_BYTES}")
    checkpoint = tmp_path / "whole" / "checkpoints" / "step_3"
    resumed = run(tmp_path, "fsdp2_tensor2", 4, *steps, "distributed.fsdp=2", "distributed.tensor=2", resume=checkpoint)
    assert_resumed(resumed, whole, "fsdp2_tensor2")
    assert_slices_only(tmp_path, "fsdp2_tensor2", 4)
    overrides = [*BASE, f"data.cache_dir={tmp_path / 'cache'}", *steps[:2]]
    jax_losses = resume_in_jax(tmp_path, checkpoint, overrides, 4, 2)
    assert sorted(jax_losses) == [4, 5, 6]
    for row in whole["rows"][3:]:
        assert jax_losses[row["step"]] == pytest.approx(row["loss"], rel=1e-5), (row, jax_losses)


# ---------------------------------------------------------------------- activation checkpointing
class OpCount(TorchDispatchMode):
    """How many times each aten op runs (forward, recompute and backward together)."""

    def __init__(self):
        super().__init__()
        self.matmuls = self.others = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
            self.matmuls += 1
        else:
            self.others += 1
        return func(*args, **(kwargs or {}))


def _loss_and_grads(mode: ActivationCheckpointing) -> tuple[float, dict[str, np.ndarray], OpCount]:
    config = load_config(None, [*BASE, *SPECS["tied"], "model.dropout=0.1"], env={})
    model = from_spec(config.model, seed=3)
    apply_activation_checkpointing(model, mode)
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, 64, (2, 17)))
    torch.manual_seed(0)  # dropout: the recompute must replay the same masks
    counts = OpCount()
    with counts:
        loss = model(ids[:, :-1], ids[:, 1:]).loss
        loss.backward()
    return loss.item(), {n: p.grad.numpy().copy() for n, p in model.named_parameters()}, counts


def test_activation_checkpointing_recomputes_and_changes_no_number():
    loss, grads, none = _loss_and_grads(ActivationCheckpointing.NONE)
    for mode in (ActivationCheckpointing.FULL, ActivationCheckpointing.SELECTIVE):
        other_loss, other_grads, _ = _loss_and_grads(mode)
        assert other_loss == pytest.approx(loss, rel=1e-6, abs=0)
        for name, g in grads.items():
            np.testing.assert_allclose(other_grads[name], g, rtol=1e-6, atol=1e-7, err_msg=f"{mode}: {name}")
    _, _, full = _loss_and_grads(ActivationCheckpointing.FULL)
    _, _, selective = _loss_and_grads(ActivationCheckpointing.SELECTIVE)
    # full recomputes every block's forward, its matmuls too; selective keeps the matmul outputs
    # (no matmul runs twice) and recomputes the elementwise work.
    assert full.matmuls > none.matmuls and full.others > none.others
    assert selective.matmuls == none.matmuls and selective.others > none.others


def test_activation_checkpointing_leaves_the_names_and_inference_alone():
    config = load_config(None, [*BASE], env={})
    model = from_spec(config.model, seed=0)
    names = [n for n, _ in model.named_parameters()]
    apply_activation_checkpointing(model, ActivationCheckpointing.SELECTIVE)
    assert [n for n, _ in model.named_parameters()] == names  # canonical names: no wrapper module
    assert all(block.recompute is not None for block in model.layers)
    apply_activation_checkpointing(model, ActivationCheckpointing.NONE)
    assert all(block.recompute is None for block in model.layers)


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("policy", ["full", "selective"])
def test_the_attention_kernel_choice_covers_the_recompute_in_the_backward(tmp_path, monkeypatch, policy):
    """On CUDA the engine puts cuDNN first among SDPA kernels; a block recomputed in the backward
    must see the same choice, or the recompute runs another kernel than the forward saved (an H200
    run failed so: flash attention "not found in storage"). The context must span the backward."""
    import contextlib

    from engine_checks import tiny

    from backends.torch.engine import TrainingEngine

    inside = {"now": False}
    seen: list[bool] = []

    @contextlib.contextmanager
    def kernels(self):
        before, inside["now"] = inside["now"], True
        try:
            yield
        finally:
            inside["now"] = before

    monkeypatch.setattr(TrainingEngine, "_attention_kernels", kernels)
    config = tiny(tmp_path, "training.max_steps=1", f"training.activation_checkpointing={policy}")
    with TrainingEngine(config, run_dir=tmp_path / "run") as engine:
        weight = engine.model.layers[0].attn.q_proj.weight
        weight.register_hook(lambda grad: seen.append(inside["now"]))  # runs in the backward
        engine.fit()
    assert seen == [True]
