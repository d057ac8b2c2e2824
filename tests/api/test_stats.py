"""Triton's statistics extension through a real server: tritonclient's get_inference_statistics parses it, counts and
durations follow what ran (successes, failures, queue, the model call, batches by size), and the routes resolve as
Triton's do (/v2/models/stats is every model's, even beside a model named "stats")."""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.repos import write_probe
from tests.server import LadleServer


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("stats")
    write_probe(repo, "probe", versions=(1, 2), version_policy={"all": True},
                dynamic_batching={"max_queue_delay_ms": 1})
    write_probe(repo, "batched", max_batch_size=16, dynamic_batching={"max_queue_delay_ms": 50, "eager": False})
    write_probe(repo, "stats")  # a model whose name is the route's last segment
    with LadleServer([repo]) as s:
        yield s


def infer(client: httpclient.InferenceServerClient, model: str, x: float, version: str = "") -> None:
    data = httpclient.InferInput("x", [1, 1], "FP32")
    data.set_data_from_numpy(np.array([[x]], dtype=np.float32))
    client.infer(model, [data], model_version=version)


def test_tritonclient_reads_counts_and_durations_of_one_version(server) -> None:
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    before_ms = time.time() * 1000
    for x in (1.0, -30.0, 3.0):  # -30: the probe sleeps 30 ms in predict
        infer(client, "probe", x, "1")
    with pytest.raises(InferenceServerException):
        infer(client, "probe", 666.0, "1")  # the probe raises: a failed request
    stats = client.get_inference_statistics(model_name="probe", model_version="1")
    [entry] = stats["model_stats"]
    assert (entry["name"], entry["version"]) == ("probe", "1")
    s = entry["inference_stats"]
    assert s["success"]["count"] == 3 and s["fail"]["count"] == 1
    assert s["queue"]["count"] == 3
    assert s["compute_infer"]["count"] == 3 and s["compute_infer"]["ns"] >= 30_000_000
    assert s["success"]["ns"] >= s["compute_infer"]["ns"] + s["queue"]["ns"]
    assert s["compute_input"]["count"] == s["compute_output"]["count"] == 3
    assert entry["execution_count"] == 3 and entry["inference_count"] == 3
    [row] = entry["batch_stats"]
    assert row["batch_size"] == 1 and row["compute_infer"]["count"] == 3
    assert row["compute_infer"]["ns"] == s["compute_infer"]["ns"]  # batches of one: per request = per batch
    assert before_ms - 1000 <= entry["last_inference"] <= time.time() * 1000 + 1000
    # version 2 saw nothing
    [other] = client.get_inference_statistics(model_name="probe", model_version="2")["model_stats"]
    assert other["inference_stats"]["success"]["count"] == 0 and other["batch_stats"] == []


async def _concurrent(url: str, n: int) -> list[httpx.Response]:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [1.0]}]}
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        return await asyncio.gather(*(client.post("/v2/models/batched/infer", json=body) for _ in range(n)))


def test_batches_are_counted_by_size_and_requests_by_their_batch(server) -> None:
    responses = asyncio.run(_concurrent(server.url, 16))
    assert all(r.status_code == 200 for r in responses)
    [entry] = httpx.get(f"{server.url}/v2/models/batched/versions/1/stats").json()["model_stats"]
    rows = entry["batch_stats"]
    assert any(r["batch_size"] > 1 for r in rows), rows  # the 50 ms delay gathered some requests together
    assert sum(r["batch_size"] * r["compute_infer"]["count"] for r in rows) == entry["inference_count"] == 16
    assert sum(r["compute_infer"]["count"] for r in rows) == entry["execution_count"] < 16
    s = entry["inference_stats"]
    assert s["compute_infer"]["count"] == s["success"]["count"] == 16
    # every request is charged its whole batch's time: the request total is >= the sum over batches
    assert s["compute_infer"]["ns"] >= sum(r["compute_infer"]["ns"] for r in rows)


def test_routes_resolve_as_triton_does(server) -> None:
    every = httpx.get(f"{server.url}/v2/models/stats").json()["model_stats"]
    assert [(e["name"], e["version"]) for e in every] == [
        ("batched", "1"), ("probe", "1"), ("probe", "2"), ("stats", "1")]
    own = httpx.get(f"{server.url}/v2/models/stats/stats").json()["model_stats"]
    assert [(e["name"], e["version"]) for e in own] == [("stats", "1")]
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    assert len(client.get_inference_statistics()["model_stats"]) == 4
    assert len(client.get_inference_statistics(model_name="probe")["model_stats"]) == 2


@pytest.mark.parametrize(("path", "status"), [
    ("/v2/models/nope/stats", 404),
    ("/v2/models/probe/versions/9/stats", 404),
    ("/v2/models/probe/versions/abc/stats", 400),
    ("/v2/models/" + "m" * 300 + "/stats", 400),
    ("/v2/models/.hidden/stats", 400),
])
def test_bad_names_answer_in_the_protocols_error_shape(server, path: str, status: int) -> None:
    response = httpx.get(server.url + path)
    assert response.status_code == status
    assert isinstance(response.json()["error"], str)


def test_tritonclient_raises_for_an_unknown_model(server) -> None:
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    with pytest.raises(InferenceServerException, match="nope"):
        client.get_inference_statistics(model_name="nope")
