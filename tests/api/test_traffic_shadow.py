"""Sticky traffic splits and shadow traffic on a real server with classic (python-backend) models: weights within
a binomial tolerance, keys that stay on their version while weights move, and shadow copies that never touch the
caller's answer but are compared, counted, logged and shed first."""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import yaml

from tests.repos import write_model
from tests.server import LadleServer

SCALED = '''
import time


class Scaled:
    def load(self, ctx):
        p = ctx.parameters
        self.scale = float(p.get("scale", 2.0))
        self.delay = float(p.get("delay_ms", 0)) / 1000.0
        self.fail = bool(p.get("fail", False))

    def predict(self, batch):
        if self.delay:
            time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("this version is broken")
        return {"y": batch["x"] * self.scale}
'''
BASE = {"backend": "python", "max_batch_size": 16, "version_policy": {"all": True},
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [1]}],
        "dynamic_batching": {"max_queue_delay_ms": 1}}


def versions(**params_by_version: dict) -> dict[int, dict[str, str]]:
    return {int(v[1:]): {"model.py": SCALED, "config.yaml": yaml.safe_dump({"parameters": p})}
            for v, p in params_by_version.items()}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("traffic")
    write_model(repo, "split", {**BASE, "traffic_split": {1: 90, 2: 10}, "sticky_key": "X-User-Id"},
                versions(v1={}, v2={}))
    write_model(repo, "shadowed", {**BASE, "traffic_split": {1: 100}, "shadow": {"version": 2, "fraction": 1.0}},
                versions(v1={}, v2={}, v3={"scale": 3.0}))
    # no split: the newest version that is not the shadow candidate serves
    write_model(repo, "broken", {**BASE, "shadow": {"version": 2, "fraction": 1.0}}, versions(v1={}, v2={"fail": True}))
    write_model(repo, "slow", {**BASE, "shadow": {"version": 2, "fraction": 1.0, "max_in_flight": 2}},
                versions(v1={}, v2={"delay_ms": 1000}))
    return repo


@pytest.fixture(scope="module")
def server(repo):
    with LadleServer([repo, "--allow-admin-without-key"]) as s:
        yield s


def infer(client: httpx.Client, model: str, x: float, key: str | None = None, as_parameter: bool = False) -> dict:
    body: dict = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [x]}]}
    headers = {}
    if key is not None and as_parameter:
        body["parameters"] = {"X-User-Id": key}
    elif key is not None:
        headers["X-User-Id"] = key
    r = client.post(f"/v2/models/{model}/infer", json=body, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def shadow_status(server, model: str, settled: int | None = None) -> dict:
    """GET /shadow, waiting until `settled` copies were compared or failed (they run after the answers)."""
    deadline = time.monotonic() + 20
    while True:
        status = httpx.get(f"{server.url}/v2/models/{model}/shadow").json()
        done = status["counts"]["compared"] + status["counts"]["failed"]
        if settled is None or (done >= settled and status["in_flight"] == 0) or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


def test_unkeyed_requests_follow_the_weights(server) -> None:
    n = 3000
    with httpx.Client(base_url=server.url) as client, ThreadPoolExecutor(8) as pool:
        served = list(pool.map(lambda i: infer(client, "split", 1.0)["model_version"], range(n)))
    second = served.count("2")
    # 10% of 3000: 300 +- 4.5 sigma (16.4)
    assert abs(second - 300) < 4.5 * math.sqrt(n * 0.1 * 0.9), second
    assert served.count("1") + second == n


def test_a_key_stays_on_its_version_and_moving_weights_moves_only_the_keys_that_must(server, repo) -> None:
    keys = [f"user-{i}" for i in range(600)]
    with httpx.Client(base_url=server.url) as client:
        before = {k: infer(client, "split", 1.0, k)["model_version"] for k in keys}
        again = {k: infer(client, "split", 1.0, k, as_parameter=True)["model_version"] for k in keys}
        assert again == before  # the same key as a KServe request parameter lands on the same version
        config = yaml.safe_load((repo / "split" / "config.yaml").read_text())
        (repo / "split" / "config.yaml").write_text(yaml.safe_dump({**config, "traffic_split": {1: 80, 2: 20}}))
        try:
            assert client.post("/v2/repository/models/split/load").status_code == 200
            after = {k: infer(client, "split", 1.0, k)["model_version"] for k in keys}
        finally:
            (repo / "split" / "config.yaml").write_text(yaml.safe_dump(config))
            client.post("/v2/repository/models/split/load")
    moved = [k for k in keys if before[k] != after[k]]
    assert all(before[k] == "1" and after[k] == "2" for k in moved)  # no key left the arm that grew
    # the arm doubles: 10% of the keys must move (60 of 600, sigma ~7.3); rendezvous hashing moves just those
    assert 30 < len(moved) < 90, len(moved)
    assert 0.05 < sum(v == "2" for v in before.values()) / len(keys) < 0.15


def test_a_sticky_key_counts_by_its_first_256_characters(server) -> None:
    """A client-sized key is bounded: it is hashed on the event loop. Keys that differ only past character 256 land
    together; a non-string parameter is no key (a random draw), never an error."""
    with httpx.Client(base_url=server.url) as client:
        for i in range(30):
            head = f"user-{i}-".ljust(256, "x")
            assert infer(client, "split", 1.0, head + "a" * 3000)["model_version"] == \
                infer(client, "split", 1.0, head + "b")["model_version"]
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [1.0]}],
                "parameters": {"X-User-Id": {"nested": [1, 2]}}}
        assert client.post("/v2/models/split/infer", json=body).status_code == 200


def test_an_identical_shadow_agrees_and_the_caller_sees_only_the_primary(server) -> None:
    before = shadow_status(server, "shadowed")["counts"]["compared"]
    with httpx.Client(base_url=server.url) as client:
        answers = [infer(client, "shadowed", float(i)) for i in range(40)]
    assert {a["model_version"] for a in answers} == {"1"}
    assert [a["outputs"][0]["data"] for a in answers] == [[2.0 * i] for i in range(40)]
    status = shadow_status(server, "shadowed", before + 40)
    assert status["version"] == 2 and status["fraction"] == 1.0 and status["ready"] is True
    assert status["counts"]["compared"] == before + 40 and status["counts"]["mismatches"] == 0
    sample = status["samples"][0]
    assert sample["outcome"] == "match" and sample["primary_version"] == 1 and sample["shadow_version"] == 2
    assert sample["outputs"] == [{"name": "y", "mismatch": False, "max_abs": 0.0, "max_rel": 0.0}]
    metrics = httpx.get(server.url + "/metrics").text
    assert f'ladle_shadow_requests_total{{model="shadowed",outcome="compared",version="2"}} {before + 40}.0' in metrics
    assert 'ladle_shadow_tensor_difference_bucket{le="0.0",measure="max_abs",model="shadowed",version="2"}' in metrics


def test_a_shadow_that_differs_is_caught_with_its_figures(server, repo) -> None:
    config = yaml.safe_load((repo / "shadowed" / "config.yaml").read_text())
    (repo / "shadowed" / "config.yaml").write_text(yaml.safe_dump({**config, "shadow": {"version": 3, "fraction": 1}}))
    try:
        with httpx.Client(base_url=server.url) as client:
            assert client.post("/v2/repository/models/shadowed/load").status_code == 200
            before = shadow_status(server, "shadowed")
            answers = [infer(client, "shadowed", 1.0 + i) for i in range(20)]
    finally:
        (repo / "shadowed" / "config.yaml").write_text(yaml.safe_dump(config))
        httpx.post(server.url + "/v2/repository/models/shadowed/load")
    assert [a["outputs"][0]["data"] for a in answers] == [[2.0 * (1 + i)] for i in range(20)]  # v1 answers, not v3
    status = shadow_status(server, "shadowed", before["counts"]["compared"] + 20)
    assert status["counts"]["mismatches"] - before["counts"]["mismatches"] == 20
    newest = status["samples"][0]
    assert newest["outcome"] == "mismatch" and newest["shadow_version"] == 3
    [y] = newest["outputs"]
    assert y["mismatch"] is True and y["max_abs"] == pytest.approx(20.0) and y["max_rel"] == pytest.approx(0.5)
    metrics = httpx.get(server.url + "/metrics").text
    assert 'ladle_shadow_mismatches_total{model="shadowed",version="3"} 20.0' in metrics


def test_a_failing_shadow_never_reaches_the_caller(server) -> None:
    with httpx.Client(base_url=server.url) as client:
        answers = [infer(client, "broken", 3.0) for _ in range(10)]
        bad = client.post("/v2/models/broken/infer", json={"inputs": [{"name": "nope", "datatype": "FP32",
                                                                         "shape": [1, 1], "data": [1]}]})
    assert {a["model_version"] for a in answers} == {"1"}  # no split: the shadow candidate takes no traffic
    assert all(a["outputs"][0]["data"] == [6.0] for a in answers)
    assert bad.status_code == 400 and "error" in bad.json()  # the primary's own error, unchanged
    status = shadow_status(server, "broken", 10)
    assert status["counts"]["failed"] == 10 and status["counts"]["compared"] == 0  # the bad request: no copy
    assert status["samples"][0]["outcome"] == "failed" and "broken" in status["samples"][0]["error"]


def test_shadow_is_shed_first_under_load(server) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as client, ThreadPoolExecutor(16) as pool:
        started = time.monotonic()
        answers = list(pool.map(lambda i: infer(client, "slow", float(i)), range(64)))
        elapsed = time.monotonic() - started
    assert [a["outputs"][0]["data"] for a in answers] == [[2.0 * i] for i in range(64)]
    # the primary never waited for its 1 s shadow: had each request waited for one copy, 64 requests on 16 threads
    # would take at least 4 s
    assert elapsed < 3.0, elapsed
    status = shadow_status(server, "slow", 1)
    counts = status["counts"]
    assert counts["dropped"] > 0 and counts["compared"] + counts["dropped"] == 64
    assert counts["compared"] <= 16  # never more than max_in_flight=2 running; most were shed


def test_shadow_status_errors(server) -> None:
    r = httpx.get(server.url + "/v2/models/split/shadow")
    assert r.status_code == 404 and "shadow:" in r.json()["error"]
    r = httpx.get(server.url + "/v2/models/nope/shadow")
    assert r.status_code == 404 and "error" in r.json()


def test_index_reports_the_split(server) -> None:
    rows = [r for r in httpx.post(server.url + "/v2/repository/index").json() if r["name"] == "split"]
    assert rows and all(r["traffic_split"] == {"1": 90.0, "2": 10.0} and r["split_source"] == "config" for r in rows)
