"""What a gated rollout is asked to do (`RolloutPlan`: the steps, their length and the gates) and the one decision
it takes at every tick (`decide`: roll back, advance or wait), as pure functions of the plan and a window's figures.

Invariants: a plan that exists is valid (its constructor checks every field, naming the field at fault); a gate
only judges a window that holds at least `min_requests` requests, and a step advances only when its time is up and
every gate is inside. No I/O, no clock, no asyncio: serving/rollout.py feeds the figures in.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # `ladle rollout` imports this module: it stays free of numpy
    from ladle.windows import WindowStats

DEFAULT_MIN_REQUESTS = 100
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smh]?)")
_UNIT_S = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


def _is_number(value: object) -> bool:
    # bool is an int to Python, never a number to a person writing JSON
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class RolloutPlan:
    """Move `model`'s traffic to version `to` through `steps` (the candidate's percent at each step), each step
    lasting at least `every_s` seconds and held to the gates over its own window of requests."""

    model: str
    to: int
    steps: tuple[float, ...]
    every_s: float
    max_error_rate: float | None = None  # failed (5xx) / all requests of the window; equal to the max passes
    max_p99_ms: float | None = None  # p99 latency of the window's successful requests; equal to the max passes
    min_requests: int = DEFAULT_MIN_REQUESTS

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("model: must be a model name")
        if isinstance(self.to, bool) or not isinstance(self.to, int) or self.to < 1:
            raise ValueError(f"to: must be a version, an integer >= 1, got {self.to!r}")
        object.__setattr__(self, "steps", _checked_steps(self.steps))
        if not _is_number(self.every_s) or self.every_s < 1:
            raise ValueError(f"every: a step must last at least 1 second, got {self.every_s!r}")
        if self.max_error_rate is not None and not (_is_number(self.max_error_rate) and
                                                    0 <= self.max_error_rate <= 1):
            raise ValueError(f"max_error_rate: must be a fraction in [0, 1] (0.01 = 1%), got {self.max_error_rate!r}")
        if self.max_p99_ms is not None and not (_is_number(self.max_p99_ms) and self.max_p99_ms > 0):
            raise ValueError(f"max_p99_ms: must be a number of milliseconds > 0, got {self.max_p99_ms!r}")
        if isinstance(self.min_requests, bool) or not isinstance(self.min_requests, int) or self.min_requests < 1:
            raise ValueError(f"min_requests: must be an integer >= 1, got {self.min_requests!r}")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "steps": list(self.steps)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RolloutPlan:
        """The plan `as_dict` wrote (a persisted rollout); KeyError/TypeError/ValueError when it is not one."""
        return cls(data["model"], data["to"], tuple(data["steps"]), data["every_s"], data.get("max_error_rate"),
                   data.get("max_p99_ms"), data.get("min_requests", DEFAULT_MIN_REQUESTS))


#: steps one rollout may have
MAX_STEPS = 100


def _checked_steps(steps: object) -> tuple[float, ...]:
    if isinstance(steps, (str, bytes)) or not isinstance(steps, (tuple, list)) or not steps:
        raise ValueError(f"steps: must be a non-empty list of percentages such as [5, 25, 50, 100], got "
                         f"{steps!r}"[:300])
    if len(steps) > MAX_STEPS:  # a status lists them, a record stores them: a hostile list stays small
        raise ValueError(f"steps: at most {MAX_STEPS} steps, got {len(steps)}")
    for step in steps:
        if not _is_number(step) or not 0 < step <= 100:
            raise ValueError(f"steps: each step is the candidate's percent of the traffic, in (0, 100], got {step!r}")
    if any(b <= a for a, b in itertools.pairwise(steps)):
        raise ValueError(f"steps: must be strictly increasing, got {list(steps)}")
    return tuple(float(step) for step in steps)


def parse_duration(value: object) -> float:
    """Seconds from a number (seconds) or a string: "90" or "90s", "5m", "1.5h". ValueError when it is neither or
    not a finite number > 0."""
    if _is_number(value):
        seconds = float(value)  # type: ignore[arg-type]
    elif isinstance(value, str) and (match := _DURATION.fullmatch(value.strip().lower())):
        seconds = float(match[1]) * _UNIT_S[match[2]]
    else:
        raise ValueError(f"a duration is a number of seconds or a string like 30s, 5m or 1h, got {value!r}")
    if not seconds > 0:
        raise ValueError(f"a duration must be > 0, got {value!r}")
    return seconds


@dataclass(frozen=True)
class Decision:
    """What a tick does: roll back (a gate failed: `gate` names it), advance to the next step, or wait."""

    kind: Literal["rollback", "advance", "wait"]
    reason: str
    gate: str | None = None  # "max_error_rate" | "max_p99_ms" when kind is rollback


def decide(plan: RolloutPlan, stats: WindowStats, elapsed_s: float) -> Decision:
    """Judge the current step from its window so far (`stats`) and its age. Gates fail fast: they are checked as
    soon as the window holds `min_requests`, mid-step; fewer requests than that never advance a step."""
    if stats.requests < plan.min_requests:
        late = "; the step's time is up" if elapsed_s >= plan.every_s else ""
        return Decision("wait", f"waiting for requests: {stats.requests} of {plan.min_requests}{late}")
    over = f"over {stats.requests} requests"
    if plan.max_error_rate is not None and stats.error_rate > plan.max_error_rate:
        return Decision("rollback", f"error rate {stats.error_rate:.3f} > max {plan.max_error_rate:.3f} {over}",
                        "max_error_rate")
    p99_ms = None if stats.p99_s is None else stats.p99_s * 1000.0
    # no p99 means no request succeeded: there is no latency to judge (the error-rate gate judges that window)
    if plan.max_p99_ms is not None and p99_ms is not None and p99_ms > plan.max_p99_ms:
        return Decision("rollback", f"p99 {format_ms(p99_ms)} ms > max {plan.max_p99_ms:g} ms {over}", "max_p99_ms")
    figures = f"error rate {stats.error_rate:.3f}, p99 {format_ms(p99_ms)} ms {over}"
    if elapsed_s >= plan.every_s:
        return Decision("advance", f"gates passed: {figures}")
    return Decision("wait", f"gates inside so far: {figures}; the step ends in {math.ceil(plan.every_s - elapsed_s)} s")


def format_ms(ms: float | None) -> str:
    """Milliseconds for people: whole above 10 ms, one decimal below, "-" when unknown."""
    if ms is None:
        return "-"
    return f"{ms:.0f}" if ms >= 10 else f"{ms:.1f}"
