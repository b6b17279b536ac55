"""Run config: defaults, conversion, validation, layering (defaults < YAML < env < CLI), errors."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llm.config import (
    ActivationCheckpointing,
    CompileMode,
    Config,
    ConfigError,
    DataConfig,
    DistBackend,
    DType,
    Task,
    TokenizerKind,
    TrainingConfig,
    dump_yaml,
    load_config,
)
from llm.spec import ModelSpec

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# ---------------------------------------------------------------------- defaults and round trips
def test_defaults_are_valid_and_typed():
    c = load_config(env={})
    assert c == Config()
    assert c.task == Task.LM == "lm" and type(c.task) is str
    assert isinstance(c.model, ModelSpec)
    assert c.optimization.dtype is DType.FLOAT32 and c.optimization.compile is False
    assert c.data.source == "stdlib" and c.data.tokenizer is TokenizerKind.CHAR
    assert c.training.max_steps is None


def test_to_dict_is_json_safe_and_round_trips():
    c = load_config(env={}, overrides=["model.rope_scaling={rope_type: llama3, factor: 8.0, "
                                       "low_freq_factor: 1.0, high_freq_factor: 4.0, "
                                       "original_max_position_embeddings: 64}",
                                       "optimization.dtype=bfloat16", "training.max_steps=7",
                                       "task=regression"])
    d = json.loads(json.dumps(c.to_dict()))
    assert d["optimization"]["dtype"] == "bfloat16" and d["task"] == "regression"
    assert Config.from_dict(d) == c
    assert set(d) == {"task", "model", "training", "data", "optimization", "checkpoint", "logging",
                      "distributed"}


def test_dump_yaml_loads_back(tmp_path):
    c = load_config(env={}, overrides=["training.lr=1e-3", "data.seq_len=64", "checkpoint.keep_last=null"])
    path = tmp_path / "resolved.yaml"
    text = dump_yaml(c, path)
    assert path.read_text() == text and "lr: 0.001" in text
    assert load_config(path, env={}) == c


def test_sections_are_frozen():
    c = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.training.lr = 1.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.data = DataConfig()  # type: ignore[misc]


# ---------------------------------------------------------------------- precedence
def test_precedence_defaults_yaml_env_cli(tmp_path):
    path = write(tmp_path, """
        training:
          lr: 1.0e-3
          batch_size: 8
          seed: 5
        data:
          seq_len: 64
    """)
    env = {"LLM_TRAINING__LR": "2e-3", "LLM_TRAINING__BATCH_SIZE": "16", "LLM_OPTIMIZATION__COMPILE": "true"}
    cli = ["training.lr=3e-3"]
    default = TrainingConfig()

    c = load_config(path, cli, env)
    assert c.training.lr == 3e-3  # CLI beats env beats YAML
    assert c.training.batch_size == 16  # env beats YAML
    assert c.training.seed == 5  # YAML beats default
    assert c.data.seq_len == 64
    assert c.optimization.compile is True
    assert c.training.warmup_steps == default.warmup_steps

    assert load_config(path, [], env).training.lr == 2e-3
    assert load_config(path, [], {}).training.lr == 1e-3
    assert load_config(None, [], {}).training.lr == default.lr


def test_env_values_parse_as_yaml_scalars():
    env = {"LLM_TRAINING__MAX_STEPS": "null", "LLM_TRAINING__LR": "3e-4", "LLM_MODEL__HIDDEN_SIZE": "64",
           "LLM_MODEL__NORM_EPS": "1e-6", "LLM_LOGGING__TENSORBOARD": "yes", "LLM_TASK": "regression",
           "LLM_DATA__CACHE_DIR": "/tmp/x: y", "LLM_OTHER_SETTING": "ignored", "PATH": "/bin"}
    c = load_config(env=env, overrides=["training.max_steps=null"])
    assert c.training.max_steps is None
    assert c.training.lr == 3e-4 and isinstance(c.training.lr, float)  # YAML 1.1 reads 3e-4 as text
    assert c.model.hidden_size == 64 and c.model.norm_eps == 1e-6
    assert c.logging.tensorboard is True
    assert c.task == "regression"
    assert c.data.cache_dir == "/tmp/x: y"  # a str field takes the raw text


def test_cli_values():
    c = load_config(env={}, overrides=["data.source=data/**/*.txt", "optimization.compile_mode=max-autotune",
                                       "distributed.backend=GLOO", "training.max_steps=1e3",
                                       "training.grad_clip=0"])
    assert c.data.source == "data/**/*.txt"  # not parsed as a YAML alias
    assert c.optimization.compile_mode is CompileMode.MAX_AUTOTUNE
    assert c.distributed.backend is DistBackend.GLOO
    assert c.training.max_steps == 1000 and isinstance(c.training.max_steps, int)
    assert c.training.grad_clip == 0.0


def test_os_environ_is_the_default_env(monkeypatch):
    monkeypatch.setenv("LLM_TRAINING__EVAL_BATCHES", "3")
    assert load_config().training.eval_batches == 3


# ---------------------------------------------------------------------- unknown keys
@pytest.mark.parametrize("overrides, env, expected", [
    (["training.lrr=1"], {}, ["'training.lrr'", "'training.lr'"]),
    (["training.seq_len=64"], {}, ["'training.seq_len'", "'data.seq_len'"]),
    (["trainng.lr=1"], {}, ["'trainng'", "'training'"]),
    (["model.hidden=64"], {}, ["'model.hidden'", "'model.hidden_size'"]),
    ([], {"LLM_TRAINING__LRR": "1"}, ["'training.lrr'", "LLM_TRAINING__LRR", "'training.lr'"]),
    ([], {"LLM_DATAA__SEQ_LEN": "1"}, ["'dataa'", "LLM_DATAA__SEQ_LEN", "'data'"]),
    (["lr=1"], {}, ["'lr=1'", "section.field=value"]),
    (["training.lr"], {}, ["'training.lr'", "section.field=value"]),
])
def test_unknown_keys_name_the_key_and_the_nearest(overrides, env, expected):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides, env=env)
    for part in expected:
        assert part in str(info.value)


def test_unknown_yaml_section_and_key(tmp_path):
    bad_section = write(tmp_path, "trainig:\n  lr: 1.0\n", "a.yaml")
    with pytest.raises(ConfigError, match=r"'trainig'.*a\.yaml.*did you mean 'training'"):
        load_config(bad_section, env={})
    bad_key = write(tmp_path, "data:\n  seqlen: 64\n", "b.yaml")
    with pytest.raises(ConfigError, match=r"'data\.seqlen'.*b\.yaml.*did you mean 'data\.seq_len'"):
        load_config(bad_key, env={})
    bad_model = write(tmp_path, "model:\n  num_layer: 2\n", "c.yaml")
    with pytest.raises(ConfigError, match=r"'model\.num_layer'.*'model\.num_layers'"):
        load_config(bad_model, env={})


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ConfigError, match=r"'training\.batchsize'.*'training\.batch_size'"):
        Config.from_dict({"training": {"batchsize": 4}})
    with pytest.raises(ConfigError, match=r"'optimisation'.*'optimization'"):
        Config.from_dict({"optimisation": {}})


# ---------------------------------------------------------------------- types
@pytest.mark.parametrize("override, message", [
    ("training.batch_size=abc", "training.batch_size: expected int, got 'abc'"),
    ("training.batch_size=2.5", "training.batch_size: expected int, got 2.5"),
    ("training.batch_size=true", "training.batch_size: expected int, got True"),
    ("training.lr=fast", "training.lr: expected float, got 'fast'"),
    ("training.lr=.inf", "training.lr: expected a finite float"),
    ("training.max_steps=many", "training.max_steps: expected int or null, got 'many'"),
    ("logging.progress=maybe", "logging.progress: expected bool, got 'maybe'"),
    ("optimization.dtype=fp8", "optimization.dtype: expected one of 'float32', 'bfloat16', 'float16', got 'fp8'"),
    ("model.hidden_size=big", "model.hidden_size: expected int, got 'big'"),
    ("task=null", "task: expected a task name, got None"),
])
def test_wrong_types_name_key_type_and_value(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override], env={})
    assert message in str(info.value)
    assert f"override {override!r}" in str(info.value)


def test_wrong_type_in_yaml(tmp_path):
    path = write(tmp_path, "training:\n  batch_size: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"training\.batch_size: expected int, got \[1, 2\]"):
        load_config(path, env={})


def test_direct_construction_converts_and_checks():
    assert TrainingConfig(lr="1e-3").lr == 1e-3
    with pytest.raises(ConfigError, match="training.batch_size: expected int, got 'x'"):
        TrainingConfig(batch_size="x")


# ---------------------------------------------------------------------- rules
@pytest.mark.parametrize("override, message", [
    ("training.lr=-1", "training.lr=-1.0 must be > 0"),
    ("training.batch_size=0", "training.batch_size=0 must be >= 1"),
    ("training.beta2=1.0", "training.beta2=1.0 must be in [0, 1)"),
    ("training.min_lr=1.0", "training.min_lr=1.0 must be >= 0 and <= training.lr"),
    ("training.grad_accum_steps=0", "training.grad_accum_steps=0 must be >= 1"),
    ("training.max_steps=0", "training.max_steps=0 must be >= 1 or null"),
    ("data.val_fraction=1.0", "data.val_fraction=1.0 must be in [0, 1)"),
    ("data.seq_len=0", "data.seq_len=0 must be >= 1"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last=0 must be >= 1 or null"),
    ("logging.every_steps=0", "logging.every_steps=0 must be >= 1"),
    ("data.seq_len=512", "data.seq_len=512 must be <= model.max_seq_len=256"),
    ("model.num_heads=3", "model.hidden_size=128 is not divisible by num_heads=3"),
])
def test_rule_violations_name_field_and_rule(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override], env={})
    assert message in str(info.value)


def test_model_rule_violations_name_the_key_and_the_source(tmp_path):
    # ModelSpec is checked by the same section machinery: via the config its error is a ConfigError
    # with the config key, and the loader adds where the value came from
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["model.vocab_size=0"], env={})
    assert str(info.value) == "model.vocab_size=0 must be >= 1 (override 'model.vocab_size=0')"
    assert info.value.key == "model.vocab_size"
    with pytest.raises(ConfigError, match=r"^model\.dropout=1\.0 must be < 1 \(environment variable "
                                          r"LLM_MODEL__DROPOUT\)$"):
        load_config(env={"LLM_MODEL__DROPOUT": "1.0"})
    path = write(tmp_path, "model:\n  head_dim: 7\n")
    with pytest.raises(ConfigError, match=rf"^model\.head_dim=7 must be even for position=rope .*\(in {path}\)$"):
        load_config(path, env={})
    with pytest.raises(ConfigError, match=r"^model\.activation: expected one of 'gelu', .*got 'swish'$") as info:
        Config.from_dict({"model": {"activation": "swish"}})
    assert info.value.key == "model.activation"
    with pytest.raises(ConfigError, match=r"^model: expected a mapping of fields, got \[1\]$"):
        Config.from_dict({"model": [1]})


def test_booleans_come_from_yaml_words_not_from_strings():
    # env and CLI text is read as a YAML scalar, so yes/off/True are booleans there ...
    c = load_config(env={"LLM_LOGGING__TENSORBOARD": "on", "LLM_MODEL__USE_GLU": "True"},
                    overrides=["logging.progress=off", "optimization.compile=1"])
    assert (c.logging.tensorboard, c.model.use_glu, c.logging.progress, c.optimization.compile) == (True, True, False, True)
    # ... but a Python or quoted-YAML string is not a bool
    with pytest.raises(ConfigError, match=r"logging\.tensorboard: expected bool, got 'yes'"):
        Config.from_dict({"logging": {"tensorboard": "yes"}})


def test_field_coercion_of_tuples():
    from llm.fields import FieldError, coerce

    assert coerce([1, "2", 3.0], tuple[int, ...], "s.sizes") == (1, 2, 3)
    assert coerce(("a", "1e-3"), tuple[str, float], "s.pair") == ("a", 1e-3)
    with pytest.raises(FieldError, match=r"^s\.sizes\[1\]: expected int, got 'x'$"):
        coerce([1, "x"], tuple[int, ...], "s.sizes")
    with pytest.raises(FieldError, match=r"^s\.pair: expected a list of 2 \(str, float\), got \['a'\]$"):
        coerce(["a"], tuple[str, float], "s.pair")
    with pytest.raises(FieldError, match=r"^s\.sizes: expected a list of int or null, got 3$"):
        coerce(3, tuple[int, ...] | None, "s.sizes")


def test_cross_section_rules():
    with pytest.raises(ConfigError, match=r"data\.vocab_size=4096 must be <= model\.vocab_size=256"):
        load_config(overrides=["data.tokenizer=bpe"], env={})
    with pytest.raises(ConfigError, match=r"data.vocab_size=100 must be >= 260"):
        load_config(overrides=["data.tokenizer=bpe", "data.vocab_size=100"], env={})
    ok = load_config(overrides=["data.tokenizer=bpe", "data.vocab_size=512", "model.vocab_size=512"], env={})
    assert ok.data.vocab_size == 512
    with pytest.raises(ConfigError, match=r"training\.eval_every=250 needs data\.val_fraction > 0"):
        load_config(overrides=["data.val_fraction=0"], env={})
    # the regression task has no sequences, so seq_len is not tied to the model
    assert load_config(overrides=["task=regression", "data.seq_len=4096"], env={}).data.seq_len == 4096


# ---------------------------------------------------------------------- task
def test_task_is_any_name_and_checked_for_form_only(tmp_path):
    # built-ins as the enum takes them (value or member name, any case), stored as plain text
    assert load_config(overrides=["task=REGRESSION"], env={}).task == "regression"
    assert Config(task=Task.REGRESSION) == Config(task="regression")
    assert Config.from_dict({"task": "lm"}).to_dict()["task"] == "lm"  # a saved config.json
    # any other name loads without its module: the registry is checked where the task is resolved
    for name in ("my_task", "mypkg.tasks:my_task"):
        c = load_config(overrides=[f"task={name}", "data.seq_len=4096"], env={})  # LM-only rules skipped
        d = json.loads(json.dumps(c.to_dict()))
        assert c.task == d["task"] == name and Config.from_dict(d) == c
        assert load_config(write(tmp_path, dump_yaml(c)), env={}) == c
    assert load_config(env={"LLM_TASK": "mypkg.tasks:my_task"}).task == "mypkg.tasks:my_task"


@pytest.mark.parametrize("value", ["", "two words", "1pkg:name", "pkg.:name", "pkg:", "pkg:a:b"])
def test_malformed_task_names_are_errors(value):
    with pytest.raises(ConfigError, match=r"task=.* must be a registered task name \(built-in: 'lm', "
                                          r"'regression'\) or 'package.module:name'") as info:
        Config(task=value)
    assert info.value.key == "task"


def test_rule_violation_from_env_names_the_variable():
    with pytest.raises(ConfigError, match=r"training\.lr=-1\.0 must be > 0 \(environment variable LLM_TRAINING__LR\)"):
        load_config(env={"LLM_TRAINING__LR": "-1"})


# ---------------------------------------------------------------------- files
def test_missing_yaml_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "run.yaml"
    with pytest.raises(ConfigError, match=f"config file not found: {missing}"):
        load_config(missing, env={})


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "training:\n  lr: 1.0\n  batch_size: [1, 2\ndata:\n  seq_len: 4\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    msg = str(info.value)
    assert f"{path}:" in msg and "YAML syntax error" in msg
    line = int(msg.split(f"{path}:")[1].split(":")[0])
    assert 3 <= line <= 4


def test_yaml_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(write(tmp_path, "- training\n"), env={})
    with pytest.raises(ConfigError, match="section 'training' must be a mapping"):
        load_config(write(tmp_path, "training: 3\n", "b.yaml"), env={})
    assert load_config(write(tmp_path, "", "empty.yaml"), env={}) == Config()
    assert load_config(write(tmp_path, "training:\n", "null.yaml"), env={}) == Config()


# ---------------------------------------------------------------------- derived values
def test_derived_values():
    t = TrainingConfig(lr=1e-3, min_lr_ratio=0.1)
    assert t.final_lr == pytest.approx(1e-4)
    assert TrainingConfig(lr=1e-3, min_lr=5e-5).final_lr == 5e-5
    assert TrainingConfig(max_steps=None, epochs=3, grad_accum_steps=2).total_steps(10) == 15
    assert TrainingConfig(max_steps=7, epochs=3).total_steps(10) == 7
    d = Config().distributed
    assert d.resolve_backend(cuda_available=True) == "nccl"
    assert d.resolve_backend(cuda_available=False) == "gloo"
    assert DataConfig(cache_dir="~/c").resolved_cache_dir == Path("~/c").expanduser()


# ---------------------------------------------------------------------- import hygiene
def test_llm_imports_pull_in_neither_torch_nor_jax():
    code = ("import sys, llm, llm.config, llm.spec, llm.data, llm.data.text, llm.data.synthetic, "
            "llm.tokenization, llm.tokenization.bpe, llm.tokenization.char\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'jax', 'jaxlib', 'flax'))\n"
            "print(heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_other_frameworks_names_suggest_our_key(tmp_path):
    with pytest.raises(ConfigError, match=r"did you mean 'training.lr'"):
        load_config(overrides=["training.learning_rate=3e-4"], env={})
    with pytest.raises(ConfigError, match=r"did you mean 'training.max_steps'"):
        load_config(overrides=["training.max_iters=10"], env={})
    with pytest.raises(ConfigError, match=r"did you mean 'training.grad_accum_steps'"):
        load_config(write(tmp_path, "training:\n  gradient_accumulation_steps: 2\n"), env={})


def test_ddp_bucket_mb_key_and_range():
    # the size rule itself is the torch backend's (tests/test_torch_ddp.py); the config holds the key
    assert load_config(None, [], env={}).distributed.bucket_mb is None
    assert load_config(None, ["distributed.bucket_mb=400"], env={}).distributed.bucket_mb == 400.0
    with pytest.raises(ConfigError, match=r"distributed.bucket_mb=0.0 must be > 0 or null \(auto\)"):
        load_config(None, ["distributed.bucket_mb=0"], env={})


# ---------------------------------------------------------------------- bad input: one-line errors
def test_a_binary_config_file_is_named_as_not_utf8_yaml(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"model:\n  vocab_size: \xd0\xff\x00\x81\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    message = str(info.value)
    assert message.startswith(f"{path}: not a UTF-8 YAML file") and "byte 0xd0 at offset 21" in message
    assert "\n" not in message


@pytest.mark.parametrize("override", ["model.vocab_size=99999999999999999999", "model.num_layers=1e30",
                                      "model.head_dim=-99999999999999999999",
                                      "training.seed=9223372036854775808"])
def test_an_int_outside_int64_names_the_field_and_the_limit(override):
    key, _, _ = override.partition("=")
    with pytest.raises(ConfigError) as info:
        load_config(None, [override], env={})
    assert str(info.value).startswith(f"{key}=") and "is out of range" in str(info.value)
    assert "9223372036854775807" in str(info.value) and info.value.key == key


def test_int64_bounds_themselves_are_accepted():
    assert load_config(None, ["training.seed=9223372036854775807"], env={}).training.seed == 2**63 - 1
    with pytest.raises(ConfigError, match="out of range"):
        load_config(None, [], env={"LLM_TRAINING__SEED": str(2**63)})


def test_logging_level_defaults_to_info_and_takes_the_four_names():
    assert load_config(None, [], env={}).logging.level.value == "info"
    for name in ("debug", "info", "warning", "error", "WARNING"):
        assert load_config(None, [f"logging.level={name}"], env={}).logging.level.value == name.lower()
    with pytest.raises(ConfigError, match=r"logging.level: expected one of 'debug', 'info', 'warning', "
                                          r"'error', got 'verbose'"):
        load_config(None, ["logging.level=verbose"], env={})


def test_none_on_the_command_line_is_an_enum_value_where_the_field_has_one():
    config = load_config(None, ["training.activation_checkpointing=full", "training.activation_checkpointing=none",
                                "training.min_lr=none"], env={"LLM_TRAINING__INIT_FROM": "None"})
    assert config.training.activation_checkpointing is ActivationCheckpointing.NONE
    assert config.training.min_lr is None and config.training.init_from is None
    env = {"LLM_TRAINING__ACTIVATION_CHECKPOINTING": "none"}
    assert load_config(None, ["training.activation_checkpointing=full"], env=env).training.activation_checkpointing \
        is ActivationCheckpointing.FULL
    assert load_config(None, [], env=env).training.activation_checkpointing is ActivationCheckpointing.NONE
