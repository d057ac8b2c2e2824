"""`ladle rollout`: the client side of gated rollouts — start one on a running `ladle serve`
(`POST /v2/models/{m}/rollout`), follow it step by step, print its status (`GET`) or abort it (`DELETE`).

Invariants: importing this module stays light (argparse, the stdlib and the pure plan module; httpx loads inside
the handler, because `ladle serve` builds the same parser); stdout carries only data (status JSON), everything for
people goes to stderr; the key is sent, never printed. Exit statuses: 0 the rollout succeeded (or the status/abort
request was answered), 1 it was rolled back or aborted, or the server said no, 2 a usage problem or an unreachable
server, 130 interrupted (the rollout goes on on the server).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ladle.client_commands import (
    DEFAULT_URL,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    CommandError,
    reaching,
)
from ladle.serving.rollout_plan import DEFAULT_MIN_REQUESTS, RolloutPlan, format_ms, parse_duration

if TYPE_CHECKING:
    import httpx

POLL_INTERVAL_S = 1.0
REPEAT_PROGRESS_S = 10.0  # while a step waits, its progress line is repeated this often



RolloutError = CommandError  # reported as `ladle rollout: MESSAGE`


def add_rollout_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "rollout", help="move a model's traffic to a new version step by step, gated on its metrics",
        description="Start a gated rollout on a running `ladle serve` and follow it: the candidate's share of the "
        "traffic rises step by step while its error rate and p99 latency (over each step's window, once it holds "
        "--min-requests requests) stay inside the gates; the server rolls back on its own when one fails.",
    )
    parser.add_argument("model", metavar="MODEL", help="the model whose traffic moves")
    parser.add_argument("--to", type=int, metavar="VERSION", help="the candidate version (must be READY)")
    parser.add_argument("--steps", metavar="PERCENTS", help="the candidate's percent at each step, e.g. 5,25,50,100")
    parser.add_argument("--every", metavar="DURATION", help="how long each step lasts at least: 30s, 5m, 1h")
    parser.add_argument("--max-error-rate", type=float, metavar="FRACTION",
                        help="roll back when the candidate's error rate (5xx) exceeds this, e.g. 0.01")
    parser.add_argument("--max-p99-ms", type=float, metavar="MS",
                        help="roll back when the candidate's p99 latency exceeds this many milliseconds")
    parser.add_argument("--min-requests", type=int, default=DEFAULT_MIN_REQUESTS, metavar="N",
                        help="requests a step's window must hold before it is judged (default: %(default)s)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--status", action="store_true", help="print the model's rollout status as JSON and exit")
    mode.add_argument("--abort", action="store_true",
                      help="abort the running rollout (traffic goes back), or forget a finished one")
    parser.add_argument("--detach", action="store_true", help="start the rollout, print its status and return")
    server = parser.add_argument_group("server")
    server.add_argument("--url", help=f"base URL of the server (default: $LADLE_URL, else {DEFAULT_URL})")
    server.add_argument("--admin-key", metavar="KEY", help="admin key sent as a bearer token (default: "
                        "$LADLE_ADMIN_KEY; --status also takes $LADLE_API_KEY)")
    server.add_argument("--timeout", type=float, default=30.0,
                        help="HTTP timeout in seconds, and how long a vanished server is waited for "
                        "(default: %(default)s)")
    parser.set_defaults(handler=run_rollout)


# -- pure helpers -----------------------------------------------------------------------------------
def build_plan(args: argparse.Namespace) -> RolloutPlan:
    """The plan the flags ask for, checked here so a typo is a usage error before the server is asked."""
    missing = [flag for flag, value in (("--to", args.to), ("--steps", args.steps), ("--every", args.every))
               if value is None]
    if missing:
        raise RolloutError(f"starting a rollout needs {', '.join(missing)} (or --status / --abort)", EXIT_USAGE)
    try:
        steps = tuple(float(part) for part in args.steps.split(","))
        return RolloutPlan(args.model, args.to, steps, parse_duration(args.every), args.max_error_rate,
                           args.max_p99_ms, args.min_requests)
    except ValueError as exc:
        raise RolloutError(f"bad rollout: {exc}", EXIT_USAGE) from None


def request_body(plan: RolloutPlan) -> dict[str, Any]:
    body = {"to": plan.to, "steps": list(plan.steps), "every": plan.every_s, "min_requests": plan.min_requests,
            "max_error_rate": plan.max_error_rate, "max_p99_ms": plan.max_p99_ms}
    return {key: value for key, value in body.items() if value is not None}


def progress_line(status: dict[str, Any]) -> str:
    """`step 2/4: 25% to version 2 — 143/200 requests, error rate 0.000, p99 12 ms`."""
    window = status.get("window") or {}
    gates = status.get("gates") or {}
    head = f"step {status.get('step')}/{len(status.get('steps') or ())}: {status.get('percent', 0):g}% to version " \
           f"{status.get('to')}"
    if not window:
        return head
    return (f"{head} — {window.get('requests', 0)}/{gates.get('min_requests', '?')} requests, error rate "
            f"{window.get('error_rate', 0.0):.3f}, p99 {format_ms(window.get('p99_ms'))} ms")


def final_line(status: dict[str, Any]) -> str:
    state = str(status.get("state", "?")).replace("_", " ")
    return f"rollout of {status.get('model')} to version {status.get('to')} {state}: {status.get('reason', '')}"


def exit_status(status: dict[str, Any]) -> int:
    return EXIT_OK if status.get("state") == "succeeded" else EXIT_FAILED


def error_message(response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict):
        error = error.get("message")
    text = str(error) if error else (response.text.strip()[:200] or response.reason_phrase)
    return f"{text} (HTTP {response.status_code})"


def resolve_key(args: argparse.Namespace, environ: Mapping[str, str]) -> str | None:
    key = args.admin_key or environ.get("LADLE_ADMIN_KEY")
    if not key and args.status:
        key = environ.get("LADLE_API_KEY")
    return key or None


# -- the handler ----------------------------------------------------------------------------------------
def run_rollout(args: argparse.Namespace) -> int:
    try:
        import httpx
    except ImportError:
        return _fail(RolloutError("needs httpx: pip install 'ladle[client]'", EXIT_USAGE))
    url = (args.url or os.environ.get("LADLE_URL") or DEFAULT_URL).rstrip("/")
    key = resolve_key(args, os.environ)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        plan = None if args.status or args.abort else build_plan(args)
        with reaching(url), httpx.Client(base_url=url, headers=headers, timeout=args.timeout) as client:
            return _run(args, client, plan, url)
    except RolloutError as exc:
        return _fail(exc)


def _run(args: argparse.Namespace, client: httpx.Client, plan: RolloutPlan | None, url: str) -> int:
    path = f"/v2/models/{args.model}/rollout"
    if plan is None:
        response = client.get(path) if args.status else client.delete(path)
        print(json.dumps(_answer(response), indent=2), flush=True)
        return EXIT_OK
    status = _answer(client.post(path, json=request_body(plan)))
    print(f"ladle rollout: started: {progress_line(status)}", file=sys.stderr, flush=True)
    if args.detach:
        print(json.dumps(status, indent=2), flush=True)
        return EXIT_OK
    try:
        status = follow(client, path, status, args.timeout)
    except KeyboardInterrupt:
        print(f"\nladle rollout: stopped following; the rollout of {args.model} goes on on the server.\n"
              f"  its status: ladle rollout {args.model} --status --url {url}\n"
              f"  abort it:   ladle rollout {args.model} --abort --url {url}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"ladle rollout: {final_line(status)}", file=sys.stderr, flush=True)
    return exit_status(status)


def follow(client: httpx.Client, path: str, status: dict[str, Any], outage_s: float,
           sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Poll the rollout until it is no longer running, printing a line per step (and every REPEAT_PROGRESS_S while
    a step waits). A server that stops answering for less than `outage_s` (a restart: rollouts resume) is waited for."""
    import httpx

    shown, shown_at, lost_since = (status.get("step"), status.get("state")), time.monotonic(), None
    while status.get("state") == "running":
        sleep(POLL_INTERVAL_S)
        try:
            status = _answer(client.get(path))
            lost_since = None
        except httpx.TransportError:
            lost_since = lost_since or time.monotonic()
            if time.monotonic() - lost_since > outage_s:
                raise
            continue
        step = (status.get("step"), status.get("state"))
        if status.get("state") == "running" and (step != shown or time.monotonic() - shown_at >= REPEAT_PROGRESS_S):
            print(f"ladle rollout: {progress_line(status)}", file=sys.stderr, flush=True)
            shown, shown_at = step, time.monotonic()
    return status


def _answer(response: httpx.Response) -> dict[str, Any]:
    if not response.is_success:
        raise RolloutError(error_message(response))
    try:
        value = response.json()
    except ValueError:
        raise RolloutError(f"the server answered {response.request.url.path} with non-JSON") from None
    if not isinstance(value, dict):
        raise RolloutError(f"the server answered {response.request.url.path} with {type(value).__name__}")
    return value


def _fail(exc: RolloutError) -> int:
    print(f"ladle rollout: {exc.message}", file=sys.stderr)
    return exc.status
