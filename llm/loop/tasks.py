"""Training tasks: what is trained on what data, split into a backend-agnostic half and a backend half.

A ``TrainingTask`` (this module, no torch or jax) owns the data side: which DataModule, checks of the
config against the data (the tokenizer fits ``model.vocab_size``), baselines worth logging (the
unigram entropy of the training tokens), its units (``items``: what a batch counts for throughput;
``loss_unit``; ``perplexity``: whether ``exp(val loss)`` means something), and files every
checkpoint carries (``tokenizer.json``). The model and the loss are framework code, so they live
in a backend half that the task names per backend in ``backends``: a class, a ``"module:Class"``
string imported only when that backend asks (``task.backend("torch")``), or the name of one of the
backend surface's halves (``"LMTaskHalf"``, looked up through ``llm.backend``).

Built-ins: ``lm`` (causal LM on ``data.source``; the default) and ``regression`` (an MLP on
SyntheticDataModule's regression set). A new task is a few lines::

    from llm.loop.tasks import TrainingTask, register_task
    from backends.torch.tasks import TorchTask

    class MAETorch(TorchTask):                       # the torch half: model + loss
        def build_model(self, config, datamodule):
            return torch.nn.Linear(datamodule.in_features, datamodule.out_features)
        def loss(self, model, batch):
            x, y = batch
            mae = (model(x) - y).abs().mean()
            return mae, {"loss": mae}

    @register_task("mae_regression")
    class MAERegression(TrainingTask):
        backends = {"torch": MAETorch}
        canonical = False                            # not a ModelSpec decoder: named checkpoints
        items, loss_unit, perplexity = "rows", "MAE", False   # rows/s, "loss (MAE)", no val_ppl
        def build_datamodule(self, config, *, rank=0, world_size=1):
            return SyntheticDataModule(task="regression", batch_size=config.training.batch_size,
                                       rank=rank, world_size=world_size)

    TrainingEngine(config, task="mae_regression").fit()

A task is chosen by name like any config value (``task: mae_regression`` in YAML, ``--set task=...``,
``--task``); ``get_task("package.module:name")`` imports the module that registers ``name`` first, which
is how ``python -m llm.train --task mypkg.tasks:mae_regression`` reaches a task defined outside this
package. Keeping such a module framework-free (backend halves as ``"module:Class"`` strings) keeps
config resolution free of torch and jax too.

This module must not import torch or jax.
"""

from __future__ import annotations

import importlib
import math
from typing import Any, ClassVar

import numpy as np

from llm.backend import backend as get_backend
from llm.config import ConfigError, OptimizationConfig
from llm.data import BaseDataModule, SyntheticDataModule, build_datamodule
from llm.loop.registry import Registry

__all__ = ["TASKS", "LMTask", "LMTaskHalfBase", "RegressionTask", "TaskError", "TrainingTask", "available_tasks", "get_task",
           "register_task", "unigram_entropy"]


class TaskError(ValueError):
    """An unknown task, or a task without an implementation for the backend asked for."""


class TrainingTask:
    """The backend-agnostic half of a task (see the module docstring).

    Subclasses set ``name`` (``register_task`` does) and ``backends``; everything else has defaults
    (those of a language model). ``canonical=True`` says the model's parameters are
    ``config.model``'s canonical table: its checkpoints are canonical ones, which load in either
    backend, ``llm.load`` and the HF export. ``canonical=False``: the checkpoints are named ones
    (``llm.checkpoint``), the half's own parameter names, resumable where those names match.

    Units, read by the loop and the writers: ``items`` is what ``items_per_batch`` counts, so
    throughput is ``<items>_per_s`` and the running count ``<items>`` in metrics.jsonl;
    ``loss_unit`` labels the loss (the plot's axis, the summary); ``perplexity`` says whether
    evaluation reports ``val_ppl = exp(val_loss)`` (only for a per-token cross-entropy).
    """

    name: ClassVar[str] = ""
    backends: ClassVar[dict[str, Any]] = {}
    canonical: ClassVar[bool] = True
    items: ClassVar[str] = "tokens"
    loss_unit: ClassVar[str] = "nats/token"
    perplexity: ClassVar[bool] = True

    def build_datamodule(self, config: Any, *, rank: int = 0, world_size: int = 1) -> BaseDataModule:
        """The (not yet set-up) DataModule; ``config.training.batch_size`` is the global batch."""
        return build_datamodule(config, rank=rank, world_size=world_size)

    def validate(self, config: Any, datamodule: BaseDataModule) -> None:
        """Check the config against the set-up data; raise with a message naming the key at fault."""

    def baselines(self, datamodule: BaseDataModule) -> dict[str, float]:
        """Reference numbers to log with the run (e.g. ``unigram_entropy``)."""
        return {}

    def items_per_batch(self, batch: tuple[np.ndarray, np.ndarray]) -> int:
        """How many ``items`` a (local) batch counts for throughput: its rows unless overridden (the
        LM task counts tokens)."""
        return int(batch[0].shape[0])

    def artifacts(self, datamodule: BaseDataModule) -> dict[str, bytes]:
        """Files (name -> bytes) written to the run directory and into every checkpoint."""
        return {}

    def backend(self, name: str) -> Any:
        """A fresh instance of this task's half for backend ``name`` ("torch", "jax")."""
        impl = self.backends.get(name)
        if impl is None:
            have = ", ".join(sorted(self.backends)) or "none"
            raise TaskError(f"task {self.name!r} has no {name!r} implementation (it has: {have})")
        if isinstance(impl, str) and ":" in impl:
            module, _, attr = impl.partition(":")
            impl = getattr(importlib.import_module(module), attr)
        elif isinstance(impl, str):  # a name of the backend's surface, e.g. "LMTaskHalf"
            impl = getattr(get_backend(name), impl)
        return impl()


TASKS: Registry[type[TrainingTask]] = Registry("task", TrainingTask, decorator="register_task", error=TaskError)


def register_task(name: str, *, replace: bool = False):
    """Class decorator: register a ``TrainingTask`` subclass under ``name`` (sets ``cls.name``)."""
    return TASKS.register(name, replace=replace)


def get_task(task: str | TrainingTask | Any) -> TrainingTask:
    """A task instance from a registered name (or a ``llm.config.Task``); instances pass through.

    ``"package.module:name"`` imports ``package.module`` first (whose import registers ``name``), so
    a config or a command line can name a task defined outside this package. Errors are one-line
    ``TaskError``s that name the value, the registered tasks and the nearest one.
    """
    if isinstance(task, TrainingTask):
        return task
    value = str(getattr(task, "value", task))
    if ":" not in value:
        return TASKS.get(value, where="task: ", hint=" (or give 'package.module:name' to import the module "
                         "that registers it)")()
    module, _, name = value.partition(":")
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (module == e.name or module.startswith(e.name + ".")):
            raise TaskError(f"task {value!r}: no module named {e.name!r} (is it on PYTHONPATH?)") from None
        raise  # the module exists but an import inside it failed: its traceback is the message
    if name not in TASKS:
        raise TaskError(f"task {value!r}: importing {module} registered no task {name!r}{TASKS.suggestions(name)}")
    return TASKS.get(name)()


def available_tasks() -> list[str]:
    return TASKS.names()


def unigram_entropy(tokens: np.ndarray | None = None, vocab_size: int | None = None, *,
                    counts: np.ndarray | None = None) -> float:
    """Entropy in nats/token of the empirical unigram distribution of ``tokens`` (or of the id
    ``counts`` given instead, e.g. a token file's, counted without holding it in memory).

    The loss of the best model that ignores context: an LM that has learnt anything beats it.
    """
    if counts is None:
        counts = np.bincount(np.asarray(tokens).ravel(), minlength=vocab_size or 0)
    counts = np.asarray(counts, np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum()) + 0.0  # + 0.0: one distinct token gives -0.0, shown "-0.0000"


class LMTaskHalfBase:
    """What the LM task's backend halves share, written once (``backends/*/tasks.py`` mix it in):
    the model is ``new_model(config)`` with the ``training.init_from`` checkpoint's weights loaded when
    there is one (``llm.init_from``), and the sample is ``llm.sampling.sample_text`` with the backend's
    ``generate``. A half supplies ``new_model``, ``generate`` and ``load_canonical``.
    ``optimization`` is the run's section once ``build_model`` has run (the defaults before): the
    halves' loss reads its ``loss_chunk``."""

    optimization = OptimizationConfig()

    def new_model(self, config: Any) -> Any:
        """A freshly initialised ``DecoderModel`` of ``config.model`` (seeded by ``training.seed``)."""
        raise NotImplementedError

    @staticmethod
    def generate(model: Any, token_ids: np.ndarray, max_new_tokens: int, **kwargs: Any) -> np.ndarray:
        """The backend's decoding loop (``backends.<name>.inference.generate``)."""
        raise NotImplementedError

    @staticmethod
    def model_inputs(batch: tuple[Any, ...]) -> tuple[Any, Any, dict[str, Any]]:
        """``(inputs, targets, extras)`` of a batch: extras are the model's keyword arguments for
        the fields after the first two (``segment_ids``, ``positions`` of packed text batches)."""
        from llm.data import BATCH_FIELDS

        if not 2 <= len(batch) <= len(BATCH_FIELDS):
            raise ValueError(f"an LM batch has {', '.join(BATCH_FIELDS[:2])} and optionally "
                             f"{', '.join(BATCH_FIELDS[2:])}; got {len(batch)} arrays")
        return batch[0], batch[1], dict(zip(BATCH_FIELDS[2:], batch[2:], strict=False))

    def build_model(self, config: Any, datamodule: Any) -> Any:
        self.optimization = config.optimization
        model = self.new_model(config)
        from llm.init_from import init_from_params

        params = init_from_params(config)  # training.init_from: start from that checkpoint's weights
        if params is not None:
            self.load_canonical(model, params)
        return model

    def sample(self, model: Any, datamodule: Any, **kwargs: Any) -> str | None:
        tokenizer = getattr(datamodule, "tokenizer", None)
        if tokenizer is None:
            return None
        from llm.sampling import sample_text

        return sample_text(self.generate, model, tokenizer, **kwargs)


@register_task("lm")
class LMTask(TrainingTask):
    """Causal language modelling on ``data.source`` (text, token files or synthetic tokens)."""

    backends = {"torch": "LMTaskHalf", "jax": "LMTaskHalf"}

    def build_datamodule(self, config: Any, *, rank: int = 0, world_size: int = 1) -> BaseDataModule:
        """As the base class, but a text or token-file source uses the ``training.init_from``
        checkpoint's tokenizer when it has one (``llm.init_from``); the backend halves load its
        weights in ``build_model``."""
        tokenizer = None
        if not config.data.is_synthetic:
            from llm.init_from import init_from_tokenizer

            tokenizer = init_from_tokenizer(config)
        return build_datamodule(config, rank=rank, world_size=world_size, tokenizer=tokenizer)

    def validate(self, config: Any, datamodule: BaseDataModule) -> None:
        m, d = config.model, config.data
        if d.seq_len > m.max_seq_len:  # Config checks this for task "lm"; here for tasks built on LMTask
            raise ConfigError(f"data.seq_len={d.seq_len} must be <= model.max_seq_len={m.max_seq_len}",
                              "data.seq_len")
        tokenizer = getattr(datamodule, "tokenizer", None)
        if tokenizer is not None:
            from llm.tokenization import check_vocab

            check_vocab(tokenizer, config.model)

    def baselines(self, datamodule: BaseDataModule) -> dict[str, float]:
        counts = getattr(datamodule, "train_token_counts", None)  # token files: counted in chunks at setup
        if counts is not None:
            return {"unigram_entropy": unigram_entropy(counts=counts)}
        tokens = getattr(datamodule, "train_tokens", None)
        if tokens is None:
            tokens = getattr(datamodule, "_train", None)  # TextDataModule's train split (a memmap)
        if tokens is not None:
            return {"unigram_entropy": unigram_entropy(tokens)}
        vocab = getattr(datamodule, "vocab_size", None)
        if isinstance(vocab, int):  # uniform synthetic tokens
            return {"unigram_entropy": math.log(vocab)}
        return {}

    def items_per_batch(self, batch: tuple[np.ndarray, np.ndarray]) -> int:
        return int(batch[0].size)  # B * T tokens

    def artifacts(self, datamodule: BaseDataModule) -> dict[str, bytes]:
        tokenizer = getattr(datamodule, "tokenizer", None)
        if tokenizer is None:
            return {}
        from llm.io import TOKENIZER_FILE

        return {TOKENIZER_FILE: tokenizer.to_bytes()}


@register_task("regression")
class RegressionTask(TrainingTask):
    """An MLP fit to SyntheticDataModule's linear regression set (MSE); a smoke test of the engines.

    The model is not a ModelSpec decoder: its checkpoints are named ones (the half's own parameter
    names: ``hidden.weight`` in torch, ``hidden.kernel`` in flax), so a run resumes on the backend
    that wrote it. Throughput counts rows; the loss is an MSE, with no perplexity.
    """

    backends = {"torch": "RegressionTaskHalf", "jax": "RegressionTaskHalf"}
    canonical = False
    items = "rows"
    loss_unit = "MSE"
    perplexity = False

    def build_datamodule(self, config: Any, *, rank: int = 0, world_size: int = 1) -> BaseDataModule:
        """SyntheticDataModule's regression set, sized by ``data`` and ``training`` (whatever ``data.source``)."""
        return SyntheticDataModule.from_config(config, task="regression", rank=rank, world_size=world_size)
