"""Tensor data of the KServe v2 protocol: JSON `data` lists and Triton's binary extension <-> numpy arrays.

Decoding validates every value against its datatype and never allocates from a declared shape, only from
data actually present; numeric data is converted by numpy, never element by element in Python.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from typing import Any

import numpy as np
import orjson

from ladle.errors import InvalidInput, ModelError
from ladle.tensors import DATATYPE_TO_NUMPY

# Binary tensor data is little-endian on the wire whatever the host byte order.
_WIRE_DTYPE: dict[str, np.dtype] = {name: dtype.newbyteorder("<") for name, dtype in DATATYPE_TO_NUMPY.items()}
# numpy dtype kinds that `np.array(json_list)` may infer for acceptable data of each datatype.
_ACCEPTED_KINDS: dict[str, str] = {name: "iu" for name in DATATYPE_TO_NUMPY if "INT" in name}
_ACCEPTED_KINDS.update(BOOL="b", FP16="iuf", FP32="iuf", FP64="iuf")
_INT_RANGE: dict[str, tuple[int, int]] = {
    name: (int(np.iinfo(dtype).min), int(np.iinfo(dtype).max))
    for name, dtype in DATATYPE_TO_NUMPY.items()
    if dtype.kind in "iu"
}
_FLOAT_MAX: dict[str, float] = {name: float(np.finfo(DATATYPE_TO_NUMPY[name]).max) for name in ("FP16", "FP32", "FP64")}
_SMALL = 64  # element count up to which a Python min/max range check beats numpy's fixed per-call overhead
_COPY_LIMIT = 1 << 16  # bytes up to which copying a binary output beats building a memoryview of it
_LENGTH = struct.Struct("<I")
_BINARY_HINT = (
    "request binary output instead (parameters.binary_data: true on the output, "
    "or parameters.binary_data_output: true on the request)"
)


def _shape_text(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _count_mismatch(name: str, shape: tuple[int, ...], count: int, found: int) -> InvalidInput:
    return InvalidInput(f"input '{name}': shape {_shape_text(shape)} has {count} elements but data has {found}")


# ---------------------------------------------------------------------------------------------- JSON decode


def array_from_json(name: str, datatype: str, shape: tuple[int, ...], count: int, data: Any) -> np.ndarray:
    """The array for an input's JSON `data` (flat row-major or nested lists), shaped to `shape`."""
    if not isinstance(data, list):
        raise InvalidInput(f"input '{name}': 'data' must be a JSON array (flat or nested), got {_describe(data)}")
    flat = _bytes_from_json(name, data) if datatype == "BYTES" else _numbers_from_json(name, datatype, data)
    if flat.size != count:
        raise _count_mismatch(name, shape, count, flat.size)
    return flat.reshape(shape)


def _numbers_from_json(name: str, datatype: str, data: list) -> np.ndarray:
    # numpy infers the JSON types in one C pass (bool -> 'b', int -> 'i'/'u', float -> 'f', str -> 'U'),
    # so strictness costs no Python loop; only the error path walks the elements to name the culprit.
    # The one leniency this buys: numpy reads true/false mixed among numbers as 1/0 (all-boolean data is rejected).
    try:
        inferred = np.array(data)
    except ValueError:
        raise InvalidInput(
            f"input '{name}': nested 'data' lists are ragged; every row must have the same length"
        ) from None
    target = DATATYPE_TO_NUMPY[datatype]
    if inferred.size == 0:
        return inferred.astype(target)
    if inferred.dtype.kind not in _ACCEPTED_KINDS[datatype] and not _uint64_mix(datatype, inferred, data):
        raise _bad_element(name, datatype, data)
    if inferred.dtype == target:
        return inferred
    if target.kind == "f":
        return _to_float(name, datatype, data, inferred)
    try:
        # Converting from the Python ints again makes numpy raise on any value out of the target's range.
        return np.array(data, dtype=target)
    except OverflowError:
        raise _bad_element(name, datatype, data) from None


def _uint64_mix(datatype: str, inferred: np.ndarray, data: list) -> bool:
    """Whether all-integer data was inferred as float64 because it mixes values only uint64 holds with others."""
    if datatype not in _INT_RANGE or inferred.dtype.kind != "f":
        return False
    return all(type(value) is int for value in _iter_leaves(data))


def _to_float(name: str, datatype: str, data: list, inferred: np.ndarray) -> np.ndarray:
    """`inferred` (JSON numbers, always finite) cast to FP16/FP32/FP64, rejecting values that would overflow."""
    target, limit = DATATYPE_TO_NUMPY[datatype], _FLOAT_MAX[datatype]
    if len(data) <= _SMALL and inferred.ndim == 1 and -limit <= min(data) and max(data) <= limit:
        # Short flat lists within range cannot overflow; Python's min/max on them cost far less than errstate.
        return inferred.astype(target)
    try:
        with np.errstate(over="raise"):
            return inferred.astype(target)
    except FloatingPointError:
        raise _bad_element(name, datatype, data) from None


def _bytes_from_json(name: str, data: list) -> np.ndarray:
    leaves = data
    if data and isinstance(data[0], list):
        try:
            # Ragged lists stay list objects in the object array and are reported as bad elements below.
            leaves = np.array(data, dtype=np.object_).ravel().tolist()
        except ValueError as exc:  # e.g. nesting deeper than numpy's 64 dimensions
            raise InvalidInput(f"input '{name}': nested 'data' lists cannot form a tensor: {exc}") from None
    try:
        encoded = [text.encode("utf-8") for text in leaves]
    except (AttributeError, UnicodeEncodeError):
        raise _bad_element(name, "BYTES", leaves, flat=True) from None
    array = np.empty(len(encoded), dtype=np.object_)
    array[:] = encoded
    return array


def _iter_leaves(data: list) -> Iterator[Any]:
    """Non-list items of nested lists in row-major order (iterative: nesting depth is client-controlled)."""
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            yield item
        else:
            stack.pop()


def _bad_element(name: str, datatype: str, data: list, flat: bool = False) -> InvalidInput:
    """Names the first element that does not fit `datatype` (error path only, so a Python loop is fine)."""
    expected = _expected_text(datatype)
    for index, value in enumerate(data if flat else _iter_leaves(data)):
        problem = _value_problem(datatype, value)
        if problem:
            return InvalidInput(f"input '{name}': {datatype} data must be {expected}; element {index} {problem}")
    return InvalidInput(f"input '{name}': {datatype} data must be {expected} in rectangular nested lists")


def _expected_text(datatype: str) -> str:
    if datatype == "BOOL":
        return "JSON true/false"
    if datatype == "BYTES":
        return "JSON strings"
    if datatype in _INT_RANGE:
        low, high = _INT_RANGE[datatype]
        return f"JSON integers in [{low}, {high}]"
    return f"JSON numbers within the {datatype} range"


def _value_problem(datatype: str, value: Any) -> str | None:
    """Why `value` does not fit `datatype`, or None when it does."""
    kind = type(value)
    if kind is list:
        return "is a list; nested 'data' lists must be rectangular"
    if datatype == "BOOL":
        return None if kind is bool else f"is {_describe(value)}"
    if datatype == "BYTES":
        if kind is not str:
            return f"is {_describe(value)}"
        return None if value.isascii() or _encodes(value) else "is a string that is not valid Unicode"
    if kind is not int and (kind is not float or datatype in _INT_RANGE):
        return f"is {_describe(value)}"
    if datatype in _INT_RANGE:
        low, high = _INT_RANGE[datatype]
        return None if low <= value <= high else f"is {value}, out of range"
    with np.errstate(over="ignore"):
        fits = np.isfinite(DATATYPE_TO_NUMPY[datatype].type(value))
    return None if fits else f"is {value}, out of range"


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _describe(value: Any) -> str:
    """A short 'the <type> <value>' text for error messages."""
    kinds = {bool: "the boolean", int: "the integer", float: "the float", str: "the string", list: "a list"}
    kind = kinds.get(type(value))
    if kind is None:
        return "null" if value is None else f"a JSON {type(value).__name__}"
    if kind == "a list":
        return kind
    text = orjson.dumps(value).decode()
    return f"{kind} {text if len(text) <= 40 else text[:37] + '...'}"


# -------------------------------------------------------------------------------------------- binary decode


def array_from_binary(name: str, datatype: str, shape: tuple[int, ...], count: int, buffer: memoryview) -> np.ndarray:
    """The array for an input's binary data; numeric arrays are zero-copy views of `buffer` when aligned."""
    if datatype == "BYTES":
        return _bytes_from_binary(name, shape, count, buffer).reshape(shape)
    wire = _WIRE_DTYPE[datatype]
    needed = count * wire.itemsize
    if len(buffer) != needed:
        raise InvalidInput(
            f"input '{name}': binary_data_size is {len(buffer)} bytes but shape {_shape_text(shape)} of {datatype} "
            f"needs {count} x {wire.itemsize} = {needed} bytes"
        )
    flat = np.frombuffer(buffer, dtype=wire)
    if datatype == "BOOL" and count:
        _check_bool_bytes(name, flat.view(np.uint8))
    if not flat.flags.aligned or not wire.isnative:
        # The JSON header has any length, so binary tensors often start unaligned; kernels want aligned data.
        flat = flat.astype(wire.newbyteorder("="))
    return flat.reshape(shape)


def _check_bool_bytes(name: str, raw: np.ndarray) -> None:
    if raw.max() > 1:
        index = int(np.argmax(raw > 1))
        raise InvalidInput(f"input '{name}': BOOL binary data must be bytes 0 or 1; byte {index} is {raw[index]}")


def _bytes_from_binary(name: str, shape: tuple[int, ...], count: int, buffer: memoryview) -> np.ndarray:
    # Walks only the bytes present, so a huge declared shape cannot make us allocate or loop beyond them.
    items: list[bytes] = []
    offset, end, unpack = 0, len(buffer), _LENGTH.unpack_from
    while offset < end:
        if end - offset < 4:
            raise InvalidInput(
                f"input '{name}': BYTES element {len(items)} is truncated: {end - offset} bytes left where a "
                "4-byte little-endian length was expected"
            )
        (length,) = unpack(buffer, offset)
        offset += 4
        if length > end - offset:
            raise InvalidInput(
                f"input '{name}': BYTES element {len(items)} declares {length} bytes but only {end - offset} remain "
                "in its binary data"
            )
        items.append(bytes(buffer[offset : offset + length]))
        offset += length
    if len(items) != count:
        raise _count_mismatch(name, shape, count, len(items))
    array = np.empty(count, dtype=np.object_)
    array[:] = items
    return array


# --------------------------------------------------------------------------------------------------- encode


def output_to_json(name: str, datatype: str, array: np.ndarray) -> Any:
    """An output's JSON `data`: a flat contiguous array orjson serializes natively, or a list of str for BYTES."""
    if datatype == "BYTES":
        return _bytes_to_text(name, array)
    flat = array.reshape(-1)
    # orjson serializes only C-contiguous arrays (and the caller made the byte order native).
    return flat if flat.flags.c_contiguous else np.ascontiguousarray(flat)


def non_finite_fragment(data: Any) -> orjson.Fragment | None:
    """JSON text with NaN/Infinity tokens for float data holding non-finite values (orjson would write null).

    NaN and Infinity are not strict JSON, but Python's json, rapidjson (tritonclient) and Triton accept them,
    and null would silently turn infinities into NaN on the client.
    """
    if not isinstance(data, np.ndarray) or data.dtype.kind != "f" or np.isfinite(data).all():
        return None
    return orjson.Fragment(json.dumps(data.tolist(), separators=(",", ":")))


def output_to_binary(name: str, datatype: str, array: np.ndarray) -> bytes | memoryview:
    """An output's raw binary tensor data: a zero-copy view for little-endian contiguous numeric arrays."""
    if datatype == "BYTES":
        pack = _LENGTH.pack
        parts: list[bytes] = []
        for item in _bytes_items(name, array):
            parts.append(pack(len(item)))
            parts.append(item)
        return b"".join(parts)
    wire = np.ascontiguousarray(array, dtype=_WIRE_DTYPE[datatype])
    # Small tensors: tobytes() is cheapest. Large ones go out as views, so the response join is their only copy.
    return wire.tobytes() if wire.nbytes <= _COPY_LIMIT else wire.data.cast("B")


def _bytes_items(name: str, array: np.ndarray) -> list[bytes]:
    items = array.reshape(-1).tolist()
    for index, item in enumerate(items):
        if isinstance(item, str):
            items[index] = item.encode("utf-8")
        elif not isinstance(item, bytes):
            if not isinstance(item, (bytearray, memoryview)):
                raise ModelError(
                    f"output '{name}': BYTES element {index} is {type(item).__name__}; expected bytes or str"
                )
            items[index] = bytes(item)
    return items


def _bytes_to_text(name: str, array: np.ndarray) -> list[str]:
    items = array.reshape(-1).tolist()
    for index, item in enumerate(items):
        if isinstance(item, str):
            continue
        if not isinstance(item, (bytes, bytearray, memoryview)):
            raise ModelError(f"output '{name}': BYTES element {index} is {type(item).__name__}; expected bytes or str")
        try:
            items[index] = bytes(item).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInput(
                f"output '{name}': BYTES element {index} is not valid UTF-8 ({exc.reason} at byte {exc.start}) so it "
                f"cannot be sent as a JSON string; {_BINARY_HINT}"
            ) from None
    return items
