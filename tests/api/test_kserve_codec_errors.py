"""KServe v2 codec: every InvalidInput names the tensor and the problem; content-coding helpers."""

from __future__ import annotations

import gzip
import zlib
from typing import Any

import orjson
import pytest

from ladle.api.kserve_codec import decode_content, decode_infer_request, encode_content
from ladle.errors import InvalidInput, PayloadTooLarge


def reject(body: bytes | dict, *fragments: str, header_length: int | None = None) -> str:
    """Decoding `body` raises InvalidInput whose message contains every fragment; returns the message."""
    raw = orjson.dumps(body) if isinstance(body, dict) else body
    with pytest.raises(InvalidInput) as caught:
        decode_infer_request(raw, header_length)
    for fragment in fragments:
        assert fragment in caught.value.message, caught.value.message
    return caught.value.message


def one_input(**tensor: Any) -> dict:
    return {"inputs": [{"name": "x", **tensor}]}


# -------------------------------------------------------------------------------------------- validation


def test_malformed_json_says_where() -> None:
    reject(b'{"inputs": [1, 2,]}', "request body is not valid JSON", "trailing comma", "line 1 column 17")
    reject(b'{"inputs": []}xyz', "not valid JSON", "(first 17 bytes of the body)", "line 1 column 15", header_length=17)


def test_header_length_outside_body() -> None:
    reject(
        b'{"inputs": []}', "Inference-Header-Content-Length is 15 but the request body has 14 bytes", header_length=15
    )
    reject(b'{"inputs": []}', "Inference-Header-Content-Length is -1", header_length=-1)


@pytest.mark.parametrize(
    ("body", "fragments"),
    [
        ([], ["request body must be a JSON object", "got a JSON array"]),
        ({}, ["'inputs' list", "missing"]),
        ({"inputs": {}}, ["'inputs' list", "got a JSON object"]),
        ({"inputs": [3]}, ["inputs[0] must be a JSON object"]),
        ({"inputs": [{"shape": [1], "datatype": "FP32", "data": [1]}]}, ["inputs[0]", "'name'"]),
        ({"inputs": [{"name": "", "shape": [1], "datatype": "FP32", "data": [1]}]}, ["inputs[0]", "non-empty string"]),
        ({"id": 5, "inputs": []}, ["request 'id' must be a string"]),
        ({"inputs": [], "parameters": [1]}, ["request: 'parameters' must be a JSON object"]),
        ({"inputs": [], "parameters": {"binary_data_output": 1}}, ["binary_data_output must be true or false"]),
        ({"inputs": [], "outputs": {"name": "y"}}, ["'outputs' must be a list"]),
        ({"inputs": [], "outputs": [{"parameters": {}}]}, ["outputs[0]", "'name'"]),
        ({"inputs": [], "outputs": [{"name": "y"}, {"name": "y"}]}, ["output 'y' is requested more than once"]),
        (
            {"inputs": [], "outputs": [{"name": "y", "parameters": {"binary_data": "yes"}}]},
            ["output 'y'", "true or false"],
        ),
        (
            {"inputs": [], "outputs": [{"name": "y", "parameters": {"classification": 2}}]},
            ["output 'y'", "classification"],
        ),
        (
            {"inputs": [], "outputs": [{"name": "y", "parameters": {"shared_memory_region": "r"}}]},
            ["output 'y'", "shared memory"],
        ),
    ],
)
def test_request_structure_errors(body: Any, fragments: list[str]) -> None:
    reject(orjson.dumps(body), *fragments)


@pytest.mark.parametrize(
    ("tensor", "fragments"),
    [
        ({"datatype": "FP8", "shape": [1], "data": [1]}, ['unknown datatype "FP8"', "expected one of BOOL, UINT8"]),
        ({"datatype": ["FP32"], "shape": [1], "data": [1]}, ["unknown datatype", "expected one of"]),
        ({"shape": [1], "data": [1]}, ["no 'datatype'", "expected one of"]),
        ({"datatype": "FP32", "data": [1]}, ["no 'shape'", "list of non-negative integers"]),
        ({"datatype": "FP32", "shape": 4, "data": [1]}, ["'shape' is a JSON number"]),
        (
            {"datatype": "FP32", "shape": [2, -1], "data": [1]},
            ["shape [2,-1] has dimension -1", "non-negative integers"],
        ),
        ({"datatype": "FP32", "shape": [1.5], "data": [1]}, ["has dimension 1.5"]),
        ({"datatype": "FP32", "shape": [True], "data": [1]}, ["has dimension true"]),
        (
            {"datatype": "FP32", "shape": [2, 4], "data": [1, 2, 3, 4, 5, 6]},
            ["shape [2, 4] has 8 elements but data has 6"],
        ),
        ({"datatype": "BYTES", "shape": [3], "data": ["a"]}, ["shape [3] has 3 elements but data has 1"]),
        ({"datatype": "FP32", "shape": [1]}, ["has no 'data'", "binary_data_size"]),
        ({"datatype": "FP32", "shape": [1], "data": 1.0}, ["'data' must be a JSON array", "the float 1.0"]),
        ({"datatype": "FP32", "shape": [3], "data": [[1, 2], [3]]}, ["ragged"]),
        ({"datatype": "BYTES", "shape": [3], "data": [["a", "b"], ["c"]]}, ["element 0 is a list", "rectangular"]),
        (
            {"datatype": "UINT8", "shape": [2], "data": [1, 300]},
            ["UINT8 data must be JSON integers in [0, 255]", "element 1 is 300"],
        ),
        ({"datatype": "UINT32", "shape": [1], "data": [-1]}, ["element 0 is -1, out of range"]),
        ({"datatype": "INT64", "shape": [1], "data": [2**63]}, ["element 0 is 9223372036854775808, out of range"]),
        ({"datatype": "INT8", "shape": [2, 1], "data": [[1], [-129]]}, ["element 1 is -129"]),
        (
            {"datatype": "INT32", "shape": [2], "data": [1, 2.5]},
            ["INT32 data must be JSON integers", "element 1 is the float 2.5"],
        ),
        ({"datatype": "INT32", "shape": [1], "data": [1.0]}, ["element 0 is the float 1.0"]),
        ({"datatype": "INT32", "shape": [2], "data": [True, False]}, ["element 0 is the boolean true"]),
        (
            {"datatype": "FP32", "shape": [2], "data": [1.0, "2.0"]},
            ["FP32 data must be JSON numbers", 'element 1 is the string "2.0"'],
        ),
        ({"datatype": "FP32", "shape": [2], "data": [1.0, None]}, ["element 1 is null"]),
        ({"datatype": "FP32", "shape": [1], "data": [{"v": 1}]}, ["element 0 is a JSON dict"]),
        ({"datatype": "FP32", "shape": [2], "data": [1.0, 1e39]}, ["element 1 is 1e+39, out of range"]),
        ({"datatype": "FP32", "shape": [80], "data": [1.0] * 79 + [-1e39]}, ["element 79 is -1e+39, out of range"]),
        ({"datatype": "FP16", "shape": [1, 1], "data": [[70000]]}, ["FP16", "element 0 is 70000, out of range"]),
        (
            {"datatype": "BOOL", "shape": [2], "data": [True, 1]},
            ["BOOL data must be JSON true/false", "element 1 is the integer 1"],
        ),
        ({"datatype": "BOOL", "shape": [1], "data": ["true"]}, ['element 0 is the string "true"']),
        (
            {"datatype": "BYTES", "shape": [2], "data": ["a", 1]},
            ["BYTES data must be JSON strings", "element 1 is the integer 1"],
        ),
        ({"datatype": "BYTES", "shape": [1], "data": [None]}, ["element 0 is null"]),
        (
            {"datatype": "FP32", "shape": [1], "data": [1], "parameters": 3},
            ["input 'x': 'parameters' must be a JSON object"],
        ),
        (
            {"datatype": "FP32", "shape": [1], "parameters": {"shared_memory_region": "r"}},
            ["shared memory is not supported"],
        ),
    ],
)
def test_input_errors_name_the_input_and_the_problem(tensor: dict, fragments: list[str]) -> None:
    message = reject(one_input(**tensor), *fragments)
    assert message.startswith("input 'x'")


def test_duplicate_input_names() -> None:
    tensor = {"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}
    reject({"inputs": [tensor, tensor]}, "input 'x' appears more than once")


def test_lone_surrogate_in_json_string_is_rejected() -> None:
    reject(b'{"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["\\ud800"]}]}', "not valid JSON")


def binary_request(tensor: dict, payload: bytes, header_length: bool = True) -> tuple[bytes, int | None]:
    header = orjson.dumps(one_input(**tensor))
    return header + payload, len(header) if header_length else None


@pytest.mark.parametrize(
    ("tensor", "payload", "fragments"),
    [
        (
            {"datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 4}},
            b"\0" * 4,
            ["input 'x': binary_data_size is 4 bytes but shape [2] of FP32 needs 2 x 4 = 8 bytes"],
        ),
        (
            {"datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": 4}},
            b"\0" * 6,
            ["6 bytes of binary data after the JSON header", "add up to 4"],
        ),
        (
            {"datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": 8}},
            b"\0" * 4,
            ["input 'x': binary_data_size 8 runs past the end of the body; only 4 bytes"],
        ),
        (
            {"datatype": "FP32", "shape": [1], "data": [1], "parameters": {"binary_data_size": 4}},
            b"\0" * 4,
            ["input 'x' has both 'data' and parameters.binary_data_size"],
        ),
        (
            {"datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": -4}},
            b"",
            ["input 'x': parameters.binary_data_size must be a non-negative integer, got -4"],
        ),
        (
            {"datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": "4"}},
            b"\0" * 4,
            ["binary_data_size must be a non-negative integer, got '4'"],
        ),
        (
            {"datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": 9}},
            b"\x02\0\0\0ab\x05\0\0",
            ["input 'x': BYTES element 1 is truncated: 3 bytes left where a 4-byte little-endian length"],
        ),
        (
            {"datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": 12}},
            b"\x02\0\0\0ab\x05\0\0\0ab",
            ["input 'x': BYTES element 1 declares 5 bytes but only 2 remain"],
        ),
        (
            {"datatype": "BYTES", "shape": [3], "parameters": {"binary_data_size": 6}},
            b"\x02\0\0\0ab",
            ["input 'x': shape [3] has 3 elements but data has 1"],
        ),
        (
            {"datatype": "BYTES", "shape": [10**12], "parameters": {"binary_data_size": 4}},
            b"\0\0\0\0",
            ["shape [1000000000000] has 1000000000000 elements but data has 1"],
        ),
        (
            {"datatype": "BOOL", "shape": [3], "parameters": {"binary_data_size": 3}},
            b"\x01\x00\x02",
            ["input 'x': BOOL binary data must be bytes 0 or 1; byte 2 is 2"],
        ),
    ],
)
def test_binary_input_errors(tensor: dict, payload: bytes, fragments: list[str]) -> None:
    reject(binary_request(tensor, payload)[0], *fragments, header_length=binary_request(tensor, payload)[1])


def test_binary_data_without_header_length() -> None:
    body, _ = binary_request({"datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": 0}}, b"")
    reject(body, "input 'x' declares binary_data_size 0", "no Inference-Header-Content-Length header")


# ---------------------------------------------------------------------------------------- content coding


def test_decode_content() -> None:
    body = b'{"inputs": []}' * 20
    assert decode_content(body, None) is body and decode_content(body, "identity") is body
    assert decode_content(gzip.compress(body), "gzip") == body
    assert decode_content(gzip.compress(body[:7]) + gzip.compress(body[7:]), "x-gzip") == body  # two gzip members
    assert decode_content(zlib.compress(body), "Deflate") == body
    raw_deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
    assert decode_content(raw_deflate.compress(body) + raw_deflate.flush(), "deflate") == body
    assert decode_content(zlib.compress(gzip.compress(body)), "gzip, deflate") == body


def test_decode_content_errors() -> None:
    with pytest.raises(InvalidInput, match="unsupported Content-Encoding 'br'; expected gzip, deflate or identity"):
        decode_content(b"x", "br")
    with pytest.raises(InvalidInput, match="not valid gzip data"):
        decode_content(b"definitely not gzip", "gzip")
    with pytest.raises(InvalidInput, match="truncated gzip data"):
        decode_content(gzip.compress(b"a" * 1000)[:-12], "gzip")
    with pytest.raises(PayloadTooLarge, match="1000-byte limit"):
        decode_content(gzip.compress(b"a" * 10**6), "gzip", max_size=1000)
    assert decode_content(gzip.compress(b"a" * 1000), "gzip", max_size=1000) == b"a" * 1000


@pytest.mark.parametrize(
    ("accept", "coding"),
    [
        (None, None),
        ("", None),
        ("identity", None),
        ("br", None),
        ("gzip", "gzip"),
        ("deflate", "deflate"),
        ("gzip, deflate", "gzip"),
        ("gzip;q=0.5, deflate", "deflate"),
        ("gzip;q=0, deflate;q=0", None),
        ("*", "gzip"),
        ("*;q=0.1, gzip;q=0", "deflate"),
        ("gzip;q=nonsense", None),
    ],
)
def test_encode_content(accept: str | None, coding: str | None) -> None:
    body = b'{"outputs": []}' * 10
    compressed, chosen = encode_content(body, accept)
    assert chosen == coding
    assert decode_content(compressed, chosen) == body
    assert encode_content(body, accept, min_size=10**6) == (body, None)
