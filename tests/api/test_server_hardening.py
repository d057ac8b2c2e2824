"""Server-level hardening against a real `ladle serve`: model names never leave the repository (raw HTTP, no client
normalising the path), internal failures reach clients only as a request id, overload beyond
--max-concurrent-requests is a 503 at once while health answers, a dead LLM engine makes the server not ready,
and SIGTERM drains in-flight requests (a stream included) before a clean exit."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import statistics
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.fixtures.checkpoints import save_tiny_checkpoint
from tests.repos import write_model, write_probe
from tests.server import LadleServer, free_port

# Loaded into the server process only (PYTHONPATH), like tests/llm/test_engine_recovery.py's runner fault:
# a prompt starting with token 7 makes an engine step raise (its first token only: a generated 7 from this random
# model must not), prompt token 8 crashes the engine loop itself, and
# LADLE_TEST_STEP_SLEEP slows every step so a stream lasts long enough to be caught mid-flight.
FAULTS = '''
import os, time
from ladle.llm import engine, runner

_execute, _add = runner.ModelRunner.execute, engine.EngineCore.add_request
_sleep = float(os.environ.get("LADLE_TEST_STEP_SLEEP", "0"))

def execute(self, sched):
    if any(seq.start_pos == 0 and seq.token_ids[0] == 7 for seq in sched.seqs):
        raise RuntimeError("injected step fault in /secret/internal/path.py")
    time.sleep(_sleep)
    return _execute(self, sched)

def add_request(self, request, *args, **kwargs):
    if 8 in request.prompt_token_ids:
        raise RuntimeError("injected engine crash")
    return _add(self, request, *args, **kwargs)

runner.ModelRunner.execute, engine.EngineCore.add_request = execute, add_request
'''
# what a model in a parent directory of the repository would do if the registry ever loaded it
MARKER_MODEL = '''
from pathlib import Path

class Escaped:
    def load(self):
        (Path(__file__).parent / "ESCAPED").write_text("ran")

    def predict(self, batch):
        return batch
'''
PYTHON_CONFIG = {"backend": "python", "max_batch_size": 0, "inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}],
                 "outputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]}


def x(v: float) -> dict:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [v]}]}


def raw(server: LadleServer, method: str, target: str, headers: str = "") -> tuple[int, str]:
    """One request with the target exactly as given (httpx would resolve `..` before sending)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(f"{method} {target} HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n{headers}"
                     "Connection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode(errors="replace")


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> Path:
    """A directory holding the repository, itself shaped like a model (the defect: `..` loaded it), plus a
    model directory elsewhere that a symlink in the repository points to."""
    base = tmp_path_factory.mktemp("hardening")
    write_model(base, ".", PYTHON_CONFIG, {1: {"model.py": MARKER_MODEL}})
    write_model(base, "elsewhere", PYTHON_CONFIG, {1: {"model.py": MARKER_MODEL}})
    repo = base / "repo"
    write_probe(repo, "probe", instance_count=2)
    write_model(repo, "bad name", PYTHON_CONFIG, {1: {"model.py": MARKER_MODEL}})
    (repo / "escape").symlink_to(base / "elsewhere", target_is_directory=True)
    return base


@pytest.fixture(scope="module")
def server(outside):
    health_port = free_port()
    with LadleServer([outside / "repo", "--max-concurrent-requests", "2", "--allow-admin-without-key",
                      "--health-port", str(health_port)]) as s:
        s.health_url = f"http://127.0.0.1:{health_port}"
        yield s


@pytest.mark.parametrize(
    ("target", "statuses"),
    [
        ("/v2/repository/models/../load", {400}),
        ("/v2/repository/models/%2e%2e/load", {400}),
        ("/v2/repository/models/%2E%2E/unload", {400}),
        ("/v2/repository/models/..%2f..%2fetc/load", {404}),  # decodes to a path no route matches
        ("/v2/repository/models/%2fetc%2fpasswd/load", {404}),
        ("/v2/repository/models/a%00b/load", {400}),
        ("/v2/repository/models/.hidden/load", {400}),
        ("/v2/repository/models/escape/load", {404}),  # a symlink out of the repository
        ("/v2/repository/models/bad%20name/load", {400}),
        ("/v2/models/%2e%2e/infer", {400}),
    ],
)
def test_model_names_never_leave_the_repository(server, outside, target: str, statuses: set[int]) -> None:
    status, body = raw(server, "POST", target)
    assert status in statuses, body
    assert str(outside) not in body and "config.yaml" not in body, "an error must not print filesystem paths"
    if status == 400:
        assert "letters, digits" in json.loads(body)["error"], "a 400 names the rule"
    assert not (outside / "1" / "ESCAPED").exists() and not (outside / "elsewhere" / "1" / "ESCAPED").exists()


def test_unknown_model_says_so_without_a_path(server, outside) -> None:
    status, body = raw(server, "POST", "/v2/repository/models/nosuch/load")
    assert status == 404 and json.loads(body)["error"] == "no model 'nosuch' in the repository"
    index = {row["name"] for row in httpx.post(server.url + "/v2/repository/index").json()}
    assert index == {"probe"}, "an invalid name and an escaping symlink are not listed"
    assert "resolves to" in server.log() and "not a valid model name" in server.log()


def test_versions_are_ascii_positive_integers(server) -> None:
    # Arabic-Indic one: str.isdigit() accepted it and int() read it as version 1
    for version in ("%D9%A1", "0", "-1", "1e3", "01x"):
        r = httpx.post(f"{server.url}/v2/models/probe/versions/{version}/infer", json=x(1.0))
        assert r.status_code == 400 and "positive integer" in r.json()["error"], version
    assert httpx.post(f"{server.url}/v2/models/probe/versions/1/infer", json=x(1.0)).status_code == 200


def test_a_model_failure_is_a_generic_500_with_a_request_id(server) -> None:
    r = httpx.post(server.url + "/v2/models/probe/infer", json=x(666.0))
    rid = r.headers["X-Request-ID"]
    assert r.status_code == 500 and r.json() == {"error": f"internal error; request id {rid}"}
    assert "probe was asked to fail" not in r.text
    assert any(rid in line and "probe was asked to fail" in line for line in server.log().splitlines())
    r = httpx.post(server.url + "/v2/models/probe/infer", json=x(666.0), headers={"X-Request-ID": "trace-42.a"})
    assert r.headers["X-Request-ID"] == "trace-42.a" and r.json()["error"].endswith("trace-42.a")
    unsafe = "x" * 65
    r = httpx.post(server.url + "/v2/models/probe/infer", json=x(666.0), headers={"X-Request-ID": unsafe})
    assert r.headers["X-Request-ID"] != unsafe and r.headers["X-Request-ID"] in r.json()["error"]


def test_an_oversized_request_head_is_431_not_buffered(server) -> None:
    # httptools keeps a header of any size: a 200 MB one grew the server by 290 MB before this bound
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\nX-Big: ")
        sent = 0
        with contextlib.suppress(OSError):  # the server closes the connection while this is still sending
            for sent in range(64):  # noqa: B007
                sock.sendall(b"a" * (1 << 20))
        assert sent < 63, "the server stopped reading the head long before 64 MiB"
        with contextlib.suppress(ConnectionResetError):  # the reset may overtake the answer
            assert sock.recv(65536).startswith(b"HTTP/1.1 431")
    r = httpx.post(server.url + "/v2/models/probe/infer", json=x(1.0), headers={"X-Fine": "b" * 16384})
    assert r.status_code == 200


def test_overload_is_a_503_at_once_and_health_still_answers(server) -> None:
    slow: list[httpx.Response] = []

    def hold() -> None:  # the probe sleeps 1.5 s for x = -1500
        slow.append(httpx.post(server.url + "/v2/models/probe/infer", json=x(-1500.0), timeout=30))

    threads = [threading.Thread(target=hold) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.4)  # both admitted and running
    with httpx.Client(base_url=server.url, timeout=10) as client:
        started = time.monotonic()
        r = client.post("/v2/models/probe/infer", json=x(1.0))
        assert time.monotonic() - started < 0.5, "refused at once, not queued"
        assert r.status_code == 503 and r.headers["Retry-After"] == "1" and "concurrent" in r.json()["error"]
        r = client.post("/v1/completions", json={"model": "m", "prompt": "hi"})
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
        timings = []
        for path in ("/v2/health/live", "/v2/health/ready", "/health", "/metrics") * 3:
            started = time.monotonic()
            assert client.get(path).status_code == 200, path
            timings.append(time.monotonic() - started)
        assert statistics.median(timings) < 0.05, timings
        assert 'ladle_requests_refused_total{reason="over_concurrency"} 2.0' in client.get("/metrics").text
        for path, status in (("/v2/health/live", 200), ("/v2/health/ready", 200), ("/health", 200), ("/v2", 404)):
            assert httpx.get(server.health_url + path).status_code == status, path  # --health-port, its own thread
        assert len(slow) == 0, "the probes answered while the slow requests still ran"
    for t in threads:
        t.join()
    assert [r.status_code for r in slow] == [200, 200]
    assert httpx.post(server.url + "/v2/models/probe/infer", json=x(2.0)).json()["outputs"][0]["data"] == [4.0]


def test_open_connections_are_capped_and_probes_are_not_refused_below_the_cap(server) -> None:
    # --max-concurrent-requests 2: the cap on open connections is max(4 x 2, 4096)
    idle = []
    try:
        for _ in range(1000):  # idle keep-alive connections far beyond the request cap, far below the connection cap
            idle.append(socket.create_connection(("127.0.0.1", server.port), timeout=30))
        assert httpx.get(server.url + "/v2/health/live").status_code == 200  # uvicorn's limit_concurrency said 503
        for _ in range(3200):
            idle.append(socket.create_connection(("127.0.0.1", server.port), timeout=30))
        status, body = raw(server, "GET", "/v2/health/live")
        assert (status, body) == (503, "too many open connections; retry later")
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 10
    while raw(server, "GET", "/v2/health/live")[0] != 200:  # the server sees the closes as they arrive
        assert time.monotonic() < deadline, "connections closed by their clients still counted"
        time.sleep(0.05)


# -- LLM: internal errors, a dead engine, SIGTERM drain -----------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "llama")


@pytest.fixture(scope="module")
def faults(tmp_path_factory) -> dict[str, str]:
    site = tmp_path_factory.mktemp("faults")
    (site / "sitecustomize.py").write_text(FAULTS)
    inherited = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": f"{site}:{inherited}" if inherited else str(site)}


LLM_ARGS = ["--served-model-name", "tiny", "--dtype", "float32", "--num-kv-blocks", "64", "--max-model-len", "256"]


def test_llm_failures_are_generic_and_a_dead_engine_is_not_ready(checkpoint, faults) -> None:
    with LadleServer(["--model", checkpoint, *LLM_ARGS], env=faults) as server:
        body = {"model": "tiny", "prompt": [7, 20, 21], "max_tokens": 4}
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
        rid = r.headers["X-Request-ID"]
        assert r.status_code == 500 and r.json()["error"]["message"] == f"internal error; request id {rid}"
        assert r.json()["error"]["type"] == "internal_error" and "secret" not in r.text
        assert any(rid in line and "injected step fault" in line for line in server.log().splitlines())
        with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=30) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        message = events[-1]["error"]["message"]
        assert r.status_code == 200 and message.startswith("internal error; request id ") and "secret" not in message
        assert any(message[-32:] in line and "injected step fault" in line for line in server.log().splitlines())
        assert httpx.get(server.url + "/v2/health/ready").status_code == 200, "a failed step leaves it serving"

        httpx.post(server.url + "/v1/completions", json={**body, "prompt": [8, 20]}, timeout=30)
        assert httpx.get(server.url + "/v2/health/ready").status_code == 503
        assert httpx.get(server.url + "/health").status_code == 503
        assert httpx.get(server.url + "/v2/health/live").status_code == 200


def test_sigterm_drains_a_stream_and_a_classic_request_then_exits_0(checkpoint, faults, tmp_path) -> None:
    write_probe(tmp_path, "probe")
    health_port = free_port()
    args = [tmp_path, "--model", checkpoint, *LLM_ARGS, "--drain-timeout", "20", "--health-port", str(health_port)]
    with LadleServer(args, env={**faults, "LADLE_TEST_STEP_SLEEP": "0.025"}) as server:
        first_chunk = threading.Event()
        lines: list[str] = []
        classic: list[httpx.Response] = []

        def stream() -> None:
            body = {"model": "tiny", "prompt": [20, 21, 22], "max_tokens": 40, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}
            with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    lines.append(line)
                    first_chunk.set()

        def slow_classic() -> None:
            classic.append(httpx.post(server.url + "/v2/models/probe/infer", json=x(-1500.0), timeout=60))

        threads = [threading.Thread(target=stream), threading.Thread(target=slow_classic)]
        for t in threads:
            t.start()
        assert first_chunk.wait(30)
        time.sleep(0.2)
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        # the listening socket closes within uvicorn's 0.1 s tick (connection refused); until then readiness says no
        with contextlib.suppress(httpx.TransportError):
            assert httpx.get(server.url + "/v2/health/ready", timeout=2).status_code == 503
        # the health port stays up while draining: not ready, but alive
        health = f"http://127.0.0.1:{health_port}"
        assert httpx.get(health + "/v2/health/ready", timeout=2).status_code == 503
        assert httpx.get(health + "/v2/health/live", timeout=2).status_code == 200
        for t in threads:
            t.join(60)
        assert server.process.wait(30) == 0
        assert time.monotonic() - started < 20
        events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert [line for line in lines if line][-1] == "data: [DONE]"
        assert events[-1]["usage"]["completion_tokens"] == 40
        assert not any("error" in e for e in events)
        assert classic[0].status_code == 200 and classic[0].json()["outputs"][0]["data"] == [-3000.0]
        assert "SIGTERM: draining" in server.log()
