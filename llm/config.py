"""The run config: frozen, validated sections and the loader that layers YAML, env and CLI.

A config is seven sections plus the task::

    model         llm.spec.ModelSpec (the architecture)
    training      optimiser, schedule, batch, steps, eval cadence, seed
    data          corpus source, tokenizer, sequence length, split, cache
    optimization  torch.compile, compute dtype, loss chunking, MoE implementation
    checkpoint    cadence, retention, directory
    logging       metrics.jsonl cadence, tensorboard, progress bar, run directory
    distributed   process-group backend

Every section, the model's included, is a frozen dataclass that converts and checks its fields at
construction with the one machinery of ``llm.fields``: a value of the wrong type fails as
``training.batch_size: expected int, got 'abc'`` and a value that breaks a rule as
``training.lr=-1.0 must be > 0`` (a ``ModelSpec`` raises ``SpecError``, which the config turns into a
``ConfigError`` with the same message and key). ``Config`` adds the rules that span sections
(``data.seq_len <= model.max_seq_len`` ...).

``load_config(path, overrides, env)`` resolves, lowest to highest precedence::

    dataclass defaults < YAML file < env LLM_<SECTION>__<FIELD> (and LLM_TASK) < CLI "section.field=value"

Env and CLI values are parsed as YAML scalars (``3e-4``, ``true``, ``null``, ``[1, 2]``); a field
typed ``str`` takes the raw text. Unknown sections or keys from any layer are errors that name the
key and the nearest valid one. This module must not import torch or jax.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llm.fields import FieldError, Section, check_key, coerce, field_types, nearest, plain, takes_text
from llm.moe_dispatch import MoEImpl
from llm.sharding import MeshError, MeshShape, check_divisible
from llm.spec import ModelSpec, SpecError

__all__ = [
    "ActivationCheckpointing",
    "CheckpointConfig",
    "CompileMode",
    "Config",
    "ConfigError",
    "DataConfig",
    "DistBackend",
    "DistributedConfig",
    "DType",
    "LoggingConfig",
    "LRSchedule",
    "OptimizationConfig",
    "Task",
    "TokenDType",
    "TokenizerKind",
    "TrainingConfig",
    "dump_yaml",
    "load_config",
    "nearest",
    "parse_override",
]


class ConfigError(FieldError):
    """A bad run config. ``key`` is the dotted key at fault (``"training.lr"``) when there is one."""


# ---------------------------------------------------------------------- choices
class Task(str, enum.Enum):
    """The built-in task names. ``Config.task`` is a plain string: any task registered with
    ``llm.loop.tasks.register_task`` can be chosen, and ``"package.module:name"`` imports the module that
    registers ``name`` first (``llm.loop.tasks.get_task`` resolves both)."""

    LM = "lm"  # next-token prediction on data.source
    REGRESSION = "regression"  # y = x @ w + noise (llm.data.synthetic); a smoke test of the engines


class DType(str, enum.Enum):
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"

    @property
    def is_half(self) -> bool:
        return self is not DType.FLOAT32


class CompileMode(str, enum.Enum):
    """``torch.compile(mode=...)`` values."""

    DEFAULT = "default"
    REDUCE_OVERHEAD = "reduce-overhead"
    MAX_AUTOTUNE = "max-autotune"
    MAX_AUTOTUNE_NO_CUDAGRAPHS = "max-autotune-no-cudagraphs"


class TokenizerKind(str, enum.Enum):
    CHAR = "char"
    BPE = "bpe"


class TokenDType(str, enum.Enum):
    UINT16 = "uint16"  # nanoGPT's prepare.py; vocabularies up to 65536 ids
    UINT32 = "uint32"  # larger vocabularies


class LRSchedule(str, enum.Enum):
    COSINE = "cosine"  # linear warmup, cosine decay to the floor (training.final_lr)
    LINEAR = "linear"  # linear warmup, linear decay to the floor
    CONSTANT = "constant"  # linear warmup, then flat
    STEP = "step"  # linear warmup, then times lr_gamma every lr_step_size steps
    PLATEAU = "plateau"  # linear warmup, then times lr_factor after lr_patience evals without improvement


class ActivationCheckpointing(str, enum.Enum):
    NONE = "none"  # keep every activation for the backward
    FULL = "full"  # keep each block's input only; recompute the block in the backward
    SELECTIVE = "selective"  # keep matmul outputs and attention; recompute the elementwise work


class DistBackend(str, enum.Enum):
    AUTO = "auto"  # nccl when CUDA is available, else gloo
    GLOO = "gloo"
    NCCL = "nccl"


# ---------------------------------------------------------------------- sections
class _Section(Section):
    """A run-config section: ``llm.fields.Section`` raising ``ConfigError``."""

    ERROR = ConfigError


@dataclass(frozen=True)
class TrainingConfig(_Section):
    """Optimiser (AdamW), schedule and loop cadence.

    ``batch_size`` is the global micro-batch in sequences (summed over data-parallel ranks; each rank
    gets ``batch_size // world_size``); one optimiser step consumes ``grad_accum_steps`` micro-batches,
    i.e. ``batch_size * grad_accum_steps * data.seq_len`` tokens. ``max_steps`` counts optimiser steps;
    ``None`` derives it from ``epochs`` (see ``total_steps``). The LR floor is ``min_lr`` when set,
    else ``lr * min_lr_ratio`` (``final_lr``); ``step`` and ``plateau`` never go below it either
    (``llm.schedule`` has every schedule's formula). ``grad_clip=0`` disables clipping; ``eval_every=0``
    disables evaluation. ``log_every`` is the console cadence; ``logging.every_steps`` the
    metrics.jsonl one. ``early_stopping_patience`` stops the run after that many evaluations without
    a val-loss improvement larger than ``early_stopping_min_delta`` (0 = never). ``init_from`` names a
    canonical checkpoint (e.g. one written by ``python -m llm.hf import``) whose weights the run starts
    from, with its spec as ``model`` and its ``tokenizer.json`` as the tokenizer (``llm.init_from``).
    ``activation_checkpointing``: ``none``; ``full`` (each block's activations are recomputed in the
    backward from its input); ``selective`` (recompute only the cheap elementwise work: norms,
    activations, residual adds; keep matmul outputs and attention). Same loss and gradients as
    ``none``; less memory, more compute.
    """

    SECTION = "training"

    batch_size: int = 32
    lr: float = 3e-4
    min_lr: float | None = None
    min_lr_ratio: float = 0.1
    lr_schedule: LRSchedule = LRSchedule.COSINE
    lr_step_size: int = 1000
    lr_gamma: float = 0.1
    lr_patience: int = 3
    lr_factor: float = 0.5
    max_steps: int | None = None
    epochs: int = 1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    grad_accum_steps: int = 1
    seed: int = 0
    eval_every: int = 250
    eval_batches: int = 20
    log_every: int = 10
    early_stopping_patience: int = 0
    early_stopping_min_delta: float = 0.0
    init_from: str | None = None
    activation_checkpointing: ActivationCheckpointing = ActivationCheckpointing.NONE

    def _validate(self) -> None:
        need = self._need
        need(self.init_from is None or self.init_from.strip() != "", "init_from",
             "must name a checkpoint directory or be null")
        need(self.batch_size >= 1, "batch_size", "must be >= 1")
        need(self.lr > 0, "lr", "must be > 0")
        need(self.min_lr is None or 0 <= self.min_lr <= self.lr, "min_lr",
             f"must be >= 0 and <= training.lr={self.lr!r}")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        need(self.lr_step_size >= 1, "lr_step_size", "must be >= 1")
        need(0 < self.lr_gamma <= 1, "lr_gamma", "must be in (0, 1]")
        need(self.lr_patience >= 1, "lr_patience", "must be >= 1")
        need(0 < self.lr_factor < 1, "lr_factor", "must be in (0, 1)")
        need(self.lr_schedule is not LRSchedule.PLATEAU or self.eval_every > 0, "lr_schedule",
             "=plateau reduces the rate on evaluations: set training.eval_every > 0")
        need(self.max_steps is None or self.max_steps >= 1, "max_steps", "must be >= 1 or null")
        need(self.epochs >= 1, "epochs", "must be >= 1")
        need(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(0 <= self.beta1 < 1, "beta1", "must be in [0, 1)")
        need(0 <= self.beta2 < 1, "beta2", "must be in [0, 1)")
        need(self.eps > 0, "eps", "must be > 0")
        need(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 disables clipping)")
        need(self.grad_accum_steps >= 1, "grad_accum_steps", "must be >= 1")
        need(self.seed >= 0, "seed", "must be >= 0")
        need(self.eval_every >= 0, "eval_every", "must be >= 0 (0 disables evaluation)")
        need(self.eval_batches >= 1, "eval_batches", "must be >= 1")
        need(self.log_every >= 1, "log_every", "must be >= 1")
        need(self.early_stopping_patience >= 0, "early_stopping_patience", "must be >= 0 (0 = off)")
        need(self.early_stopping_min_delta >= 0, "early_stopping_min_delta", "must be >= 0")

    @property
    def final_lr(self) -> float:
        """The floor the schedule decays to."""
        return self.min_lr if self.min_lr is not None else self.lr * self.min_lr_ratio

    def total_steps(self, steps_per_epoch: int) -> int:
        """Optimiser steps of the run: ``max_steps``, or ``epochs`` passes over ``steps_per_epoch``
        micro-batches (the data module's ``steps_per_epoch``) divided by ``grad_accum_steps``."""
        if self.max_steps is not None:
            return self.max_steps
        return max(1, self.epochs * steps_per_epoch // self.grad_accum_steps)


@dataclass(frozen=True)
class DataConfig(_Section):
    """Where tokens come from.

    ``source``: ``"stdlib"`` (every ``*.py`` of the running Python's standard library, tests,
    site-packages and the generated ``encodings/`` and ``pydoc_data/`` excluded, sorted; the default
    corpus, no download), ``"synthetic"`` (seeded random
    tokens; the regression task always uses synthetic data), or a file, a directory (recursive, text
    files only) or a glob. ``max_bytes`` caps the bytes read from a text source (files in sorted order,
    the last one cut; null = no cap). ``vocab_size`` is the BPE target size (ignored for ``char``).
    ``val_fraction`` is the share of tokens held out for validation, as whole files picked by a
    hash of their relative path (a one-file source: its tail; see ``llm/data/text.py``; 0 = no
    validation split).
    ``cache_dir`` holds tokenized corpora (null = ``$XDG_CACHE_HOME/llm`` or ``~/.cache/llm``).
    ``synthetic_size`` is the number of sequences (or regression rows) of the synthetic source.
    ``pack_documents``: batches also carry ``segment_ids`` so that attention never
    crosses the ``<EOS>`` that ends a document inside a window; ``reset_positions`` (needs
    ``pack_documents``) adds ``positions`` that restart at 0 at each document.
    Token files (``source`` a ``.bin``/``.npy`` file, a directory of them or a glob ending in one;
    ``llm/data/tokens.py``) are read as they lie, memory-mapped: the vocabulary is
    ``model.vocab_size``, no tokenizer is built, ``max_bytes`` does not apply, and a ``val.bin``
    beside ``train.bin`` is the val split. ``token_dtype`` is the dtype of a headerless ``.bin``
    (an llm.c header or a ``.npy`` carries its own). ``tokenizer_file``: a ``tokenizer.json`` used
    as the tokenizer instead of building ``tokenizer`` from the corpus (for token files: what
    decodes their ids; null = none, the run skips its text sample); a ``training.init_from``
    checkpoint's tokenizer comes first.
    """

    SECTION = "data"

    source: str = "stdlib"
    seq_len: int = 128
    tokenizer: TokenizerKind = TokenizerKind.CHAR
    vocab_size: int = 4096
    val_fraction: float = 0.1
    cache_dir: str | None = None
    max_bytes: int | None = 4_000_000
    synthetic_size: int = 8192
    pack_documents: bool = False
    reset_positions: bool = False
    token_dtype: TokenDType = TokenDType.UINT16
    tokenizer_file: str | None = None

    def _validate(self) -> None:
        need = self._need
        need(self.tokenizer_file is None or self.tokenizer_file.strip() != "", "tokenizer_file",
             "must name a tokenizer.json or be null")
        need(self.tokenizer_file is None or self.source != "synthetic", "tokenizer_file",
             "applies to text and token-file sources, not source='synthetic' (its ids decode to nothing)")
        need(not (self.pack_documents and self.source == "synthetic"), "pack_documents",
             "applies to text sources only, not source='synthetic' (it has no documents)")
        need(self.pack_documents or not self.reset_positions, "reset_positions",
             "needs data.pack_documents: true (positions restart at document boundaries)")
        need(self.source.strip() != "", "source", "must name 'stdlib', 'synthetic' or a path")
        need(self.seq_len >= 1, "seq_len", "must be >= 1")
        if self.tokenizer is TokenizerKind.BPE:
            need(self.vocab_size >= 260, "vocab_size",
                 "must be >= 260 for a byte-level BPE (256 byte tokens + 4 special tokens)")
        need(0 <= self.val_fraction < 1, "val_fraction", "must be in [0, 1)")
        need(self.max_bytes is None or self.max_bytes >= 1, "max_bytes", "must be >= 1 or null")
        need(self.synthetic_size >= 1, "synthetic_size", "must be >= 1")

    @property
    def is_stdlib(self) -> bool:
        return self.source == "stdlib"

    @property
    def is_synthetic(self) -> bool:
        return self.source == "synthetic"

    @property
    def resolved_cache_dir(self) -> Path:
        if self.cache_dir is not None:
            return Path(self.cache_dir).expanduser()
        base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
        return Path(base).expanduser() / "llm"


@dataclass(frozen=True)
class OptimizationConfig(_Section):
    """Speed knobs.

    ``compile`` wraps the torch model in ``torch.compile(mode=compile_mode)``. It means nothing for
    the JAX backend: XLA always compiles the jitted step, so the flag is ignored there (the JAX
    engine logs a line saying so when it is set).
    ``dtype`` is the compute dtype of forward and backward (torch autocast / the flax modules'
    ``dtype``); parameters and optimiser moments stay float32 (mixed precision). ``float16`` adds
    a dynamic loss scale in both engines (``torch.amp.GradScaler`` / the same rule in
    ``backends/flax/optim.py``).
    ``loss_chunk_tokens``: how the LM loss meets the output projection. ``0``: the plain loss, from
    the whole (tokens, vocab) logits of the micro-batch; ``k >= 1``: the chunked linear +
    cross-entropy (``backends/*/loss.py``), ``k`` tokens of logits at a time, recomputed in the
    backward, so the (tokens, vocab) logits never exist; ``null`` (auto): chunked, with
    about ``AUTO_LOSS_CHUNK_ELEMENTS`` logits a chunk (a multiple of
    ``LOSS_CHUNK_MULTIPLE`` tokens), when ``tokens * vocab`` of the micro-batch
    the loss sees exceeds ``LOSS_CHUNK_THRESHOLD`` (``loss_chunk``; a torch rank's micro-batch, the
    JAX step's whole one; never under ``compile`` on torch, whose fused plain loss already keeps
    only the compute-dtype logits). The same loss and gradients either way (up to float32
    summation order).

    ``moe_impl`` is how MoE layers run their experts (``llm.moe_dispatch``): ``auto`` (the fastest
    measured path for the backend, device and dtype: ``resolve_moe_impl``), ``dense`` (the
    reference: every expert on every token), ``blocked`` or ``grouped`` (only the selected experts).
    """

    SECTION = "optimization"
    # The auto rule of loss_chunk_tokens, from benchmarks/loss_bench.py on an H200
    # (benchmarks/NOTES.md, results/loss_H200_chunked.jsonl): chunking costs +35-55% of the loss
    # head's fwd+bwd time (JAX GPT-2 50k x 32k tokens 15.1 -> 21.0 ms; Llama 128k: +34%) and saves
    # what the plain loss holds per logit (JAX ~4 B, eager torch ~12 B: Llama-3 8B at 32k tokens
    # 15.7 -> 2.0 GiB JAX, 48.0 -> 5.1 GiB torch). Above 2^31 logits (4 GiB of bf16 logits) that
    # saving is >= 6 GiB and buys batch; below it the time matters more (GPT-2's 32 x 1024 stays plain).
    LOSS_CHUNK_THRESHOLD = 2 ** 31  # tokens * vocab above which the auto rule chunks
    # Chunks of 2048 tokens at 128k vocab: the least memory at the same speed as 4096 and 8192
    # (the per-chunk (n, V) float32 softmax dominates the chunked loss's own memory).
    AUTO_LOSS_CHUNK_ELEMENTS = 2 ** 28  # tokens * vocab of one chunk's logits
    LOSS_CHUNK_MULTIPLE = 256  # auto chunks are a multiple of this many tokens (whole matmul tiles)

    compile: bool = False
    compile_mode: CompileMode = CompileMode.DEFAULT
    dtype: DType = DType.FLOAT32
    loss_chunk_tokens: int | None = None
    moe_impl: MoEImpl = MoEImpl.AUTO

    def _validate(self) -> None:
        self._need(self.loss_chunk_tokens is None or self.loss_chunk_tokens >= 0, "loss_chunk_tokens",
                   "must be >= 0 (0 = never chunk) or null (auto)")

    def loss_chunk(self, tokens: int, vocab_size: int, *, fused_plain: bool = False) -> int:
        """Tokens per chunk of the LM loss over a micro-batch of ``tokens`` targets and
        ``vocab_size`` logits each; 0 = the plain loss (the class docstring). ``fused_plain``: the
        backend's plain loss is fused by a compiler that keeps only the compute-dtype logits
        (``torch.compile``), where chunking measured no memory saving, so auto stays plain."""
        if self.loss_chunk_tokens is not None:
            return self.loss_chunk_tokens
        if fused_plain or tokens * vocab_size <= self.LOSS_CHUNK_THRESHOLD:
            return 0
        per_chunk = self.AUTO_LOSS_CHUNK_ELEMENTS // vocab_size // self.LOSS_CHUNK_MULTIPLE * self.LOSS_CHUNK_MULTIPLE
        return max(per_chunk, self.LOSS_CHUNK_MULTIPLE)


@dataclass(frozen=True)
class CheckpointConfig(_Section):
    """Canonical checkpoints: every ``every_steps`` optimiser steps (0 = only at the end of the run),
    the newest ``keep_last`` kept (null = keep all), under ``dir`` (null = ``<run_dir>/checkpoints``).
    ``save_best``: also keep ``<dir>/best``, the state at the evaluation with the lowest val loss so
    far (rewritten at each new best; never pruned; loads and resumes like any checkpoint).
    ``async_save``: the loop waits only for the device-to-host copy; writing, hashing and the atomic
    rename run in a background thread (null = on for GPU runs, off on CPU)."""

    SECTION = "checkpoint"

    every_steps: int = 1000
    keep_last: int | None = 3
    dir: str | None = None
    save_best: bool = False
    async_save: bool | None = None

    def _validate(self) -> None:
        self._need(self.every_steps >= 0, "every_steps", "must be >= 0 (0 = only at the end)")
        self._need(self.keep_last is None or self.keep_last >= 1, "keep_last", "must be >= 1 or null")


class LogLevel(str, enum.Enum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


@dataclass(frozen=True)
class LoggingConfig(_Section):
    """``every_steps``: cadence of metrics.jsonl rows; ``tensorboard``: also write event files;
    ``progress``: a progress bar on rank 0; ``run_dir``: where metrics, events and (by default)
    checkpoints go (null = chosen by the entry point, ``runs/<timestamp>``); ``level``: the console
    log level of ``llm.train`` on rank 0 (the other ranks log warnings and errors only)."""

    SECTION = "logging"

    every_steps: int = 10
    tensorboard: bool = False
    progress: bool = True
    run_dir: str | None = None
    level: LogLevel = LogLevel.INFO

    def _validate(self) -> None:
        self._need(self.every_steps >= 1, "every_steps", "must be >= 1")


@dataclass(frozen=True)
class DistributedConfig(_Section):
    """The device mesh and the torch process group.

    Both backends build one mesh with axes ``data``, ``fsdp`` and ``tensor`` (``llm.sharding``):
    ``fsdp`` devices share the weights, gradients and optimizer state of each parameter (FSDP2 /
    ``NamedSharding`` over ``fsdp``; 1 = none, -1 = every device the tensor axis leaves);
    ``tensor`` is the tensor-parallel degree (it must divide the heads, the kv heads and the MLP
    size); data parallel takes ``devices / (fsdp * tensor)``. Degrees that do not divide the device
    count are refused at start, naming these keys.

    ``backend`` is the torch process-group backend (``torchrun`` sets rank and world size);
    ``bucket_mb`` is DDP's ``bucket_cap_mb`` (the fsdp = tensor = 1 path); null = auto, a size the
    torch backend derives from the model (``backends/torch/ddp.py``).
    """

    SECTION = "distributed"

    backend: DistBackend = DistBackend.AUTO
    bucket_mb: float | None = None
    fsdp: int = 1
    tensor: int = 1

    def _validate(self) -> None:
        self._need(self.bucket_mb is None or self.bucket_mb > 0, "bucket_mb", "must be > 0 or null (auto)")
        self._need(self.fsdp >= 1 or self.fsdp == -1, "fsdp", "must be >= 1, or -1 (all devices)")
        self._need(self.tensor >= 1, "tensor", "must be >= 1 (1 = no tensor parallelism)")

    def mesh(self, devices: int) -> MeshShape:
        """The mesh for ``devices`` devices; a ``ConfigError`` naming the key when it cannot be built."""
        try:
            return MeshShape.resolve(devices, self.fsdp, self.tensor)
        except MeshError as e:
            raise ConfigError(str(e), e.key) from None

    def resolve_backend(self, cuda_available: bool) -> str:
        """The concrete backend name for ``torch.distributed.init_process_group``."""
        if self.backend is DistBackend.AUTO:
            return "nccl" if cuda_available else "gloo"
        return self.backend.value


_SECTIONS: dict[str, type] = {
    "model": ModelSpec,
    "training": TrainingConfig,
    "data": DataConfig,
    "optimization": OptimizationConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
    "distributed": DistributedConfig,
}
_TOP_LEVEL_SCALARS: dict[str, Any] = {"task": str}
_MODULE_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def _task_name(value: Any) -> str:
    """``Config.task`` as text: a built-in name (matched as the ``Task`` enum matches, by value or
    member name in any case), another registered name, or ``"package.module:name"``.

    Only the form is checked here. Whether the name is registered is checked where the task is
    resolved (``llm.loop.tasks.get_task``, called by ``python -m llm.train`` and the engines): a custom
    task's module may import a framework, and a saved config must load without it.
    """
    if isinstance(value, enum.Enum):
        value = value.value
    if not isinstance(value, str):
        raise ConfigError(f"task: expected a task name, got {value!r}", "task")
    name = value.strip()
    for member in Task:
        if name.lower() in (member.value, member.name.lower()):
            return member.value
    module, colon, attr = name.partition(":")
    if not name or any(c.isspace() for c in name) or (
            colon and not (_MODULE_PATH.fullmatch(module) and attr and ":" not in attr)):
        raise ConfigError(f"task={value!r} must be a registered task name (built-in: "
                          f"{', '.join(repr(t.value) for t in Task)}) or 'package.module:name'", "task")
    return name


def _fields_of(section: str) -> list[str]:
    return [f.name for f in dataclasses.fields(_SECTIONS[section])]


def _check_section(section: str, origin: str = "") -> None:
    """Raise a ConfigError with the nearest valid section unless ``section`` exists."""
    if section in _SECTIONS:
        return
    where = f" ({origin})" if origin else ""
    valid = sorted(_SECTIONS) + sorted(_TOP_LEVEL_SCALARS)
    near = nearest(section, valid)
    hint = f"; did you mean {near!r}?" if near else f"; valid: {', '.join(valid)}"
    raise ConfigError(f"unknown config section {section!r}{where}{hint}", section)


def _check_key(section: str, key: str, origin: str = "") -> None:
    """Raise a ConfigError with the nearest valid key unless ``section.key`` exists; a key that
    belongs to another section points there."""
    _check_section(section, origin)
    elsewhere = [f"{s}.{key}" for s in _SECTIONS if key in _fields_of(s)]
    check_key(section, key, _fields_of(section), ConfigError, origin=origin,
              elsewhere=elsewhere[0] if elsewhere else None)


# ---------------------------------------------------------------------- the whole config
@dataclass(frozen=True)
class Config:
    """A fully resolved run config. ``Config.from_dict(c.to_dict()) == c`` (and the dict is JSON-safe).

    Cross-section rules checked here: for the LM task ``data.seq_len <= model.max_seq_len``; for BPE
    ``data.vocab_size <= model.vocab_size``; evaluation (``training.eval_every > 0``) needs
    ``data.val_fraction > 0``.

    ``task`` is the name of a registered task (``llm.loop.tasks``): ``"lm"``, ``"regression"``, a custom
    one, or ``"package.module:name"`` to import the module that registers it. Its form is checked here,
    its registration where the task is resolved (``llm.loop.tasks.get_task``).
    """

    model: ModelSpec = field(default_factory=ModelSpec)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimization: OptimizationConfig = field(default_factory=OptimizationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    task: str = Task.LM.value

    def __post_init__(self) -> None:
        object.__setattr__(self, "task", _task_name(self.task))
        for name, cls in _SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(f"{name}: expected a {cls.__name__}, got {getattr(self, name)!r}", name)
        m, d, t = self.model, self.data, self.training
        if self.task == Task.LM.value and d.seq_len > m.max_seq_len:
            raise ConfigError(f"data.seq_len={d.seq_len} must be <= model.max_seq_len={m.max_seq_len}",
                              "data.seq_len")
        if self.task == Task.LM.value and d.tokenizer is TokenizerKind.BPE and d.vocab_size > m.vocab_size:
            raise ConfigError(f"data.vocab_size={d.vocab_size} must be <= model.vocab_size={m.vocab_size} "
                              "(the BPE ids index the embedding table)", "data.vocab_size")
        for key, message in check_divisible(m, self.distributed.tensor):
            raise ConfigError(message, key)
        if t.eval_every > 0 and d.val_fraction == 0:
            raise ConfigError(f"training.eval_every={t.eval_every} needs data.val_fraction > 0 "
                              "(or set training.eval_every=0)", "training.eval_every")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Config:
        """Build from nested mappings (a parsed YAML file); missing sections take their defaults."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"config: expected a mapping of sections, got {data!r}")
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            name = str(name)
            if name in _TOP_LEVEL_SCALARS:
                kwargs[name] = value
                continue
            _check_section(name)
            for key in value if isinstance(value, Mapping) else ():
                _check_key(name, str(key))
            try:
                kwargs[name] = _SECTIONS[name].from_dict(value)
            except SpecError as e:  # the model section is a ModelSpec: the same error, as a config's
                raise ConfigError(str(e), e.key) from None
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"task": self.task}
        for name in _SECTIONS:
            out[name] = plain(getattr(self, name).to_dict())
        return out

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def dump_yaml(config: Config, path: str | os.PathLike | None = None) -> str:
    """The resolved config as YAML (what ``--print-config`` prints); also written to ``path`` if given."""
    text = config.to_yaml()
    if path is not None:
        Path(path).write_text(text)
    return text


# ---------------------------------------------------------------------- loading
def _read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not a UTF-8 YAML file (byte {e.object[e.start]:#04x} at offset {e.start} "
                          "is not UTF-8 text)") from None
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    except IsADirectoryError:
        raise ConfigError(f"config path is a directory, not a YAML file: {p}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(p)
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{where}: YAML syntax error: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of sections at the top level, got {type(data).__name__}")
    for name, section in data.items():
        if name in _TOP_LEVEL_SCALARS:
            continue
        _check_section(str(name), f"in {p}")
        if section is not None and not isinstance(section, dict):
            raise ConfigError(f"{p}: section {name!r} must be a mapping, got {section!r}", str(name))
        for key in section or {}:
            _check_key(str(name), str(key), f"in {p}")
    return data


def _field_type(section: str | None, key: str) -> Any:
    if section is None:
        return _TOP_LEVEL_SCALARS[key]
    return field_types(_SECTIONS[section])[key]


def _parse_value(raw: str, tp: Any) -> Any:
    """A text value from env or CLI: the raw text for str fields, else a YAML scalar."""
    stripped = raw.strip()
    members = {str(m.value) for a in getattr(tp, "__args__", (tp,))
               if isinstance(a, type) and issubclass(a, enum.Enum) for m in a}
    if stripped.lower() in ("null", "~", "none") and stripped not in members:  # "none" may be an enum value
        return None
    if takes_text(tp):
        return raw
    try:
        return yaml.safe_load(stripped)
    except yaml.YAMLError:
        return raw


def parse_override(text: str) -> tuple[str | None, str, str]:
    """Split ``"section.field=value"`` (or ``"task=..."``) into (section, field, raw value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected 'section.field=value'")
    dotted, raw = text.split("=", 1)
    dotted = dotted.strip()
    if dotted in _TOP_LEVEL_SCALARS:
        return None, dotted, raw
    if dotted.count(".") != 1:
        near = nearest(dotted, [f"{s}.{f}" for s in _SECTIONS for f in _fields_of(s)])
        hint = f"; did you mean {near!r}?" if near else ""
        raise ConfigError(f"override {text!r}: expected 'section.field=value'{hint}", dotted)
    section, key = dotted.split(".")
    return section, key, raw


def _env_overrides(env: Mapping[str, str]) -> list[tuple[str | None, str, str, str]]:
    out = []
    for name in sorted(env):
        if name == "LLM_TASK":
            out.append((None, "task", env[name], f"environment variable {name}"))
        elif name.startswith("LLM_") and "__" in name:
            section, _, key = name[len("LLM_"):].partition("__")
            out.append((section.lower(), key.lower(), env[name], f"environment variable {name}"))
    return out


def load_config(path: str | os.PathLike | None = None, overrides: Iterable[str] = (),
                env: Mapping[str, str] | None = None) -> Config:
    """Resolve a Config: defaults < YAML at ``path`` < env ``LLM_<SECTION>__<FIELD>`` < ``overrides``.

    ``env`` defaults to ``os.environ``; only names ``LLM_<SECTION>__<FIELD>`` and ``LLM_TASK`` are
    read (other ``LLM_*`` names are not config). Errors are ConfigError; when a layer set the key at
    fault the message says which (file, variable or override).
    """
    env = os.environ if env is None else env
    merged: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if path is not None:
        for name, section in _read_yaml(path).items():
            if name in _TOP_LEVEL_SCALARS:
                merged[name] = section
                origins[name] = f"in {path}"
                continue
            merged[name] = dict(section or {})
            for key in merged[name]:
                origins[f"{name}.{key}"] = f"in {path}"

    layers = list(_env_overrides(env))
    layers += [(*parse_override(o), f"override {o!r}") for o in overrides]
    for section, key, raw, origin in layers:
        if section is None:
            merged[key] = _parse_value(raw, _field_type(None, key))
            origins[key] = origin
            continue
        _check_key(section, key, origin)
        tp = _field_type(section, key)
        try:
            value = coerce(_parse_value(raw, tp), tp, f"{section}.{key}", ConfigError)
        except ConfigError as e:
            raise ConfigError(f"{e} ({origin})", e.key) from None
        merged.setdefault(section, {})
        if merged[section] is None:
            merged[section] = {}
        merged[section][key] = value
        origins[f"{section}.{key}"] = origin

    try:
        return Config.from_dict(merged)
    except ConfigError as e:
        origin = origins.get(e.key or "")
        if origin and origin not in str(e):
            raise ConfigError(f"{e} ({origin})", e.key) from None
        raise
