"""Start a server as a subprocess for a benchmark, wait until it is ready, stop it afterwards.

Shared by benchmarks/classic/run.py and benchmarks/llm/run.py; both poll ladle's (or the bare floor's)
`/v2/health/ready`, so the time to ready doubles as the cold-start measurement.
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Spawned:
    process: subprocess.Popen
    url: str
    ready_s: float  # seconds from spawn to the first 200 from /v2/health/ready
    compile_s: float | None = None  # an LLM's background compile, seconds after ready (when waited for)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_ready(port: int) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
    try:
        connection.request("GET", "/v2/health/ready")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


@contextmanager
def spawned_server(
    command: list[str], log: Path, port: int | None = None, timeout_s: float = 180.0, poll_s: float = 0.02
) -> Iterator[Spawned]:
    """Run `command --port PORT` (offline, output appended to `log`) until the block ends."""
    port = port or free_port()
    if "serve" in command and "--grpc-port" not in command and any("ladle" in part for part in command):
        command = [*command, "--grpc-port", "0"]  # gRPC's default port would clash between servers; REST is measured
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with log.open("ab") as sink:
        started = time.perf_counter()
        process = subprocess.Popen([*command, "--port", str(port)], stdout=sink, stderr=subprocess.STDOUT,
                                   env=env, cwd=ROOT)
    try:
        while not is_ready(port):
            if process.poll() is not None or time.perf_counter() - started > timeout_s:
                raise RuntimeError(f"{' '.join(command)} did not become ready; see {log}")
            time.sleep(poll_s)
        yield Spawned(process, f"http://127.0.0.1:{port}", time.perf_counter() - started)
    finally:
        stop(process, 60)


def stop(process: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM, up to `grace_s` to exit, then SIGKILL."""
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def metrics(port: int) -> bytes:
    """GET /metrics ('' when it cannot be reached)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2.0)
    try:
        connection.request("GET", "/metrics")
        return connection.getresponse().read()
    except OSError:
        return b""
    finally:
        connection.close()


def wait_compiled(port: int, model: str, timeout_s: float = 300.0) -> float | None:
    """Seconds until the LLM `model` serves from its compiled decoder (ladle compiles in the background after it is
    ready; steps meanwhile are eager, and the compile takes a core from them), or None after `timeout_s` (a failed
    compile, --enforce-eager, a quantization that stays eager). Benchmarks measure after this, so the compile is
    not in their figures."""
    started = time.monotonic()
    prefix = b'ladle_llm_decoder_compiled{model="' + model.encode() + b'",version="1"} '
    while time.monotonic() - started < timeout_s:
        line = next((ln for ln in metrics(port).splitlines() if ln.startswith(prefix)), None)
        if line is not None and float(line[len(prefix):]) == 1.0:
            return time.monotonic() - started
        time.sleep(0.5)
    return None
