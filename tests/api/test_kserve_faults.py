"""Classic-model faults through a real server: a worker killed with SIGKILL fails only its own batch (503 +
Retry-After) and comes back as a new process; a batch past `execution_timeout_ms` fails with 504 (a process
worker is killed and restarted, a thread instance serves again once its thread returns); a full queue's 503
carries Retry-After."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.repos import write_model
from tests.server import LadleServer

# writes "<pid> <value>" when a batch starts (so a test knows which worker holds it), sleeps -x ms for x < 0
FAULT_SOURCE = '''
import os
import time

import numpy as np


class Fault:
    def load(self, ctx):
        self.log = ctx.parameters["log"]

    def predict(self, batch):
        x = batch["x"]
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()} {float(x[0, 0])}\\n")
        if float(x.min()) < 0:
            time.sleep(-float(x.min()) / 1000.0)
        return {"y": x * 2, "pid": np.full((x.shape[0], 1), os.getpid(), dtype=np.int64)}
'''


def write_fault(repo: Path, name: str, **config) -> Path:
    log = repo / f"{name}.log"
    base = {
        "backend": "python",
        "max_batch_size": 1,
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}],
        "outputs": [
            {"name": "y", "datatype": "FP32", "shape": [1]},
            {"name": "pid", "datatype": "INT64", "shape": [1]},
        ],
        "dynamic_batching": {"max_queue_delay_ms": 0},
        "parameters": {"log": str(log)},
        **config,
    }
    write_model(repo, name, base, {1: {"model.py": FAULT_SOURCE}})
    return log


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("faults")
    logs = {
        "crashy": write_fault(repo, "crashy", instance_kind="process", instance_count=2),
        "hung": write_fault(repo, "hung", instance_kind="process", execution_timeout_ms=500),
        "stuck": write_fault(repo, "stuck", inline_max_us=0, execution_timeout_ms=300),
        "tiny": write_fault(repo, "tiny", inline_max_us=0, dynamic_batching={"max_queue_size": 1}),
    }
    with LadleServer([repo]) as s:
        s.logs = logs
        yield s


def body(x: float) -> dict:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [x]}]}


def outputs(response: httpx.Response) -> dict[str, list]:
    return {o["name"]: o["data"] for o in response.json()["outputs"]}


async def worker_running(log: Path, value: float, timeout_s: float = 30.0) -> int:
    """The pid of the worker that started the batch with `value` (from the model's own log)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines() if log.exists() else []:
            pid, seen = line.split()
            if float(seen) == value:
                return int(pid)
        await asyncio.sleep(0.02)
    raise TimeoutError(f"no batch with {value} started")


def test_a_killed_worker_fails_only_its_batch_with_503_and_is_restarted(server) -> None:
    async def main() -> tuple:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            def infer(x: float):
                return asyncio.ensure_future(client.post("/v2/models/crashy/infer", json=body(x)))

            victim = infer(-30000.0)  # would hold its worker for 30 s
            killed = await worker_running(server.logs["crashy"], -30000.0)
            during = [infer(float(i)) for i in range(20)]  # served by the other instance meanwhile
            await asyncio.sleep(0.1)
            os.kill(killed, signal.SIGKILL)
            dead = await victim
            after = [infer(float(i)) for i in range(20, 40)]  # wait in the queue or run on the other instance
            ok = await asyncio.gather(*during, *after)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # both instances busy at once: the restarted one answers too
                pair = await asyncio.gather(infer(-300.0), infer(-300.0))
                pids = {outputs(r)["pid"][0] for r in pair if r.status_code == 200}
                if len(pids) == 2:
                    return killed, dead, ok, pids
            raise AssertionError("the killed worker was not replaced within 60 s")

    killed, dead, ok, pids = asyncio.run(main())
    assert dead.status_code == 503, dead.text
    assert "died" in dead.json()["error"] and "restarted" in dead.json()["error"]
    assert dead.headers["retry-after"] == "1"
    assert [r.status_code for r in ok] == [200] * 40, "only the killed worker's own batch failed"
    assert [outputs(r)["y"] for r in ok] == [[2.0 * i] for i in range(40)]
    assert killed not in pids, "a new worker process serves in its place"
    assert httpx.get(server.url + "/v2/health/ready").status_code == 200


def test_a_hung_process_worker_is_cut_off_with_504_and_replaced(server) -> None:
    started = time.monotonic()
    hung = httpx.post(server.url + "/v2/models/hung/infer", json=body(-20000.0), timeout=60)
    elapsed = time.monotonic() - started
    assert hung.status_code == 504, hung.text
    assert "execution_timeout_ms=500" in hung.json()["error"]
    assert 0.45 < elapsed < 5.0, elapsed
    old_pid = asyncio.run(worker_running(server.logs["hung"], -20000.0))
    after = httpx.post(server.url + "/v2/models/hung/infer", json=body(3.0), timeout=60)  # waits for the restart
    assert after.status_code == 200, after.text
    assert outputs(after)["y"] == [6.0] and outputs(after)["pid"][0] != old_pid


def test_a_stuck_thread_instance_gets_504_then_503_until_its_thread_returns(server) -> None:
    url = server.url + "/v2/models/stuck/infer"
    started = time.monotonic()
    stuck = httpx.post(url, json=body(-1500.0), timeout=60)
    assert stuck.status_code == 504, stuck.text
    assert time.monotonic() - started < 1.2
    refused = httpx.post(url, json=body(1.0), timeout=60)  # its only instance is still stuck: no waiting
    assert refused.status_code == 503 and "no instance can run" in refused.json()["error"]
    assert refused.headers["retry-after"] == "1"
    time.sleep(max(0.0, started + 1.8 - time.monotonic()))  # the thread has returned by now
    back = httpx.post(url, json=body(2.0), timeout=60)
    assert back.status_code == 200 and outputs(back)["y"] == [4.0]


def test_a_full_queue_answers_503_with_retry_after(server) -> None:
    async def main() -> tuple:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            blocker = asyncio.ensure_future(client.post("/v2/models/tiny/infer", json=body(-500.0)))
            await worker_running(server.logs["tiny"], -500.0)
            rest = await asyncio.gather(*(client.post("/v2/models/tiny/infer", json=body(1.0)) for _ in range(4)))
            return await blocker, rest

    blocker, rest = asyncio.run(main())
    assert blocker.status_code == 200
    rejected = [r for r in rest if r.status_code == 503]
    assert len(rejected) >= 3, [r.status_code for r in rest]
    assert all("queue is full" in r.json()["error"] and r.headers["retry-after"] == "1" for r in rejected)
