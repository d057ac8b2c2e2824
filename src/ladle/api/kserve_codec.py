"""KServe v2 / Open Inference Protocol REST codec: request bodies -> `InferRequest`, outputs -> response bodies.

Pure bytes in, objects out (no HTTP framework); supports Triton's binary tensor data extension. Every problem a
client can cause raises `InvalidInput` naming the tensor and saying what was expected.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from ladle.api.kserve_tensors import (
    array_from_binary,
    array_from_json,
    non_finite_fragment,
    output_to_binary,
    output_to_json,
)
from ladle.errors import InvalidInput, ModelError, PayloadTooLarge
from ladle.tensors import DATATYPE_TO_NUMPY, DATATYPES, datatype_of

_NUMPY_OPTION = orjson.OPT_SERIALIZE_NUMPY
_SHARED_MEMORY = "shared_memory_region"
# Level 6 is zlib's default trade-off; higher levels cost much more CPU on the hot path for little gain.
_COMPRESS_LEVEL = 6
# numpy 1.x's NPY_MAXDIMS (numpy 2 allows 64): the most dimensions an input may have.
_MAX_DIMS = 32
# Far more elements than any request body can carry, yet small enough that numpy can shape an empty array so.
_MAX_NOMINAL_ELEMENTS = 1 << 40


@dataclass(frozen=True, slots=True, eq=False)
class InputTensor:
    """One decoded input; `data` has `shape` and the numpy dtype of `datatype` (BYTES: object array of bytes).

    Arrays decoded from binary data of an immutable body are read-only views of it: treat `data` as read-only.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray
    parameters: dict


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    """An output the client asked for; `binary` is None when it did not say (use `InferRequest.binary_output`)."""

    name: str
    binary: bool | None
    parameters: dict


@dataclass(frozen=True, slots=True, eq=False)
class InferRequest:
    """A decoded inference request; `outputs` is None when the client wants every output."""

    id: str | None
    inputs: tuple[InputTensor, ...]
    outputs: tuple[RequestedOutput, ...] | None
    parameters: dict
    binary_output: bool


# --------------------------------------------------------------------------------------------------- decode


def decode_infer_request(body: bytes | bytearray | memoryview, header_length: int | None) -> InferRequest:
    """Decode a request body; `header_length` is the Inference-Header-Content-Length header (None: all JSON)."""
    view = memoryview(body)
    if header_length is None:
        header, binary = view, None
    else:
        if not 0 <= header_length <= len(view):
            raise InvalidInput(
                f"Inference-Header-Content-Length is {header_length} but the request body has {len(view)} bytes; "
                "it must be the byte length of the JSON header at the start of the body"
            )
        header, binary = view[:header_length], view[header_length:]
    document = _load_json(header, header_length)
    parameters = _parameters(document.get("parameters"), "request")
    binary_output = parameters.get("binary_data_output", False)
    if type(binary_output) is not bool:
        raise InvalidInput(f"request parameters.binary_data_output must be true or false, got {binary_output!r}")
    return InferRequest(
        id=_request_id(document),
        inputs=_decode_inputs(document, binary),
        outputs=_decode_outputs(document.get("outputs")),
        parameters=parameters,
        binary_output=binary_output,
    )


def _load_json(header: memoryview, header_length: int | None) -> dict:
    try:
        document = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        where = "request body" if header_length is None else f"JSON header (first {header_length} bytes of the body)"
        raise InvalidInput(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidInput(
            f"request body must be a JSON object with an 'inputs' list, got a JSON {_json_type(document)}"
        )
    return document


def _request_id(document: dict) -> str | None:
    request_id = document.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput(f"request 'id' must be a string, got a JSON {_json_type(request_id)}")
    return request_id


def _decode_inputs(document: dict, binary: memoryview | None) -> tuple[InputTensor, ...]:
    raw_inputs = document.get("inputs")
    if not isinstance(raw_inputs, list):
        found = "it is missing" if raw_inputs is None else f"got a JSON {_json_type(raw_inputs)}"
        raise InvalidInput(f"request must have an 'inputs' list of tensors; {found}")
    inputs: list[InputTensor] = []
    names: set[str] = set()
    offset = 0
    for index, raw in enumerate(raw_inputs):
        tensor, offset = _decode_input(index, raw, binary, offset)
        if tensor.name in names:
            raise InvalidInput(f"input '{tensor.name}' appears more than once; input names must be unique")
        names.add(tensor.name)
        inputs.append(tensor)
    if binary is not None and offset != len(binary):
        raise InvalidInput(
            f"the body has {len(binary)} bytes of binary data after the JSON header but the inputs' "
            f"binary_data_size values add up to {offset}"
        )
    return tuple(inputs)


def _decode_input(index: int, raw: Any, binary: memoryview | None, offset: int) -> tuple[InputTensor, int]:
    """One input tensor, and the offset in `binary` where the next input's binary data starts."""
    if not isinstance(raw, dict):
        raise InvalidInput(f"inputs[{index}] must be a JSON object, got a JSON {_json_type(raw)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"inputs[{index}] must have a 'name' that is a non-empty string")
    datatype = _datatype(name, raw.get("datatype"))
    shape, count = _shape(name, raw.get("shape"))
    parameters = _parameters(raw.get("parameters"), f"input '{name}'")
    size = parameters.get("binary_data_size")
    if size is None:
        if _SHARED_MEMORY in parameters:
            raise InvalidInput(f"input '{name}': shared memory is not supported; send 'data' or binary data")
        if "data" not in raw:
            raise InvalidInput(f"input '{name}' has no 'data' (or parameters.binary_data_size for binary data)")
        data = array_from_json(name, datatype, shape, count, raw["data"])
    else:
        end = offset + _binary_size(name, size, raw, binary, offset)
        data = array_from_binary(name, datatype, shape, count, binary[offset:end])
        offset = end
    return InputTensor(name=name, datatype=datatype, shape=shape, data=data, parameters=parameters), offset


def _datatype(name: str, datatype: Any) -> str:
    if isinstance(datatype, str) and datatype in DATATYPE_TO_NUMPY:
        return datatype
    found = "no 'datatype'" if datatype is None else f"unknown datatype {orjson.dumps(datatype).decode()}"
    raise InvalidInput(f"input '{name}': {found}; expected one of {', '.join(DATATYPES)}")


def _shape(name: str, shape: Any) -> tuple[tuple[int, ...], int]:
    """The shape as a tuple and its element count."""
    if not isinstance(shape, list):
        found = "no 'shape'" if shape is None else f"'shape' is a JSON {_json_type(shape)}"
        raise InvalidInput(f"input '{name}': {found}; expected a list of non-negative integers such as [1, 4]")
    # Checked before any product: multiplying thousands of client-sent 64-bit dimensions costs quadratic time.
    if len(shape) > _MAX_DIMS:
        raise InvalidInput(f"input '{name}': shape has {len(shape)} dimensions; at most {_MAX_DIMS} are allowed")
    for dim in shape:
        if type(dim) is not int or dim < 0:
            raise InvalidInput(
                f"input '{name}': shape {orjson.dumps(shape).decode()} has dimension {orjson.dumps(dim).decode()}; "
                "dimensions must be non-negative integers"
            )
    # numpy cannot shape even an empty array whose other dimensions multiply past its index range (ValueError);
    # no real tensor comes near the bound.
    if math.prod(dim for dim in shape if dim) > _MAX_NOMINAL_ELEMENTS:
        raise InvalidInput(
            f"input '{name}': shape {orjson.dumps(shape).decode()} is too large; its non-zero dimensions may "
            f"multiply to at most {_MAX_NOMINAL_ELEMENTS}"
        )
    return tuple(shape), math.prod(shape)


def _binary_size(name: str, size: Any, raw: dict, binary: memoryview | None, offset: int) -> int:
    """The validated binary_data_size of an input whose data follows the JSON header."""
    if type(size) is not int or size < 0:
        raise InvalidInput(f"input '{name}': parameters.binary_data_size must be a non-negative integer, got {size!r}")
    if "data" in raw:
        raise InvalidInput(f"input '{name}' has both 'data' and parameters.binary_data_size; send only one")
    if binary is None:
        raise InvalidInput(
            f"input '{name}' declares binary_data_size {size} but the request has no Inference-Header-Content-Length "
            "header, so the whole body was read as JSON"
        )
    if offset + size > len(binary):
        raise InvalidInput(
            f"input '{name}': binary_data_size {size} runs past the end of the body; only {len(binary) - offset} "
            "bytes of binary data remain for it"
        )
    return size


def _decode_outputs(raw_outputs: Any) -> tuple[RequestedOutput, ...] | None:
    # An empty list is read like an absent one: the client names no particular outputs, so it gets all of them.
    if raw_outputs is None or raw_outputs == []:
        return None
    if not isinstance(raw_outputs, list):
        raise InvalidInput(f"request 'outputs' must be a list, got a JSON {_json_type(raw_outputs)}")
    outputs: list[RequestedOutput] = []
    for index, raw in enumerate(raw_outputs):
        output = _decode_output(index, raw)
        if any(output.name == seen.name for seen in outputs):
            raise InvalidInput(f"output '{output.name}' is requested more than once; output names must be unique")
        outputs.append(output)
    return tuple(outputs)


def _decode_output(index: int, raw: Any) -> RequestedOutput:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or not raw["name"]:
        raise InvalidInput(f"outputs[{index}] must be a JSON object with a 'name' that is a non-empty string")
    name = raw["name"]
    parameters = _parameters(raw.get("parameters"), f"output '{name}'")
    if parameters.get("classification"):
        raise InvalidInput(f"output '{name}': the classification extension is not supported; remove 'classification'")
    if _SHARED_MEMORY in parameters:
        raise InvalidInput(f"output '{name}': shared memory is not supported; remove '{_SHARED_MEMORY}'")
    binary = parameters.get("binary_data")
    if binary is not None and type(binary) is not bool:
        raise InvalidInput(f"output '{name}': parameters.binary_data must be true or false, got {binary!r}")
    return RequestedOutput(name=name, binary=binary, parameters=parameters)


def _parameters(raw: Any, owner: str) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidInput(f"{owner}: 'parameters' must be a JSON object, got a JSON {_json_type(raw)}")
    return raw


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return names.get(type(value), "null")


# --------------------------------------------------------------------------------------------------- encode


def encode_infer_response(
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: list[tuple[str, np.ndarray, bool]],
    parameters: dict | None = None,
) -> tuple[bytes, int | None]:
    """The response body for (name, array, binary) outputs and its JSON header length (None: all JSON)."""
    entries: list[dict] = []
    blobs: list[bytes | memoryview] = []
    for name, output, binary in outputs:
        array, datatype = _output_array(name, output)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            blob = output_to_binary(name, datatype, array)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = output_to_json(name, datatype, array)
        entries.append(entry)
    response: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        response["id"] = request_id
    if parameters:
        response["parameters"] = parameters
    response["outputs"] = entries
    header = _dump_response(response, entries)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def _output_array(name: str, array: np.ndarray) -> tuple[np.ndarray, str]:
    """The output as a native-byte-order ndarray (numpy scalars and big-endian arrays are fine) and its datatype."""
    if type(array) is not np.ndarray or not array.dtype.isnative:
        array = np.asarray(array)
        array = array.astype(array.dtype.newbyteorder("="), copy=False)
    try:
        return array, datatype_of(array)
    except TypeError:
        raise ModelError(f"output '{name}': numpy dtype {array.dtype} has no KServe v2 datatype") from None


def _dump_response(response: dict, entries: list[dict]) -> bytes:
    header = orjson.dumps(response, option=_NUMPY_OPTION)
    # orjson writes NaN and infinities as null; searching the bytes is far cheaper than an isfinite() per output,
    # and only when null appears do we check the float outputs and re-encode them with NaN/Infinity tokens.
    if b"null" not in header:
        return header
    replaced = False
    for entry in entries:
        fragment = non_finite_fragment(entry.get("data"))
        if fragment is not None:
            entry["data"] = fragment
            replaced = True
    return orjson.dumps(response, option=_NUMPY_OPTION) if replaced else header


def encode_error(message: str) -> bytes:
    """The protocol's error body: {"error": message}."""
    return orjson.dumps({"error": message})


# ------------------------------------------------------------------------------------------ content coding


def decode_content(body: bytes, content_encoding: str | None, max_size: int | None = None) -> bytes:
    """The body with its Content-Encoding (gzip, deflate, identity) undone; `max_size` caps the inflated size."""
    if not content_encoding:
        return body
    codings = [coding.strip().lower() for coding in content_encoding.split(",")]
    for coding in reversed(codings):  # codings are listed in the order they were applied
        if coding in ("", "identity"):
            continue
        if coding in ("gzip", "x-gzip"):
            body = _inflate(body, 31, coding, max_size)
        elif coding == "deflate":
            # HTTP deflate is zlib-wrapped, but some clients send raw deflate streams; accept both.
            raw = len(body) < 2 or (body[0] & 0x0F != 8) or (body[0] << 8 | body[1]) % 31 != 0
            body = _inflate(body, -15 if raw else 15, coding, max_size)
        else:
            raise InvalidInput(f"unsupported Content-Encoding '{coding}'; expected gzip, deflate or identity")
    return body


def _inflate(body: bytes, wbits: int, coding: str, max_size: int | None) -> bytes:
    parts: list[bytes] = []
    total = 0
    remaining = body
    while remaining:  # gzip allows several concatenated members
        inflater = zlib.decompressobj(wbits)
        try:
            part = inflater.decompress(remaining, 0 if max_size is None else max_size - total + 1)
        except zlib.error as exc:
            raise InvalidInput(f"request body is not valid {coding} data: {exc}") from None
        total += len(part)
        if max_size is not None and total > max_size:
            raise PayloadTooLarge(f"request body inflates to more than the {max_size}-byte limit")
        if not inflater.eof:
            raise InvalidInput(f"request body is truncated {coding} data")
        parts.append(part)
        remaining = inflater.unused_data if wbits == 31 else b""
    return b"".join(parts)


def encode_content(body: bytes, accept_encoding: str | None, min_size: int = 0) -> tuple[bytes, str | None]:
    """The body compressed with the best coding `accept_encoding` allows, and that Content-Encoding (None: as is).

    Bodies shorter than `min_size` are sent as they are, which HTTP always allows.
    """
    coding = _preferred_coding(accept_encoding)
    if coding is None or len(body) < min_size:
        return body, None
    if coding == "deflate":
        return zlib.compress(body, _COMPRESS_LEVEL), coding
    compressor = zlib.compressobj(_COMPRESS_LEVEL, zlib.DEFLATED, 31)  # wbits 31: gzip framing, without gzip's overhead
    return compressor.compress(body) + compressor.flush(), coding


def _preferred_coding(accept_encoding: str | None) -> str | None:
    """gzip or deflate, whichever the Accept-Encoding header rates higher (gzip on a tie), or None."""
    if not accept_encoding:
        return None
    weights: dict[str, float] = {}
    for item in accept_encoding.split(","):
        coding, _, params = item.partition(";")
        weight = 1.0
        params = params.strip().lower()
        if params.startswith("q="):
            try:
                weight = float(params[2:])
            except ValueError:
                weight = 0.0  # unreadable weight: identity is always acceptable, so decline rather than guess
        weights[coding.strip().lower()] = weight
    wildcard = weights.get("*", 0.0)
    gzip_weight = weights.get("gzip", weights.get("x-gzip", wildcard))
    deflate_weight = weights.get("deflate", wildcard)
    if max(gzip_weight, deflate_weight) <= 0:
        return None
    return "gzip" if gzip_weight >= deflate_weight else "deflate"


def decode_request(body: bytes, content_encoding: str | None, header_length: int | None,
                   max_size: int | None) -> InferRequest:
    """The whole decode of a request body in one picklable call, so that a large one can run in a helper process
    (api/offload.py): parsing JSON holds the GIL, so a thread would still stall the event loop."""
    return decode_infer_request(decode_content(body, content_encoding, max_size), header_length)
