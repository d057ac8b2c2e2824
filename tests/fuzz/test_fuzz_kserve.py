"""Fuzzing the KServe v2 codec in-process, then a live server over HTTP: any body decodes or is a 4xx,
never another exception, a 5xx, a hang, or memory in proportion to a size the client only claims."""

from __future__ import annotations

import gzip
import json
import time
import tracemalloc
import zlib

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from ladle.api.kserve_codec import decode_content, decode_infer_request
from ladle.errors import LadleError
from ladle.tensors import DATATYPE_TO_NUMPY
from tests.fuzz.kserve_strategies import Body, bodies, demo_requests, dumps, json_documents, json_values

# derandomize: every run (and CI) explores the same examples, so a failure reproduces from the printed example.
CODEC = settings(max_examples=1500, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
#: bytes a decode may allocate per body byte: a JSON list costs ~40 bytes of Python objects per 2-byte element
ALLOC_PER_BYTE = 100
ALLOC_SLACK = 1 << 20


def decode(body: Body):
    """The decoded request, or None for a client error; anything else fails the test."""
    try:
        return decode_infer_request(body.content, body.header_length)
    except LadleError as exc:
        assert exc.status < 500, f"{type(exc).__name__} ({exc.status}): {exc.message}"
        assert exc.message
        return None


def check_request(request) -> None:
    """A decoded request is what the model layer relies on: arrays of the declared shape and dtype."""
    for tensor in request.inputs:
        assert isinstance(tensor.data, np.ndarray)
        assert tensor.data.shape == tensor.shape
        assert tensor.data.dtype == DATATYPE_TO_NUMPY[tensor.datatype]
        if tensor.datatype == "BYTES":
            assert all(type(item) is bytes for item in tensor.data.reshape(-1).tolist())


@CODEC
@given(bodies)
def test_codec_decodes_or_refuses_any_body(body: Body) -> None:
    note(f"body={body.content!r} header_length={body.header_length}")
    tracemalloc.start()
    try:
        request = decode(body)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= ALLOC_PER_BYTE * len(body.content) + ALLOC_SLACK, f"allocated {peak} bytes"
    if request is not None:
        check_request(request)


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(json_documents(), st.sampled_from(["gzip", "deflate", "gzip, identity"]), st.integers(0, 40))
def test_compressed_bodies_decode_or_refuse(document, coding: str, cut: int) -> None:
    raw = dumps(document)
    packed = gzip.compress(raw) if coding.startswith("gzip") else zlib.compress(raw)
    packed = packed[: len(packed) - cut] if cut < 20 else packed  # sometimes truncated
    try:
        body = decode_content(packed, coding, max_size=len(raw) // 2 + 10)
    except LadleError as exc:
        assert exc.status in (400, 413), exc.message
        return
    assert body == raw
    decode(Body(body, None))


@pytest.mark.parametrize(
    "shape",
    [[2**31, 2**31], [2**63 - 1], [2**32, 2**32, 2**32], [0, 2**62, 2**62], [0, 2**63 - 1, 2], [1] * 65, [0] * 2000],
)
@pytest.mark.parametrize("datatype", ["FP32", "BYTES", "BOOL", "INT64"])
@pytest.mark.parametrize("binary", [False, True])
def test_claimed_sizes_fail_fast_without_allocating(shape: list[int], datatype: str, binary: bool) -> None:
    """Shapes that claim far more elements than the body holds (or that numpy cannot even describe) are a 400
    at once, with no allocation in proportion to the claim. [0, 2**62, 2**62] and [1] * 65 raised ValueError."""
    tensor = {"name": "x", "shape": shape, "datatype": datatype}
    if binary:
        tensor["parameters"] = {"binary_data_size": 4}
        header = dumps({"inputs": [tensor]})
        body = Body(header + b"\x01\x00\x00\x00", len(header))
    else:
        tensor["data"] = [True] if datatype == "BOOL" else ["a"] if datatype == "BYTES" else [1]
        body = Body(dumps({"inputs": [tensor]}), None)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        request = decode(body)
        elapsed, peak = time.perf_counter() - started, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert request is None
    assert elapsed < 0.5 and peak < ALLOC_SLACK, (elapsed, peak)


def test_many_huge_dimensions_cost_no_quadratic_time() -> None:
    """Thousands of 64-bit dimensions: multiplying them out would take seconds of big-integer arithmetic."""
    body = Body(dumps({"inputs": [{"name": "x", "shape": [2**64 - 1] * 200_000, "datatype": "FP32", "data": []}]}),
                None)
    started = time.perf_counter()
    assert decode(body) is None
    assert time.perf_counter() - started < 0.5


def test_deeply_nested_data_is_a_client_error() -> None:
    for depth in (70, 1000, 100_000):
        for datatype, leaf in (("FP32", "1"), ("BYTES", '"a"')):
            data = "[" * depth + leaf + "]" * depth
            raw = f'{{"inputs":[{{"name":"x","shape":[1],"datatype":"{datatype}","data":{data}}}]}}'.encode()
            request = decode(Body(raw, None))
            if request is not None:
                check_request(request)


# ------------------------------------------------------------------------------------------ live server

LIVE = settings(max_examples=250, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
IRIS = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]}
MODELS = ["iris", "minilm", "textstats", "nope", "iris/versions/2", "iris/versions/9", "iris/versions/-1"]
#: a hang is a failure: every fuzzed request must be answered within this many seconds
REQUEST_TIMEOUT_S = 10.0


@pytest.fixture(scope="module")
def http(demo_server):
    with httpx.Client(base_url=demo_server.url, timeout=REQUEST_TIMEOUT_S) as client:
        yield client
    # Afterwards the server is alive, ready, and still right.
    with httpx.Client(base_url=demo_server.url, timeout=REQUEST_TIMEOUT_S) as client:
        assert client.get("/v2/health/live").status_code == 200
        assert client.get("/v2/health/ready").status_code == 200


def assert_answered(response: httpx.Response, what: str) -> None:
    assert response.status_code < 500, f"{what} -> {response.status_code}: {response.text[:500]}"


def iris_still_right(http: httpx.Client) -> None:
    response = http.post("/v2/models/iris/infer", content=dumps(IRIS))
    assert response.status_code == 200, response.text
    label = next(o for o in response.json()["outputs"] if o["name"] == "label")
    assert label["data"] == [0]  # setosa


requests_to_models = st.one_of(
    st.tuples(st.sampled_from(MODELS), bodies),  # hostile bodies, mostly refused by the codec
    demo_requests().flatmap(  # bodies that reach a model, on its newest version or on version 1
        lambda pair: st.tuples(st.sampled_from([pair[0], f"{pair[0]}/versions/1"]), st.just(pair[1]))
    ),
)


@LIVE
@given(request=requests_to_models, coding=st.integers(0, 5))
def test_live_infer_never_5xx(http: httpx.Client, request: tuple[str, Body], coding: int) -> None:
    model, body = request
    headers, content = body.headers(), body.content
    if coding == 0:
        headers["Content-Encoding"], content = "gzip", gzip.compress(content)
    elif coding == 1:
        headers["Content-Encoding"] = "gzip"  # a lie: the body is not gzip
    elif coding == 2:
        headers["Accept-Encoding"] = "gzip"
    note(f"POST /v2/models/{model}/infer headers={headers} body={content!r}")
    assert_answered(http.post(f"/v2/models/{model}/infer", content=content, headers=headers), "infer")


#: printable ASCII that stays inside one path segment
PATH_CHARACTERS = st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="/?#%")


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    segments=st.lists(st.one_of(st.sampled_from(["models", "iris", "infer", "ready", "versions", "1", "config",
                                                 "health", "live", "repository", "index", "load", "unload", "..",
                                                 "%2e%2e", "%00", "", "minilm"]),
                                st.text(PATH_CHARACTERS, max_size=6)),
                      max_size=5),
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS"]),
    payload=json_values,
)
def test_live_random_paths_never_5xx(http: httpx.Client, segments: list[str], method: str, payload) -> None:
    path = "/v2/" + "/".join(segments)
    # Loading and unloading real models is another suite's business; here only the routing must hold.
    if method == "POST" and segments[-1:] in (["load"], ["unload"]):
        return
    note(f"{method} {path} body={json.dumps(payload)}")
    response = http.request(method, path, content=json.dumps(payload).encode())
    assert_answered(response, f"{method} {path}")


def test_live_wrong_content_length_is_answered(demo_server, http: httpx.Client) -> None:
    """A Content-Length that lies (short, long, not a number) gets an answer or a closed connection, not a hang,
    and the server keeps serving everyone else."""
    import socket

    raw = dumps(IRIS)
    for declared in (str(len(raw) - 5), str(len(raw) + 50), "abc", "-1", str(2**70)):
        with socket.create_connection(("127.0.0.1", demo_server.port), timeout=REQUEST_TIMEOUT_S) as sock:
            sock.sendall(b"POST /v2/models/iris/infer HTTP/1.1\r\nHost: x\r\nContent-Length: " + declared.encode()
                         + b"\r\nConnection: close\r\n\r\n" + raw)
            if declared == str(len(raw) + 50):
                sock.shutdown(socket.SHUT_WR)  # the rest never comes
            reply = b""
            try:
                while chunk := sock.recv(65536):
                    reply += chunk
            except ConnectionResetError:
                pass
        status = reply.split(b" ", 2)[1] if reply.startswith(b"HTTP/1.1 ") else b""
        assert not status.startswith(b"5"), (declared, reply[:300])
    iris_still_right(http)


def test_live_server_healthy_and_right_after_fuzzing(http: httpx.Client) -> None:
    # Runs after the fuzzers above (pytest keeps file order).
    assert http.get("/v2/health/ready").status_code == 200
    iris_still_right(http)
    assert http.get("/v2/models/minilm/ready").status_code == 200
