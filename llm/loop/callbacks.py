"""Training callbacks: observers of the loop's events, the built-in writers, and their registry.

The loop (``llm.loop.engine.BaseTrainingEngine.fit``) decides what happens when: the optimiser
step, evaluation, checkpoints and early stopping. Callbacks only observe it; both engines call, on
every rank and in list order (the built-ins in ``DEFAULT_CALLBACKS`` order, then the extra ones)::

    on_train_start(trainer)                 after setup and resume; trainer.step = first step - 1
    on_epoch_start(trainer, epoch)          before the first step of each epoch the run trains in
                                            (a resumed run starts with the epoch it is in)
    on_batch_start(trainer, step)           before optimiser step ``step`` (1-based) fetches its batches
    on_step_end(trainer, metrics)           after every optimiser step and that step's evaluation
                                            and checkpoint
    on_epoch_end(trainer, epoch)            after the step that finished the epoch's batches, and
                                            for the epoch the run is in when it stops
    on_validation_start(trainer)            when trainer.evaluate() starts
    on_eval_end(trainer, metrics)           after trainer.evaluate()
    on_checkpoint(trainer, path)            after a checkpoint is saved (rank 0 has the path; with
                                            checkpoint.async_save still being written:
                                            trainer.wait_for_checkpoint())
    on_train_end(trainer, metrics)          once, when the loop stops for any reason but an exception
                                            (after the end-of-run evaluation and checkpoint)
    on_exception(trainer, exc)              when the loop dies (NaN loss, an error, a 2nd Ctrl-C)

``metrics`` is a plain dict of Python numbers, in the task's units (``TrainingTask.items``,
``loss_unit``, ``perplexity``; below for an LM, whose items are tokens). ``on_step_end`` always has
``step`` (optimiser steps done), ``epoch``, ``lr`` (of that step), ``tokens`` (``<items>`` seen so
far, all ranks: ``rows`` for regression) and ``elapsed_s``; ``loss``, ``grad_norm``,
``tokens_per_s`` (``<items>_per_s``) (and ``aux_loss``/``z_loss`` for MoE) only on steps that are
read from the device -- a host sync, so the loop does it only where something needs it: an
evaluation step, the last step, a stop, or a callback whose ``needs_metrics(step)`` is true;
``val_loss`` on evaluation steps, with ``val_ppl`` when the task has a perplexity. ``on_train_end`` gets ``step``, ``total_steps``,
``stop_reason`` ("completed", "early_stop", "interrupted", "requested"), the last measured losses,
and ``evaluated_at_end`` when the loop evaluated once more after the last step.

The trainer a hook receives offers (both engines): ``config``, ``run`` (a ``llm.run.RunDir``),
``step``, ``total_steps``, ``tokens_seen``, ``rank``, ``world_size``, ``is_main``, ``baselines`` (dict),
``best_val_loss``, ``evaluate() -> dict``, ``save_checkpoint(reason) -> Path | None`` and
``request_stop(reason, message="")``.

Callbacks with ``main_process_only = True`` (the writers) are called on rank 0 only (every rank
holds them, so that ``needs_metrics`` -- which triggers a collective -- agrees across ranks). A callback with state
that must survive a resume returns it from ``state_dict()`` (JSON-safe); it is saved in the
checkpoint's ``state.json`` under ``callbacks.<name>``. The writers' cadences are
``llm.loop.cadence.every``, as the loop's are.

A new callback is a few lines::

    from llm.loop.cadence import every
    from llm.loop.callbacks import Callback, register_callback

    @register_callback("print_loss")
    class PrintLoss(Callback):
        due = every(100)
        def needs_metrics(self, step):
            return self.due(step)
        def on_step_end(self, trainer, metrics):
            if self.due(metrics["step"]):
                print(metrics["step"], metrics["loss"])

    TrainingEngine(config, callbacks=[PrintLoss()]).fit()   # or: python -m llm.train --callback print_loss

This module must not import torch or jax (TensorBoard's writer is imported lazily).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import shutil
import sys
from typing import Any, ClassVar

from llm.loop import cadence
from llm.loop.registry import Registry

__all__ = [
    "CALLBACKS",
    "DEFAULT_CALLBACKS",
    "Callback",
    "CallbackList",
    "ConsoleLogger",
    "LossPlot",
    "MetricsLogger",
    "ProgressBar",
    "TensorBoard",
    "available_callbacks",
    "build_callbacks",
    "get_callback",
    "register_callback",
]

log = logging.getLogger("llm.train")


class Callback:
    """Base class: every hook is a no-op. See the module docstring for when each is called."""

    name: ClassVar[str] = ""  # set by register_callback; the key of its state in checkpoints
    main_process_only: ClassVar[bool] = False  # writers: only rank 0 gets one

    @classmethod
    def from_config(cls, config: Any) -> Callback | None:
        """The instance a run config asks for, or None when the config disables it."""
        return cls()

    def needs_metrics(self, step: int) -> bool:
        """Whether ``on_step_end`` of ``step`` needs the measured ``loss`` (a host sync)."""
        return False

    def on_train_start(self, trainer: Any) -> None: ...
    def on_epoch_start(self, trainer: Any, epoch: int) -> None: ...
    def on_batch_start(self, trainer: Any, step: int) -> None: ...
    def on_step_end(self, trainer: Any, metrics: dict[str, Any]) -> None: ...
    def on_epoch_end(self, trainer: Any, epoch: int) -> None: ...
    def on_validation_start(self, trainer: Any) -> None: ...
    def on_eval_end(self, trainer: Any, metrics: dict[str, Any]) -> None: ...
    def on_checkpoint(self, trainer: Any, path: Any) -> None: ...
    def on_train_end(self, trainer: Any, metrics: dict[str, Any]) -> None: ...
    def on_exception(self, trainer: Any, exc: BaseException) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class CallbackList:
    """Callbacks in list order; ``call(hook, ...)`` calls the hook on each active one in turn.

    Every rank holds the same list so that ``needs_metrics`` (which decides the collective metric
    sync) agrees across ranks; writers (``main_process_only``) are active on rank 0 only.
    """

    def __init__(self, callbacks: list[Callback], *, is_main: bool = True):
        self.all = list(callbacks)
        self.callbacks = [cb for cb in callbacks if is_main or not cb.main_process_only]

    def __iter__(self):
        return iter(self.callbacks)

    def needs_metrics(self, step: int) -> bool:
        return any(cb.needs_metrics(step) for cb in self.all)

    def call(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(*args)

    def state_dict(self) -> dict[str, Any]:
        return {cb.name: state for cb in self.callbacks if cb.name and (state := cb.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for cb in self.callbacks:
            if cb.name in state:
                cb.load_state_dict(state[cb.name])


# ---------------------------------------------------------------------- registry
CALLBACKS: Registry[type[Callback]] = Registry("callback", Callback, decorator="register_callback")


def register_callback(name: str, *, replace: bool = False):
    """Class decorator: register a ``Callback`` subclass under ``name`` (sets ``cls.name``)."""
    return CALLBACKS.register(name, replace=replace)


def get_callback(name: str) -> type[Callback]:
    """A registered callback class, or ``"package.module:Class"`` imported on demand."""
    if ":" not in name:
        return CALLBACKS.get(name, hint=" (or give 'package.module:Class')")
    module, _, attr = name.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"callback {name!r}: cannot import it ({e})") from None
    if isinstance(cls, type) and issubclass(cls, Callback):
        return cls
    raise ValueError(f"callback {name!r} is not a Callback subclass")


def available_callbacks() -> list[str]:
    return CALLBACKS.names()


# ---------------------------------------------------------------------- writers (rank 0)
def _fmt_step(metrics: dict[str, Any], total: int, rate: float | None, rate_unit: str = "tok/s") -> str:
    parts = [f"step {metrics['step']}/{total}"]
    if "loss" in metrics:
        parts.append(f"loss {metrics['loss']:.4f}")
    parts.append(f"lr {metrics['lr']:.2e}")
    if "grad_norm" in metrics:
        parts.append(f"gnorm {metrics['grad_norm']:.2f}")
    if rate is not None:
        parts.append(f"{rate:,.0f} {rate_unit}")
    return " | ".join(parts)


class _Rate:
    """Items/s since the previous call, from the cumulative ``<items>`` and ``elapsed_s`` metrics
    (the per-row ``<items>_per_s`` covers only the last measured window, often one step). ``unit``
    is how the writers print it: ``tok/s`` for tokens, ``<items>/s`` otherwise."""

    def __init__(self):
        self.last: tuple[float, float] | None = None
        self.items = "tokens"

    @property
    def unit(self) -> str:
        return "tok/s" if self.items == "tokens" else f"{self.items}/s"

    def __call__(self, metrics: dict[str, Any]) -> float | None:
        now = (float(metrics[self.items]), float(metrics["elapsed_s"]))
        rate = None
        if self.last is not None and now[1] > self.last[1]:
            rate = (now[0] - self.last[0]) / (now[1] - self.last[1])
        self.last = now
        return rate

    def start(self, trainer: Any) -> None:
        self.items = trainer.task.items
        self.last = (float(getattr(trainer, "tokens_seen", 0)), 0.0)


def _log_eval(metrics: dict[str, Any]) -> None:
    ppl = metrics.get("val_ppl")
    log.info("step %d: val loss %.4f%s", metrics["step"], metrics["val_loss"],
             f" (perplexity {ppl:.2f})" if ppl is not None and math.isfinite(ppl) else "")


class _Writer(Callback):
    """A rank-0 callback that writes every ``every`` steps: it asks for the measured metrics then."""

    main_process_only = True

    def __init__(self, every: int):
        self.due = cadence.every(every)

    def needs_metrics(self, step: int) -> bool:
        return self.due(step)


@register_callback("progress")
class ProgressBar(_Writer):
    """A tqdm bar on stderr with the loss and the task's items/s (when stderr is a terminal)."""

    def __init__(self, every: int = 10, file: Any = None):
        super().__init__(every)
        self.file = file
        self._bar = None
        self._redirect = None
        self._rate = _Rate()

    @classmethod
    def from_config(cls, config: Any) -> ProgressBar | None:
        on = config.logging.progress and sys.stderr.isatty()
        return cls(config.training.log_every) if on else None

    def on_train_start(self, trainer: Any) -> None:
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self._rate.start(trainer)
        # A terminal that reports no size (some CI consoles, `script`, a fresh tmux pane) makes a
        # dynamic bar 0 columns wide, i.e. invisible: give it a fixed width instead.
        sized = shutil.get_terminal_size(fallback=(0, 0)).columns > 0
        self._bar = tqdm(total=trainer.total_steps, initial=trainer.step, desc="train", unit="step",
                         file=self.file or sys.stderr, dynamic_ncols=sized, ncols=None if sized else 100)
        # Log records go through the bar (tqdm.write) instead of the console handler: the console
        # handlers sit on the root logger (logging.basicConfig), so that is the logger to redirect;
        # redirecting "llm" alone printed every line twice, once glued to the bar.
        self._redirect = logging_redirect_tqdm(loggers=[logging.getLogger()])
        self._redirect.__enter__()

    def on_step_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        self._bar.update(1)
        if "loss" in metrics and self.due(metrics["step"]):
            post = {"loss": f"{metrics['loss']:.4f}", "lr": f"{metrics['lr']:.1e}"}
            rate = self._rate(metrics)
            if rate is not None:
                post[self._rate.unit] = f"{rate:,.0f}"
            self._bar.set_postfix(post, refresh=False)

    def on_eval_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        _log_eval(metrics)

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None

    def on_train_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        self._close()

    def on_exception(self, trainer: Any, exc: BaseException) -> None:
        self._close()


@register_callback("console")
class ConsoleLogger(_Writer):
    """One log line every ``every`` steps (used instead of the bar when stderr is not a terminal)."""

    def __init__(self, every: int = 10):
        super().__init__(every)
        self._rate = _Rate()

    @classmethod
    def from_config(cls, config: Any) -> ConsoleLogger | None:
        bar = config.logging.progress and sys.stderr.isatty()
        return None if bar else cls(config.training.log_every)

    def on_train_start(self, trainer: Any) -> None:
        self._rate.start(trainer)

    def on_step_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        if self.due(metrics["step"]) and "loss" in metrics:
            log.info(_fmt_step(metrics, trainer.total_steps, self._rate(metrics), self._rate.unit))

    def on_eval_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        _log_eval(metrics)


@register_callback("metrics")
class MetricsLogger(_Writer):
    """``metrics.jsonl``: one JSON object per logged step (every ``every`` steps, eval steps, the last).

    A resumed run first drops the rows after its starting step, so the file reads like one
    uninterrupted run.
    """

    def __init__(self, every: int = 1):
        super().__init__(every)
        self._file = None

    @classmethod
    def from_config(cls, config: Any) -> MetricsLogger:
        return cls(config.logging.every_steps)

    def on_train_start(self, trainer: Any) -> None:
        path = trainer.run.metrics_path
        kept: list[str] = []
        if trainer.step > 0 and path.exists():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= trainer.step:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue  # a torn last line from a killed run
        path.write_text("".join(line + "\n" for line in kept))
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 -- closed in on_train_end

    def _write(self, row: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()

    def on_step_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        if "loss" in metrics and (self.due(metrics["step"]) or "val_loss" in metrics):
            self._write(metrics)

    def on_train_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        if "val_loss" in metrics and metrics.get("evaluated_at_end"):
            self._write({k: metrics[k] for k in ("step", "val_loss", "val_ppl") if k in metrics})
        self._close()

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def on_exception(self, trainer: Any, exc: BaseException) -> None:
        self._close()


@register_callback("tensorboard")
class TensorBoard(_Writer):
    """TensorBoard event files under ``<run_dir>/tensorboard`` (needs ``tensorboard`` or ``tensorboardX``)."""

    def __init__(self, every: int = 1):
        super().__init__(every)
        self._writer = None

    @classmethod
    def from_config(cls, config: Any) -> TensorBoard | None:
        if not config.logging.tensorboard:
            return None
        try:
            cls.writer_class()  # fail before training, not at the first write
        except ImportError as e:
            from llm.config import ConfigError

            raise ConfigError(str(e), "logging.tensorboard") from None
        return cls(config.logging.every_steps)

    # Loaders of a SummaryWriter class that a backend offers (the torch backend adds
    # torch.utils.tensorboard's when it is imported); tried after tensorboardX, in order.
    backend_writers: ClassVar[list[Any]] = []

    @staticmethod
    def writer_class():
        """The SummaryWriter class, or an ImportError saying what to install."""
        try:
            from tensorboardX import SummaryWriter
            return SummaryWriter
        except ImportError:
            pass
        for load in TensorBoard.backend_writers:
            try:
                return load()
            except ImportError:
                pass
        raise ImportError("logging.tensorboard=true needs the 'tensorboard' package (pip install "
                          "tensorboard) or 'tensorboardX'; or set logging.tensorboard=false")

    def on_train_start(self, trainer: Any) -> None:
        self._writer = self.writer_class()(log_dir=str(trainer.run.root / "tensorboard"))

    def on_step_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        if "loss" not in metrics:
            return
        for key, value in metrics.items():
            if key != "step" and isinstance(value, (int, float)):
                self._writer.add_scalar(f"train/{key}" if not key.startswith("val_") else f"val/{key[4:]}",
                                        value, metrics["step"])

    def on_train_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        self.on_exception(trainer, None)

    def on_exception(self, trainer: Any, exc: BaseException | None) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


@register_callback("loss_plot")
class LossPlot(Callback):
    """``loss.png`` from metrics.jsonl at the end (also after a failure): train and val loss per
    step in the task's ``loss_unit``, with the unigram baseline as a dashed line when the task
    logged one."""

    main_process_only = True  # listed after "metrics" in DEFAULT_CALLBACKS: drawn after its last row

    def on_train_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        self.draw(trainer.run.metrics_path, trainer.run.plot_path, trainer.baselines, trainer.task.loss_unit)

    def on_exception(self, trainer: Any, exc: BaseException) -> None:
        try:
            self.draw(trainer.run.metrics_path, trainer.run.plot_path, trainer.baselines, trainer.task.loss_unit)
        except Exception as e:  # never mask the real failure
            log.debug("loss plot failed: %s", e)

    @staticmethod
    def draw(metrics_path: Any, out_path: Any, baselines: dict[str, float] | None = None,
             loss_unit: str = "nats/token") -> bool:
        """Draw ``out_path`` from ``metrics_path``; False when there is nothing to draw."""
        fig = LossPlot.figure(metrics_path, baselines, loss_unit)
        if fig is None:
            return False
        fig.savefig(out_path)
        return True

    @staticmethod
    def figure(metrics_path: Any, baselines: dict[str, float] | None = None, loss_unit: str = "nats/token") -> Any:
        """The plot of ``metrics_path`` (a matplotlib ``Figure``, its y axis ``loss (<loss_unit>)``),
        None when there is nothing to draw."""
        rows = []
        if metrics_path.exists():
            for line in metrics_path.read_text().splitlines():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
        val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
        if not train and not val:
            return None
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7, 4.2), dpi=110)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        if train:
            ax.plot(*zip(*train, strict=True), lw=1.2, label="train loss")
        if val:
            ax.plot(*zip(*val, strict=True), "o-", ms=3.5, lw=1.2, label="val loss")
        if baselines and "unigram_entropy" in baselines:
            ax.axhline(baselines["unigram_entropy"], ls="--", c="gray", lw=1,
                       label=f"unigram entropy {baselines['unigram_entropy']:.3f}")
        ax.set_xlabel("optimiser step")
        ax.set_ylabel(f"loss ({loss_unit})")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        return fig


DEFAULT_CALLBACKS = ("progress", "console", "metrics", "tensorboard", "loss_plot")


def build_callbacks(config: Any, names: tuple[str, ...] | list[str] = DEFAULT_CALLBACKS) -> list[Callback]:
    """Instances of the registered callbacks ``names`` that ``config`` enables, in that order."""
    out = []
    for name in names:
        cb = get_callback(name).from_config(config)
        if cb is not None:
            out.append(cb)
    return out
