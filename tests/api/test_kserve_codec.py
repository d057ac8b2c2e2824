"""KServe v2 codec: round trips for every datatype, interop with the real tritonclient, property tests."""

from __future__ import annotations

import gzip
import struct
import zlib
from typing import Any

import numpy as np
import orjson
import pytest
import tritonclient.http as triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ladle.api.kserve_codec import (
    InferRequest,
    decode_content,
    decode_infer_request,
    encode_content,
    encode_error,
    encode_infer_response,
)
from ladle.errors import InvalidInput, ModelError
from ladle.tensors import DATATYPE_TO_NUMPY, DATATYPES

SHAPES = [(4,), (2, 3), (1, 2, 2), (0,), (3, 0, 2), ()]


# ------------------------------------------------------------------------------------------ test helpers


def sample(datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    """A deterministic array of `datatype` with values spanning the type's range."""
    count = int(np.prod(shape))
    dtype = DATATYPE_TO_NUMPY[datatype]
    if datatype == "BYTES":
        words = [b"", b"a", "h\u00e9llo \u4e16\u754c \U0001f600".encode(), b"null", b'quote"back\\slash']
        flat = object_array([words[i % len(words)] for i in range(count)], (count,))
    elif datatype == "BOOL":
        flat = np.arange(count) % 3 == 0
    elif dtype.kind == "f":
        flat = (np.linspace(-1, 1, count) * [0.1, 3.3e3, -7.25e-3][count % 3]).astype(dtype)
    else:
        info = np.iinfo(dtype)
        flat = np.resize(np.array([info.min, info.max, 0, 1, 7], dtype=dtype), count)
    return flat.reshape(shape)


def object_array(items: list, shape: tuple[int, ...]) -> np.ndarray:
    out = np.empty(shape, dtype=np.object_)
    out.reshape(-1)[:] = items
    return out


def decoded_text(array: np.ndarray) -> np.ndarray:
    """A BYTES array as str elements (invalid UTF-8 replaced), the form a JSON response can carry."""
    return object_array([item.decode("utf-8", "replace") for item in array.reshape(-1)], array.shape)


def serialize_bytes(array: np.ndarray) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in array.reshape(-1))


def make_request(
    tensors: list[tuple[str, np.ndarray, bool]], nested: bool = False, **fields: Any
) -> tuple[bytes, int | None]:
    """A request body built independently of the codec: (name, array, binary) inputs plus top-level fields."""
    inputs, blobs = [], []
    for name, array, binary in tensors:
        datatype = (
            "BYTES" if array.dtype == np.object_ else next(k for k, v in DATATYPE_TO_NUMPY.items() if v == array.dtype)
        )
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            raw = (
                serialize_bytes(array) if datatype == "BYTES" else array.astype(array.dtype.newbyteorder("<")).tobytes()
            )
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        elif datatype == "BYTES":
            text = decoded_text(array)
            entry["data"] = text.tolist() if nested and array.ndim else text.reshape(-1).tolist()
        else:
            entry["data"] = array.tolist() if nested and array.ndim else array.reshape(-1).tolist()
        inputs.append(entry)
    header = orjson.dumps({**fields, "inputs": inputs})
    return (header + b"".join(blobs), len(header)) if blobs else (header, None)


def assert_same(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    assert actual.dtype == (np.dtype(np.object_) if expected.dtype.kind in "OSU" else expected.dtype)
    if expected.dtype.kind == "f":
        # Bitwise equality keeps -0.0 apart from 0.0; NaNs only need to stay NaN (JSON cannot carry payloads).
        nan = np.isnan(expected)
        assert np.array_equal(np.isnan(actual), nan)
        bits = f"u{expected.itemsize}"
        assert np.array_equal(actual[~nan].view(bits), expected[~nan].view(bits))
    else:
        assert actual.tolist() == expected.tolist()


def one_input(**tensor: Any) -> dict:
    return {"inputs": [{"name": "x", **tensor}]}


def parse_with_tritonclient(body: bytes, header_length: int | None) -> triton.InferResult:
    return triton.InferResult.from_response_body(body, header_length=header_length)


def as_text(array: np.ndarray) -> list:
    return [item.decode() for item in array.reshape(-1)]


# ------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("datatype", DATATYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mode", ["flat", "nested", "binary"])
def test_request_round_trip(datatype: str, shape: tuple[int, ...], mode: str) -> None:
    array = sample(datatype, shape)
    body, header_length = make_request([("x", array, mode == "binary")], nested=mode == "nested", id="r-1")
    request = decode_infer_request(body, header_length)
    assert request.id == "r-1" and request.outputs is None and request.binary_output is False
    (tensor,) = request.inputs
    assert (tensor.name, tensor.datatype, tensor.shape) == ("x", datatype, shape)
    assert_same(tensor.data, array)
    assert tensor.data.flags.aligned


def test_request_with_several_binary_and_json_inputs_keeps_order_and_parameters() -> None:
    tensors = [
        ("a", sample("FP16", (3,)), True),
        ("b", sample("BYTES", (2, 2)), False),
        ("c", sample("INT8", (5,)), True),
    ]
    body, header_length = make_request(tensors, parameters={"priority": 2, "custom": "yes"})
    request = decode_infer_request(body, header_length)
    assert [t.name for t in request.inputs] == ["a", "b", "c"]
    for tensor, (_, array, _) in zip(request.inputs, tensors, strict=True):
        assert_same(tensor.data, array)
    assert request.parameters == {"priority": 2, "custom": "yes"}
    assert request.inputs[0].parameters == {"binary_data_size": 6}


def test_binary_inputs_are_zero_copy_views_when_aligned_and_copies_when_not() -> None:
    array = np.arange(4, dtype=np.float32)
    for pad in range(4):
        header = orjson.dumps(one_input(datatype="FP32", shape=[4], parameters={"binary_data_size": 16}))
        header += b" " * pad  # whitespace after the JSON object shifts where the binary data starts
        body = bytearray(header + array.tobytes())
        tensor = decode_infer_request(body, len(header)).inputs[0]
        assert_same(tensor.data, array)
        assert tensor.data.flags.aligned
        shares = np.shares_memory(tensor.data, np.frombuffer(body, np.uint8))
        assert shares == (len(header) % 4 == 0)


def test_json_bytes_are_utf8_encoded_and_nested_lists_accepted() -> None:
    body = orjson.dumps(one_input(datatype="BYTES", shape=[2, 2], data=[["", "\u00e9"], ["\U0001f600", "a b"]]))
    tensor = decode_infer_request(body, None).inputs[0]
    assert tensor.data.tolist() == [[b"", "\u00e9".encode()], ["\U0001f600".encode(), b"a b"]]


def test_json_numbers_convert_exactly_and_ints_are_accepted_for_floats() -> None:
    body = orjson.dumps(one_input(datatype="FP32", shape=[3], data=[1, 0.1, -2.5]))
    assert_same(decode_infer_request(body, None).inputs[0].data, np.array([1, 0.1, -2.5], dtype=np.float32))
    body = orjson.dumps(one_input(datatype="UINT64", shape=[1], data=[2**64 - 1]))
    assert decode_infer_request(body, None).inputs[0].data.tolist() == [2**64 - 1]
    body = orjson.dumps(one_input(datatype="FP16", shape=[1], data=[65519]))  # rounds to the FP16 max, no overflow
    assert decode_infer_request(body, None).inputs[0].data.tolist() == [65504.0]


def test_requested_outputs_and_binary_output_flag() -> None:
    body = orjson.dumps(
        {
            "inputs": [],
            "parameters": {"binary_data_output": True},
            "outputs": [{"name": "y", "parameters": {"binary_data": False}}, {"name": "z"}],
        }
    )
    request = decode_infer_request(body, None)
    assert isinstance(request, InferRequest) and request.binary_output is True
    assert [(o.name, o.binary) for o in request.outputs] == [("y", False), ("z", None)]
    assert request.outputs[0].parameters == {"binary_data": False}
    assert decode_infer_request(b'{"inputs": [], "outputs": []}', None).outputs is None


@pytest.mark.parametrize("datatype", DATATYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("binary", [True, False])
def test_response_parsed_by_tritonclient(datatype: str, shape: tuple[int, ...], binary: bool) -> None:
    array = sample(datatype, shape)
    body, header_length = encode_infer_response("m", "1", "id-7", [("out", array, binary), ("n", np.int32(3), binary)])
    assert (header_length is None) == (not binary)
    result = parse_with_tritonclient(body, header_length)
    assert result.get_response()["id"] == "id-7" and result.get_response()["model_name"] == "m"
    got = result.as_numpy("out")
    if datatype == "BYTES" and not binary:
        assert got.shape == shape and got.reshape(-1).tolist() == as_text(array)
    else:
        assert_same(got, array)
    assert result.as_numpy("n").tolist() == 3


def test_response_json_shape_is_flat_and_omits_absent_fields() -> None:
    body, header_length = encode_infer_response(
        "m", "2", None, [("y", np.arange(6, dtype=np.int64).reshape(2, 3), False)]
    )
    assert header_length is None
    assert orjson.loads(body) == {
        "model_name": "m",
        "model_version": "2",
        "outputs": [{"name": "y", "datatype": "INT64", "shape": [2, 3], "data": [0, 1, 2, 3, 4, 5]}],
    }
    body, _ = encode_infer_response("m", "2", "", [], parameters={"sequence_id": 4})
    assert orjson.loads(body) == {
        "model_name": "m",
        "model_version": "2",
        "id": "",
        "parameters": {"sequence_id": 4},
        "outputs": [],
    }


def test_response_binary_layout() -> None:
    first, second = np.array([1.5, -2.0], dtype=np.float32), np.array([b"ab", b""], dtype=np.object_)
    body, header_length = encode_infer_response(
        "m", "1", None, [("a", first, True), ("j", first, False), ("b", second, True)]
    )
    header = orjson.loads(body[:header_length])
    assert [o.get("parameters") for o in header["outputs"]] == [{"binary_data_size": 8}, None, {"binary_data_size": 10}]
    assert body[header_length:] == first.tobytes() + b"\x02\x00\x00\x00ab\x00\x00\x00\x00"


def test_response_accepts_strided_big_endian_str_and_fixed_bytes_arrays() -> None:
    strided = np.arange(12, dtype=np.float64).reshape(3, 4)[:, ::2]
    big_endian = np.arange(3, dtype=">i4")
    outputs = [("s", strided, False), ("sb", strided, True), ("be", big_endian, False), ("beb", big_endian, True)]
    outputs += [
        ("u", np.array(["\u00e9", "x"]), False),
        ("ub", np.array(["\u00e9", "x"]), True),
        ("fixed", np.array([b"q"]), True),
    ]
    result = parse_with_tritonclient(*encode_infer_response("m", "1", None, outputs))
    assert result.as_numpy("s").tolist() == result.as_numpy("sb").tolist() == strided.tolist()
    assert result.as_numpy("be").tolist() == result.as_numpy("beb").tolist() == [0, 1, 2]
    assert result.as_numpy("u").tolist() == ["\u00e9", "x"]
    assert result.as_numpy("ub").tolist() == ["\u00e9".encode(), b"x"]
    assert result.as_numpy("fixed").tolist() == [b"q"]


@pytest.mark.parametrize("datatype", ["FP16", "FP32", "FP64"])
def test_non_finite_json_floats_survive_tritonclient(datatype: str) -> None:
    array = np.array([np.nan, np.inf, -np.inf, 0.1, -0.0], dtype=DATATYPE_TO_NUMPY[datatype])
    outputs = [("f", array, False), ("text", np.array([b"null"], dtype=np.object_), False)]
    result = parse_with_tritonclient(*encode_infer_response("m", "1", None, outputs))
    assert_same(result.as_numpy("f"), array)
    assert result.as_numpy("text").tolist() == ["null"]


def test_json_output_of_non_utf8_bytes_tells_client_to_ask_for_binary() -> None:
    with pytest.raises(InvalidInput, match=r"output 'blob': BYTES element 1 is not valid UTF-8.*binary_data"):
        encode_infer_response("m", "1", None, [("blob", np.array([b"ok", b"\xff\xfe"], dtype=np.object_), False)])
    body, header_length = encode_infer_response("m", "1", None, [("blob", np.array([b"\xff"], dtype=np.object_), True)])
    assert parse_with_tritonclient(body, header_length).as_numpy("blob").tolist() == [b"\xff"]


def test_model_outputs_that_have_no_v2_form_raise_model_error() -> None:
    with pytest.raises(ModelError, match=r"output 'c'.*complex128"):
        encode_infer_response("m", "1", None, [("c", np.zeros(2, dtype=np.complex128), False)])
    for binary in (True, False):
        with pytest.raises(ModelError, match="output 'o': BYTES element 1 is int"):
            encode_infer_response("m", "1", None, [("o", np.array([b"a", 3], dtype=np.object_), binary)])


def test_encode_error() -> None:
    assert orjson.loads(encode_error('bad "x"')) == {"error": 'bad "x"'}


# --------------------------------------------------------------------------------- tritonclient requests


def tritonclient_request(arrays: dict[str, np.ndarray], binary: bool, **kwargs: Any) -> tuple[bytes, int | None]:
    inputs = []
    for name, array in arrays.items():
        datatype = "BYTES" if array.dtype == np.object_ else triton_datatype(array)
        inputs.append(
            triton.InferInput(name, list(array.shape), datatype).set_data_from_numpy(array, binary_data=binary)
        )
    return triton.InferenceServerClient.generate_request_body(inputs, **kwargs)


def triton_datatype(array: np.ndarray) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return np_to_triton_dtype(array.dtype)


@pytest.mark.parametrize("datatype", DATATYPES)
@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_request_bodies_decode_exactly(datatype: str, binary: bool) -> None:
    arrays = {f"in{i}": sample(datatype, shape) for i, shape in enumerate(SHAPES)}
    body, header_length = tritonclient_request(arrays, binary, request_id="abc", priority=3)
    request = decode_infer_request(body, header_length)
    assert request.id == "abc" and request.parameters["priority"] == 3 and request.binary_output is True
    assert [t.name for t in request.inputs] == list(arrays)
    for tensor, array in zip(request.inputs, arrays.values(), strict=True):
        assert tensor.datatype == datatype
        assert_same(tensor.data, array)


def test_tritonclient_requested_outputs() -> None:
    outputs = [triton.InferRequestedOutput("a", binary_data=False), triton.InferRequestedOutput("b")]
    body, header_length = tritonclient_request({"x": sample("FP32", (2,))}, True, outputs=outputs)
    request = decode_infer_request(body, header_length)
    assert request.binary_output is False
    assert [(o.name, o.binary) for o in request.outputs] == [("a", False), ("b", True)]
    outputs = [triton.InferRequestedOutput("a", class_count=3)]
    body, _ = tritonclient_request({"x": sample("FP32", (2,))}, False, outputs=outputs)
    with pytest.raises(InvalidInput, match="output 'a': the classification extension is not supported"):
        decode_infer_request(body, None)


def test_tritonclient_compressed_request_and_response() -> None:
    body, header_length = tritonclient_request({"x": sample("INT32", (3, 3))}, True)
    for coding, compress in (("gzip", gzip.compress), ("deflate", zlib.compress)):
        decoded = decode_infer_request(decode_content(compress(body), coding), header_length)
        assert_same(decoded.inputs[0].data, sample("INT32", (3, 3)))
        response, response_header_length = encode_infer_response("m", "1", None, [("y", sample("FP64", (4,)), True)])
        compressed, encoding = encode_content(response, coding)
        assert encoding == coding and len(compressed) != len(response)
        result = triton.InferResult.from_response_body(compressed, False, response_header_length, encoding)
        assert_same(result.as_numpy("y"), sample("FP64", (4,)))


# -------------------------------------------------------------------------------------- property tests


def arrays_strategy(allow_non_finite: bool) -> st.SearchStrategy[np.ndarray]:
    shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)

    def for_datatype(datatype: str) -> st.SearchStrategy[np.ndarray]:
        if datatype == "BYTES":
            items = st.binary(max_size=8) if allow_non_finite else st.text(max_size=6).map(str.encode)
            return shapes.flatmap(lambda shape: hnp.arrays(np.object_, shape, elements=items))
        dtype = DATATYPE_TO_NUMPY[datatype]
        finite = {} if dtype.kind != "f" else {"allow_nan": allow_non_finite, "allow_infinity": allow_non_finite}
        return hnp.arrays(dtype, shapes, elements=hnp.from_dtype(dtype, **finite))

    return st.sampled_from(DATATYPES).flatmap(for_datatype)


PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(st.lists(st.tuples(arrays_strategy(allow_non_finite=False), st.booleans(), st.booleans()), max_size=4))
def test_property_requests_round_trip(tensors: list[tuple[np.ndarray, bool, bool]]) -> None:
    named = [(f"t{i}", array, binary) for i, (array, binary, _) in enumerate(tensors)]
    nested = any(flag for _, _, flag in tensors)
    request = decode_infer_request(*make_request(named, nested=nested))
    for tensor, (_, array, _) in zip(request.inputs, named, strict=True):
        assert_same(tensor.data, array)


@PROPERTY
@given(arrays_strategy(allow_non_finite=False), st.booleans())
def test_property_tritonclient_requests_decode(array: np.ndarray, binary: bool) -> None:
    request = decode_infer_request(*tritonclient_request({"x": array}, binary))
    assert_same(request.inputs[0].data, array)


@PROPERTY
@given(arrays_strategy(allow_non_finite=True), st.booleans())
def test_property_responses_parse_in_tritonclient(array: np.ndarray, binary: bool) -> None:
    if array.dtype == np.object_ and not binary:
        array = object_array([item.encode() for item in decoded_text(array).reshape(-1)], array.shape)
    result = parse_with_tritonclient(*encode_infer_response("m", "1", None, [("y", array, binary)]))
    got = result.as_numpy("y")
    if array.dtype == np.object_ and not binary:
        assert got.shape == array.shape and got.reshape(-1).tolist() == as_text(array)
    else:
        assert_same(got, array)


@PROPERTY
@given(arrays_strategy(allow_non_finite=False), st.booleans())
def test_property_response_outputs_decode_as_request_inputs(array: np.ndarray, binary: bool) -> None:
    """Our own encoder's tensor entries are valid request inputs for our own decoder."""
    body, header_length = encode_infer_response("m", "1", None, [("y", array, binary)])
    request_body = body.replace(b'"outputs":', b'"inputs":', 1)
    shift = len(request_body) - len(body)
    request = decode_infer_request(request_body, None if header_length is None else header_length + shift)
    assert_same(request.inputs[0].data, array)


@pytest.mark.parametrize("datatype", ["BOOL", "UINT16", "FP16", "FP64"])
def test_large_binary_outputs_are_joined_from_views(datatype: str) -> None:
    array = sample(datatype, (300, 70))  # over 64 KiB for 8-byte types, under it for the others
    body, header_length = encode_infer_response("m", "1", None, [("y", array, True)])
    assert orjson.loads(body[:header_length])["outputs"][0]["parameters"] == {"binary_data_size": array.nbytes}
    assert_same(parse_with_tritonclient(body, header_length).as_numpy("y"), array)
