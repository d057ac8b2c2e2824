"""ONNX Runtime backend: one InferenceSession per loaded version.

Invariant: the served inputs/outputs agree with the session's own metadata (names, element types,
ranks) — checked at load, or inferred from it when the config leaves them out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ladle.errors import InvalidInput
from ladle.repository.model_config import ModelConfig
from ladle.runtimes.base import RuntimeLoadError
from ladle.runtimes.common import artifact_names, cast_output, find_artifact, param_int, served_shape
from ladle.tensors import TensorSpec

ONNX_TO_DATATYPE: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


class OnnxRuntime:
    """A loaded ONNX model; `predict` feeds the config's inputs and fetches the config's outputs."""

    def __init__(
        self, session: ort.InferenceSession, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]
    ) -> None:
        self.session: ort.InferenceSession | None = session
        self.inputs = inputs
        self.outputs = outputs
        self._output_names = [spec.name for spec in outputs]
        self._string_inputs = {spec.name for spec in inputs if spec.datatype == "BYTES"}

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.session is None:
            raise RuntimeError("predict() called on a closed ONNX runtime")
        feed = {name: _decode(name, array) if name in self._string_inputs else array for name, array in inputs.items()}
        results = self.session.run(self._output_names, feed)
        return {spec.name: cast_output(value, spec) for spec, value in zip(self.outputs, results, strict=True)}

    def close(self) -> None:
        self.session = None


def _decode(name: str, array: np.ndarray) -> np.ndarray:
    """ORT string tensors hold text: the protocol's bytes are decoded as UTF-8."""
    out = np.empty(array.shape, dtype=np.object_)
    for index, item in np.ndenumerate(array):
        try:
            out[index] = item.decode("utf-8") if isinstance(item, bytes) else str(item)
        except UnicodeDecodeError:
            raise InvalidInput(f"input '{name}': item {list(index)} is not valid UTF-8") from None
    return out


def load(version_dir: Path, config: ModelConfig) -> OnnxRuntime:
    """Open `model.onnx` (or `parameters.model_filename`) and reconcile its metadata with the config."""
    path = find_artifact(version_dir, artifact_names(config, ["model.onnx"]))
    session = _session(path, config)
    model_inputs = _metadata(session.get_inputs())
    model_outputs = _metadata(session.get_outputs())
    if config.inputs:
        inputs = config.inputs
        _check_inputs(path, inputs, model_inputs, config.batched)
    else:
        inputs = _infer(path, model_inputs, config.batched, "input")
    if config.outputs:
        outputs = config.outputs
        _check_known(path, outputs, model_outputs, config.batched, "output")
    else:
        outputs = _infer(path, model_outputs, config.batched, "output")
    return OnnxRuntime(session, inputs, outputs)


def _session(path: Path, config: ModelConfig) -> ort.InferenceSession:
    options = ort.SessionOptions()
    # One intra-op thread is fastest for small models on a box whose cores the HTTP edge also needs.
    options.intra_op_num_threads = param_int(config, "intra_op_threads", 1, minimum=0) or 0  # 0: ORT decides
    options.inter_op_num_threads = param_int(config, "inter_op_threads", 1, minimum=0) or 0
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    available = ort.get_available_providers()
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:
        raise RuntimeLoadError(f"{path}: not a loadable ONNX model ({type(exc).__name__}: {exc})") from exc


Meta = dict[str, tuple[str, tuple[int, ...] | None]]


def _metadata(args: list[Any]) -> Meta:
    """name -> (ONNX type string, full shape with -1 for symbolic dims, or None if unknown rank)."""
    meta: Meta = {}
    for arg in args:
        shape = None if arg.shape is None else tuple(d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape)
        meta[arg.name] = (arg.type, shape)
    return meta


def _infer(path: Path, meta: Meta, batched: bool, kind: str) -> tuple[TensorSpec, ...]:
    specs = []
    for name, (onnx_type, shape) in meta.items():
        datatype = ONNX_TO_DATATYPE.get(onnx_type)
        if datatype is None:
            hint = " (skl2onnx classifiers: export with options={id(model): {'zipmap': False}})"
            raise RuntimeLoadError(
                f"{path}: {kind} '{name}' has type {onnx_type}, which is not a tensor the server can carry"
                f"{hint if 'map' in onnx_type else ''}; or list only the tensor {kind}s under '{kind}s' in config.yaml"
            )
        if shape is None:
            raise RuntimeLoadError(f"{path}: {kind} '{name}' has no known rank; list '{kind}s' in config.yaml")
        if batched and not shape:
            raise RuntimeLoadError(
                f"{path}: {kind} '{name}' is a scalar, so the model cannot batch; set max_batch_size: 0"
            )
        specs.append(TensorSpec(name=name, datatype=datatype, shape=served_shape(shape, batched)))
    return tuple(specs)


def _check_inputs(path: Path, specs: tuple[TensorSpec, ...], meta: Meta, batched: bool) -> None:
    _check_known(path, specs, meta, batched, "input")
    missing = sorted(set(meta) - {s.name for s in specs})
    if missing:
        raise RuntimeLoadError(f"{path}: the model needs inputs {missing}, which config.yaml does not list")


def _check_known(path: Path, specs: tuple[TensorSpec, ...], meta: Meta, batched: bool, kind: str) -> None:
    for spec in specs:
        if spec.name not in meta:
            raise RuntimeLoadError(
                f"{path}: config {kind} '{spec.name}' is not in the model; its {kind}s are {sorted(meta)}"
            )
        onnx_type, shape = meta[spec.name]
        want = ONNX_TO_DATATYPE.get(onnx_type)
        if want != spec.datatype:
            raise RuntimeLoadError(
                f"{path}: config {kind} '{spec.name}' is {spec.datatype}, but the model's is {onnx_type}"
                + (f" (datatype {want})" if want else "")
            )
        rank = len(spec.shape) + (1 if batched else 0)
        if shape is not None and len(shape) != rank:
            batch_note = " plus the batch dim" if batched else ""
            raise RuntimeLoadError(
                f"{path}: config {kind} '{spec.name}' has shape {list(spec.shape)}{batch_note}, but the model's "
                f"is {list(shape)} (config shapes leave out the batch dim only when max_batch_size > 0)"
            )
