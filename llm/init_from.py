"""Starting a training run from a checkpoint's weights (``training.init_from`` / ``--init-from DIR``).

The checkpoint is any canonical checkpoint: one a run wrote, or one ``python -m llm.hf import``
made from a Hugging Face model. Three things come from it, each in the one place that needs it:

* the spec -- ``apply_init_from(config)`` returns the config with ``model`` replaced by the
  checkpoint's spec (``python -m llm.train`` calls it while resolving the config, so the run's
  ``config.json`` records the spec actually trained);
* the starting weights -- ``init_from_params(config)``, which a task's backend half loads into the
  model it builds (``backends/torch/tasks.py``: ``TorchLMTask.build_model``); None without
  ``init_from``. Resuming (``--resume``) still wins: the engine loads the resumed checkpoint after;
* the tokenizer -- ``init_from_tokenizer(config)``: the checkpoint's ``tokenizer.json``, used instead
  of building ``data.tokenizer`` from the corpus (``llm.loop.tasks.LMTask.build_datamodule``), so token
  ids mean what the embedding rows were trained on.

Only the weights are taken: optimizer moments, the step counter and the data cursor start fresh
(that is ``--resume``'s job). This module must not import torch or jax.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from llm.checkpoint import CheckpointError, load_checkpoint

__all__ = ["apply_init_from", "init_from_params", "init_from_tokenizer", "init_from_path"]

log = logging.getLogger("llm.train")

TOKENIZER_FILE = "tokenizer.json"


def init_from_path(config: Any) -> Path | None:
    """The checkpoint directory of ``config.training.init_from`` (the newest valid ``step_<N>`` of a
    run's checkpoints dir), or None when the field is unset."""
    source = config.training.init_from
    if source is None:
        return None
    from llm.checkpoint import resolve_checkpoint

    path = Path(source).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"training.init_from={source!r}: no such checkpoint directory")
    return resolve_checkpoint(path)


def apply_init_from(config: Any) -> Any:
    """``config`` with ``model`` replaced by the ``init_from`` checkpoint's spec and ``init_from`` by the
    checkpoint's absolute path (``config`` itself without ``init_from``).

    Cross-section rules are re-checked (e.g. ``data.seq_len <= model.max_seq_len``), so a config that
    does not fit the checkpoint fails here with the config's own error.
    """
    path = init_from_path(config)
    if path is None:
        return config
    spec = load_checkpoint(path, load_state=False).spec
    if spec != config.model:
        log.info("init_from %s: model spec taken from the checkpoint (differs from the config in %s)",
                 path, ", ".join(spec.diff(config.model)))
    # record the resolved absolute directory, so the run's config.json says exactly what it started from
    return config.replace(model=spec, training=config.training.replace(init_from=str(path.resolve())))


def init_from_params(config: Any) -> dict[str, np.ndarray] | None:
    """The ``init_from`` checkpoint's canonical params (float32 numpy), or None without ``init_from``.

    The checkpoint's spec must equal ``config.model`` (``apply_init_from`` makes it so); otherwise a
    CheckpointError names the differing fields.
    """
    path = init_from_path(config)
    if path is None:
        return None
    ckpt = load_checkpoint(path, load_state=False)
    if ckpt.spec != config.model:
        diff = ckpt.spec.diff(config.model)
        raise CheckpointError(f"training.init_from={str(path)!r} holds a different model spec "
                              f"(model.{', model.'.join(diff)}); take the spec from the checkpoint "
                              "(llm.init_from.apply_init_from, done by python -m llm.train)")
    log.info("init_from %s: starting from its weights", path)
    return ckpt.params


def init_from_tokenizer(config: Any) -> Any:
    """The ``init_from`` checkpoint's tokenizer, or None (no ``init_from``, or no tokenizer.json in it)."""
    path = init_from_path(config)
    if path is None:
        return None
    if not (path / TOKENIZER_FILE).is_file():
        log.warning("init_from %s has no %s: data.tokenizer=%s is built from the corpus, and its ids have no "
                    "relation to the rows of the checkpoint's embedding table", path, TOKENIZER_FILE,
                    getattr(config.data.tokenizer, "value", config.data.tokenizer))
        return None
    from llm.tokenization import load_tokenizer

    return load_tokenizer(path / TOKENIZER_FILE)
