"""Test harness: a real `ladle serve` subprocess on a free loopback port.

Tests talk to it with real clients (tritonclient, openai, httpx); its log is printed when a
test fails to help debugging.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LadleServer:
    """`with LadleServer(["examples/models"]) as server:` -> server.url, server.port, server.log()."""

    def __init__(self, args: list[str], ready_timeout: float = 120.0, wait_ready: bool = True,
                 env: dict[str, str] | None = None, port: int | None = None) -> None:
        self.args = [str(a) for a in args]
        if "--grpc-port" not in self.args:  # gRPC's default port (8001) would be shared by every test server
            self.args += ["--grpc-port", "0"]
        if "--data-dir" not in self.args:  # batch jobs are stored under --data-dir: never in the checkout
            self._data = tempfile.TemporaryDirectory(prefix="ladle-data-")
            self.args += ["--data-dir", self._data.name]
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ready_timeout = ready_timeout
        self.wait_ready = wait_ready
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        self._log = tempfile.NamedTemporaryFile(prefix="ladle-", suffix=".log", delete=False)  # noqa: SIM115
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> LadleServer:
        cmd = [sys.executable, "-m", "ladle", "serve", *self.args, "--port", str(self.port)]
        self.process = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT)
        try:
            self._wait()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait(self) -> None:
        path = "/v2/health/ready" if self.wait_ready else "/v2/health/live"
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ladle serve exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + path, timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"ladle serve was not {path} within {self.ready_timeout}s:\n{self.log()}")

    def log(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if exc and exc[0] is not None:
            sys.stderr.write(f"--- ladle serve log ---\n{self.log()[-20000:]}\n")
