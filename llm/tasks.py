"""The import path ``llm.tasks`` of ``llm.loop.tasks`` (kept for code written against it)."""

from llm.loop.tasks import *  # noqa: F403
from llm.loop.tasks import __all__  # noqa: F401
