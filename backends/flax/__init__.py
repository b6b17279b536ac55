"""The Flax NNX lowering of ``llm.spec.ModelSpec``, written to ``docs/architecture.md``.

``model.py`` holds the modules (same class and attribute names as ``backends/torch``);
``convert.py`` is the only place that moves weights, gradients and optimizer moments between
canonical dicts and NNX state. This package's names are the backend surface
(``llm.backend.SURFACE``), the same in ``backends.torch``. This package never imports torch.
"""

from backends.flax.convert import (
    from_canonical,
    from_spec,
    grads_to_canonical,
    load_canonical,
    moments_from_canonical,
    moments_to_canonical,
    to_canonical,
)
from backends.flax.engine import TrainingEngine
from backends.flax.inference import generate, load_model, logits
from backends.flax.model import DecoderModel, KVCache, ModelOutput
from backends.flax.tasks import FlaxLMTask as LMTaskHalf
from backends.flax.tasks import FlaxRegressionTask as RegressionTaskHalf
from backends.flax.tasks import FlaxTask as TaskHalf

__all__ = ["DecoderModel", "KVCache", "LMTaskHalf", "ModelOutput", "RegressionTaskHalf", "TaskHalf",
           "TrainingEngine", "from_canonical", "from_spec", "generate", "grads_to_canonical", "load_canonical",
           "load_model", "logits", "moments_from_canonical", "moments_to_canonical", "to_canonical"]
