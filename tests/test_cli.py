"""The command line: help for every option, and the server's log formats."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx

from tests.repos import write_probe
from tests.server import LadleServer


def ladle(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "ladle", *args], capture_output=True, text=True, check=True).stdout


def test_help_explains_every_option() -> None:
    assert "serve" in ladle("--help")
    text = ladle("serve", "--help")
    for flag in ("REPOSITORY", "--host", "--port", "--log-level", "--log-format", "--max-request-bytes",
                 "--load-model", "--strict-readiness"):
        assert flag in text, flag


def test_missing_repository_is_a_clear_error(tmp_path) -> None:
    result = subprocess.run([sys.executable, "-m", "ladle", "serve", str(tmp_path / "nope")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "is not a directory" in result.stderr


def test_json_logs_with_one_line_per_request_at_debug(tmp_path) -> None:
    write_probe(tmp_path, "probe")
    with LadleServer([tmp_path, "--log-format", "json", "--log-level", "debug"]) as server:
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [3.0]}]}
        assert httpx.post(server.url + "/v2/models/probe/infer", json=body).status_code == 200
        lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    assert lines, "log lines are JSON objects"
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    assert any("loaded model probe version 1" in line["message"] and line["level"] == "info" for line in lines)
    assert any(line["message"].startswith("infer probe:1 rows=1") and line["level"] == "debug" for line in lines)
