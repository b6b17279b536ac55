"""The PyTorch lowering of ``llm.spec.ModelSpec`` (see ``docs/architecture.md``).

Never imports jax or flax: the two backends meet only through canonical numpy weights.
"""

from backends.torch.convert import from_canonical, load_canonical, to_canonical
from backends.torch.model import DecoderModel, KVCache, ModelOutput

__all__ = ["DecoderModel", "KVCache", "ModelOutput", "from_canonical", "load_canonical", "to_canonical"]
