"""Bad requests and bad configs: the right status, a message saying what was wrong, and a server
that keeps serving everyone else."""

from __future__ import annotations

import gzip

import httpx
import pytest

from tests.repos import write_model, write_probe
from tests.server import LadleServer

LIMIT = 4096


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("errors")
    write_probe(repo, "probe", max_batch_size=4)
    write_model(repo, "badconfig", {"backend": "onnx", "max_batch_size": 4,
                                    "dynamic_batching": {"max_queue_delay": 3}})
    write_model(repo, "noartifact", {"backend": "onnx"})
    write_probe(repo, "crashy", max_batch_size=4)
    with LadleServer([repo, "--max-request-bytes", str(LIMIT)], wait_ready=False) as s:
        yield s


def infer(server, body, model: str = "probe", **kw) -> httpx.Response:
    kwargs = {"json": body} if not isinstance(body, (bytes, str)) else {"content": body}
    return httpx.post(f"{server.url}/v2/models/{model}/infer", timeout=30, **kwargs, **kw)


def good(x: float = 1.0) -> dict:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [x]}]}


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ("{not json", 400, "JSON"),
        ({"inputs": [{"name": "x", "datatype": "INT64", "shape": [1, 1], "data": [1]}]}, 400, "expected FP32"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}, 400, "expected [-1, 1]"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [5, 1], "data": [1] * 5}]}, 400, "max_batch_size=4"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 1], "data": [1]}]}, 400, "2 elements"),
        ({"inputs": [{"name": "z", "datatype": "FP32", "shape": [1, 1], "data": [1]}]}, 400, "missing input"),
        ({"inputs": []}, 400, "missing input"),
        ({"inputs": [{"name": "x", "datatype": "FP8", "shape": [1, 1], "data": [1]}]}, 400, "FP8"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": ["a"]}]}, 400, "x"),
        ({**good(), "outputs": [{"name": "nope"}]}, 400, "unknown output 'nope'"),
        ({**good(), "parameters": {"timeout": -5}}, 400, "timeout"),
    ],
)
def test_bad_requests(server, body, status: int, fragment: str) -> None:
    r = infer(server, body)
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]


def test_unknown_model_and_version_are_404(server) -> None:
    r = infer(server, good(), model="nosuch")
    assert r.status_code == 404 and "unknown model 'nosuch'" in r.json()["error"]
    r = httpx.post(server.url + "/v2/models/probe/versions/9/infer", json=good())
    assert r.status_code == 404 and "no version 9" in r.json()["error"]
    r = httpx.post(server.url + "/v2/models/probe/versions/abc/infer", json=good())
    assert r.status_code == 400
    r = httpx.get(server.url + "/v2/no/such/route")
    assert r.status_code == 404 and "error" in r.json()


def test_oversized_body_is_413_declared_or_chunked(server) -> None:
    big = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [1.0]}], "pad": "x" * LIMIT}
    r = infer(server, big)
    assert r.status_code == 413 and "--max-request-bytes" in r.json()["error"]

    def chunks():
        yield b'{"inputs": []'
        yield b" " * LIMIT
        yield b"}"

    r = httpx.post(server.url + "/v2/models/probe/infer", content=chunks())
    assert r.status_code == 413


def test_gzip_bomb_is_413(server) -> None:
    bomb = gzip.compress(b'{"inputs": [], "pad": "' + b"0" * (LIMIT * 50) + b'"}')
    assert len(bomb) < LIMIT
    r = infer(server, bomb, headers={"Content-Encoding": "gzip"})
    assert r.status_code == 413


def test_model_failure_is_500_and_isolated(server) -> None:
    r = infer(server, good(666.0), model="crashy")
    rid = r.headers["X-Request-ID"]  # the client sees a request id; the model's own message goes to the log
    assert r.status_code == 500 and r.json()["error"] == f"internal error; request id {rid}"
    assert any(rid in line and "probe was asked to fail" in line for line in server.log().splitlines())
    assert infer(server, good(2.0), model="crashy").json()["outputs"][0]["data"] == [4.0]


def test_bad_configs_are_unavailable_with_reasons_and_others_serve(server) -> None:
    index = {r["name"]: r for r in httpx.post(server.url + "/v2/repository/index").json()}
    assert index["badconfig"]["state"] == "UNAVAILABLE"
    reason = index["badconfig"]["reason"]
    assert "badconfig/config.yaml" in reason and "dynamic_batching.max_queue_delay" in reason
    assert index["noartifact"]["state"] == "UNAVAILABLE"
    assert "model.onnx" in index["noartifact"]["reason"]
    assert index["probe"]["state"] == "READY"
    r = infer(server, good(), model="badconfig")
    assert r.status_code == 503 and "not ready" in r.json()["error"]
    # strict readiness: the repository asked for models that did not load
    assert httpx.get(server.url + "/v2/health/ready").status_code == 503
    assert httpx.get(server.url + "/v2/health/live").status_code == 200


def test_server_still_serves_after_all_of_that(server) -> None:
    assert infer(server, good(21.0)).json()["outputs"][0]["data"] == [42.0]
