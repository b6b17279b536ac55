"""The training loop layer: the engine base both backends subclass, tasks and callbacks.

Sits above the core (``llm.spec``, ``llm.config``, ``llm.data``, ``llm.checkpoint``, ...) and below
the backends and the apps; never imports torch or jax (``docs/architecture.md``, "Layers").

* ``engine``    -- ``BaseTrainingEngine``: setup, ``fit()`` (step, evaluation, checkpoint, early
  stop, then the observers), resume, signals, throughput; a backend supplies the framework steps
* ``cadence``   -- ``every(n)``: when the loop's and the writers' recurring work is due
* ``tasks``     -- ``TrainingTask`` (the backend-free half of a task) and its registry
* ``callbacks`` -- ``Callback`` (observers of the loop's events), the built-in writers and their registry
* ``registry``  -- ``Registry``, the one name -> class registry behind tasks and callbacks
"""

from llm.loop.cadence import every
from llm.loop.callbacks import Callback, available_callbacks, get_callback, register_callback
from llm.loop.engine import BaseTrainingEngine, EarlyStopping, StepReadout
from llm.loop.registry import Registry
from llm.loop.tasks import (
           LMTask,
           RegressionTask,
           TaskError,
           TrainingTask,
           available_tasks,
           get_task,
           register_task,
)

__all__ = ["BaseTrainingEngine", "Callback", "EarlyStopping", "LMTask", "Registry", "RegressionTask",
           "StepReadout", "TaskError", "TrainingTask", "available_callbacks", "available_tasks", "every",
           "get_callback", "get_task", "register_callback", "register_task"]
