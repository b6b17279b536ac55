"""Starting a training run from a checkpoint's weights (``training.init_from`` / ``--init-from DIR``).

The checkpoint is any canonical checkpoint: one a run wrote, or one ``python -m llm.hf import``
made from a Hugging Face model. It is resolved, verified and loaded once per process into a frozen
``StartingPoint`` (``starting_point(config)``, cached by the resolved directory), and three things
come from it, each in the one place that needs it:

* the spec -- ``apply_init_from(config)`` returns the config with ``model`` replaced by the
  checkpoint's spec (``python -m llm.train`` calls it while resolving the config, so the run's
  ``config.json`` records the spec actually trained);
* the starting weights -- ``init_from_params(config)``, which the LM task's backend half loads into
  the model it builds (``llm.loop.tasks.LMTaskHalf.build_model``); None without ``init_from``.
  Resuming (``--resume``) still wins: the engine loads the resumed checkpoint after;
* the tokenizer -- ``init_from_tokenizer(config)``: the checkpoint's ``tokenizer.json``, used instead
  of building ``data.tokenizer`` from the corpus (``llm.loop.tasks.LMTask.build_datamodule``), so token
  ids mean what the embedding rows were trained on.

Only the weights are taken: optimizer moments, the step counter and the data cursor start fresh
(that is ``--resume``'s job). This module must not import torch or jax.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llm.checkpoint import CheckpointError, list_checkpoints, open_checkpoint
from llm.io import MANIFEST_FILE, TOKENIZER_FILE
from llm.spec import ModelSpec

__all__ = ["StartingPoint", "apply_init_from", "init_from_params", "init_from_tokenizer", "load_starting_point",
           "starting_point"]

log = logging.getLogger("llm.train")


@dataclass(frozen=True)
class StartingPoint:
    """What a run takes from its ``init_from`` checkpoint: ``path`` (the resolved absolute checkpoint
    directory), ``spec``, ``params`` (canonical float32 numpy) and ``tokenizer`` (None when the
    checkpoint has no tokenizer.json)."""

    path: Path
    spec: ModelSpec
    params: dict[str, np.ndarray]
    tokenizer: Any = None


# the last one loaded, keyed by (directory, identity of its manifest file): one copy of the weights
_LOADED: dict[tuple[str, tuple[int, int, int]], StartingPoint] = {}


def _key(path: Path) -> tuple[str, tuple[int, int, int]]:
    st = (path / MANIFEST_FILE).stat()  # a checkpoint rewritten in place has a new manifest file
    return str(path), (st.st_ino, st.st_mtime_ns, st.st_size)


def _cached(path: Path) -> StartingPoint | None:
    """The loaded starting point of ``path`` (for a checkpoints dir: of its newest ``step_<N>``), if any."""
    if not (path / MANIFEST_FILE).is_file():
        steps = list_checkpoints(path)
        if not steps:
            return None
        path = steps[0][1]  # a newer step than the loaded one is loaded (and verified) afresh
    try:
        return _LOADED.get(_key(path.resolve()))
    except OSError:
        return None


def load_starting_point(source: str | Path) -> StartingPoint:
    """The ``StartingPoint`` of a checkpoint directory (or of a run's checkpoints dir: its newest valid
    ``step_<N>``), verified and loaded the first time it is asked for, then served from memory."""
    path = Path(source).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"training.init_from={str(source)!r}: no such checkpoint directory")
    cached = _cached(path)
    if cached is not None:
        return cached
    ckpt = open_checkpoint(path, load_state=False)
    resolved = ckpt.path.resolve()
    tokenizer = None
    if (resolved / TOKENIZER_FILE).is_file():
        from llm.tokenization import load_tokenizer

        tokenizer = load_tokenizer(resolved / TOKENIZER_FILE)
    point = StartingPoint(resolved, ckpt.spec, ckpt.params, tokenizer)
    _LOADED.clear()
    _LOADED[_key(resolved)] = point
    return point


def starting_point(config: Any) -> StartingPoint | None:
    """The ``StartingPoint`` of ``config.training.init_from``, or None when the field is unset."""
    source = config.training.init_from
    return None if source is None else load_starting_point(source)


def apply_init_from(config: Any) -> Any:
    """``config`` with ``model`` replaced by the ``init_from`` checkpoint's spec and ``init_from`` by the
    checkpoint's absolute path (``config`` itself without ``init_from``).

    Cross-section rules are re-checked (e.g. ``data.seq_len <= model.max_seq_len``), so a config that
    does not fit the checkpoint fails here with the config's own error.
    """
    point = starting_point(config)
    if point is None:
        return config
    if point.spec != config.model:
        log.info("init_from %s: model spec taken from the checkpoint (differs from the config in %s)",
                 point.path, ", ".join(point.spec.diff(config.model)))
    # record the resolved absolute directory, so the run's config.json says exactly what it started from
    return config.replace(model=point.spec, training=config.training.replace(init_from=str(point.path)))


def init_from_params(config: Any) -> dict[str, np.ndarray] | None:
    """The ``init_from`` checkpoint's canonical params (float32 numpy), or None without ``init_from``.

    The checkpoint's spec must equal ``config.model`` (``apply_init_from`` makes it so); otherwise a
    CheckpointError names the differing fields.
    """
    point = starting_point(config)
    if point is None:
        return None
    if point.spec != config.model:
        diff = point.spec.diff(config.model)
        raise CheckpointError(f"training.init_from={str(point.path)!r} holds a different model spec "
                              f"(model.{', model.'.join(diff)}); take the spec from the checkpoint "
                              "(llm.init_from.apply_init_from, done by python -m llm.train)")
    log.info("init_from %s: starting from its weights", point.path)
    return point.params


def init_from_tokenizer(config: Any) -> Any:
    """The ``init_from`` checkpoint's tokenizer, or None (no ``init_from``, or no tokenizer.json in it)."""
    point = starting_point(config)
    if point is None:
        return None
    if point.tokenizer is None:
        log.warning("init_from %s has no %s: data.tokenizer=%s is built from the corpus, and its ids have no "
                    "relation to the rows of the checkpoint's embedding table", point.path, TOKENIZER_FILE,
                    getattr(config.data.tokenizer, "value", config.data.tokenizer))
    return point.tokenizer
