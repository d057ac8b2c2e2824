"""ConfigError, and the mapping from pydantic's ValidationError to it: the file, the field path
(`dynamic_batching.max_queue_delay`, `inputs[0].shape`) and what was expected, in words.

Invariant: a ConfigError names one field and what it should be; a validator's own words (`bad`) win.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails, PydanticCustomError

_OWN = "ladle_config"
_WORDS: dict[Any, str] = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_BY_TYPE = {"int": "an integer", "float": "a number", "bool": "true or false", "string": "a string",
            "tuple": "a list", "list": "a list", "dict": "a mapping", "mapping": "a mapping", "model": "a mapping"}


class ConfigError(ValueError):
    """A model config is invalid: which file, which field, what was expected."""

    def __init__(self, path: Path | str, field_name: str, expected: str) -> None:
        super().__init__(f"{path}: field '{field_name}': {expected}")
        self.path = str(path)
        self.field = field_name
        self.expected = expected


def bad(expected: str, field: str | None = None) -> PydanticCustomError:
    """A validator's own error: `expected` in words; `field` (a full path) when not the validator's location."""
    return PydanticCustomError(_OWN, "{expected}", {"expected": expected, "field": field})


def config_error(exc: ValidationError, path: Path | str, root: type[BaseModel]) -> ConfigError:
    """The first of pydantic's errors as a ConfigError (one problem at a time, as a person fixes them)."""
    error = exc.errors(include_url=False)[0]
    ctx = error.get("ctx") or {}
    if error["type"] == _OWN:
        return ConfigError(path, ctx["field"] or _path(error["loc"]), ctx["expected"])
    holder, field = _walk(root, error["loc"])
    if error["type"] == "extra_forbidden":
        hint: str = getattr(holder, "unknown_hint", "unknown field; known fields are {known}")
        return ConfigError(path, _path(error["loc"]), hint.format(known=sorted(holder.model_fields)))
    return ConfigError(path, _path(error["loc"]), _expected(error, field))


def _path(loc: tuple[int | str, ...]) -> str:
    """('inputs', 0, 'shape') -> 'inputs[0].shape'."""
    return "".join(f"[{p}]" if isinstance(p, int) else p if p.startswith("[") else f".{p}" for p in loc).lstrip(".")


def _walk(root: type[BaseModel], loc: tuple[int | str, ...]) -> tuple[type[BaseModel], FieldInfo | None]:
    """The model holding the last named field of `loc`, and that field (None when the model has no such field)."""
    holder, field = root, None
    for part in (p for p in loc if isinstance(p, str)):
        inner = holder if field is None else _model_in(field.annotation)
        if inner is None:
            break
        holder, field = inner, inner.model_fields.get(part)
        if field is None:
            break
    return holder, field


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The config model inside `DynamicBatching | None`, `tuple[Annotated[TensorSpec, marker], ...]`, ..."""
    candidate = getattr(annotation, "model", annotation)  # a marker standing for a model (model_config.py)
    if isinstance(candidate, type) and issubclass(candidate, BaseModel):
        return candidate
    return next((m for m in map(_model_in, typing.get_args(annotation)) if m is not None), None)


def _expected(error: ErrorDetails, field: FieldInfo | None) -> str:
    words = _describe(field) if field is not None else None
    words = words or _BY_TYPE.get(error["type"].split("_")[0]) or error["msg"]
    return f"required; {words}" if error["type"] == "missing" else f"{words}, got {_shown(error['input'])}"


def _describe(field: FieldInfo) -> str | None:
    """A scalar field in words from its type and constraints: 'an integer >= 1', "one of ['thread', ...]"."""
    kind = field.annotation
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        kind = typing.get_args(kind)[0]  # X | None
    if typing.get_origin(kind) is Literal:
        return f"one of {list(typing.get_args(kind))}"
    meta = field.metadata
    if any(getattr(m, "allow_inf_nan", True) is False for m in meta):
        return "a finite number >= 0"
    if any(getattr(m, "min_length", 0) for m in meta):
        return "a non-empty string"
    ge = next((m.ge for m in meta if getattr(m, "ge", None) is not None), None)
    words = _WORDS.get(kind)
    return words if words is None or ge is None else f"{words} >= {ge}"


def _shown(value: Any) -> str:
    """A scalar as written (cut short), anything bigger by its type: messages stay one readable line."""
    if value is None or isinstance(value, (bool, int, float, str)):
        text = repr(value)
        return text if len(text) <= 80 else text[:77] + "..."
    return type(value).__name__
