"""`ladle serve --ray` end to end on a real local Ray cluster (two nodes, one CPU each): a classic model's replicas
share traffic and answer as a single ladle does, and a killed replica costs only its in-flight requests."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton

from tests.cluster.ray_helpers import IRIS, PREFIX, per_replica, replica_pids, running, settle_metrics, wait_for
from tests.server import LadleServer

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def iris_on_ray(ray_address: str, demo_repository: Path) -> Iterator[LadleServer]:
    args = [demo_repository, "--load-model", "iris", "--ray", ray_address, "--replicas", "2", "--num-cpus", "1",
            "--allow-admin-without-key", "--ray-app-prefix", PREFIX]
    with LadleServer(args, ready_timeout=180) as server:
        yield server


def test_replicas_share_traffic_and_answer_like_a_single_ladle(iris_on_ray: LadleServer) -> None:
    url = iris_on_ray.url
    # every replica is in /metrics before any request reaches it (the routers start with the deployment)
    wait_for(lambda: len(per_replica(url, "ladle_model_state", model="iris", state="READY")) == 2, 20,
             "both replicas in /metrics before any traffic")
    client = triton.InferenceServerClient(url.removeprefix("http://"))
    data = triton.InferInput("input", [1, 4], "FP32")
    data.set_data_from_numpy(np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32))
    assert client.infer("iris", [data]).as_numpy("label").tolist() == [0]
    for _ in range(40):
        assert httpx.post(url + "/v2/models/iris/infer", json=IRIS).status_code == 200
    settle_metrics()
    served = per_replica(url, "ladle_model_requests_total", model="iris", outcome="success")
    assert len(served) == 2 and all(v > 0 for v in served.values()), served
    assert running(url, "iris") == 2
    assert httpx.get(url + "/v2/health/ready").status_code == 200
    index = httpx.post(url + "/v2/repository/index", json={}).json()
    assert {r["version"] for r in index if r["name"] == "iris" and r["state"] == "READY"} == {"1", "2"}


def test_errors_keep_their_protocol_shape(iris_on_ray: LadleServer) -> None:
    url = iris_on_ray.url
    bad = httpx.post(url + "/v2/models/iris/infer", json={"inputs": [{"name": "input", "shape": [1, 3],
                                                                      "datatype": "FP32", "data": [1, 2, 3]}]})
    assert bad.status_code == 400 and isinstance(bad.json()["error"], str)
    missing = httpx.post(url + "/v2/models/nope/infer", json=IRIS)
    assert missing.status_code == 404 and "nope" in missing.json()["error"]
    no_model = httpx.post(url + "/v1/chat/completions", json={"messages": []})
    assert no_model.status_code == 400 and no_model.json()["error"]["param"] == "model"
    garbage = httpx.post(url + "/v1/completions", content=b"{not json")
    assert garbage.status_code == 400 and "JSON" in garbage.json()["error"]["message"]
    huge = httpx.post(url + "/v1/completions", content=b"x" * (5 * 1024 * 1024))
    assert huge.status_code == 413
    rollout = httpx.post(url + "/v2/models/iris/rollout", json={"to": 2, "steps": [50, 100], "every": 60})
    assert rollout.status_code == 501 and "--ray" in rollout.json()["error"]  # a single ladle's feature, said so


def test_a_killed_replica_costs_only_its_in_flight_requests(iris_on_ray: LadleServer) -> None:
    url = iris_on_ray.url
    before = set(per_replica(url, "ladle_model_requests_total", model="iris"))
    sent: list[tuple[float, int, str]] = []  # (when sent, status, body of a failure)
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                at = time.monotonic()
                r = http.post(url + "/v2/models/iris/infer", json=IRIS)
                sent.append((at, r.status_code, r.text if r.status_code != 200 else ""))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(2)
    victim = replica_pids(PREFIX + "iris")[0]
    killed = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    time.sleep(3)
    wait_for(lambda: running(url, "iris") == 2 and set(per_replica(url, "ladle_model_requests_total",
                                                                   model="iris")) - before, 180,
             "a replacement replica")
    time.sleep(1)
    stop.set()
    for t in threads:
        t.join()
    failed = [(at, status, body) for at, status, body in sent if status != 200]
    assert {status for _, status, _ in failed} <= {503}, failed[:3]
    # only requests in flight when the replica died fail (4 clients: at most 4); every request sent after the kill —
    # some of them routed to the dead replica before Ray knew — was answered by the live one
    assert len(failed) <= 4 and all(at < killed for at, _, _ in failed), failed[:3]
    assert all("replica" in body for _, _, body in failed), failed[:3]
    statuses = [status for _, status, _ in sent]
    assert statuses.count(200) > 100
    for _ in range(20):
        assert httpx.post(url + "/v2/models/iris/infer", json=IRIS).status_code == 200




def test_unload_and_load_go_through_serve(iris_on_ray: LadleServer) -> None:
    url = iris_on_ray.url
    settle_metrics()
    old = set(per_replica(url, "ladle_model_state", model="iris", state="READY"))
    # a reload answers once the fresh replicas run (Serve's rolling update), the old ones gone
    assert httpx.post(url + "/v2/repository/models/iris/load", timeout=180).status_code == 200
    settle_metrics()
    reloaded = set(per_replica(url, "ladle_model_state", model="iris", state="READY"))
    assert len(reloaded) == 2 and not reloaded & old, (old, reloaded)
    assert httpx.post(url + "/v2/models/iris/infer", json=IRIS).status_code == 200
    old = reloaded

    def ready_versions() -> set[str]:  # the index answers from a fan-out at most 1 s old, refreshed by load/unload
        index = httpx.post(url + "/v2/repository/index", json={"ready": True}).json()
        return {r["version"] for r in index if r["name"] == "iris"}

    assert ready_versions() == {"1", "2"}
    assert httpx.post(url + "/v2/repository/models/iris/unload").status_code == 200
    assert ready_versions() == set()
    gone = httpx.post(url + "/v2/models/iris/infer", json=IRIS)
    assert gone.status_code == 503 and "not loaded" in gone.json()["error"]
    assert httpx.post(url + "/v2/repository/models/iris/load", timeout=180).status_code == 200
    assert ready_versions() == {"1", "2"}
    assert httpx.post(url + "/v2/models/iris/infer", json=IRIS).status_code == 200
    settle_metrics()
    assert not set(per_replica(url, "ladle_model_state", model="iris", state="READY")) & old  # fresh replicas
    assert httpx.post(url + "/v2/repository/models/nope/load").status_code == 404


def test_a_batch_job_runs_over_the_replicas(iris_on_ray: LadleServer) -> None:
    from tests.jobs.helpers import jsonl, lines_of, wait_job

    url = iris_on_ray.url
    rows = [{"id": f"row-{i}", **IRIS} for i in range(30)]
    created = httpx.post(f"{url}/v2/jobs?model=iris", content=jsonl(rows),
                         headers={"content-type": "application/jsonl"})
    assert created.status_code == 200, created.text
    done = wait_job(url, created.json()["id"])
    assert done["status"] == "completed" and done["request_counts"] == {"total": 30, "completed": 30, "failed": 0}
    results = lines_of(httpx.get(f"{url}/v2/jobs/{done['id']}/results").content)
    assert [r["id"] for r in results] == [r["id"] for r in rows]
    assert all(r["response"]["outputs"][0]["data"] == [0] for r in results)
    assert httpx.post(f"{url}/v2/jobs?model=nope", content=jsonl(rows[:1])).status_code == 404
