"""tritonclient.grpc, with its default settings, against every classic demo model: outputs, metadata, config and
statistics equal to what tritonclient.http gets over REST from the same server; repository calls and errors."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.server import LadleServer, free_port

MODELS = ("iris", "minilm", "textstats")


@pytest.fixture(scope="module")
def server(demo_repository) -> Iterator[LadleServer]:
    port = free_port()
    args = [demo_repository, "--grpc-port", str(port), "--allow-admin-without-key", "--max-request-bytes", "65536",
            *(a for m in MODELS for a in ("--load-model", m))]
    with LadleServer(args) as s:
        s.grpc_address = f"127.0.0.1:{port}"
        yield s


@pytest.fixture(scope="module")
def rpc(server) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(server.grpc_address)


@pytest.fixture(scope="module")
def rest(server) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(server.url.removeprefix("http://"))


def _inputs(module, name: str, array: np.ndarray, datatype: str) -> list:
    inp = module.InferInput(name, list(array.shape), datatype)
    inp.set_data_from_numpy(array) if module is grpcclient else inp.set_data_from_numpy(array, binary_data=True)
    return [inp]


CASES = [
    ("iris", "", "input", np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], np.float32), "FP32"),
    ("iris", "1", "input", np.array([[5.9, 3.0, 4.2, 1.5]], np.float32), "FP32"),
    ("iris", "2", "input", np.array([[5.9, 3.0, 4.2, 1.5]], np.float32), "FP32"),
    ("minilm", "", "text", np.array([[b"The cat sits."], ["Ünïcödé 日本語".encode()]], dtype=np.object_), "BYTES"),
    ("textstats", "", "text", np.array([["héllo wörld".encode()], [b""]], dtype=np.object_), "BYTES"),
]


@pytest.mark.parametrize(("model", "version", "name", "array", "datatype"), CASES)
def test_infer_matches_rest(rpc, rest, model, version, name, array, datatype) -> None:
    got = rpc.infer(model, _inputs(grpcclient, name, array, datatype), model_version=version, request_id="r1")
    want = rest.infer(model, _inputs(httpclient, name, array, datatype), model_version=version)
    response = got.get_response()
    assert response.model_name == model and response.id == "r1"
    assert response.model_version == want.get_response()["model_version"]
    outputs = [o["name"] for o in want.get_response()["outputs"]]
    assert [o.name for o in response.outputs] == outputs
    for output in outputs:
        a, b = got.as_numpy(output), want.as_numpy(output)
        assert a.dtype == b.dtype and a.shape == b.shape
        if a.dtype == np.object_:
            assert a.tolist() == b.tolist()
        else:
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_requested_outputs_only(rpc) -> None:
    array = np.array([[b"abc"]], dtype=np.object_)
    result = rpc.infer("textstats", _inputs(grpcclient, "text", array, "BYTES"),
                       outputs=[grpcclient.InferRequestedOutput("length")])
    assert [o.name for o in result.get_response().outputs] == ["length"]
    assert result.as_numpy("length").tolist() == [[3]]


def test_health_metadata_and_config_match_rest(rpc, rest) -> None:
    assert rpc.is_server_live() and rpc.is_server_ready()
    assert rpc.is_model_ready("iris") and rpc.is_model_ready("iris", "2")
    assert not rpc.is_model_ready("iris", "3") and not rpc.is_model_ready("nope")
    meta = rpc.get_server_metadata(as_json=True)
    assert meta["name"] == "ladle" and set(rest.get_server_metadata()["extensions"]) <= set(meta["extensions"])
    for model in MODELS:
        assert rpc.get_model_metadata(model, as_json=True) == _shapes_as_str(rest.get_model_metadata(model))
        config = rpc.get_model_config(model, as_json=True)["config"]
        want = rest.get_model_config(model)
        assert (config["name"], int(config["max_batch_size"])) == (want["name"], want["max_batch_size"])
        assert [(i["name"], i["data_type"].replace("STRING", "BYTES")) for i in config["input"]] == \
            [(i["name"], i["data_type"]) for i in want["input"]]
        assert [o["name"] for o in config["output"]] == [o["name"] for o in want["output"]]
    iris = rpc.get_model_config("iris", "1").config
    assert iris.backend == "sklearn" and list(iris.input[0].dims) == [4]
    assert iris.dynamic_batching.max_queue_delay_microseconds == 2000
    assert iris.version_policy.HasField("all")


def _shapes_as_str(meta: dict) -> dict:
    """tritonclient.grpc's as_json writes int64 fields (shape) as strings (protobuf's JSON mapping)."""
    tensors = {k: [{**t, "shape": [str(d) for d in t["shape"]]} for t in meta[k]] for k in ("inputs", "outputs")}
    return {**meta, **tensors}


def test_statistics_match_rest(rpc, rest) -> None:
    rpc.infer("iris", _inputs(grpcclient, "input", np.ones((3, 4), np.float32), "FP32"), model_version="2")
    got = rpc.get_inference_statistics("iris", "2").model_stats[0]
    want = rest.get_inference_statistics("iris", "2")["model_stats"][0]
    assert (got.name, got.version) == ("iris", "2")
    assert got.inference_stats.success.count >= 1 and got.inference_count >= 3
    assert got.inference_stats.success.count == want["inference_stats"]["success"]["count"]
    assert got.inference_count == want["inference_count"]
    assert {b.batch_size for b in got.batch_stats} == {b["batch_size"] for b in want["batch_stats"]}
    every = rpc.get_inference_statistics()
    assert {(s.name, s.version) for s in every.model_stats} >= {("iris", "1"), ("iris", "2"), ("textstats", "1")}
    _expect(grpc.StatusCode.NOT_FOUND, rpc.get_inference_statistics, "nope")


def _expect(code: grpc.StatusCode, call, *args, **kwargs) -> str:
    with pytest.raises(InferenceServerException) as info:
        call(*args, **kwargs)
    assert info.value.status() == str(code), info.value.message()
    return info.value.message()


def test_errors_have_grpc_status_codes(rpc) -> None:
    good = _inputs(grpcclient, "input", np.ones((1, 4), np.float32), "FP32")
    assert "unknown model 'nope'" in _expect(grpc.StatusCode.NOT_FOUND, rpc.infer, "nope", good)
    _expect(grpc.StatusCode.NOT_FOUND, rpc.infer, "iris", good, model_version="9")
    _expect(grpc.StatusCode.INVALID_ARGUMENT, rpc.infer, "iris", good, model_version="x")
    bad_shape = _inputs(grpcclient, "input", np.ones((1, 3), np.float32), "FP32")
    assert "expected [-1, 4]" in _expect(grpc.StatusCode.INVALID_ARGUMENT, rpc.infer, "iris", bad_shape)
    wrong_type = _inputs(grpcclient, "input", np.ones((1, 4), np.float64), "FP64")
    _expect(grpc.StatusCode.INVALID_ARGUMENT, rpc.infer, "iris", wrong_type)
    missing = _inputs(grpcclient, "other", np.ones((1, 4), np.float32), "FP32")
    _expect(grpc.StatusCode.INVALID_ARGUMENT, rpc.infer, "iris", missing)
    _expect(grpc.StatusCode.INVALID_ARGUMENT, rpc.infer, "iris", good, outputs=[grpcclient.InferRequestedOutput("z")])
    assert rpc.infer("iris", good, priority=1, timeout=10_000_000).as_numpy("label").shape == (1,)
    huge = _inputs(grpcclient, "input", np.ones((5000, 4), np.float32), "FP32")  # 80 kB > --max-request-bytes 64 kB
    _expect(grpc.StatusCode.RESOURCE_EXHAUSTED, rpc.infer, "iris", huge)
    assert rpc.is_server_live()  # nothing above took the server down
    assert rpc.infer("iris", good).as_numpy("label").shape == (1,)


def test_stream_infer_answers_each_request(rpc) -> None:
    results: list = []
    rpc.start_stream(callback=lambda result, error: results.append((result, error)))
    try:
        for i, text in enumerate(("a", "bb", "ccc")):
            rpc.async_stream_infer("textstats", _inputs(grpcclient, "text", np.array([[text.encode()]], np.object_),
                                                        "BYTES"), request_id=str(i))
        rpc.async_stream_infer("nope", _inputs(grpcclient, "text", np.array([[b"x"]], np.object_), "BYTES"))
    finally:
        rpc.stop_stream()  # waits for the responses
    assert len(results) == 4
    answered = sorted((r.get_response().id, r.as_numpy("length").item()) for r, e in results if e is None)
    assert answered == [("0", 1), ("1", 2), ("2", 3)]
    errors = [e for _, e in results if e is not None]
    assert len(errors) == 1 and "unknown model 'nope'" in errors[0].message()


def test_repository_index_unload_load(rpc) -> None:
    index = {(m.name, m.version): m.state for m in rpc.get_model_repository_index().models}
    assert index[("iris", "1")] == index[("textstats", "1")] == "READY"
    assert ("smollm2", "") in index  # on disk, not loaded
    rpc.unload_model("textstats")
    assert not rpc.is_model_ready("textstats")
    text = _inputs(grpcclient, "text", np.array([[b"x"]], np.object_), "BYTES")
    assert "not ready" in _expect(grpc.StatusCode.UNAVAILABLE, rpc.infer, "textstats", text)  # as REST: 503
    rpc.load_model("textstats")
    assert rpc.is_model_ready("textstats")
    assert rpc.infer("textstats", text).as_numpy("upper").tolist() == [[b"X"]]
    _expect(grpc.StatusCode.NOT_FOUND, rpc.unload_model, "nope")
    _expect(grpc.StatusCode.NOT_FOUND, rpc.load_model, "nope")
