"""The PyTorch lowering of ``llm.spec.ModelSpec`` (see ``docs/architecture.md``).

This package's names are the backend surface (``llm.backend.SURFACE``), the same in
``backends.flax``; apps, tasks and the parity app reach a backend only through them
(``llm.backend.backend("torch")``). Never imports jax or flax: the two backends meet only through
canonical numpy weights.
"""

from backends.torch.convert import (
    from_canonical,
    from_spec,
    grads_to_canonical,
    load_canonical,
    moments_from_canonical,
    moments_to_canonical,
    to_canonical,
)
from backends.torch.engine import TrainingEngine
from backends.torch.inference import generate, load_model, logits
from backends.torch.model import DecoderModel, KVCache, ModelOutput
from backends.torch.tasks import TorchLMTask as LMTaskHalf
from backends.torch.tasks import TorchRegressionTask as RegressionTaskHalf
from backends.torch.tasks import TorchTask as TaskHalf

__all__ = ["DecoderModel", "KVCache", "LMTaskHalf", "ModelOutput", "RegressionTaskHalf", "TaskHalf",
           "TrainingEngine", "from_canonical", "from_spec", "generate", "grads_to_canonical", "load_canonical",
           "load_model", "logits", "moments_from_canonical", "moments_to_canonical", "to_canonical"]
