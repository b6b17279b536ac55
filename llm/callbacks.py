"""The import path ``llm.callbacks`` of ``llm.loop.callbacks`` (kept for code written against it)."""

from llm.loop.callbacks import *  # noqa: F403
from llm.loop.callbacks import __all__  # noqa: F401
