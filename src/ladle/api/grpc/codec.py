"""ModelInferRequest <-> ladle tensors: typed `contents` or `raw_input_contents` in, `raw_output_contents` out.

Pure messages in, arrays out (no grpc); raw data follows the REST binary-extension rules (kserve_tensors), so every
problem a client can cause raises `InvalidInput` naming the tensor. Nothing is allocated from a declared shape alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ladle.api.kserve_tensors import array_from_binary, output_to_binary
from ladle.errors import InvalidInput, ModelError
from ladle.tensors import DATATYPE_TO_NUMPY, DATATYPES, datatype_of

_MAX_DIMS = 32  # as the REST codec: numpy 1.x's NPY_MAXDIMS
_MAX_NOMINAL_ELEMENTS = 1 << 40
#: the InferTensorContents field each datatype travels in (FP16 has none: raw only, as in Triton)
CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


@dataclass(frozen=True, slots=True, eq=False)
class GrpcInferRequest:
    """A decoded request: `inputs` name -> (datatype, array); `outputs` None when the client wants them all."""

    id: str
    inputs: dict[str, tuple[str, np.ndarray]]
    outputs: list[str] | None
    parameters: dict[str, Any]


def parameter_value(param: Any) -> Any:
    """An InferParameter's value (its oneof), or None when unset."""
    which = param.WhichOneof("parameter_choice")
    return None if which is None else getattr(param, which)


def parameters_dict(params: Any) -> dict[str, Any]:
    return {key: parameter_value(value) for key, value in params.items()}


#: measured on this 2-core box: raw numeric tensors decode zero-copy (1 MiB of FP32: 0.06 ms) and stay on the event
#: loop at any size; BYTES items and typed contents cost a Python-level step per element (250 kB of 10-byte raw BYTES:
#: ~10 ms, typed BYTES ~1.5 ms), so past this many message bytes they decode on a worker thread
THREAD_DECODE_BYTES = 64 * 1024


def decode_off_loop(message: Any) -> bool:
    """Whether decoding `message` is worth a worker thread (ByteSize is computed in C and counts every element)."""
    if message.ByteSize() <= THREAD_DECODE_BYTES:
        return False
    return not message.raw_input_contents or any(t.datatype == "BYTES" for t in message.inputs)


def decode(message: Any) -> GrpcInferRequest:
    """A ModelInferRequest -> GrpcInferRequest; raw contents, if any, come one per input in order."""
    raw = message.raw_input_contents
    if raw and len(raw) != len(message.inputs):
        raise InvalidInput(f"the request has {len(message.inputs)} inputs but {len(raw)} raw_input_contents; "
                           "send raw data for every input or for none")
    inputs: dict[str, tuple[str, np.ndarray]] = {}
    for index, tensor in enumerate(message.inputs):
        if not tensor.name:
            raise InvalidInput(f"inputs[{index}] must have a non-empty 'name'")
        if tensor.name in inputs:
            raise InvalidInput(f"input '{tensor.name}' appears more than once; input names must be unique")
        inputs[tensor.name] = (tensor.datatype, _decode_input(tensor, raw[index] if raw else None))
    return GrpcInferRequest(message.id, inputs, _requested(message.outputs), parameters_dict(message.parameters))


def _requested(outputs: Any) -> list[str] | None:
    names: list[str] = []
    for index, output in enumerate(outputs):
        if not output.name:
            raise InvalidInput(f"outputs[{index}] must have a non-empty 'name'")
        if "classification" in output.parameters:
            raise InvalidInput(f"output '{output.name}': the classification extension is not supported")
        if output.name in names:
            raise InvalidInput(f"output '{output.name}' is requested more than once; output names must be unique")
        names.append(output.name)
    return names or None


def _decode_input(tensor: Any, raw: bytes | None) -> np.ndarray:
    name, datatype = tensor.name, tensor.datatype
    if datatype not in DATATYPE_TO_NUMPY:
        found = "no 'datatype'" if not datatype else f"unknown datatype {datatype!r}"
        raise InvalidInput(f"input '{name}': {found}; expected one of {', '.join(DATATYPES)}")
    if "shared_memory_region" in tensor.parameters:
        raise InvalidInput(f"input '{name}': shared memory is not supported; send contents or raw_input_contents")
    shape, count = _shape(name, tensor.shape)
    if raw is not None:
        if tensor.HasField("contents"):
            raise InvalidInput(f"input '{name}' has both 'contents' and raw_input_contents; send only one")
        return array_from_binary(name, datatype, shape, count, memoryview(raw))
    return _from_contents(name, datatype, shape, count, tensor.contents)


def _shape(name: str, dims: Any) -> tuple[tuple[int, ...], int]:
    if len(dims) > _MAX_DIMS:
        raise InvalidInput(f"input '{name}': shape has {len(dims)} dimensions; at most {_MAX_DIMS} are allowed")
    shape = tuple(dims)
    if any(d < 0 for d in shape):
        raise InvalidInput(f"input '{name}': shape {list(shape)} has a negative dimension; dimensions must be >= 0")
    if math.prod(d for d in shape if d) > _MAX_NOMINAL_ELEMENTS:
        raise InvalidInput(f"input '{name}': shape {list(shape)} is too large")
    return shape, math.prod(shape)


def _from_contents(name: str, datatype: str, shape: tuple[int, ...], count: int, contents: Any) -> np.ndarray:
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidInput(f"input '{name}': {datatype} has no typed contents field; send it in raw_input_contents")
    values = getattr(contents, field)
    others = [f.name for f, v in contents.ListFields() if f.name != field and len(v)]
    if others:
        raise InvalidInput(f"input '{name}' is {datatype}: its data goes in contents.{field}, not {others[0]}")
    if len(values) != count:
        raise InvalidInput(f"input '{name}': shape {list(shape)} has {count} elements but contents.{field} "
                           f"has {len(values)}")
    if datatype == "BYTES":
        array = np.empty(count, dtype=np.object_)
        array[:] = list(values)
        return array.reshape(shape)
    target = DATATYPE_TO_NUMPY[datatype]
    wide = np.asarray(values, dtype=np.int64 if field in ("int_contents", "int64_contents") else None)
    if target.kind in "iu" and wide.size and target.itemsize < wide.dtype.itemsize:
        info = np.iinfo(target)
        if wide.min() < info.min or wide.max() > info.max:
            raise InvalidInput(f"input '{name}': a value in contents.{field} is out of range for {datatype} "
                               f"[{info.min}, {info.max}]")
    return wide.astype(target, copy=False).reshape(shape)


def encode_outputs(response: Any, outputs: list[tuple[str, Any]]) -> None:
    """Appends (name, array) outputs to a ModelInferResponse as raw_output_contents (what tritonclient reads)."""
    for name, value in outputs:
        array = value if type(value) is np.ndarray and value.dtype.isnative else np.asarray(value)
        if not array.dtype.isnative:
            array = array.astype(array.dtype.newbyteorder("="))
        try:
            datatype = datatype_of(array)
        except TypeError:
            raise ModelError(f"output '{name}': numpy dtype {array.dtype} has no KServe v2 datatype") from None
        tensor = response.outputs.add()
        tensor.name, tensor.datatype = name, datatype
        tensor.shape.extend(array.shape)
        response.raw_output_contents.append(bytes(output_to_binary(name, datatype, array)))
