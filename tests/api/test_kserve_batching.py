"""Dynamic batching through a real server: own rows under concurrency, batches > 1 in the metrics,
process instances, bounded queues (503), queue timeouts, priorities, and disconnects dropping work."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient

from tests.repos import write_probe
from tests.server import LadleServer


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("batching")
    log = repo / "slow.log"
    write_probe(repo, "probe", max_batch_size=16, dynamic_batching={"max_queue_delay_ms": 20, "eager": False})
    write_probe(repo, "busy", max_batch_size=16, dynamic_batching={"max_queue_delay_ms": 1})
    write_probe(repo, "workers", max_batch_size=4, instance_count=2, instance_kind="process",
                dynamic_batching={"max_queue_delay_ms": 1})
    write_probe(repo, "slow", max_batch_size=1, parameters={"log": str(log)},
                dynamic_batching={"max_queue_size": 2, "priority_levels": 2, "default_priority_level": 2})
    with LadleServer([repo]) as s:
        s.slow_log = log
        yield s


def body(x: float, **parameters) -> dict:
    req = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [x]}]}
    if parameters:
        req["parameters"] = parameters
    return req


async def post_many(url: str, values: list[float], model: str = "probe") -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=100)) as client:
        return await asyncio.gather(*(client.post(f"/v2/models/{model}/infer", json=body(v)) for v in values))


def test_64_concurrent_requests_get_their_own_rows_and_batches_form(server) -> None:
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"), concurrency=64)
    handles = []
    for i in range(64):
        inp = httpclient.InferInput("x", [1, 1], "FP32")
        inp.set_data_from_numpy(np.array([[float(i)]], dtype=np.float32))
        handles.append((i, client.async_infer("probe", [inp])))
    for i, handle in handles:
        assert handle.get_result().as_numpy("y").tolist() == [[2.0 * i]]
    metrics = httpx.get(server.url + "/metrics").text
    pattern = r'ladle_model_batch_size_bucket\{le="([^"]+)",model="probe",version="1"\} (\S+)'
    buckets = dict(re.findall(pattern, metrics))
    count = float(re.search(r'ladle_model_batch_size_count\{model="probe",version="1"\} (\S+)', metrics).group(1))
    assert count < 64, "some requests must have shared a batch"
    assert float(buckets["1.0"]) < count, "the batch-size histogram shows batches larger than 1"


def test_eager_batching_forms_batches_while_the_model_is_busy(server) -> None:
    values = [-(5.0 + i / 64) for i in range(64)]  # negative: each batch sleeps ~5 ms, so requests pile up
    responses = asyncio.run(post_many(server.url, values, model="busy"))
    for v, r in zip(values, responses, strict=True):
        assert r.json()["outputs"][0]["data"] == [np.float32(2 * v).item()]
    metrics = httpx.get(server.url + "/metrics").text
    count = float(re.search(r'ladle_model_batch_size_count\{model="busy",version="1"\} (\S+)', metrics).group(1))
    assert count < 32, f"64 requests ran in {count} batches"


def test_mixed_batch_sizes_are_split_back_correctly(server) -> None:
    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            reqs = []
            for i in range(1, 9):
                data = [float(10 * i + k) for k in range(i)]
                reqs.append(client.post("/v2/models/probe/infer", json={
                    "inputs": [{"name": "x", "datatype": "FP32", "shape": [i, 1], "data": data}]}))
            return await asyncio.gather(*reqs)

    for i, response in enumerate(asyncio.run(main()), start=1):
        y = response.json()["outputs"][0]
        assert y["shape"] == [i, 1]
        assert y["data"] == [2.0 * (10 * i + k) for k in range(i)]


def test_process_instances_run_in_separate_workers(server) -> None:
    responses = asyncio.run(post_many(server.url, [float(i) for i in range(32)], model="workers"))
    pids = set()
    for i, r in enumerate(responses):
        outputs = {o["name"]: o["data"] for o in r.json()["outputs"]}
        assert outputs["y"] == [2.0 * i]
        pids.add(outputs["pid"][0])
    assert len(pids) == 2, "two worker processes served the traffic"
    assert server.process.pid not in pids


def test_full_queue_answers_503_at_once(server) -> None:
    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            blocker = asyncio.ensure_future(client.post("/v2/models/slow/infer", json=body(-400.0)))
            await asyncio.sleep(0.1)
            started = time.monotonic()
            rest = await asyncio.gather(*(client.post("/v2/models/slow/infer", json=body(1.0)) for _ in range(6)))
            return await blocker, rest, time.monotonic() - started

    blocker, rest, _elapsed = asyncio.run(main())
    assert blocker.status_code == 200
    codes = sorted(r.status_code for r in rest)
    assert codes.count(503) >= 3 and codes.count(200) >= 1, codes
    rejected = next(r for r in rest if r.status_code == 503)
    assert "queue is full" in rejected.json()["error"]


def test_queue_timeout_errors_and_never_runs(server) -> None:
    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            blocker = asyncio.ensure_future(client.post("/v2/models/slow/infer", json=body(-500.0)))
            await asyncio.sleep(0.1)
            late = await client.post("/v2/models/slow/infer", json=body(4242.0, timeout=100_000))  # 0.1 s
            return await blocker, late

    _blocker, late = asyncio.run(main())
    assert late.status_code == 503
    assert "timed out in the queue" in late.json()["error"]
    time.sleep(0.2)
    assert "4242.0" not in server.slow_log.read_text()


def test_higher_priority_runs_first(server) -> None:
    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            blocker = asyncio.ensure_future(client.post("/v2/models/slow/infer", json=body(-300.0)))
            await asyncio.sleep(0.1)
            low = asyncio.ensure_future(client.post("/v2/models/slow/infer", json=body(1111.0)))
            await asyncio.sleep(0.05)
            high = asyncio.ensure_future(client.post("/v2/models/slow/infer", json=body(2222.0, priority=1)))
            return await asyncio.gather(blocker, low, high)

    start = len(server.slow_log.read_text().splitlines())
    assert all(r.status_code == 200 for r in asyncio.run(main()))
    ran = server.slow_log.read_text().splitlines()[start:]
    assert ran.index("2222.0") < ran.index("1111.0")


def test_bad_priority_is_a_400(server) -> None:
    r = httpx.post(server.url + "/v2/models/slow/infer", json=body(1.0, priority=3))
    assert r.status_code == 400 and "priority 3 is out of range" in r.json()["error"]


def test_disconnected_client_request_is_dropped_before_it_runs(server) -> None:
    with ThreadPoolExecutor(1) as pool:
        blocker = pool.submit(httpx.post, server.url + "/v2/models/slow/infer", json=body(-600.0), timeout=60)
        time.sleep(0.15)
        payload = httpx.Request("POST", server.url + "/v2/models/slow/infer", json=body(31337.0))
        raw = (f"POST /v2/models/slow/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(payload.content)}\r\n\r\n").encode() + payload.content
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(raw)
            time.sleep(0.1)  # queued behind the blocker; now hang up
        assert blocker.result().status_code == 200
    time.sleep(0.3)
    assert "31337.0" not in server.slow_log.read_text()
    # the server is fine and the queue slot was released
    assert httpx.post(server.url + "/v2/models/slow/infer", json=body(5.0)).status_code == 200
    metrics = httpx.get(server.url + "/metrics").text
    assert 'ladle_model_requests_total{model="slow",outcome="cancelled",version="1"} 1.0' in metrics
