"""The pure core of gated rollouts (serving/rollout_plan.py): every check of a plan, durations, and every branch of
`decide` with its boundaries (exactly min_requests, an error rate or p99 exactly at the max, no p99 at all)."""

from __future__ import annotations

import pytest

from ladle.serving.rollout_plan import Decision, RolloutPlan, decide, format_ms, parse_duration
from ladle.windows import WindowStats


def plan(**changes) -> RolloutPlan:
    fields = {"model": "m", "to": 2, "steps": (5, 25, 50, 100), "every_s": 60.0, "max_error_rate": 0.01,
              "max_p99_ms": 200.0, "min_requests": 200}
    return RolloutPlan(**{**fields, **changes})


# -- validation ------------------------------------------------------------------------------------------
def test_a_valid_plan_keeps_its_fields_with_steps_as_floats() -> None:
    p = plan(steps=[5, 25.5, 100])
    assert p.steps == (5.0, 25.5, 100.0) and all(isinstance(s, float) for s in p.steps)
    assert (p.model, p.to, p.every_s, p.max_error_rate, p.max_p99_ms, p.min_requests) == ("m", 2, 60.0, 0.01, 200.0,
                                                                                          200)
    assert RolloutPlan("m", 1, (100,), 1).min_requests == 100  # the default
    assert RolloutPlan("m", 1, (100,), 1).max_error_rate is None and RolloutPlan("m", 1, (100,), 1).max_p99_ms is None


def test_a_plan_is_frozen() -> None:
    with pytest.raises(AttributeError):
        plan().to = 3  # type: ignore[misc]


@pytest.mark.parametrize(("changes", "field"), [
    ({"model": ""}, "model"),
    ({"model": None}, "model"),
    ({"to": 0}, "to"),
    ({"to": -1}, "to"),
    ({"to": 1.0}, "to"),
    ({"to": True}, "to"),
    ({"to": "2"}, "to"),
    ({"steps": ()}, "steps"),
    ({"steps": []}, "steps"),
    ({"steps": "5,25"}, "steps"),
    ({"steps": None}, "steps"),
    ({"steps": (0, 50)}, "steps"),
    ({"steps": (-5, 50)}, "steps"),
    ({"steps": (50, 100.5)}, "steps"),
    ({"steps": (50, float("nan"))}, "steps"),
    ({"steps": (50, True)}, "steps"),
    ({"steps": (50, "100")}, "steps"),
    ({"steps": (50, 50)}, "steps"),
    ({"steps": (50, 25)}, "steps"),
    ({"steps": tuple(range(1, 102))}, "steps"),  # more than MAX_STEPS
    ({"every_s": 0.5}, "every"),
    ({"every_s": 0}, "every"),
    ({"every_s": float("inf")}, "every"),
    ({"every_s": "5m"}, "every"),
    ({"max_error_rate": -0.01}, "max_error_rate"),
    ({"max_error_rate": 1.01}, "max_error_rate"),
    ({"max_error_rate": "0.1"}, "max_error_rate"),
    ({"max_error_rate": float("nan")}, "max_error_rate"),
    ({"max_p99_ms": 0}, "max_p99_ms"),
    ({"max_p99_ms": -1}, "max_p99_ms"),
    ({"max_p99_ms": float("inf")}, "max_p99_ms"),
    ({"max_p99_ms": False}, "max_p99_ms"),
    ({"min_requests": 0}, "min_requests"),
    ({"min_requests": 1.5}, "min_requests"),
    ({"min_requests": True}, "min_requests"),
])
def test_bad_fields_are_refused_naming_the_field(changes, field) -> None:
    with pytest.raises(ValueError, match=rf"^{field}: "):
        plan(**changes)


@pytest.mark.parametrize("changes", [
    {"steps": (100,)}, {"steps": (0.5, 1, 99.9)}, {"every_s": 1}, {"max_error_rate": 0}, {"max_error_rate": 1},
    {"max_p99_ms": 0.001}, {"min_requests": 1}, {"max_error_rate": None, "max_p99_ms": None},
])
def test_boundaries_that_are_allowed(changes) -> None:
    plan(**changes)


def test_as_dict_round_trips() -> None:
    p = plan(max_p99_ms=None)
    assert p.as_dict()["steps"] == [5.0, 25.0, 50.0, 100.0]
    assert RolloutPlan.from_dict(p.as_dict()) == p
    assert RolloutPlan.from_dict({"model": "m", "to": 1, "steps": [100], "every_s": 5}).min_requests == 100
    with pytest.raises(KeyError):
        RolloutPlan.from_dict({"model": "m"})


# -- durations --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("value", "seconds"), [
    ("5m", 300.0), ("30s", 30.0), ("1h", 3600.0), ("90", 90.0), (90, 90.0), (1.5, 1.5), ("1.5m", 90.0),
    (" 2M ", 120.0), ("0.5s", 0.5),
])
def test_parse_duration(value, seconds) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["", "m", "5d", "5 minutes", "-5m", "1e3", "0", "0s", 0, -1, True, None,
                                   float("nan"), float("inf"), [5]])
def test_parse_duration_refuses(value) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)


# -- decide ------------------------------------------------------------------------------------------------
def stats(requests: int, errors: int = 0, p99_ms: float | None = 10.0) -> WindowStats:
    return WindowStats(requests, errors, None if p99_ms is None else p99_ms / 1000.0)


def test_too_few_requests_waits_whatever_the_figures() -> None:
    d = decide(plan(), stats(37, errors=37, p99_ms=9999), elapsed_s=1.0)
    assert d == Decision("wait", "waiting for requests: 37 of 200")


def test_too_few_requests_at_the_end_of_the_step_keeps_waiting_and_says_so() -> None:
    d = decide(plan(), stats(199), elapsed_s=600.0)
    assert d.kind == "wait" and d.reason == "waiting for requests: 199 of 200; the step's time is up"


def test_error_rate_over_the_max_rolls_back_mid_step() -> None:
    d = decide(plan(), stats(250, errors=30), elapsed_s=1.0)
    assert d == Decision("rollback", "error rate 0.120 > max 0.010 over 250 requests", "max_error_rate")


def test_p99_over_the_max_rolls_back_mid_step() -> None:
    d = decide(plan(), stats(250, p99_ms=412.4), elapsed_s=1.0)
    assert d == Decision("rollback", "p99 412 ms > max 200 ms over 250 requests", "max_p99_ms")


def test_error_gate_is_reported_first_when_both_fail() -> None:
    assert decide(plan(), stats(250, errors=250 // 2, p99_ms=999), 1.0).gate == "max_error_rate"


def test_exactly_min_requests_is_judged() -> None:
    assert decide(plan(), stats(200, errors=3), 1.0).kind == "rollback"  # 0.015 > 0.01
    assert decide(plan(), stats(199, errors=3), 1.0).kind == "wait"


def test_figures_exactly_at_the_max_pass() -> None:
    d = decide(plan(), stats(200, errors=2, p99_ms=200.0), elapsed_s=60.0)  # 2/200 = 0.010 exactly
    assert d.kind == "advance"
    assert d.reason == "gates passed: error rate 0.010, p99 200 ms over 200 requests"


def test_gates_inside_before_the_step_ends_waits() -> None:
    d = decide(plan(), stats(300, p99_ms=4.25), elapsed_s=59.2)
    assert d.kind == "wait" and d.gate is None
    assert d.reason == "gates inside so far: error rate 0.000, p99 4.2 ms over 300 requests; the step ends in 1 s"


def test_the_step_advances_when_its_time_is_up() -> None:
    assert decide(plan(), stats(300), elapsed_s=60.0).kind == "advance"
    assert decide(plan(), stats(300), elapsed_s=59.999).kind == "wait"


def test_no_p99_is_no_latency_to_judge() -> None:
    """Every request failed: no latency. The p99 gate cannot fail; the error gate (if any) judges."""
    no_error_gate = plan(max_error_rate=None)
    d = decide(no_error_gate, stats(250, errors=250, p99_ms=None), elapsed_s=60.0)
    assert d.kind == "advance" and "p99 - ms" in d.reason
    assert decide(plan(), stats(250, errors=250, p99_ms=None), 1.0).gate == "max_error_rate"


def test_no_gates_advances_on_time_and_requests_alone() -> None:
    free = plan(max_error_rate=None, max_p99_ms=None, min_requests=1)
    assert decide(free, stats(1, errors=1, p99_ms=None), 60.0).kind == "advance"
    assert decide(free, stats(0), 60.0).kind == "wait"


def test_format_ms() -> None:
    assert (format_ms(None), format_ms(0.04), format_ms(9.96), format_ms(10.0), format_ms(412.6)) == \
        ("-", "0.0", "10.0", "10", "413")
