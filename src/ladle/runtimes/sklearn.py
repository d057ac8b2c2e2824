"""scikit-learn backend: a fitted estimator from skops (default) or, only when trusted, pickle/joblib.

Invariant: the model has exactly one input (the feature matrix) and each output is one estimator
method (predict, predict_proba, ...) whose result is cast to the output's declared datatype.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ladle.errors import InvalidInput, Unprocessable
from ladle.repository.model_config import ModelConfig
from ladle.runtimes.base import RuntimeLoadError
from ladle.runtimes.common import (
    artifact_names,
    cast_output,
    find_artifact,
    item_to_served,
    param_bool,
    param_str_list,
    param_str_map,
)
from ladle.tensors import NUMPY_TO_DATATYPE, TensorSpec

DEFAULT_FILES = ("model.skops", "model.joblib", "model.pkl")
PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib")
METHOD_BY_NAME = {
    "label": "predict",
    "predict": "predict",
    "probabilities": "predict_proba",
    "predict_proba": "predict_proba",
    "decision_function": "decision_function",
    "transform": "transform",
}
POSITIONAL_METHODS = ("predict", "predict_proba")


class SklearnRuntime:
    """A fitted estimator; `predict` calls each output's method once on the single input."""

    def __init__(self, estimator: Any, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...],
                 methods: dict[str, str]) -> None:
        self.estimator = estimator
        self.inputs = inputs
        self.outputs = outputs
        self.methods = methods

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        features = _features(inputs[self.inputs[0].name])
        results: dict[str, Any] = {}  # method -> result, so two outputs of one method run it once
        out: dict[str, np.ndarray] = {}
        for spec in self.outputs:
            method = self.methods[spec.name]
            if method not in results:
                results[method] = self._call(method, features)
            out[spec.name] = cast_output(results[method], spec)
        return out

    def _call(self, method: str, features: Any) -> Any:
        try:
            return getattr(self.estimator, method)(features)
        except ValueError as exc:
            # scikit-learn validates values (NaN, wrong feature count) with ValueError: the request's fault.
            raise Unprocessable(f"{type(self.estimator).__name__}.{method} rejected the input: {exc}") from exc

    def close(self) -> None:
        self.estimator = None


def _features(array: np.ndarray) -> Any:
    # Text pipelines (e.g. a TfidfVectorizer first) take a 1-D list of str, not [N, 1] bytes.
    if array.dtype != np.object_:
        return array
    try:
        return [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in array.reshape(-1)]
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"a text input is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def load(version_dir: Path, config: ModelConfig) -> SklearnRuntime:
    """Load the estimator, then settle inputs, outputs and the method behind each output."""
    path = find_artifact(version_dir, artifact_names(config, DEFAULT_FILES))
    estimator = _load_estimator(path, config)
    inputs = config.inputs or (_infer_input(path, estimator, config.batched),)
    if len(inputs) != 1:
        raise RuntimeLoadError(
            f"{path}: a scikit-learn model takes exactly one input (the feature matrix); "
            f"config.yaml lists {len(inputs)}: {[s.name for s in inputs]}"
        )
    if config.outputs:
        outputs = config.outputs
        methods = _methods(path, estimator, outputs, config)
    else:
        names = _default_output_names(estimator)
        methods = {name: METHOD_BY_NAME[name] for name in names}
        outputs = _infer_outputs(path, estimator, inputs[0], methods, config.batched)
    return SklearnRuntime(estimator, inputs, outputs, methods)


def _load_estimator(path: Path, config: ModelConfig) -> Any:
    if path.suffix in PICKLE_SUFFIXES:
        return _load_pickle(path, config)
    return _load_skops(path, config)


def _load_skops(path: Path, config: ModelConfig) -> Any:
    import skops.io as sio

    allowed = set(param_str_list(config, "trusted_types"))
    try:
        untrusted = sio.get_untrusted_types(file=path)
    except Exception as exc:
        raise RuntimeLoadError(f"{path}: not a readable skops file ({type(exc).__name__}: {exc})") from exc
    refused = [t for t in untrusted if t not in allowed]
    if refused:
        raise RuntimeLoadError(
            f"{path}: skops does not trust these types by default: {refused}. If you trust this file, "
            f"list them under parameters.trusted_types in config.yaml"
        )
    try:
        return sio.load(path, trusted=[t for t in untrusted if t in allowed])
    except Exception as exc:
        raise RuntimeLoadError(f"{path}: skops could not load it ({type(exc).__name__}: {exc})") from exc


def _load_pickle(path: Path, config: ModelConfig) -> Any:
    if not param_bool(config, "trusted", False):
        raise RuntimeLoadError(
            f"{path}: loading a pickle/joblib file runs whatever code it contains, so ladle refuses it unless "
            f"config.yaml sets 'parameters: {{trusted: true}}'; or save the model with skops.io.dump as model.skops"
        )
    import joblib  # reads plain pickles too

    try:
        return joblib.load(path)
    except Exception as exc:
        raise RuntimeLoadError(f"{path}: could not unpickle it ({type(exc).__name__}: {exc})") from exc


def _infer_input(path: Path, estimator: Any, batched: bool) -> TensorSpec:
    n_features = getattr(estimator, "n_features_in_", None)
    if not isinstance(n_features, int):
        raise RuntimeLoadError(
            f"{path}: {type(estimator).__name__} does not record n_features_in_; list the input "
            f"(name, datatype, shape) under 'inputs' in config.yaml"
        )
    return TensorSpec(name="input", datatype="FP32", shape=item_to_served((n_features,), batched))


def _default_output_names(estimator: Any) -> list[str]:
    if hasattr(estimator, "classes_") and hasattr(estimator, "predict"):
        return ["label", "probabilities"] if hasattr(estimator, "predict_proba") else ["label"]
    if hasattr(estimator, "predict"):
        return ["predict"]
    if hasattr(estimator, "transform"):
        return ["transform"]
    return []


def _infer_outputs(path: Path, estimator: Any, input_spec: TensorSpec, methods: dict[str, str],
                   batched: bool) -> tuple[TensorSpec, ...]:
    """Run each method on one probe row to learn its result's per-row shape and dtype."""
    if not methods:
        raise RuntimeLoadError(f"{path}: {type(estimator).__name__} has no predict or transform method")
    row_shape = input_spec.shape if batched else input_spec.shape[1:]
    if any(d < 0 for d in row_shape):
        raise RuntimeLoadError(f"{path}: input '{input_spec.name}' has an unknown size; list 'outputs' in config.yaml")
    if input_spec.datatype == "BYTES":
        probe = np.full((1, *row_shape), b"", dtype=np.object_)
    else:
        probe = np.zeros((1, *row_shape), dtype=np.float32)
    specs = []
    for name, method in methods.items():
        try:
            result = np.asarray(getattr(estimator, method)(_features(probe)))
        except Exception as exc:
            raise RuntimeLoadError(
                f"{path}: could not infer output '{name}' by calling {method} on a probe row "
                f"({type(exc).__name__}: {exc}); list 'outputs' in config.yaml"
            ) from exc
        specs.append(TensorSpec(name, _datatype(result, method), item_to_served(result.shape[1:], batched)))
    return tuple(specs)


def _datatype(result: np.ndarray, method: str) -> str:
    if result.dtype.kind in "USO":
        return "BYTES"
    if method != "predict" and result.dtype.kind == "f":
        return "FP32"  # scores and probabilities: float32 is plenty and halves the payload
    if result.dtype.kind in "iu":
        return "INT64"
    return NUMPY_TO_DATATYPE.get(result.dtype, "FP64")


def _methods(path: Path, estimator: Any, outputs: tuple[TensorSpec, ...], config: ModelConfig) -> dict[str, str]:
    explicit = param_str_map(config, "methods")
    unknown = sorted(set(explicit) - {s.name for s in outputs})
    if unknown:
        raise RuntimeLoadError(f"{path}: parameters.methods names outputs {unknown} that config.yaml does not list")
    methods = {}
    for index, spec in enumerate(outputs):
        method = explicit.get(spec.name) or METHOD_BY_NAME.get(spec.name)
        if method is None and index < len(POSITIONAL_METHODS):
            method = POSITIONAL_METHODS[index]
        if method is None:
            raise RuntimeLoadError(
                f"{path}: no estimator method for output '{spec.name}'; set parameters.methods: "
                f"{{{spec.name}: <method>}} in config.yaml"
            )
        if not callable(getattr(estimator, method, None)):
            raise RuntimeLoadError(
                f"{path}: {type(estimator).__name__} has no method '{method}' (for output '{spec.name}'); "
                f"choose another with parameters.methods"
            )
        methods[spec.name] = method
    return methods
