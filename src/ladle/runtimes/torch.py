"""PyTorch backends: TorchScript (`model.pt`, torch.jit.load) and torch.export (`model.pt2`).

Invariant: inputs go to the module positionally in config order, under torch.inference_mode(), and
whatever it returns (tensor, tuple/list, dict) is mapped onto the served output names or rejected.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ladle.errors import ModelError
from ladle.process import pin_torch_threads
from ladle.repository.model_config import ModelConfig
from ladle.runtimes.base import RuntimeLoadError
from ladle.runtimes.common import artifact_names, cast_output, find_artifact, param_int, param_str, served_shape
from ladle.tensors import TensorSpec

TORCH_TO_DATATYPE: dict[torch.dtype, str] = {
    torch.bool: "BOOL",
    torch.uint8: "UINT8",
    torch.uint16: "UINT16",
    torch.uint32: "UINT32",
    torch.uint64: "UINT64",
    torch.int8: "INT8",
    torch.int16: "INT16",
    torch.int32: "INT32",
    torch.int64: "INT64",
    torch.float16: "FP16",
    torch.float32: "FP32",
    torch.float64: "FP64",
}


class TorchRuntime:
    """A loaded torch module (scripted or exported) on one device."""

    def __init__(self, module: Callable[..., Any], device: torch.device, inputs: tuple[TensorSpec, ...],
                 outputs: tuple[TensorSpec, ...]) -> None:
        self.module: Callable[..., Any] | None = module
        self.device = device
        self.inputs = inputs
        self.outputs = outputs

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.module is None:
            raise RuntimeError("predict() called on a closed torch runtime")
        # torch.from_numpy shares memory and warns on read-only buffers (e.g. decoded request bodies).
        args = [torch.from_numpy(_writable(inputs[spec.name])).to(self.device) for spec in self.inputs]
        with torch.inference_mode():
            result = self.module(*args)
        values = _map_outputs(result, self.outputs)
        return {spec.name: cast_output(values[spec.name].detach().cpu().numpy(), spec) for spec in self.outputs}

    def close(self) -> None:
        self.module = None


def _writable(array: np.ndarray) -> np.ndarray:
    return array if array.flags.writeable and array.flags.c_contiguous else np.array(array, order="C", copy=True)


def _map_outputs(result: Any, outputs: tuple[TensorSpec, ...]) -> dict[str, torch.Tensor]:
    names = [spec.name for spec in outputs]
    if isinstance(result, torch.Tensor):
        result = (result,)
    if isinstance(result, dict):
        missing = [n for n in names if n not in result]
        if missing:
            raise ModelError(f"the model returned a dict with keys {sorted(result)}; missing outputs {missing}")
        return {n: result[n] for n in names}
    if isinstance(result, (tuple, list)):
        if len(result) != len(names):
            raise ModelError(f"the model returned {len(result)} values, but the config lists outputs {names}")
        return dict(zip(names, result, strict=True))
    raise ModelError(f"the model returned {type(result).__name__}; expected a tensor, tuple/list or dict of tensors")


def load(version_dir: Path, config: ModelConfig) -> TorchRuntime:
    """Load `model.pt` (torchscript) or `model.pt2` (torch_export), per `config.backend`."""
    # load runs on the instance's own thread (or worker process), which also runs its batches
    pin_torch_threads(param_int(config, "num_threads", None, minimum=1), f"model {config.name}")
    device = _device(config)
    if config.backend == "torch_export":
        path = find_artifact(version_dir, artifact_names(config, ["model.pt2"]))
        module, inputs, outputs = _load_exported(path, config, device)
    else:
        path = find_artifact(version_dir, artifact_names(config, ["model.pt"]))
        module, inputs, outputs = _load_scripted(path, config, device)
    bad = [s.name for s in inputs if s.datatype == "BYTES"]
    if bad:
        raise RuntimeLoadError(f"{path}: torch models take numeric tensors; inputs {bad} are BYTES")
    return TorchRuntime(module, device, inputs, outputs)


def _device(config: ModelConfig) -> torch.device:
    name = param_str(config, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise RuntimeLoadError(f"model '{config.name}': parameters.device {name!r} is not a torch device") from exc


def _load_scripted(path: Path, config: ModelConfig, device: torch.device) -> tuple[Any, tuple, tuple]:
    try:
        module = torch.jit.load(str(path), map_location=device)
    except Exception as exc:
        raise RuntimeLoadError(f"{path}: not a TorchScript archive ({type(exc).__name__}: {exc})") from exc
    module.eval()
    # The schema knows argument names but not dtypes or shapes, so those must come from the config.
    args = [a for a in module.forward.schema.arguments if a.name != "self"]
    arg_names = [a.name for a in args]
    missing = [f for f, specs in (("inputs", config.inputs), ("outputs", config.outputs)) if not specs]
    if missing:
        raise RuntimeLoadError(
            f"{path}: TorchScript does not record tensor datatypes or shapes; list {' and '.join(missing)} "
            f"(name, datatype, shape) in config.yaml. forward() takes {arg_names}, in that order"
        )
    required = [a.name for a in args if not a.has_default_value()]
    if not len(required) <= len(config.inputs) <= len(args):
        raise RuntimeLoadError(
            f"{path}: config.yaml lists {len(config.inputs)} inputs, but forward() takes {arg_names} "
            f"({len(required)} required); inputs are passed positionally in config order"
        )
    return module, config.inputs, config.outputs


def _load_exported(path: Path, config: ModelConfig, device: torch.device) -> tuple[Any, tuple, tuple]:
    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        raise RuntimeLoadError(f"{path}: not a torch.export archive ({type(exc).__name__}: {exc})") from exc
    inputs = config.inputs or _exported_inputs(path, program, config.batched)
    outputs = config.outputs or _exported_outputs(path, program, config.batched)
    module = program.module()
    if device.type != "cpu":
        module = module.to(device)
    return module, inputs, outputs


def _spec(path: Path, name: str, value: Any, batched: bool) -> TensorSpec:
    """A TensorSpec from a graph node's fake tensor; symbolic dims become -1."""
    if not isinstance(value, torch.Tensor):
        raise RuntimeLoadError(f"{path}: '{name}' is not a tensor ({type(value).__name__}); list it in config.yaml")
    datatype = TORCH_TO_DATATYPE.get(value.dtype)
    if datatype is None:
        raise RuntimeLoadError(f"{path}: '{name}' has dtype {value.dtype}, which the protocol cannot carry")
    shape = [d if isinstance(d, int) else -1 for d in value.shape]
    if batched and (not shape or shape[0] != -1):
        raise RuntimeLoadError(
            f"{path}: '{name}' has shape {shape} with no dynamic batch dimension; export with "
            f"dynamic_shapes={{...: {{0: torch.export.Dim('batch')}}}} or set max_batch_size: 0"
        )
    return TensorSpec(name=name, datatype=datatype, shape=served_shape(shape, batched))


def _exported_inputs(path: Path, program: Any, batched: bool) -> tuple[TensorSpec, ...]:
    nodes = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    names = program.graph_signature.user_inputs
    return tuple(_spec(path, name, nodes[name].meta.get("val"), batched) for name in names)


def _exported_outputs(path: Path, program: Any, batched: bool) -> tuple[TensorSpec, ...]:
    output_node = next(n for n in program.graph.nodes if n.op == "output")
    by_name = {n.name: n for n in output_node.args[0] if isinstance(n, torch.fx.Node)}
    values = [by_name[name].meta.get("val") if name in by_name else None
              for name in program.graph_signature.user_outputs]
    names = _output_names(program, len(values))
    return tuple(_spec(path, name, value, batched) for name, value in zip(names, values, strict=True))


def _output_names(program: Any, count: int) -> list[str]:
    """Dict keys when forward returns a flat dict; `output` for one tensor; else output_0, output_1, ..."""
    signature = program.module_call_graph[0].signature
    spec = signature.out_spec if signature is not None else None
    if spec is None:
        return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]
    if spec.type is dict and len(spec.context) == count and all(isinstance(k, str) for k in spec.context):
        return list(spec.context)
    if count == 1 and spec.type not in (tuple, list):
        return ["output"]
    return [f"output_{i}" for i in range(count)]
