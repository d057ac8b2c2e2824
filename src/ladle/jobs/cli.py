"""`ladle jobs`: the async batch path's command line — submit a JSONL file to a running `ladle serve`, follow the
job with a progress bar, fetch its results, cancel it. It owns the client side of the HTTP contract
(`POST /v2/jobs`, `POST /v1/files` + `POST /v1/batches`, `GET /v2/jobs/{id}[/results]`, `POST .../cancel`) and
the mapping of outcomes to exit statuses.

Invariants: importing this module stays light (argparse and the stdlib; httpx and tqdm load inside the handlers,
because `ladle serve` builds the same parser); files travel in chunks both ways, never read whole into memory;
stdout carries only data (a job id, a job object, result lines) and everything for people goes to stderr; the
API key is sent, never printed. Exit statuses: 0 success, 1 the server said no or the job did not complete,
2 a usage problem (missing file, unreachable server, missing package), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from ladle.client_commands import (
    DEFAULT_URL,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    CommandError,
    reaching,
)
from ladle.jobs.records import COMPLETED, TERMINAL

if TYPE_CHECKING:
    import httpx

OPENAI_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
POLL_INTERVAL_S = 0.5
MAX_ERRORS_SHOWN = 20  # a failed validation can list an error per line; the first ones say what is wrong



JobsError = CommandError  # reported as `ladle jobs: MESSAGE`


@dataclass(frozen=True)
class Connection:
    """Where the server is and how to authenticate; resolved from the flags, then the environment."""

    url: str
    api_key: str | None
    timeout: float

    def __repr__(self) -> str:  # the key must never reach a log line or a traceback
        return f"Connection(url={self.url!r}, api_key={'***' if self.api_key else None}, timeout={self.timeout})"


def resolve_connection(args: argparse.Namespace, environ: Mapping[str, str]) -> Connection:
    url = args.url or environ.get("LADLE_URL") or DEFAULT_URL
    return Connection(url.rstrip("/"), args.api_key or environ.get("LADLE_API_KEY") or None, args.timeout)


# ---------------------------------------------------------------------------------------------------------------
# the parser


def add_jobs_parser(commands: argparse._SubParsersAction) -> None:
    """Add `jobs` and its subcommands to the `ladle` command's subparsers."""
    jobs = commands.add_parser(
        "jobs", help="submit and follow batch jobs on a running server",
        description="The async batch path: submit a JSONL file of requests to a running `ladle serve`, follow it, "
        "fetch its results. Jobs run on the server; this command only talks to it.",
    )
    actions = jobs.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    common = _common_options()
    submit = actions.add_parser(
        "submit", parents=[common], help="submit a JSONL file and follow the job",
        description="Submit a JSONL file: KServe v2 infer requests for --model (POST /v2/jobs), or OpenAI batch "
        "lines with --endpoint (POST /v1/files, then /v1/batches). Prints the job id, then follows the job.",
    )
    submit.add_argument("file", type=Path, metavar="FILE", help="the JSONL input, one request per line")
    submit.add_argument("--model", help="the model every line is for (KServe jobs: required without --endpoint)")
    submit.add_argument("--version", help="the model version (KServe jobs; default: the server's choice)")
    submit.add_argument("--endpoint", choices=OPENAI_ENDPOINTS,
                        help="submit an OpenAI batch for this endpoint instead (each line names its model)")
    submit.add_argument("--completion-window", default="24h",
                        help="how long the job may take before it expires (default: %(default)s)")
    submit.add_argument("--detach", action="store_true", help="print the job id and return at once")
    _add_progress_flag(submit)
    submit.set_defaults(handler=_handler(run_submit))
    status = actions.add_parser("status", parents=[common], help="print a job",
                                description="Print a job object as JSON (GET /v2/jobs/ID).")
    status.add_argument("job_id", metavar="ID")
    status.add_argument("--watch", action="store_true",
                        help="follow the job until it ends, then print it (exit status as for submit)")
    _add_progress_flag(status)
    status.set_defaults(handler=_handler(run_status))
    results = actions.add_parser("results", parents=[common], help="download a job's results",
                                 description="Stream a job's finished lines (JSONL, in line order).")
    results.add_argument("job_id", metavar="ID")
    results.add_argument("-o", "--output", type=Path, metavar="FILE", help="write to FILE instead of stdout")
    results.set_defaults(handler=_handler(run_results))
    cancel = actions.add_parser("cancel", parents=[common], help="cancel a job",
                                description="Cancel a job (lines already done keep their results).")
    cancel.add_argument("job_id", metavar="ID")
    cancel.set_defaults(handler=_handler(run_cancel))


def _common_options() -> argparse.ArgumentParser:
    # defaults are None and resolved from the environment when a handler runs (resolve_connection), so the
    # help text never shows an API key and the parser does not capture the environment at build time
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("server")
    group.add_argument("--url", help=f"base URL of the server (default: $LADLE_URL, else {DEFAULT_URL})")
    group.add_argument("--api-key", help="API key sent as a bearer token (default: $LADLE_API_KEY)")
    group.add_argument("--timeout", type=_positive_float, default=60.0,
                       help="HTTP timeout in seconds (default: %(default)s)")
    return common


def _add_progress_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar on stderr while following")


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


# ---------------------------------------------------------------------------------------------------------------
# pure helpers: error messages, progress, outcomes


def error_message(body: bytes | str, status: int, reason: str = "") -> str:
    """The server's error message from a response body in either shape (KServe `{"error": "..."}`, OpenAI
    `{"error": {"message": ...}}`), else the body's start, else the HTTP reason phrase."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        error = parsed.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str) and error:
            return error
    text = text.strip()
    if text:
        return text if len(text) <= 200 else text[:200] + "..."  # an HTML error page from a proxy, say
    return reason or f"HTTP {status}"


@dataclass(frozen=True)
class Progress:
    """How far a job has come, from its object's `request_counts`."""

    status: str
    total: int
    completed: int
    failed: int

    @property
    def done(self) -> int:
        return self.completed + self.failed

    @property
    def final(self) -> bool:
        return self.status in TERMINAL

    @classmethod
    def of(cls, job: dict[str, Any]) -> Progress:
        counts = job.get("request_counts") or {}
        return cls(str(job.get("status", "?")), int(counts.get("total") or 0), int(counts.get("completed") or 0),
                   int(counts.get("failed") or 0))


def exit_status(job: dict[str, Any]) -> int:
    """0 when a job ended completed (some lines may still have failed: that is in its results), else 1."""
    return EXIT_OK if job.get("status") == COMPLETED else EXIT_FAILED


def describe_errors(job: dict[str, Any], limit: int = MAX_ERRORS_SHOWN) -> list[str]:
    """The job's `errors` as lines for people: `line N: code: message`, at most `limit` of them."""
    errors = job.get("errors") or []
    if isinstance(errors, dict):  # OpenAI's batch object nests them: {"object": "list", "data": [...]}
        errors = errors.get("data") or []
    lines = []
    for error in errors[:limit]:
        where = f"line {error['line']}: " if error.get("line") is not None else ""
        if str(error.get("message", "")).startswith(where):  # the server's message may name the line itself
            where = ""
        code = f"{error['code']}: " if error.get("code") else ""
        lines.append(f"{where}{code}{error.get('message', '')}")
    if len(errors) > limit:
        lines.append(f"... and {len(errors) - limit} more")
    return lines


def summary(job: dict[str, Any], elapsed_s: float | None = None) -> str:
    """One line on how a job ended: `job-1 completed: 50 lines (0 failed) in 1.2 s`."""
    progress = Progress.of(job)
    took = f" in {elapsed_s:.1f} s" if elapsed_s is not None else ""
    return f"{job.get('id')} {progress.status}: {progress.done}/{progress.total} lines ({progress.failed} failed){took}"


# ---------------------------------------------------------------------------------------------------------------
# HTTP


def _handler(run: Callable[[argparse.Namespace, httpx.Client, Connection], int]) -> Callable[[argparse.Namespace], int]:
    """Wrap a subcommand: import the client, open it, and turn every failure into a message and exit status."""

    def handle(args: argparse.Namespace) -> int:
        try:
            import httpx  # noqa: F401  (only whether it is there: reaching() and make_client() use it)
        except ImportError:
            return _fail(JobsError("needs httpx and tqdm: pip install 'ladle[client]'", EXIT_USAGE))
        conn = resolve_connection(args, os.environ)
        try:
            with reaching(conn.url), make_client(conn) as client:
                return run(args, client, conn)
        except JobsError as exc:
            return _fail(exc)
        except KeyboardInterrupt:
            print("ladle jobs: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED

    return handle


def make_client(conn: Connection) -> httpx.Client:
    """The HTTP client every subcommand uses (a seam for tests: they swap in a mock transport)."""
    import httpx

    headers = {"Authorization": f"Bearer {conn.api_key}"} if conn.api_key else {}
    return httpx.Client(base_url=conn.url, headers=headers, timeout=conn.timeout)


def _fail(exc: JobsError) -> int:
    print(f"ladle jobs: {exc.message}", file=sys.stderr)
    return exc.status


def _check(response: httpx.Response) -> httpx.Response:
    """`response`, or a JobsError carrying the server's message and the HTTP status."""
    if response.is_success:
        return response
    body = response.read()
    message = error_message(body, response.status_code, response.reason_phrase)
    raise JobsError(f"{message} (HTTP {response.status_code})")


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        value = _check(response).json()
    except ValueError as exc:
        raise JobsError(f"the server answered {response.request.url.path} with non-JSON: {exc}") from None
    if not isinstance(value, dict):
        raise JobsError(f"the server answered {response.request.url.path} with {type(value).__name__}, not an object")
    return value


def get_job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    return _json(client.get(f"/v2/jobs/{job_id}"))


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2), flush=True)


# ---------------------------------------------------------------------------------------------------------------
# submit


def run_submit(args: argparse.Namespace, client: httpx.Client, conn: Connection) -> int:
    if args.endpoint is None and not args.model:
        raise JobsError("submit: --model is required (or --endpoint for an OpenAI batch)", EXIT_USAGE)
    if args.endpoint is not None and (args.model or args.version):
        print("ladle jobs: --model/--version are ignored with --endpoint (each line names its model)",
              file=sys.stderr)
    with _open_input(args.file) as body:
        try:
            job = _submit_kserve(client, args, body) if args.endpoint is None else _submit_openai(client, args, body)
        except KeyboardInterrupt:
            raise JobsError("interrupted before the server gave a job id: the job may or may not have been "
                            "created", EXIT_INTERRUPTED) from None
    job_id = str(job["id"])
    print(job_id, flush=True)  # first line of stdout, alone: `ID=$(ladle jobs submit ... --detach)`
    if args.detach:
        return EXIT_OK
    return follow_to_end(client, conn, job_id, args.progress, started=time.monotonic())


@contextmanager
def _open_input(path: Path) -> Iterator[IO[bytes]]:
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise JobsError(f"submit: no such file: {path}", EXIT_USAGE) from None
    except OSError as exc:  # a directory, no permission, ...
        raise JobsError(f"submit: cannot read {path}: {exc.strerror or exc}", EXIT_USAGE) from None
    with handle:
        yield handle


def _submit_kserve(client: httpx.Client, args: argparse.Namespace, body: IO[bytes]) -> dict[str, Any]:
    params = {"model": args.model, "completion_window": args.completion_window}
    if args.version:
        params["version"] = args.version
    # a file object as content: httpx sends it in chunks with its Content-Length, never whole in memory
    return _json(client.post("/v2/jobs", params=params, content=body,
                             headers={"Content-Type": "application/jsonl"}))


def _submit_openai(client: httpx.Client, args: argparse.Namespace, body: IO[bytes]) -> dict[str, Any]:
    upload = _json(client.post("/v1/files", data={"purpose": "batch"},
                               files={"file": (args.file.name, body, "application/jsonl")}))
    batch = {"input_file_id": upload["id"], "endpoint": args.endpoint, "completion_window": args.completion_window}
    return _json(client.post("/v1/batches", json=batch))


# ---------------------------------------------------------------------------------------------------------------
# following a job


def follow_to_end(client: httpx.Client, conn: Connection, job_id: str, progress: bool,
                  started: float | None = None) -> int:
    """Follow a job to a final status; report how it ended on stderr (with the time taken since `started`, a
    time.monotonic() value, when given). Ctrl-C leaves the job running on the server."""
    try:
        job = follow(client, job_id, progress, conn.timeout)
    except KeyboardInterrupt:
        print(f"\nladle jobs: stopped following {job_id}; it keeps running on the server.\n"
              f"  cancel it with: ladle jobs cancel {job_id} --url {conn.url}", file=sys.stderr)
        return EXIT_INTERRUPTED
    elapsed = None if started is None else time.monotonic() - started
    print(f"ladle jobs: {summary(job, elapsed)}", file=sys.stderr)
    for line in describe_errors(job):
        print(f"  {line}", file=sys.stderr)
    failed = Progress.of(job).failed
    if failed and job.get("status") == COMPLETED:  # the job completed, but not every line: say where to look
        print(f"  {failed} line(s) failed: their status_code and error are in the results", file=sys.stderr)
    if exit_status(job) == EXIT_OK:
        print(f"  results: ladle jobs results {job_id} --url {conn.url}", file=sys.stderr)
    return exit_status(job)


def follow(client: httpx.Client, job_id: str, progress: bool, outage_s: float,
           sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Poll the job every POLL_INTERVAL_S until its status is final; return its last object. A server that stops
    answering for less than `outage_s` (a restart: jobs are durable) is waited for, not given up on."""
    import httpx

    bar = ProgressBar(job_id, progress)
    unreachable_since: float | None = None
    try:
        while True:
            try:
                job = get_job(client, job_id)
                unreachable_since = None
            except httpx.TransportError:
                unreachable_since = unreachable_since or time.monotonic()
                if time.monotonic() - unreachable_since > outage_s:
                    raise
                sleep(POLL_INTERVAL_S)
                continue
            bar.update(Progress.of(job))
            if Progress.of(job).final:
                return job
            sleep(POLL_INTERVAL_S)
    finally:
        bar.close()


class ProgressBar:
    """A tqdm bar on stderr fed from job objects: done/total lines, failed, lines/s and ETA (tqdm's own rate and
    remaining-time estimates). Without tqdm, or with `enabled` false, it does nothing."""

    def __init__(self, job_id: str, enabled: bool) -> None:
        self._bar = _tqdm(job_id) if enabled else None
        self._shown: Progress | None = None

    def update(self, progress: Progress) -> None:
        if self._bar is None or progress == self._shown:
            return
        if progress.total and self._bar.total != progress.total:
            self._bar.total = progress.total  # unknown (0) while the server is still validating the file
        self._bar.set_postfix(failed=progress.failed, status=progress.status, refresh=False)
        self._bar.update(max(0, progress.done - self._bar.n))
        self._shown = progress

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _tqdm(job_id: str) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        print("ladle jobs: no progress bar (tqdm is not installed: pip install tqdm)", file=sys.stderr)
        return None
    # on by default even when stderr is not a terminal (tqdm then writes plain updates); --no-progress turns it off
    return tqdm(total=None, desc=job_id, unit="line", file=sys.stderr, dynamic_ncols=True, mininterval=0.5)


# ---------------------------------------------------------------------------------------------------------------
# status, results, cancel


def run_status(args: argparse.Namespace, client: httpx.Client, conn: Connection) -> int:
    if not args.watch:
        print_json(get_job(client, args.job_id))
        return EXIT_OK
    status = follow_to_end(client, conn, args.job_id, args.progress)
    if status != EXIT_INTERRUPTED:
        print_json(get_job(client, args.job_id))
    return status


def run_results(args: argparse.Namespace, client: httpx.Client, conn: Connection) -> int:
    with client.stream("GET", f"/v2/jobs/{args.job_id}/results") as response:
        _check(response)
        # the output file is opened only once the server said yes, so an error leaves no empty file behind
        if args.output is None:
            _copy(response, sys.stdout.buffer)
            return EXIT_OK
        try:
            with args.output.open("wb") as out:
                _copy(response, out)
        except OSError as exc:
            raise JobsError(f"results: cannot write {args.output}: {exc.strerror or exc}", EXIT_USAGE) from None
    return EXIT_OK


def _copy(response: httpx.Response, out: IO[bytes]) -> None:
    try:
        for chunk in response.iter_bytes():
            out.write(chunk)
        out.flush()
    except BrokenPipeError:
        # `ladle jobs results ID | head`: the reader has all it wants; silence the interpreter's exit-time flush
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())


def run_cancel(args: argparse.Namespace, client: httpx.Client, conn: Connection) -> int:
    print_json(_json(client.post(f"/v2/jobs/{args.job_id}/cancel")))
    return EXIT_OK
