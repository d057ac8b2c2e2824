"""Helpers every backend shares: finding artifacts, reading typed parameters, batch-dim bookkeeping.

Invariant: every problem found while loading is a RuntimeLoadError naming the file or the config
parameter and what was expected, so backends never surface a bare framework traceback at load time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ladle.repository.model_config import ModelConfig
from ladle.runtimes.base import RuntimeLoadError
from ladle.tensors import TensorSpec, as_bytes_array, numpy_dtype

_MISSING = object()


def find_artifact(version_dir: Path, names: Sequence[str]) -> Path:
    """The first of `names` that exists as a file in `version_dir`."""
    for name in names:
        path = version_dir / name
        if path.is_file():
            return path
    looked_for = ", ".join(repr(n) for n in names)
    raise RuntimeLoadError(f"{version_dir}: no model artifact found; looked for {looked_for}")


def artifact_names(config: ModelConfig, defaults: Sequence[str]) -> list[str]:
    """`parameters.model_filename` when set, else the backend's default file names."""
    name = param_str(config, "model_filename", None)
    return [name] if name else list(defaults)


def _param(config: ModelConfig, name: str) -> Any:
    return config.parameters.get(name, _MISSING)


def _bad(config: ModelConfig, name: str, expected: str, value: Any) -> RuntimeLoadError:
    return RuntimeLoadError(f"model '{config.name}': parameters.{name} must be {expected}, got {value!r}")


def param_int(config: ModelConfig, name: str, default: int | None, minimum: int = 0) -> int | None:
    """An integer parameter >= minimum, or `default` when absent."""
    value = _param(config, name)
    if value is _MISSING or value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _bad(config, name, f"an integer >= {minimum}", value)
    return value


def param_bool(config: ModelConfig, name: str, default: bool) -> bool:
    """A boolean parameter, or `default` when absent."""
    value = _param(config, name)
    if value is _MISSING:
        return default
    if not isinstance(value, bool):
        raise _bad(config, name, "true or false", value)
    return value


def param_str(config: ModelConfig, name: str, default: str | None) -> str | None:
    """A non-empty string parameter, or `default` when absent."""
    value = _param(config, name)
    if value is _MISSING or value is None:
        return default
    if not isinstance(value, str) or not value:
        raise _bad(config, name, "a non-empty string", value)
    return value


def param_str_list(config: ModelConfig, name: str) -> list[str]:
    """A list of strings (a single string counts as a one-item list); empty when absent."""
    value = _param(config, name)
    if value is _MISSING or value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _bad(config, name, "a list of strings", value)
    return list(value)


def param_str_map(config: ModelConfig, name: str) -> dict[str, str]:
    """A mapping of strings to strings; empty when absent."""
    value = _param(config, name)
    if value is _MISSING or value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise _bad(config, name, "a mapping of names to strings", value)
    return dict(value)


def served_shape(full_shape: Sequence[int], batched: bool) -> tuple[int, ...]:
    """A framework's full tensor shape as served: the leading batch dimension dropped when batched."""
    shape = tuple(full_shape)
    return shape[1:] if batched and shape else shape


def item_to_served(item_shape: Sequence[int], batched: bool) -> tuple[int, ...]:
    """A per-sample shape as served: a leading -1 added when the model does not batch."""
    return tuple(item_shape) if batched else (-1, *item_shape)


def cast_output(value: Any, spec: TensorSpec) -> np.ndarray:
    """A framework result as a numpy array of the output's declared datatype."""
    if spec.datatype == "BYTES":
        array = value if isinstance(value, np.ndarray) else np.asarray(value, dtype=np.object_)
        return as_bytes_array(array)
    return np.asarray(value).astype(numpy_dtype(spec.datatype), copy=False)


def spec_names(specs: Sequence[TensorSpec]) -> list[str]:
    return [s.name for s in specs]
