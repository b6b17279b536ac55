"""Names -> classes of one kind: the one registry class behind tasks and callbacks.

``llm.loop.tasks`` keeps ``TrainingTask`` subclasses in one (``register_task`` / ``get_task`` /
``available_tasks``), ``llm.loop.callbacks`` keeps ``Callback`` subclasses in another
(``register_callback`` / ``get_callback`` / ``available_callbacks``). A registry checks what it is
given (a subclass of its base), refuses a second class under a taken name unless ``replace=True``
(registering the same class again, as a re-imported module does, is no clash), and names the
nearest registered name when a lookup misses.

This module never imports torch or jax.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from llm.config import nearest

__all__ = ["Registry"]

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """Classes deriving from ``base``, by name; errors are ``error`` instances.

    ``kind`` ("task", "callback") and ``decorator`` (the public decorator's name) word the errors.
    """

    def __init__(self, kind: str, base: type, *, decorator: str, error: type[Exception] = ValueError):
        self.kind, self.base, self.decorator, self.error = kind, base, decorator, error
        self._classes: dict[str, T] = {}

    def register(self, name: str, *, replace: bool = False) -> Callable[[T], T]:
        """Class decorator: register a subclass of ``base`` under ``name`` (sets ``cls.name``)."""

        def decorate(cls: T) -> T:
            if not (isinstance(cls, type) and issubclass(cls, self.base)):
                raise self.error(f"{self.decorator}({name!r}) decorates {self.base.__name__} subclasses, got {cls!r}")
            old = self._classes.get(name)
            if old is not None and not replace and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
                raise self.error(f"{self.kind} {name!r} is already registered ({old.__module__}.{old.__qualname__}); "
                                 "pass replace=True to override it")
            cls.name = name
            self._classes[name] = cls
            return cls

        return decorate

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def get(self, name: str, *, where: str = "", hint: str = "") -> T:
        """The class registered as ``name``; otherwise ``error``:
        ``<where>unknown <kind> 'name'; did you mean 'x'? registered: a, b<hint>``."""
        if name not in self._classes:
            raise self.error(f"{where}unknown {self.kind} {name!r}{self.suggestions(name)}{hint}")
        return self._classes[name]

    def suggestions(self, name: str) -> str:
        """``"; did you mean 'x'? registered: a, b"`` (the nearest name only when one is close)."""
        near = nearest(name, self._classes)
        return (f"; did you mean {near!r}? registered: " if near else "; registered: ") + ", ".join(self.names())

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._classes)
