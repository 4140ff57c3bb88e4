"""Untrusted JSON or TOML read into dataclasses: every field's type checked against its
annotation (`dataclasses.fields` and the type hints), so a bad file is one error naming the field,
not a traceback later. Numbers must be finite; booleans are not numbers; lists become tuples."""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, fields, is_dataclass

from edgediff.errors import EdgediffError


def read(cls, raw: object, where: str, error: type[EdgediffError], path: str = ""):
    """`cls(**raw)` with each value checked; unknown and missing keys are errors too."""
    label = path or cls.__name__
    if not isinstance(raw, Mapping):
        raise error(f"{where}: {label} must be a table of keys (got {_kind(raw)})")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise error(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} in "
                    f"{label} (known: {', '.join(known)})")
    values = {}
    for name, f in known.items():
        if name not in raw:
            if f.default is MISSING and f.default_factory is MISSING:
                raise error(f"{where}: {label} lacks '{name}'")
            continue
        values[name] = _value(hints[name], raw[name], where, error, f"{path}{name}" if not path else f"{path}.{name}")
    return cls(**values)


def _kind(value: object) -> str:
    return {dict: "a table", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "nothing"}.get(type(value), type(value).__name__)


def _value(tp, value, where: str, error, name: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is object or tp is typing.Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        problems = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _value(option, value, where, error, name)
            except EdgediffError as exc:
                problems.append(str(exc))
        raise error(problems[0] if len(problems) == 1 else f"{where}: '{name}' has the wrong type ({_kind(value)})")
    if is_dataclass(tp):
        return read(tp, value, where, error, name)
    if tp is bool:
        if not isinstance(value, bool):
            raise error(f"{where}: '{name}' must be true or false (got {_kind(value)} {value!r})")
        return value
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise error(f"{where}: '{name}' must be an integer (got {_kind(value)} {value!r})")
        return value
    if tp is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise error(f"{where}: '{name}' must be a number (got {_kind(value)} {value!r})")
        if not math.isfinite(value):
            raise error(f"{where}: '{name}' must be a finite number (got {value})")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise error(f"{where}: '{name}' must be a string (got {_kind(value)} {value!r})")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise error(f"{where}: '{name}' must be a list (got {_kind(value)} {value!r})")
        item = args[0]
        return tuple(_value(item, v, where, error, f"{name}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise error(f"{where}: '{name}' must be a table (got {_kind(value)} {value!r})")
        item = args[1] if args else object
        return {k: _value(item, v, where, error, f"{name}.{k}") for k, v in value.items()}
    raise TypeError(f"typed.read cannot check the annotation {tp!r} of '{name}'")
