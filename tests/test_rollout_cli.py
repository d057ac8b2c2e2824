"""`ladle rollout` (src/ladle/rollout_cli.py) without a server: the parser, the plan it builds, the lines it prints,
and following a rollout through an in-process fake of the API (httpx.MockTransport).
End to end: tests/api/test_rollout.py."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from ladle import cli, rollout_cli


def parse(*argv: str):
    return cli.build_parser().parse_args(["rollout", *argv])


def test_the_flags_build_the_plan_and_the_request_body() -> None:
    args = parse("m", "--to", "2", "--steps", "5,25,50,100", "--every", "5m", "--max-error-rate", "0.01",
                 "--max-p99-ms", "200", "--min-requests", "200")
    plan = rollout_cli.build_plan(args)
    assert (plan.model, plan.to, plan.steps, plan.every_s) == ("m", 2, (5.0, 25.0, 50.0, 100.0), 300.0)
    assert rollout_cli.request_body(plan) == {"to": 2, "steps": [5.0, 25.0, 50.0, 100.0], "every": 300.0,
                                              "min_requests": 200, "max_error_rate": 0.01, "max_p99_ms": 200.0}
    assert rollout_cli.request_body(rollout_cli.build_plan(parse("m", "--to", "2", "--steps", "100", "--every",
                                                                 "1"))) == \
        {"to": 2, "steps": [100.0], "every": 1.0, "min_requests": 100}


@pytest.mark.parametrize(("argv", "message"), [
    (("m",), "needs --to, --steps, --every"),
    (("m", "--to", "2", "--steps", "5,x", "--every", "1"), "bad rollout"),
    (("m", "--to", "2", "--steps", "50,5", "--every", "1"), "steps: must be strictly increasing"),
    (("m", "--to", "2", "--steps", "50", "--every", "soon"), "duration"),
    (("m", "--to", "2", "--steps", "50", "--every", "1", "--max-error-rate", "5"), "max_error_rate"),
])
def test_bad_flags_are_usage_errors(argv, message) -> None:
    with pytest.raises(rollout_cli.RolloutError, match=message) as caught:
        rollout_cli.build_plan(parse(*argv))
    assert caught.value.status == rollout_cli.EXIT_USAGE


def test_status_and_abort_exclude_each_other(capsys) -> None:
    with pytest.raises(SystemExit):
        parse("m", "--status", "--abort")


def test_the_key_comes_from_the_flag_then_the_environment() -> None:
    assert rollout_cli.resolve_key(parse("m", "--admin-key", "a"), {"LADLE_ADMIN_KEY": "b"}) == "a"
    assert rollout_cli.resolve_key(parse("m"), {"LADLE_ADMIN_KEY": "b", "LADLE_API_KEY": "c"}) == "b"
    assert rollout_cli.resolve_key(parse("m"), {"LADLE_API_KEY": "c"}) is None  # starting needs the admin key
    assert rollout_cli.resolve_key(parse("m", "--status"), {"LADLE_API_KEY": "c"}) == "c"


STATUS = {"model": "m", "to": 2, "state": "running", "step": 2, "steps": [5, 25, 50, 100], "percent": 25.0,
          "gates": {"min_requests": 200}, "window": {"requests": 143, "error_rate": 0.0, "p99_ms": 12.3},
          "reason": "waiting for requests: 143 of 200"}


def test_lines_for_people() -> None:
    assert rollout_cli.progress_line(STATUS) == \
        "step 2/4: 25% to version 2 — 143/200 requests, error rate 0.000, p99 12 ms"
    assert rollout_cli.progress_line({**STATUS, "window": None}) == "step 2/4: 25% to version 2"
    done = {**STATUS, "state": "rolled_back", "reason": "p99 412 ms > max 200 ms over 250 requests"}
    assert rollout_cli.final_line(done) == \
        "rollout of m to version 2 rolled back: p99 412 ms > max 200 ms over 250 requests"
    assert rollout_cli.exit_status(done) == 1 and rollout_cli.exit_status({"state": "succeeded"}) == 0
    assert rollout_cli.exit_status({"state": "aborted"}) == 1


def test_follow_prints_each_step_and_returns_the_final_status(capsys) -> None:
    answers = iter([{**STATUS, "step": 2}, {**STATUS, "step": 3, "percent": 50.0}, {**STATUS, "step": 3},
                    {**STATUS, "step": 4, "state": "succeeded", "window": None}])
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=next(answers)))
    with httpx.Client(transport=transport, base_url="http://ladle") as client:
        final = rollout_cli.follow(client, "/v2/models/m/rollout", {**STATUS, "step": 1}, 5.0, sleep=lambda s: None)
    assert final["state"] == "succeeded"
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(":")[1].strip() for line in lines] == ["step 2/4", "step 3/4"]  # one line per step change


def test_a_refusal_carries_the_server_message() -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(409, json={"error": "already running"}))
    with httpx.Client(transport=transport, base_url="http://ladle") as client, \
            pytest.raises(rollout_cli.RolloutError, match=r"already running \(HTTP 409\)"):
        rollout_cli.follow(client, "/v2/models/m/rollout", STATUS, 5.0, sleep=lambda s: None)


def test_importing_the_client_stays_light() -> None:
    code = "import sys, ladle.rollout_cli; print(any(m in sys.modules for m in ('httpx', 'starlette', 'numpy')))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
