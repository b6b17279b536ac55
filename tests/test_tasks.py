"""Custom tasks chosen by name: from YAML, ``--task``/``--set task=``, a saved config.json, both engines.

A user's task module is written to a temporary directory: ``mytasks`` registers the tasks without
importing a framework (its backend halves are ``"module:Class"`` strings into ``mytasks_torch`` and
``mytasks_flax``), so resolving a config that names it stays framework-free.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

import llm.loop.tasks
from llm.config import Config, load_config
from llm.data import SyntheticDataModule
from llm.loop.tasks import TaskError, get_task
from llm.train import main

REPO = Path(__file__).resolve().parents[1]
TINY_YAML = (REPO / "configs" / "tiny.yaml").read_text()
RUN = ["--max-steps", "2", "--sample-tokens", "0", "--set", "logging.progress=false",
       "--set", "training.log_every=1", "--set", "logging.every_steps=1"]

MODULES = {
    "mytasks": '''
        from llm.data import SyntheticDataModule
        from llm.loop.tasks import LMTask, TrainingTask, register_task


        @register_task("mae_regression")
        class MAERegression(TrainingTask):
            backends = {"torch": "mytasks_torch:MAETorch", "jax": "mytasks_flax:MAEFlax"}
            canonical = False

            def build_datamodule(self, config, *, rank=0, world_size=1):
                return SyntheticDataModule(task="regression", batch_size=config.training.batch_size,
                                           num_samples=256, seed=config.training.seed, rank=rank,
                                           world_size=world_size)

            def artifacts(self, datamodule):
                return {"task.txt": self.name.encode()}


        @register_task("torch_only")
        class TorchOnly(TrainingTask):
            backends = {"torch": "mytasks_torch:MAETorch"}
            canonical = False


        @register_task("twin_lm")
        class TwinLM(LMTask):
            """The LM task under another name: canonical, so it checkpoints and resumes."""
    ''',
    "mytasks_torch": '''
        import torch
        from backends.torch.tasks import TorchTask


        class MAETorch(TorchTask):
            """A bias-free linear map under torch's own L1 loss."""

            def build_model(self, config, datamodule):
                return torch.nn.Linear(datamodule.in_features, datamodule.out_features, bias=False)

            def loss(self, model, batch):
                mae = torch.nn.functional.l1_loss(model(batch[0]), batch[1])
                return mae, {"loss": mae}
    ''',
    "mytasks_flax": '''
        import jax.numpy as jnp
        from flax import nnx
        from backends.flax.tasks import FlaxTask


        class MAEFlax(FlaxTask):
            """A bias-free linear map, its L1 loss written out."""

            def build_model(self, config, datamodule):
                return nnx.Linear(datamodule.in_features, datamodule.out_features, use_bias=False,
                                  rngs=nnx.Rngs(0))

            def loss(self, model, batch, *, deterministic):
                mae = jnp.mean(jnp.abs(model(batch[0]) - batch[1]))
                return mae, {"loss": mae}
    ''',
}


@pytest.fixture
def user_tasks(tmp_path, monkeypatch) -> Path:
    """A directory holding the user's task modules, on sys.path; the registry is restored after."""
    root = tmp_path / "user"
    root.mkdir()
    for name, code in MODULES.items():
        (root / f"{name}.py").write_text(textwrap.dedent(code))
    monkeypatch.syspath_prepend(str(root))
    forget_user_tasks(monkeypatch)  # also tasks other test modules registered: as in a fresh process
    yield root
    for name in MODULES:
        sys.modules.pop(name, None)


def forget_user_tasks(monkeypatch) -> None:
    """As in a fresh process: the user's modules not imported, only the built-ins registered."""
    monkeypatch.setattr(llm.loop.tasks.TASKS, "_classes", {k: llm.loop.tasks.TASKS.get(k) for k in ("lm", "regression")})
    for name in MODULES:
        sys.modules.pop(name, None)


def tiny_yaml(path: Path, task: str) -> Path:
    path.write_text(f"{TINY_YAML}task: {task}\n")
    return path


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def env() -> dict[str, str]:
    import os

    out = {k: v for k, v in os.environ.items() if not k.startswith("LLM_")}
    out["PYTHONPATH"] = str(REPO)
    out["OMP_NUM_THREADS"] = "1"
    return out


# ---------------------------------------------------------------------- resolving names
def test_the_regression_task_builds_its_regression_set_whatever_the_data_source():
    config = load_config(env={}, overrides=["task=regression", "training.batch_size=4", "training.seed=3"])
    assert config.data.source != "synthetic"
    dm = get_task(config.task).build_datamodule(config, rank=1, world_size=2)
    assert isinstance(dm, SyntheticDataModule) and dm.task == "regression"
    dm.setup()
    x, y = dm.batch_at(0)
    assert x.dtype == y.dtype == np.float32 and x.shape == (2, dm.in_features) and y.shape == (2, dm.out_features)
    assert dm.seed == 3 and dm.rank == 1


def test_module_colon_name_imports_the_module_that_registers_it(user_tasks):
    assert "mae_regression" not in llm.loop.tasks.available_tasks()
    task = get_task("mytasks:mae_regression")
    assert task.name == "mae_regression" and task.canonical is False and "mytasks" in sys.modules
    assert get_task("twin_lm").name == "twin_lm" and get_task("lm").name == "lm"  # registered by the import


def test_unknown_names_say_what_is_registered_and_the_nearest(user_tasks):
    with pytest.raises(TaskError) as info:
        get_task("regresion")
    assert str(info.value) == ("task: unknown task 'regresion'; did you mean 'regression'? registered: lm, "
                               "regression (or give 'package.module:name' to import the module that registers it)")
    with pytest.raises(TaskError) as info:
        get_task("mytasks:mae_regresion")
    assert str(info.value) == ("task 'mytasks:mae_regresion': importing mytasks registered no task "
                               "'mae_regresion'; did you mean 'mae_regression'? registered: lm, mae_regression, "
                               "regression, torch_only, twin_lm")
    with pytest.raises(TaskError, match=r"^task 'nowhere\.tasks:x': no module named 'nowhere' \(is it on PYTHONPATH\?\)$"):
        get_task("nowhere.tasks:x")
    (user_tasks / "broken_tasks.py").write_text("import not_installed_dependency\n")
    with pytest.raises(ModuleNotFoundError, match="not_installed_dependency"):  # the module's own bug: traceback
        get_task("broken_tasks:x")


@pytest.mark.parametrize("args, message", [
    (["--task", "regresion"], "task: unknown task 'regresion'; did you mean 'regression'? registered: lm, regression"),
    (["--set", "task=mytasks:mae_regresion"], "task 'mytasks:mae_regresion': importing mytasks registered no task "
                                               "'mae_regresion'; did you mean 'mae_regression'?"),
    (["--task", "nowhere.tasks:x"], "task 'nowhere.tasks:x': no module named 'nowhere' (is it on PYTHONPATH?)"),
    (["--task", "two words"], "task='two words' must be a registered task name (built-in: 'lm', 'regression') "
                              "or 'package.module:name' (override 'task=two words')"),
])
def test_bad_task_names_are_one_line_config_errors(user_tasks, capsys, args, message):
    assert main([*args, "--config", str(tiny_yaml(user_tasks / "run.yaml", "lm")), "--print-config"]) == 2
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert out.out == "" and len(lines) == 1 and lines[0].startswith(f"llm-train: error: {message}"), lines


def test_a_task_without_the_chosen_backend_is_a_config_error(user_tasks, capsys):
    config = tiny_yaml(user_tasks / "run.yaml", "mytasks:torch_only")
    assert main(["--backend", "jax", "--config", str(config), "--run-dir", str(user_tasks / "run")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "llm-train: error: task 'torch_only' has no 'jax' implementation (it has: torch); choose --backend torch")
    assert not (user_tasks / "run").exists()  # refused before any run directory or engine


def test_lm_rules_hold_for_a_task_built_on_the_lm_task(user_tasks, capsys):
    # Config ties data.seq_len to model.max_seq_len for "lm" only; LMTask.validate holds it for subclasses
    config = tiny_yaml(user_tasks / "run.yaml", "mytasks:twin_lm")
    assert main(["--config", str(config), "--set", "data.seq_len=128", "--run-dir", str(user_tasks / "run")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "llm-train: error: data.seq_len=128 must be <= model.max_seq_len=64")


def test_print_config_with_a_custom_task_imports_no_framework(user_tasks):
    code = ("import sys, llm.train; rc = llm.train.main(['--config', 'run.yaml', '--print-config']); "
            "print('FRAMEWORK', rc, sorted({'torch', 'jax'} & set(sys.modules)))")
    tiny_yaml(user_tasks / "run.yaml", "mytasks:mae_regression")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=user_tasks,
                         env=env(), timeout=120)
    text, _, tail = out.stdout.rpartition("FRAMEWORK")
    assert out.returncode == 0 and tail.split() == ["0", "[]"], out.stderr
    assert yaml.safe_load(text)["task"] == "mytasks:mae_regression"


# ---------------------------------------------------------------------- training by name
def test_custom_task_from_yaml_trains_checkpoints_and_resumes_from_config_json(user_tasks, monkeypatch, caplog):
    caplog.set_level("INFO", logger="llm")
    run = user_tasks / "run"
    config_path = tiny_yaml(user_tasks / "run.yaml", "mytasks:twin_lm")
    assert main(["--config", str(config_path), "--run-dir", str(run), *RUN]) == 0
    assert losses(run).keys() == {1, 2}
    saved = json.loads((run / "config.json").read_text())
    assert saved["task"] == "mytasks:twin_lm"
    assert Config.from_dict(saved) == load_config(config_path, ["training.max_steps=2", "logging.progress=false",
                                                                "training.log_every=1", "logging.every_steps=1",
                                                                f"logging.run_dir={run}"], env={})
    checkpoint = json.loads((run / "checkpoints" / "step_2" / "config.json").read_text())
    assert checkpoint["task"] == "mytasks:twin_lm"
    assert any(r.getMessage().startswith("task twin_lm on") for r in caplog.records)  # the custom task ran

    forget_user_tasks(monkeypatch)  # a new process: only config.json says where the task comes from
    assert main(["--run-dir", str(run), "--resume", "--max-steps", "3", "--sample-tokens", "0"]) == 0
    assert losses(run).keys() == {1, 2, 3} and "mytasks" in sys.modules
    assert any(r.getMessage().startswith(f"resumed from {run / 'checkpoints' / 'step_2'}") for r in caplog.records)


def test_custom_task_from_the_command_line_in_a_fresh_process(user_tasks):
    """``python -m llm.train`` puts the current directory on sys.path: a module there is importable."""
    tiny_yaml(user_tasks / "run.yaml", "lm")
    out = subprocess.run([sys.executable, "-m", "llm.train", "--config", "run.yaml", "--task",
                          "mytasks:mae_regression", "--run-dir", "run", *RUN], capture_output=True, text=True,
                         cwd=user_tasks, env=env(), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    run = user_tasks / "run"
    assert (run / "task.txt").read_text() == "mae_regression"  # the custom task's artifact
    assert json.loads((run / "config.json").read_text())["task"] == "mytasks:mae_regression"
    assert losses(run).keys() == {1, 2} and "stopped: completed at step 2/2" in out.stdout


def test_custom_task_on_the_jax_backend(user_tasks, capsys):
    pytest.importorskip("jax")
    run = user_tasks / "run"
    rc = main(["--backend", "jax", "--config", str(tiny_yaml(user_tasks / "run.yaml", "lm")),
               "--set", "task=mytasks:mae_regression", "--run-dir", str(run), *RUN])
    assert rc == 0, capsys.readouterr().err[-3000:]
    assert (run / "task.txt").read_text() == "mae_regression" and losses(run).keys() == {1, 2}


def test_the_unigram_entropy_of_one_distinct_token_is_plus_zero():
    import math

    import numpy as np

    from llm.loop.tasks import unigram_entropy

    for tokens in (np.array([7]), np.full(100, 3)):
        h = unigram_entropy(tokens, vocab_size=16)
        assert h == 0.0 and math.copysign(1.0, h) == 1.0 and f"{h:.4f}" == "0.0000"
    assert unigram_entropy(np.array([0, 1])) == math.log(2)


# ---------------------------------------------------------------------- a task's own optimiser
MODULES["mytasks_sgd"] = '''
    from llm.loop.tasks import LMTask, register_task


    @register_task("sgd_lm")
    class SGDLM(LMTask):
        backends = {"torch": "mytasks_sgd_torch:SGDTorch", "jax": "mytasks_sgd_flax:SGDFlax"}
'''
MODULES["mytasks_sgd_torch"] = '''
    import torch
    from backends.torch.tasks import TorchLMTask


    class SGDTorch(TorchLMTask):
        def build_optimizer(self, config, model):
            return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

        def build_scheduler(self, config, optimizer):
            return torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
'''
MODULES["mytasks_sgd_flax"] = '''
    import optax
    from backends.flax.tasks import FlaxLMTask


    class SGDFlax(FlaxLMTask):
        def build_optimizer(self, config, model):
            schedule = optax.exponential_decay(0.05, transition_steps=2, decay_rate=0.5, staircase=True)
            return optax.inject_hyperparams(optax.sgd)(learning_rate=schedule, momentum=0.9)
'''


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_a_task_with_its_own_optimizer_trains_follows_its_schedule_and_resumes(user_tasks, backend):
    if backend == "jax":
        pytest.importorskip("jax")
    config_path = tiny_yaml(user_tasks / "run.yaml", "mytasks_sgd:sgd_lm")
    args = ["--backend", backend, "--config", str(config_path), "--sample-tokens", "0",
            "--set", "logging.progress=false", "--set", "training.log_every=1",
            "--set", "logging.every_steps=1"]
    full, cut = user_tasks / "full", user_tasks / "cut"
    assert main([*args, "--run-dir", str(full), "--max-steps", "5"]) == 0
    assert main([*args, "--run-dir", str(cut), "--max-steps", "2"]) == 0
    assert main(["--backend", backend, "--run-dir", str(cut), "--resume", "--max-steps", "5",
                 "--sample-tokens", "0"]) == 0
    rows = {run: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            for run in (full, cut)}
    expected = [0.05, 0.05, 0.025, 0.025, 0.0125]
    if backend == "jax":  # optax keeps the rate in float32
        expected = [float(np.float32(lr)) for lr in expected]
    assert [r["lr"] for r in rows[full]] == [r["lr"] for r in rows[cut]] == expected
    assert losses(cut) == losses(full) and losses(full)[5] < losses(full)[1]
    saved = json.loads((cut / "checkpoints" / "step_5" / "state.json").read_text())["optimizer"]
    assert saved["name"] == "task" and saved["backend"] == backend
