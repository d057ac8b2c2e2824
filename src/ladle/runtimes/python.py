"""Custom Python backend: `model.py` in the version dir defines a class with `load()` and `predict(batch)`.

Invariant: each load imports model.py under its own unique module name (never a generic "model"), so
several versions or instances coexist; results are checked and converted to the declared outputs.
"""

from __future__ import annotations

import importlib.util
import inspect
import re
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from ladle.errors import LadleError, ModelError
from ladle.repository.model_config import ModelConfig
from ladle.runtimes.base import RuntimeLoadError
from ladle.runtimes.common import artifact_names, cast_output, find_artifact, param_str
from ladle.tensors import TensorSpec


@dataclass(frozen=True)
class ModelContext:
    """What a custom model's `load(context)` is told about itself."""

    name: str
    version: int
    model_dir: Path
    parameters: Mapping[str, Any]
    config: ModelConfig


class PythonRuntime:
    """A user object whose `predict(batch)` results are validated against the declared outputs."""

    def __init__(self, instance: Any, module_name: str, config: ModelConfig) -> None:
        self.instance = instance
        self.module_name = module_name
        self.inputs = config.inputs
        self.outputs = config.outputs
        self.batched = config.batched
        self._where = f"model '{config.name}' ({type(instance).__name__}.predict)"

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            result = self.instance.predict(inputs)
        except LadleError:
            raise  # the model chose the protocol error itself (e.g. InvalidInput)
        except Exception as exc:
            raise ModelError(f"{self._where} raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(result, Mapping):
            raise ModelError(f"{self._where} returned {type(result).__name__}; expected a dict of output name -> array")
        batch = len(next(iter(inputs.values()))) if self.batched and inputs else None
        return {spec.name: self._output(result, spec, batch) for spec in self.outputs}

    def _output(self, result: Mapping[str, Any], spec: TensorSpec, batch: int | None) -> np.ndarray:
        if spec.name not in result:
            raise ModelError(f"{self._where} returned no output '{spec.name}' (it returned {sorted(result)})")
        try:
            array = cast_output(result[spec.name], spec)
        except (TypeError, ValueError, UnicodeError) as exc:
            why = f"output '{spec.name}' is not convertible to {spec.datatype}: {exc}"
            raise ModelError(f"{self._where}: {why}") from exc
        if batch is None:
            if not spec.shape_matches(array.shape):
                raise ModelError(f"{self._where}: output '{spec.name}' has shape {list(array.shape)}, "
                                 f"expected {list(spec.shape)}")
            return array
        if array.ndim == 0 or array.shape[0] != batch:
            raise ModelError(f"{self._where}: output '{spec.name}' has {array.shape[0] if array.ndim else 0} "
                             f"rows for a batch of {batch}")
        if spec.shape == (1,) and array.ndim == 1:
            array = array.reshape(batch, 1)  # a flat list of N values fills a per-item shape [1]
        if not spec.shape_matches(array.shape[1:]):
            raise ModelError(f"{self._where}: output '{spec.name}' has per-item shape {list(array.shape[1:])}, "
                             f"expected {list(spec.shape)}")
        return array

    def close(self) -> None:
        closer = getattr(self.instance, "close", None)
        try:
            if callable(closer):
                closer()
        finally:
            self.instance = None
            sys.modules.pop(self.module_name, None)


def load(version_dir: Path, config: ModelConfig) -> PythonRuntime:
    """Import model.py, pick its model class, instantiate it and call its `load`."""
    path = find_artifact(version_dir, artifact_names(config, ["model.py"]))
    if not config.inputs or not config.outputs:
        raise RuntimeLoadError(
            f"{path}: the python backend cannot infer tensors; list 'inputs' and 'outputs' "
            f"(name, datatype, shape) in the model's config.yaml"
        )
    module = _import(path, config.name)
    try:
        cls = _model_class(path, module, param_str(config, "class_name", None))
        instance = _construct(path, cls, _context(version_dir, config))
    except BaseException:
        sys.modules.pop(module.__name__, None)
        raise
    return PythonRuntime(instance, module.__name__, config)


def _context(version_dir: Path, config: ModelConfig) -> ModelContext:
    version = int(version_dir.name) if version_dir.name.isdigit() else 0
    return ModelContext(config.name, version, version_dir, dict(config.parameters), config)


def _import(path: Path, model_name: str) -> ModuleType:
    safe = re.sub(r"\W", "_", model_name)
    unique = f"ladle_python_model_{safe}_{path.parent.name}_{uuid.uuid4().hex[:8]}"
    spec = importlib.util.spec_from_file_location(unique, path)
    if spec is None or spec.loader is None:
        raise RuntimeLoadError(f"{path}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    # dataclasses, pickle and typing look a class's module up in sys.modules; the name is unique.
    sys.modules[unique] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(unique, None)
        raise RuntimeLoadError(f"{path}: importing it raised {type(exc).__name__}: {exc}") from exc
    return module


def _model_class(path: Path, module: ModuleType, class_name: str | None) -> type:
    classes = {n: c for n, c in vars(module).items() if inspect.isclass(c) and c.__module__ == module.__name__}
    if class_name is not None:
        cls = classes.get(class_name)
        if cls is None:
            raise RuntimeLoadError(
                f"{path}: parameters.class_name is '{class_name}', but model.py defines classes {sorted(classes)}"
            )
        if not callable(getattr(cls, "predict", None)):
            raise RuntimeLoadError(f"{path}: class '{class_name}' has no predict(batch) method")
        return cls
    candidates = sorted(n for n, c in classes.items() if callable(getattr(c, "predict", None)))
    if len(candidates) == 1:
        return classes[candidates[0]]
    if not candidates:
        raise RuntimeLoadError(
            f"{path}: no class defines predict(batch); classes found: {sorted(classes)}. "
            f"Define one with load() and predict(batch)"
        )
    raise RuntimeLoadError(
        f"{path}: several classes define predict: {candidates}; choose one with parameters.class_name"
    )


def _construct(path: Path, cls: type, context: ModelContext) -> Any:
    try:
        instance = cls()
    except Exception as exc:
        raise RuntimeLoadError(f"{path}: {cls.__name__}() raised {type(exc).__name__}: {exc}") from exc
    loader = getattr(instance, "load", None)
    if loader is None:
        return instance
    arity = len(inspect.signature(loader).parameters)
    if arity > 1:
        raise RuntimeLoadError(f"{path}: {cls.__name__}.load must take no arguments or one ModelContext")
    try:
        if arity == 1:
            loader(context)
        else:
            loader()
    except Exception as exc:
        raise RuntimeLoadError(f"{path}: {cls.__name__}.load() raised {type(exc).__name__}: {exc}") from exc
    return instance
