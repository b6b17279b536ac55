"""Typed, frozen, validated dataclass sections: the one field coercion, "did you mean" and error
format shared by every run-config section (``llm.config``) and by ``llm.spec.ModelSpec``.

A section is a frozen dataclass that subclasses ``Section`` and names its key in a config
(``SECTION = "training"``) and its error class (``ERROR``, a ``FieldError``). At construction each
field is converted to its annotated type by ``coerce``, then ``_validate`` checks the rules with
``_need``. Every error names the dotted key, the value and what was expected::

    training.batch_size: expected int, got 'abc'        a value of the wrong type
    training.lr=-1.0 must be > 0                        a value that breaks a rule
    unknown config key 'model.num_kv_head'; did you mean 'model.num_kv_heads'?

and carries the dotted key of the field at fault in ``.key``, so the config loader can say where the
value came from (file, environment variable or override).

Conversions are the ones text sources need: numeric strings to numbers (YAML 1.1 reads ``3e-4`` as a
string), integral floats to int, 0 and 1 to bool, enum members by value or name in any case, lists
to tuples; an int must lie in the int64 range (``training.seed=9223372036854775808 is out of range``),
what numpy, torch and jax take. Boolean words (``yes``, ``off``) are read by the YAML scalar parse
of env and CLI text, not here: a string is never a bool. This module imports no other project
module and must not import torch or jax.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

__all__ = ["INT_MAX", "INT_MIN", "FieldError", "Section", "check_key", "coerce", "field_types", "nearest",
           "plain", "takes_text"]


class FieldError(ValueError):
    """A bad field value or key. ``key`` is the dotted key at fault (``"training.lr"``) when there is one."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


# ---------------------------------------------------------------------- types
INT_MIN, INT_MAX = -(2**63), 2**63 - 1  # the int64 range: every int field ends up in numpy/torch/jax
_HINTS: dict[type, dict[str, Any]] = {}


def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotations of a dataclass (cached: sections are built often)."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _type_name(tp: Any) -> str:
    if _is_union(tp):
        args = typing.get_args(tp)
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(e.value) for e in tp)
    origin = typing.get_origin(tp)
    if origin is dict or tp is dict:
        return "a mapping"
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} ({', '.join(_type_name(a) for a in args)})"
    return getattr(tp, "__name__", str(tp))


def takes_text(tp: Any) -> bool:
    """Whether a field takes text (str, str|None or a str enum): env and CLI give it the raw text."""
    if _is_union(tp):
        return all(takes_text(a) for a in typing.get_args(tp) if a is not type(None))
    return tp is str or (isinstance(tp, type) and issubclass(tp, str))


def _integral(value: Any) -> int | None:
    """``value`` as an int when it is one, an integral float or the text of either; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        text = value.strip().replace("_", "")
        try:
            return int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                return None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return value if isinstance(value, int) else None


def coerce(value: Any, tp: Any, key: str, error: type[FieldError] = FieldError) -> Any:
    """``value`` converted to the field type ``tp``, or an ``error`` naming ``key``, the type and the value."""

    def fail() -> FieldError:
        return error(f"{key}: expected {_type_name(tp)}, got {value!r}", key)

    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if _is_union(tp):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        number = _integral(value) if int in args else None
        if number is not None and not INT_MIN <= number <= INT_MAX:
            return coerce(number, int, key, error)  # the range error, not "expected int or null"
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, key, error)
            except FieldError:
                pass
        raise fail()
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        if isinstance(value, str):
            for member in tp:
                if value.lower() in (member.value.lower(), member.name.lower()):
                    return member
        raise fail()
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise fail()
    if tp is int:
        number = _integral(value)
        if number is None:
            raise fail()
        if not INT_MIN <= number <= INT_MAX:  # numpy, torch and jax take int64 sizes, seeds and counts
            raise error(f"{key}={number} is out of range: an int field must lie in [{INT_MIN}, {INT_MAX}] "
                        "(int64)", key)
        return number
    if tp is float:
        if isinstance(value, bool):
            raise fail()
        number = value
        if isinstance(value, str):
            try:
                number = float(value.strip().replace("_", ""))
            except ValueError:
                raise fail() from None
        if isinstance(number, (int, float)):
            if not math.isfinite(number):
                raise error(f"{key}: expected a finite float, got {value!r}", key)
            return float(number)
        raise fail()
    if tp is str:
        if isinstance(value, str):
            return value
        raise fail()
    if origin is dict or tp is dict:
        if isinstance(value, Mapping):
            return dict(value)
        raise fail()
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise fail()
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        elif len(args) != len(value):
            raise fail()
        return tuple(coerce(v, a, f"{key}[{i}]", error) for i, (v, a) in enumerate(zip(value, args, strict=True)))
    raise TypeError(f"{key}: unsupported field type {tp!r}")  # a bug in the section's annotations


def plain(value: Any) -> Any:
    """A field value as JSON/YAML-safe data: enums by value, tuples as lists, mappings copied."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------- names
# Names other frameworks use for our keys: spelling distance alone would suggest the wrong field
# (``learning_rate`` is closer to ``early_stopping_patience`` than to ``lr``).
_ALIASES = {
    "learning_rate": "lr", "max_iters": "max_steps", "num_steps": "max_steps", "steps": "max_steps",
    "lr_warmup_steps": "warmup_steps", "warmup_iters": "warmup_steps", "gradient_accumulation_steps":
    "grad_accum_steps", "max_grad_norm": "grad_clip", "clip_grad": "grad_clip", "block_size": "seq_len",
    "micro_batch_size": "batch_size", "eval_interval": "eval_every", "log_interval": "log_every",
}


def nearest(word: str, choices: Iterable[str]) -> str | None:
    """The valid name closest to ``word`` (known aliases first, then spelling), for "did you mean"."""
    choices = list(choices)
    section, _, leaf = word.rpartition(".")
    alias = _ALIASES.get(leaf)
    if alias is not None:
        target = f"{section}.{alias}" if section else alias
        if target in choices:
            return target
        same_leaf = [c for c in choices if c.rpartition(".")[2] == alias]
        if same_leaf:
            return same_leaf[0]
    found = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return found[0] if found else None


def check_key(section: str, key: str, names: Sequence[str], error: type[FieldError] = FieldError, *,
              origin: str = "", elsewhere: str | None = None) -> None:
    """Raise ``error`` naming ``section.key`` and the nearest valid key unless ``key`` is in ``names``.

    ``elsewhere`` is a dotted key of another section with this field name (the config knows them); it
    is the hint when given. ``origin`` says where the key came from (``in run.yaml``).
    """
    if key in names:
        return
    dotted = f"{section}.{key}"
    where = f" ({origin})" if origin else ""
    close = nearest(key, names)
    near = elsewhere or (f"{section}.{close}" if close else None)
    hint = f"; did you mean {near!r}?" if near else f"; valid keys of {section}: {', '.join(names)}"
    raise error(f"unknown config key {dotted!r}{where}{hint}", dotted)


# ---------------------------------------------------------------------- sections
_OWN = object()  # _need's default: show the field's own value


class Section:
    """Base of a frozen dataclass section: per-field coercion at construction, then ``_validate``;
    ``from_dict`` with unknown-key hints, ``to_dict``, ``replace`` and ``diff``."""

    SECTION: ClassVar[str] = ""
    ERROR: ClassVar[type[FieldError]] = FieldError

    def __post_init__(self) -> None:
        hints = field_types(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = coerce(getattr(self, f.name), hints[f.name], f"{self.SECTION}.{f.name}", self.ERROR)
            object.__setattr__(self, f.name, value)
        self._validate()

    def _validate(self) -> None:
        """The section's rules, as ``self._need(...)`` calls; fields are already of their types."""

    def _need(self, ok: bool, name: str, rule: str, value: Any = _OWN) -> None:
        """Raise ``ERROR("<section>.<name>=<value> <rule>")`` unless ``ok``.

        ``name`` may reach into a mapping field (``"rope_scaling.factor"``); ``value`` replaces the
        shown value (a derived one, e.g. the head size a null ``head_dim`` stands for). The error's
        key is the field's (``model.rope_scaling``), where the loader looks up the value's source.
        """
        if ok:
            return
        field_name, *inner = name.split(".")
        if value is _OWN:
            value = getattr(self, field_name)
            for part in inner:
                value = value.get(part) if isinstance(value, Mapping) else None
        raise self.ERROR(f"{self.SECTION}.{name}={value!r} {rule}", f"{self.SECTION}.{field_name}")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None):
        """Build from a mapping (a YAML section; None = all defaults); unknown keys are errors."""
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise cls.ERROR(f"{cls.SECTION}: expected a mapping of fields, got {data!r}", cls.SECTION)
        names = cls.field_names()
        for key in data:
            check_key(cls.SECTION, str(key), names, cls.ERROR)
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-safe dict; ``type(s).from_dict(s.to_dict()) == s``."""
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def diff(self, other: Section) -> list[str]:
        """The names of the fields whose values differ from ``other``'s (same section type), in field order."""
        if type(other) is not type(self):
            raise TypeError(f"cannot diff a {type(self).__name__} against a {type(other).__name__}")
        return [n for n in self.field_names() if getattr(self, n) != getattr(other, n)]
