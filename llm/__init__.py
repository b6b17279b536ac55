"""Backend-agnostic core: the model spec, config, data, tokenizers and checkpoints.

Importing ``llm`` (or ``llm.spec`` / ``llm.config``) never imports torch or jax; a backend is
imported lazily, by name, only where one is asked for (``llm.load(..., backend="torch")``).
"""

from llm.spec import ModelSpec, SpecError, init_params

__all__ = ["ModelSpec", "SpecError", "init_params", "load"]
__version__ = "0.1.0"


def load(checkpoint_dir, backend: str = "torch", **kwargs):
    """Load a canonical checkpoint into ``backend`` ("torch" or "jax"); see ``llm.api.load``."""
    from llm.api import load as _load

    return _load(checkpoint_dir, backend=backend, **kwargs)
