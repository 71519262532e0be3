"""Typed stage results to and from JSON: dataclasses in, plain JSON out, and back.

`to_json` turns a dataclass (nested dataclasses, lists, dicts, tuples, Paths, numpy scalars) into
JSON-ready data with null for a missing or non-finite number, so every manifest is valid JSON.
`from_json(Type, data)` rebuilds the dataclass from its type hints; unknown keys are an error, so a
manifest that does not match its schema is caught where it is read, not three stages later.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["to_json", "from_json", "SchemaError"]

T = TypeVar("T")


class SchemaError(ValueError):
    """JSON data that does not fit the dataclass it is read as."""


def to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [to_json(v) for v in value]
    if isinstance(value, Path):
        return value.as_posix()
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def from_json(cls: type[T], data: Any, where: str = "") -> T:
    return _convert(cls, data, where or getattr(cls, "__name__", "value"))


def _convert(annotation: Any, data: Any, where: str) -> Any:
    if annotation is Any:
        return data
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if data is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, data, where)
            except SchemaError as err:
                errors.append(str(err))
        raise SchemaError("; ".join(errors) or f"{where}: unexpected null")
    if dataclasses.is_dataclass(annotation):
        if not isinstance(data, dict):
            raise SchemaError(f"{where}: expected an object, got {type(data).__name__}")
        hints = typing.get_type_hints(annotation)
        names = {f.name for f in dataclasses.fields(annotation) if f.init}
        unknown = set(data) - names
        if unknown:
            raise SchemaError(f"{where}: unknown field(s) {sorted(unknown)}")
        values = {name: _convert(hints[name], data[name], f"{where}.{name}") for name in names if name in data}
        try:
            return annotation(**values)
        except TypeError as err:
            raise SchemaError(f"{where}: {err}") from None
    if origin in (list, tuple):
        if not isinstance(data, list):
            raise SchemaError(f"{where}: expected a list, got {type(data).__name__}")
        args = typing.get_args(annotation)
        if origin is tuple and args and args[-1] is not Ellipsis:
            return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, data)))
        item = args[0] if args else Any
        items = [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(data)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(data, dict):
            raise SchemaError(f"{where}: expected an object, got {type(data).__name__}")
        _, item = typing.get_args(annotation) or (str, Any)
        return {k: _convert(item, v, f"{where}.{k}") for k, v in data.items()}
    if annotation is Path:
        if not isinstance(data, str):
            raise SchemaError(f"{where}: expected a path string, got {type(data).__name__}")
        return Path(data)
    if annotation is float:
        if data is None:
            return math.nan
        if isinstance(data, (int, float)) and not isinstance(data, bool):
            return float(data)
        raise SchemaError(f"{where}: expected a number, got {type(data).__name__}")
    if annotation in (int, str, bool):
        if isinstance(data, annotation) and not (annotation is int and isinstance(data, bool)):
            return data
        raise SchemaError(f"{where}: expected {annotation.__name__}, got {type(data).__name__}")
    if annotation in (dict, list):
        if isinstance(data, annotation):
            return data
        raise SchemaError(f"{where}: expected {annotation.__name__}, got {type(data).__name__}")
    raise SchemaError(f"{where}: unsupported type {annotation!r}")
