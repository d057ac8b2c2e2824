"""`ladle jobs` (src/ladle/jobs/cli.py): the parser, the pure helpers, the handlers against an in-process fake of
the jobs API (httpx.MockTransport), and end to end against a real `ladle serve` — those skip while the server
has no /v2/jobs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from ladle import cli
from ladle.jobs import cli as jobs_cli
from tests.repos import ROOT
from tests.server import LadleServer, free_port

IRIS_ROWS = [[5.1, 3.5, 1.4, 0.2], [6.2, 2.9, 4.3, 1.3], [7.7, 3.0, 6.1, 2.3]]


def parse(*argv: str):
    return cli.build_parser().parse_args(["jobs", *argv])


def iris_line(i: int) -> dict:
    return {"id": f"r{i}", "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
                                       "data": IRIS_ROWS[i % len(IRIS_ROWS)]}]}


def write_jsonl(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


# ---------------------------------------------------------------------------------------------------------------
# 1. the parser and the pure helpers


def test_submit_parses_with_defaults() -> None:
    args = parse("submit", "in.jsonl", "--model", "iris")
    assert (args.file, args.model, args.version, args.endpoint) == (Path("in.jsonl"), "iris", None, None)
    assert (args.completion_window, args.detach, args.progress, args.timeout) == ("24h", False, True, 60.0)
    assert args.handler is not None


def test_submit_flags() -> None:
    args = parse("submit", "in.jsonl", "--endpoint", "/v1/embeddings", "--completion-window", "1h", "--detach",
                 "--no-progress", "--url", "http://h:1", "--api-key", "k", "--timeout", "5")
    assert (args.endpoint, args.completion_window, args.detach, args.progress) == ("/v1/embeddings", "1h", True,
                                                                                    False)
    assert (args.url, args.api_key, args.timeout) == ("http://h:1", "k", 5.0)


@pytest.mark.parametrize("argv", [
    ["submit", "in.jsonl", "--endpoint", "/v1/other"],
    ["submit"],
    ["status"],
    ["results"],
    ["cancel"],
    ["status", "job-1", "--timeout", "0"],
    [],
])
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        parse(*argv)
    assert exc.value.code == 2


def test_status_results_cancel_parse() -> None:
    assert (parse("status", "job-1", "--watch").job_id, parse("status", "job-1", "--watch").watch) == ("job-1", True)
    assert parse("results", "job-1", "-o", "out.jsonl").output == Path("out.jsonl")
    assert parse("results", "job-1").output is None
    assert parse("cancel", "batch_1").job_id == "batch_1"


def test_connection_flags_beat_the_environment() -> None:
    env = {"LADLE_URL": "http://env:9/", "LADLE_API_KEY": "env-key"}
    from_env = jobs_cli.resolve_connection(parse("status", "j"), env)
    assert (from_env.url, from_env.api_key) == ("http://env:9", "env-key")
    flags = jobs_cli.resolve_connection(parse("status", "j", "--url", "http://f:1", "--api-key", "flag-key"), env)
    assert (flags.url, flags.api_key) == ("http://f:1", "flag-key")
    default = jobs_cli.resolve_connection(parse("status", "j"), {})
    assert (default.url, default.api_key) == ("http://127.0.0.1:8000", None)
    assert "flag-key" not in repr(flags)  # never in a traceback or a log line


def test_the_help_never_shows_the_api_key(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("LADLE_API_KEY", "sekrit-key")
    with pytest.raises(SystemExit):
        parse("submit", "--help")
    assert "sekrit-key" not in capsys.readouterr().out


@pytest.mark.parametrize(("body", "status", "expected"), [
    (b'{"error": "model nope is not in the repository"}', 404, "model nope is not in the repository"),
    (b'{"error": {"message": "bad file", "type": "invalid_request_error", "param": null, "code": null}}', 400,
     "bad file"),
    ('{"detail": "x"}', 422, '{"detail": "x"}'),
    (b"<html>Bad Gateway</html>", 502, "<html>Bad Gateway</html>"),
    (b"", 503, "Service Unavailable"),
    (b"", 599, "HTTP 599"),
    (b"x" * 500, 500, "x" * 200 + "..."),
])
def test_error_message_reads_both_shapes(body: bytes | str, status: int, expected: str) -> None:
    reason = "Service Unavailable" if status == 503 else ""
    assert jobs_cli.error_message(body, status, reason) == expected


def job(status: str = "in_progress", total: int = 10, completed: int = 0, failed: int = 0, **extra) -> dict:
    return {"id": "job-1", "object": "job", "kind": "kserve", "status": status,
            "request_counts": {"total": total, "completed": completed, "failed": failed}, "errors": None, **extra}


def test_progress_of_a_job() -> None:
    progress = jobs_cli.Progress.of(job(total=10, completed=6, failed=2))
    assert (progress.done, progress.total, progress.failed, progress.final) == (8, 10, 2, False)
    assert jobs_cli.Progress.of(job("validating", total=0)).total == 0
    assert jobs_cli.Progress.of({"id": "x", "status": "validating"}) == jobs_cli.Progress("validating", 0, 0, 0)
    assert all(jobs_cli.Progress.of(job(s)).final for s in ("completed", "failed", "cancelled", "expired"))
    assert not any(jobs_cli.Progress.of(job(s)).final
                   for s in ("validating", "in_progress", "finalizing", "cancelling"))


def test_exit_status_and_summary() -> None:
    assert jobs_cli.exit_status(job("completed", failed=3)) == 0  # failed lines are in the results
    assert {jobs_cli.exit_status(job(s)) for s in ("failed", "cancelled", "expired")} == {1}
    assert jobs_cli.summary(job("completed", 50, 48, 2), 1.25) == "job-1 completed: 50/50 lines (2 failed) in 1.2 s"


def test_errors_are_described_and_capped() -> None:
    errors = [{"code": "invalid_json", "message": "not JSON", "line": i} for i in range(1, 26)]
    lines = jobs_cli.describe_errors(job("failed", errors=errors))
    assert lines[0] == "line 1: invalid_json: not JSON"
    assert len(lines) == jobs_cli.MAX_ERRORS_SHOWN + 1 and lines[-1] == "... and 5 more"
    nested = job("failed", errors={"object": "list", "data": [{"code": None, "message": "m", "line": None}]})
    assert jobs_cli.describe_errors(nested) == ["m"]
    assert jobs_cli.describe_errors(job("completed")) == []


# ---------------------------------------------------------------------------------------------------------------
# the handlers against an in-process fake of the jobs API


class FakeJobsAPI:
    """The jobs API contract in miniature: each poll of a job completes `step` more lines."""

    def __init__(self, step: int = 20, final: str = "completed") -> None:
        self.step, self.final = step, final
        self.jobs: dict[str, dict] = {}
        self.requests: list[httpx.Request] = []
        self.on_poll: Callable[[int], None] = lambda n: None
        self.polls = 0
        self.transport: RecordingTransport | None = None

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path, method = request.url.path, request.method
        if method == "POST" and path == "/v2/jobs":
            return self._create_kserve(request)
        if method == "POST" and path == "/v1/files":
            body = request.read()
            assert b'name="purpose"' in body and b"batch" in body
            return httpx.Response(200, json={"id": "file-1", "object": "file", "purpose": "batch"})
        if method == "POST" and path == "/v1/batches":
            spec = json.loads(request.read())
            if spec["input_file_id"] != "file-1":
                return httpx.Response(404, json={"error": {"message": "no such file", "type": "not_found_error"}})
            return self._add("batch_1", "openai", 2)
        match = re.fullmatch(r"/v2/jobs/([^/]+)(/results|/cancel)?", path)
        if match is None or match[1] not in self.jobs:
            return httpx.Response(404, json={"error": f"job {match[1] if match else path} not found"})
        return self._on_job(self.jobs[match[1]], method, match[2])

    def _create_kserve(self, request: httpx.Request) -> httpx.Response:
        assert request.headers["content-type"] == "application/jsonl"
        if request.url.params["model"] != "iris":
            return httpx.Response(404, json={"error": f"model {request.url.params['model']} not found"})
        lines = request.read().splitlines()
        assert int(request.headers["content-length"]) == sum(len(line) + 1 for line in lines)
        return self._add("job-1", "kserve", len(lines))

    def _add(self, job_id: str, kind: str, total: int) -> httpx.Response:
        self.jobs[job_id] = job("validating", total=total, completed=0, id=job_id, kind=kind)
        return httpx.Response(200, json=self.jobs[job_id])

    def _on_job(self, record: dict, method: str, action: str | None) -> httpx.Response:
        if action == "/results":
            lines = [json.dumps({"line": i + 1, "status_code": 200}).encode() + b"\n"
                     for i in range(record["request_counts"]["total"])]
            return httpx.Response(200, content=iter(lines), headers={"content-type": "application/jsonl"})
        if action == "/cancel":
            if record["status"] in ("completed", "failed", "cancelled", "expired"):
                return httpx.Response(409, json={"error": f"job {record['id']} is already {record['status']}"})
            record["status"] = "cancelling"
            return httpx.Response(200, json=record)
        self.polls += 1
        self.on_poll(self.polls)
        self._advance(record)
        return httpx.Response(200, json=record)

    def _advance(self, record: dict) -> None:
        counts = record["request_counts"]
        if record["status"] in ("validating", "in_progress"):
            counts["completed"] = min(counts["total"], counts["completed"] + self.step)
            record["status"] = "in_progress" if counts["completed"] < counts["total"] else self.final
        if record["status"] == "failed":
            record["errors"] = [{"code": "model_error", "message": "the model broke", "line": 3}]


class RecordingTransport(httpx.BaseTransport):
    """httpx.MockTransport, but noting how each body arrived before reading it (MockTransport reads it first)."""

    def __init__(self, handler: Callable[[httpx.Request], httpx.Response]) -> None:
        self.handler = handler
        self.streamed: list[bool] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        # a file object or generator arrives as an iterator stream, bytes as one ByteStream
        self.streamed.append(not isinstance(request.stream, httpx.ByteStream))
        request.read()
        return self.handler(request)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeJobsAPI:
    api = FakeJobsAPI()
    transport = RecordingTransport(api)
    real = jobs_cli.make_client

    def client(conn: jobs_cli.Connection) -> httpx.Client:
        made = real(conn)  # the real headers, base URL and timeout; only the transport is fake
        return httpx.Client(base_url=made.base_url, headers=made.headers, timeout=made.timeout, transport=transport)

    monkeypatch.setattr(jobs_cli, "make_client", client)
    api.transport = transport
    monkeypatch.setattr(jobs_cli, "POLL_INTERVAL_S", 0.0)
    monkeypatch.delenv("LADLE_URL", raising=False)
    monkeypatch.delenv("LADLE_API_KEY", raising=False)
    return api


def run(*argv: str) -> int:
    return cli.main(["jobs", *argv])


def test_submit_streams_the_file_and_follows_to_completed(fake: FakeJobsAPI, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", [iris_line(i) for i in range(50)])
    assert run("submit", str(data), "--model", "iris", "--version", "2", "--api-key", "k1") == 0
    out, err = capsys.readouterr()
    assert out == "job-1\n"
    assert "50/50" in err and "job-1 completed: 50/50 lines (0 failed)" in err
    assert "k1" not in out + err
    create = fake.requests[0]
    assert fake.transport.streamed[0]  # sent from the open file in chunks, never read whole
    assert dict(create.url.params) == {"model": "iris", "version": "2", "completion_window": "24h"}
    assert {r.headers["authorization"] for r in fake.requests} == {"Bearer k1"}
    assert fake.polls == 3  # 20 + 20 + 10 lines


def test_submit_detach_prints_the_id_only(fake: FakeJobsAPI, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", [iris_line(0)])
    assert run("submit", str(data), "--model", "iris", "--detach") == 0
    assert capsys.readouterr().out == "job-1\n"
    assert fake.polls == 0


def test_submit_openai_uploads_then_creates_the_batch(fake: FakeJobsAPI, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", [{"custom_id": "a", "method": "POST", "url": "/v1/embeddings",
                                                "body": {"model": "minilm", "input": "hi"}}] * 2)
    assert run("submit", str(data), "--endpoint", "/v1/embeddings", "--no-progress") == 0
    out, err = capsys.readouterr()
    assert out == "batch_1\n" and "batch_1 completed" in err and "line/s" not in err
    assert [r.url.path for r in fake.requests[:2]] == ["/v1/files", "/v1/batches"]
    assert json.loads(fake.requests[1].content) == {"input_file_id": "file-1", "endpoint": "/v1/embeddings",
                                                    "completion_window": "24h"}


def test_a_failed_job_exits_1_with_its_errors(fake: FakeJobsAPI, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    fake.final = "failed"
    data = write_jsonl(tmp_path / "in.jsonl", [iris_line(0)] * 5)
    assert run("submit", str(data), "--model", "iris", "--no-progress") == 1
    err = capsys.readouterr().err
    assert "job-1 failed" in err and "line 3: model_error: the model broke" in err


def test_ctrl_c_while_following_leaves_the_job_running(fake: FakeJobsAPI, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    fake.step = 1

    def interrupt(n: int) -> None:
        if n == 2:
            raise KeyboardInterrupt

    fake.on_poll = interrupt
    data = write_jsonl(tmp_path / "in.jsonl", [iris_line(0)] * 5)
    assert run("submit", str(data), "--model", "iris") == 130
    out, err = capsys.readouterr()
    assert out == "job-1\n"
    assert "keeps running on the server" in err and "ladle jobs cancel job-1" in err


def test_following_rides_out_a_short_outage(fake: FakeJobsAPI, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    def drop(n: int) -> None:
        if n == 2:
            raise httpx.ConnectError("connection refused")

    fake.on_poll = drop
    data = write_jsonl(tmp_path / "in.jsonl", [iris_line(0)] * 50)
    assert run("submit", str(data), "--model", "iris", "--no-progress") == 0
    assert "job-1 completed" in capsys.readouterr().err


def test_submit_errors(fake: FakeJobsAPI, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert run("submit", str(tmp_path / "missing.jsonl"), "--model", "iris") == 2
    assert "no such file" in capsys.readouterr().err
    assert run("submit", str(tmp_path), "--model", "iris") == 2
    assert "cannot read" in capsys.readouterr().err
    data = write_jsonl(tmp_path / "in.jsonl", [iris_line(0)])
    assert run("submit", str(data)) == 2
    assert "--model is required" in capsys.readouterr().err
    assert run("submit", str(data), "--model", "nope") == 1
    out, err = capsys.readouterr()
    assert out == "" and "ladle jobs: model nope not found (HTTP 404)" in err
    assert fake.requests[-1].url.path == "/v2/jobs"  # the missing files never reached the server


def test_status_watch_results_and_cancel(fake: FakeJobsAPI, tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    fake.step = 2
    data = write_jsonl(tmp_path / "in.jsonl", [iris_line(0)] * 4)
    assert run("submit", str(data), "--model", "iris", "--detach") == 0
    capsys.readouterr()
    assert run("cancel", "job-1") == 0
    assert json.loads(capsys.readouterr().out)["status"] == "cancelling"
    fake.jobs["job-1"]["status"] = "in_progress"
    assert run("status", "job-1") == 0
    assert json.loads(capsys.readouterr().out)["status"] == "in_progress"
    assert run("status", "job-1", "--watch", "--no-progress") == 0
    assert json.loads(capsys.readouterr().out)["status"] == "completed"
    assert run("cancel", "job-1") == 1
    assert "job job-1 is already completed (HTTP 409)" in capsys.readouterr().err
    assert run("status", "job-404") == 1
    assert "job job-404 not found (HTTP 404)" in capsys.readouterr().err


def test_results_stream_to_stdout_or_a_file(fake: FakeJobsAPI, tmp_path: Path,
                                            capsysbinary: pytest.CaptureFixture) -> None:
    fake.jobs["job-1"] = job("completed", total=3, completed=3)
    assert run("results", "job-1") == 0
    assert [json.loads(line)["line"] for line in capsysbinary.readouterr().out.splitlines()] == [1, 2, 3]
    out = tmp_path / "out.jsonl"
    assert run("results", "job-1", "-o", str(out)) == 0
    assert len(out.read_bytes().splitlines()) == 3
    assert run("results", "job-9", "-o", str(tmp_path / "never.jsonl")) == 1
    assert not (tmp_path / "never.jsonl").exists()  # an error leaves no empty file behind


def test_an_unreachable_server_exits_2(tmp_path: Path) -> None:
    """The real client, a real socket, nothing listening: as a subprocess, like a user runs it."""
    url = f"http://127.0.0.1:{free_port()}"
    data = write_jsonl(tmp_path / "in.jsonl", [iris_line(0)])
    for argv in (["submit", str(data), "--model", "iris"], ["status", "job-1"], ["results", "job-1"]):
        done = ladle_jobs(*argv, "--url", url)
        assert done.returncode == 2, done.stderr
        assert f"ladle jobs: cannot reach the server at {url}: " in done.stderr
        assert done.stdout == ""


def test_cannot_reach_names_the_url_from_the_environment() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    done = ladle_jobs("status", "job-1", env={"LADLE_URL": url})
    assert done.returncode == 2 and f"cannot reach the server at {url}" in done.stderr


def test_without_httpx_it_says_what_to_install(tmp_path: Path) -> None:
    from tests.test_packaging import absent_env

    done = ladle_jobs("status", "job-1", env=absent_env(tmp_path, ("httpx",)))
    assert done.returncode == 2 and "ladle jobs: needs httpx and tqdm: pip install 'ladle[client]'" in done.stderr


def ladle_jobs(*argv: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ladle", "jobs", *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})


# ---------------------------------------------------------------------------------------------------------------
# 2. end to end against a real server (skipped while it has no jobs API)


API_KEY = "jobs-cli-test-key"


def has_jobs_api(url: str) -> bool:
    """The server answers an unknown job id with its own 404 (the router's "no route" 404 has the same shape)."""
    response = httpx.get(f"{url}/v2/jobs/nonexistent", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)
    try:
        error = response.json().get("error")
    except ValueError:
        return False
    return response.status_code == 404 and bool(error) and "no route" not in str(error)


@pytest.fixture(scope="module")
def jobs_server(demo_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LadleServer]:
    """iris version 2 (ONNX: starts in about a second) behind an API key, so every e2e call also proves the key
    is sent."""
    root = tmp_path_factory.mktemp("jobs-e2e")
    (root / "repo" / "iris").mkdir(parents=True)
    shutil.copy(demo_repository / "iris" / "config.yaml", root / "repo" / "iris")
    shutil.copytree(demo_repository / "iris" / "2", root / "repo" / "iris" / "2")
    args = [root / "repo", "--data-dir", root / "data", "--api-key", API_KEY]
    try:
        server = LadleServer(args, ready_timeout=60).__enter__()
    except RuntimeError as exc:
        if "unrecognized arguments" in str(exc):
            pytest.skip("server has no --data-dir (no /v2/jobs) yet")
        raise
    try:
        if not has_jobs_api(server.url):
            pytest.skip("server has no /v2/jobs yet")
        yield server
    finally:
        server.__exit__(None, None, None)


def e2e(server: LadleServer, *argv: str, key: str | None = API_KEY) -> subprocess.CompletedProcess:
    """`ladle jobs ...` against the e2e server, its URL and key from the environment as a user would set them."""
    env = {"LADLE_URL": server.url, "LADLE_API_KEY": key or ""}
    done = ladle_jobs(*argv, env=env)
    assert API_KEY not in done.stdout + done.stderr  # the key is sent, never printed
    return done


@pytest.fixture(scope="module")
def finished_job(jobs_server: LadleServer, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(job id, stderr) of 50 iris requests submitted with the real CLI and followed to the end."""
    data = write_jsonl(tmp_path_factory.mktemp("in") / "iris.jsonl", [iris_line(i) for i in range(50)])
    done = e2e(jobs_server, "submit", str(data), "--model", "iris")
    assert done.returncode == 0, done.stderr + jobs_server.log()[-3000:]
    job_id = done.stdout.splitlines()[0]
    assert job_id.startswith("job-") and done.stdout.strip() == job_id
    return job_id, done.stderr


def test_e2e_submit_follows_with_a_progress_bar(finished_job: tuple[str, str]) -> None:
    job_id, err = finished_job
    assert "50/50" in err and "line" in err  # tqdm's bar, written even without a terminal
    assert f"{job_id} completed: 50/50 lines (0 failed)" in err


def test_e2e_results_are_50_lines_in_order(jobs_server: LadleServer, finished_job: tuple[str, str],
                                           tmp_path: Path) -> None:
    job_id, _ = finished_job
    done = e2e(jobs_server, "results", job_id)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(lines) == 50
    assert [line["id"] for line in lines] == [f"r{i}" for i in range(50)]  # in line order
    first = lines[0]["line"]  # the contract does not say whether lines count from 0 or 1
    assert first in (0, 1) and [line["line"] for line in lines] == list(range(first, first + 50))
    assert {line["status_code"] for line in lines} == {200}
    out = tmp_path / "out.jsonl"
    assert e2e(jobs_server, "results", job_id, "-o", str(out)).returncode == 0
    assert out.read_text() == done.stdout


def test_e2e_status_prints_the_job(jobs_server: LadleServer, finished_job: tuple[str, str]) -> None:
    job_id, _ = finished_job
    done = e2e(jobs_server, "status", job_id)
    assert done.returncode == 0, done.stderr
    job_object = json.loads(done.stdout)
    assert (job_object["id"], job_object["status"], job_object["kind"]) == (job_id, "completed", "kserve")
    assert job_object["request_counts"] == {"total": 50, "completed": 50, "failed": 0}
    watched = e2e(jobs_server, "status", job_id, "--watch")
    assert watched.returncode == 0 and json.loads(watched.stdout)["status"] == "completed"


def test_e2e_cancel_a_finished_job(jobs_server: LadleServer, finished_job: tuple[str, str]) -> None:
    job_id, _ = finished_job
    done = e2e(jobs_server, "cancel", job_id)
    if done.returncode == 0:  # the server answers with the (unchanged, final) job
        assert json.loads(done.stdout)["status"] == "completed"
    else:  # or refuses: its message and HTTP status, nothing on stdout
        assert done.returncode == 1 and done.stdout == ""
        assert re.search(r"^ladle jobs: .+ \(HTTP 4\d\d\)$", done.stderr.strip(), re.M), done.stderr


def test_e2e_unknown_model_and_unknown_job(jobs_server: LadleServer, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", [iris_line(0)])
    done = e2e(jobs_server, "submit", str(data), "--model", "nope")
    assert done.returncode == 1 and done.stdout == ""
    assert re.search(r"^ladle jobs: .*nope.* \(HTTP 4\d\d\)$", done.stderr.strip(), re.M), done.stderr
    missing = e2e(jobs_server, "status", "job-nonexistent")
    assert missing.returncode == 1 and "(HTTP 404)" in missing.stderr



def test_e2e_without_the_api_key_the_server_says_so(jobs_server: LadleServer, finished_job: tuple[str, str]) -> None:
    job_id, _ = finished_job
    refused = e2e(jobs_server, "status", job_id, key=None)
    assert refused.returncode == 1 and refused.stdout == "" and "(HTTP 401)" in refused.stderr
    by_flag = e2e(jobs_server, "status", job_id, "--api-key", API_KEY, key=None)
    assert by_flag.returncode == 0 and json.loads(by_flag.stdout)["id"] == job_id
