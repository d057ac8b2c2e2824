"""Gated rollouts end to end: a real `ladle serve`, real HTTP, a python-backend model whose versions fail or slow down
as their `<version>/config.yaml` parameters say. A healthy candidate goes all the way (and its split survives a
reload), a failing or slow one is rolled back by its gate, a restart resumes a rollout at its step, the API refuses
what it should, and `ladle rollout` drives one from the command line."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
import yaml

from tests.repos import write_model
from tests.server import LadleServer, free_port

ADMIN_KEY = "admin-key-rollout-0123456789abcdef"
API_KEY = "api-key-rollout-0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}

#: fails exactly `fail_rate` of its calls (spread evenly, so a gate's figures are predictable) after sleeping
#: `delay_ms`; each request is a batch of its own (no dynamic_batching)
FLAKY_SOURCE = '''
import threading
import time


class Flaky:
    def load(self, ctx):
        self.fail_rate = float(ctx.parameters.get("fail_rate", 0.0))
        self.delay_s = float(ctx.parameters.get("delay_ms", 0.0)) / 1000.0
        self.calls = 0
        self.lock = threading.Lock()

    def predict(self, batch):
        with self.lock:
            before, self.calls = self.calls, self.calls + 1
        if self.delay_s:
            time.sleep(self.delay_s)
        if int(self.calls * self.fail_rate) > int(before * self.fail_rate):
            raise RuntimeError("flaky was asked to fail")
        return {"y": batch["x"] * 2}
'''


def write_flaky(repo, name: str, v2: dict | None = None, versions: tuple[int, ...] = (1, 2)) -> None:
    """Versions 1 and 2 of a flaky model, traffic on version 1 by config; `v2`: version 2's parameters."""
    config = {"backend": "python", "max_batch_size": 8, "version_policy": {"all": True},
              "inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}],
              "outputs": [{"name": "y", "datatype": "FP32", "shape": [1]}], "traffic_split": {1: 100}}
    files = {v: {"model.py": FLAKY_SOURCE} for v in versions}
    if v2:
        files[2]["config.yaml"] = yaml.safe_dump({"parameters": v2})
    write_model(repo, name, config, files)


X = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [1.0]}]}


@contextmanager
def traffic(url: str, model: str, threads: int = 4) -> Iterator[Counter]:
    """Requests to `model` from `threads` clients while the block runs; yields a Counter of (status, version)."""
    seen: Counter = Counter()
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=url, headers=ADMIN, timeout=30) as c:
            while not stop.is_set():
                r = c.post(f"/v2/models/{model}/infer", json=X)
                seen[(r.status_code, r.json().get("model_version") if r.status_code == 200 else None)] += 1

    workers = [threading.Thread(target=client, daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    try:
        yield seen
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=30)


def wait_until_done(url: str, model: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = httpx.get(f"{url}/v2/models/{model}/rollout", headers=ADMIN).json()
        if status["state"] != "running" or time.monotonic() > deadline:
            return status
        time.sleep(0.1)


def index_rows(url: str, model: str) -> list[dict]:
    rows = httpx.post(url + "/v2/repository/index", headers=ADMIN).json()
    return [row for row in rows if row["name"] == model]


def versions_served(url: str, model: str, n: int = 20) -> set[str]:
    with httpx.Client(base_url=url, headers=ADMIN) as c:
        return {c.post(f"/v2/models/{model}/infer", json=X).json()["model_version"] for _ in range(n)}


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[LadleServer]:
    repo = tmp_path_factory.mktemp("rollout-repo")
    write_flaky(repo, "good")
    write_flaky(repo, "flaky", {"fail_rate": 0.5})
    write_flaky(repo, "slow", {"delay_ms": 60})
    write_flaky(repo, "spare")
    write_flaky(repo, "cli")
    write_model(repo, "broken", {"backend": "python", "version_policy": {"all": True}, "max_batch_size": 8,
                                 "inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}],
                                 "outputs": [{"name": "y", "datatype": "FP32", "shape": [1]}]},
                {1: {"model.py": FLAKY_SOURCE}, 2: {"model.py": "raise ImportError('version 2 is broken')\n"}})
    args = [repo, "--admin-key", ADMIN_KEY, "--api-key", API_KEY, "--max-request-bytes", "8192"]
    with LadleServer(args) as s:
        yield s


def test_a_healthy_candidate_goes_all_the_way_and_its_split_outlives_a_reload(server) -> None:
    url = server.url
    assert versions_served(url, "good") == {"1"}
    body = {"to": 2, "steps": [50, 100], "every": 1, "min_requests": 20, "max_error_rate": 0.05, "max_p99_ms": 1000}
    with traffic(url, "good") as seen:
        r = httpx.post(url + "/v2/models/good/rollout", json=body, headers=ADMIN)
        assert r.status_code == 200, r.text
        assert (r.json()["state"], r.json()["step"], r.json()["split"]) == ("running", 1, {"1": 50.0, "2": 50.0})
        status = wait_until_done(url, "good")
    assert status["state"] == "succeeded", status
    assert [(h["step"], h["percent"], h["result"]) for h in status["history"]] == [(1, 50.0, "passed"),
                                                                                   (2, 100.0, "passed")]
    assert all(h["requests"] >= 20 and h["errors"] == 0 for h in status["history"])
    assert status["gates"] == {"max_error_rate": 0.05, "max_p99_ms": 1000.0, "min_requests": 20, "every_s": 1.0}
    assert seen[(200, "1")] > 0 and seen[(200, "2")] > 0 and sum(n for (code, _), n in seen.items() if code != 200) == 0
    rows = index_rows(url, "good")
    assert [r["version"] for r in rows] == ["1", "2"]
    assert all(r["traffic_split"] == {"2": 100.0} and r["split_source"] == "rollout" for r in rows)
    assert httpx.post(url + "/v2/repository/models/good/load", headers=ADMIN).status_code == 200
    assert all(r["traffic_split"] == {"2": 100.0} and r["split_source"] == "rollout" for r in index_rows(url, "good"))
    assert versions_served(url, "good") == {"2"}
    assert "rollout of good to version 2 succeeded" in server.log()


def test_a_failing_candidate_is_rolled_back_by_the_error_rate_gate(server) -> None:
    url = server.url
    body = {"to": "2", "steps": [50, 100], "every": "10m", "min_requests": 20, "max_error_rate": 0.1}
    with traffic(url, "flaky") as seen:
        assert httpx.post(url + "/v2/models/flaky/rollout", json=body, headers=ADMIN).status_code == 200
        status = wait_until_done(url, "flaky")
    assert status["state"] == "rolled_back" and status["failed_gate"] == "max_error_rate", status
    assert re.fullmatch(r"error rate 0\.(49\d|50\d) > max 0\.100 over \d+ requests at step 1/2 \(50%\)",
                        status["reason"]), status["reason"]
    assert status["history"][0]["result"] == "failed" and status["history"][0]["requests"] >= 20
    assert seen[(500, None)] > 0  # the failures the gate saw
    assert status["split"] == {"1": 100.0} and status["split_source"] == "config" and status["percent"] == 0.0
    assert all(r["split_source"] == "config" for r in index_rows(url, "flaky"))
    assert versions_served(url, "flaky") == {"1"}
    assert "rollout of flaky to version 2 rolled back: error rate" in server.log()


def test_a_slow_candidate_is_rolled_back_by_the_p99_gate(server) -> None:
    url = server.url
    body = {"to": 2, "steps": [50, 100], "every": 600, "min_requests": 10, "max_p99_ms": 20}
    with traffic(url, "slow"):
        assert httpx.post(url + "/v2/models/slow/rollout", json=body, headers=ADMIN).status_code == 200
        status = wait_until_done(url, "slow")
    assert status["state"] == "rolled_back" and status["failed_gate"] == "max_p99_ms", status
    assert status["reason"].startswith("p99 ") and "ms > max 20 ms over " in status["reason"]
    assert status["history"][0]["p99_ms"] >= 60
    assert versions_served(url, "slow") == {"1"}


def test_the_api_refuses(server) -> None:
    url, path = server.url, server.url + "/v2/models/spare/rollout"
    ok = {"to": 2, "steps": [10, 100], "every": "10m"}

    def post(model: str, body: dict, headers: dict = ADMIN) -> httpx.Response:
        return httpx.post(f"{url}/v2/models/{model}/rollout", json=body, headers=headers)

    cases = [
        (post("nosuch", ok), 404, "unknown model 'nosuch'"),
        (post("spare", {**ok, "to": 9}), 400, "version 9 of model 'spare' is not ready; ready versions: 1, 2"),
        (post("broken", ok), 400, "version 2 of model 'broken' is not ready; ready versions: 1"),
        (post("spare", {**ok, "steps": [50, 10]}), 400, "steps: must be strictly increasing"),
        (post("spare", {**ok, "steps": "10,100"}), 400, "steps: must be a non-empty list"),
        (post("spare", {**ok, "every": "soon"}), 400, "every: a duration is"),
        (post("spare", {**ok, "max_error_rate": 2}), 400, "max_error_rate: must be a fraction"),
        (post("spare", {**ok, "colour": "red"}), 400, "unknown field(s) colour"),
        (post("spare", {"steps": [100], "every": 1}), 400, "to: required"),
        (post("spare", ok, {}), 401, "needs an API key"),
        (post("spare", ok, {"Authorization": f"Bearer {API_KEY}"}), 403, "admin key"),
        (httpx.delete(path, headers={"Authorization": f"Bearer {API_KEY}"}), 403, "admin key"),
        (httpx.get(path, headers={"Authorization": f"Bearer {API_KEY}"}), 404, "model 'spare' has no rollout"),
        (httpx.post(path, content=b"[1]", headers=ADMIN), 400, "must be a JSON object"),
        (httpx.post(path, content=b" " * 10_000, headers=ADMIN), 413, "over the server's limit"),
    ]
    for response, status, message in cases:
        assert response.status_code == status and list(response.json()) == ["error"], (message, response.text)
        assert message in response.json()["error"], (message, response.text)
    first = post("spare", ok)
    assert first.status_code == 200 and first.json()["split"] == {"1": 90.0, "2": 10.0}
    again = post("spare", {**ok, "to": 1})
    assert again.status_code == 409 and "already running" in again.json()["error"]
    status = httpx.get(path, headers={"Authorization": f"Bearer {API_KEY}"}).json()  # reading needs an API key only
    assert status["state"] == "running" and status["window"]["requests"] == 0
    assert "waiting for requests" in status["reason"] or status["reason"] == "step 1 started"
    aborted = httpx.delete(path, headers=ADMIN).json()
    assert aborted["state"] == "aborted" and aborted["split_source"] == "config"
    forgotten = httpx.delete(path, headers=ADMIN).json()
    assert forgotten["forgotten"] is True
    assert httpx.get(path, headers=ADMIN).status_code == 404


def test_ladle_rollout_on_the_command_line(server) -> None:
    url = server.url
    command = [sys.executable, "-m", "ladle", "rollout", "cli", "--url", url, "--admin-key", ADMIN_KEY]
    with traffic(url, "cli"):
        done = subprocess.run([*command, "--to", "2", "--steps", "50,100", "--every", "1s", "--min-requests", "10",
                               "--max-error-rate", "0.01", "--max-p99-ms", "1000"],
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "ladle rollout: started: step 1/2: 50% to version 2" in done.stderr
    assert "step 2/2: 100% to version 2 — " in done.stderr and "requests, error rate 0.000, p99" in done.stderr
    assert "rollout of cli to version 2 succeeded" in done.stderr and done.stdout == ""
    status = subprocess.run([*command, "--status"], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and '"state": "succeeded"' in status.stdout
    refused = subprocess.run([*command, "--to", "9", "--steps", "100", "--every", "1"], capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 1 and "version 9 of model 'cli' is not ready" in refused.stderr
    assert "(HTTP 400)" in refused.stderr
    usage = subprocess.run([*command, "--to", "2", "--steps", "50,10", "--every", "1"], capture_output=True,
                           text=True, timeout=60)
    assert usage.returncode == 2 and "steps: must be strictly increasing" in usage.stderr
    gone = subprocess.run([sys.executable, "-m", "ladle", "rollout", "cli", "--status", "--url",
                           f"http://127.0.0.1:{free_port()}"], capture_output=True, text=True, timeout=60)
    assert gone.returncode == 2 and "cannot reach the server" in gone.stderr


def test_a_restart_resumes_the_rollout_at_its_step(tmp_path) -> None:
    write_flaky(tmp_path / "repo", "good")
    args = [tmp_path / "repo", "--admin-key", ADMIN_KEY, "--data-dir", tmp_path / "data"]
    path = "/v2/models/good/rollout"
    body = {"to": 2, "steps": [10, 50, 100], "every": 1, "min_requests": 5}
    with LadleServer(args) as first:
        with traffic(first.url, "good"):
            assert httpx.post(first.url + path, json=body, headers=ADMIN).status_code == 200
            deadline = time.monotonic() + 30
            while httpx.get(first.url + path).json()["step"] < 2:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        # no traffic now: step 2 cannot gather its 5 requests, so it stays at step 2 until the restart
        before = httpx.get(first.url + path).json()
        assert (before["state"], before["step"], before["resumed"]) == ("running", 2, False)
    assert (tmp_path / "data" / "rollouts" / "good.json").is_file()
    with LadleServer(args) as second:
        status = httpx.get(second.url + path).json()
        assert (status["state"], status["step"], status["resumed"]) == ("running", 2, True)
        assert status["split"] == {"1": 50.0, "2": 50.0} and status["history"][0]["result"] == "passed"
        assert status["window"]["requests"] == 0  # the step's window started over
        rows = index_rows(second.url, "good")
        assert all(r["split_source"] == "rollout" and r["traffic_split"] == {"1": 50.0, "2": 50.0} for r in rows)
        assert "resumed at step 2/3 (50%)" in second.log()
        aborted = httpx.delete(second.url + path, headers=ADMIN).json()
        assert aborted["state"] == "aborted" and aborted["split"] == {"1": 100.0}
        assert all(r["split_source"] == "config" for r in index_rows(second.url, "good"))
        assert versions_served(second.url, "good") == {"1"}
