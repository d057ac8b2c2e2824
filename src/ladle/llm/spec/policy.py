"""Speculative decoding's decisions: its configuration, what a step costs, how many draft tokens each request gets
this step, and the acceptance counts behind the metrics (pure Python: no torch, no model).

Invariant: speculation is only ever a bet on throughput; every choice here changes speed, never output (verification
is exact). The bet is sized per step from a measured step-cost curve and per-request acceptance estimates.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field

METHODS = ("ngram", "draft_model")


@dataclass(frozen=True)
class SpecConfig:
    """`method`: ngram (prompt lookup) or draft_model (`model`, a smaller checkpoint sharing the tokenizer);
    `num_speculative_tokens`: the most draft tokens one request verifies per step."""

    method: str
    num_speculative_tokens: int = 4
    ngram_min: int = 2
    ngram_max: int = 4
    model: str | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative_method must be one of {METHODS}, got {self.method!r}")
        if not 1 <= self.num_speculative_tokens <= 16:
            raise ValueError(f"num_speculative_tokens must be in [1, 16], got {self.num_speculative_tokens}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {self.ngram_min} and {self.ngram_max}")
        if (self.method == "draft_model") != (self.model is not None):
            raise ValueError("speculative_model (a draft checkpoint) goes with speculative_method draft_model")


class StepCost:
    """Seconds a forward pass takes for n tokens, interpolated from measured points (linear between them, and
    extrapolated along the last segment). Measured at start-up by feeding the model n tokens."""

    def __init__(self, points: Sequence[tuple[int, float]]) -> None:
        pts = sorted(points)
        if not pts or pts[0][0] < 1:
            raise ValueError("StepCost needs measured (tokens >= 1, seconds) points")
        # More tokens never cost less, so a point above a later one was inflated by noise (noise only ever adds
        # time): each point is lowered to the cheapest at or after it, and the curve is non-decreasing.
        self.tokens = [n for n, _ in pts]
        self.seconds = [t for _, t in pts]
        for i in range(len(pts) - 2, -1, -1):
            self.seconds[i] = min(self.seconds[i], self.seconds[i + 1])

    def __call__(self, n: int) -> float:
        ns, ts = self.tokens, self.seconds
        if n <= ns[0] or len(ns) == 1:
            return ts[0] if n <= ns[0] else ts[0] * n / ns[0]
        i = min(bisect.bisect_left(ns, n), len(ns) - 1)
        lo, hi = (i - 1, i) if i > 0 else (0, 1)
        if lo == hi or ns[hi] == ns[lo]:
            return ts[-1]
        slope = (ts[hi] - ts[lo]) / (ns[hi] - ns[lo])
        return ts[lo] + slope * (n - ns[lo])

    def describe(self) -> str:
        return ", ".join(f"{n}: {t * 1e3:.1f} ms" for n, t in zip(self.tokens, self.seconds, strict=True))


class Acceptance:
    """One request's per-token acceptance rate: a Beta(prior) estimate over recent outcomes (older ones decay), so
    a request that stops copying its prompt stops paying for drafts within a few steps."""

    __slots__ = ("accepted", "trials")
    PRIOR_ACCEPTED, PRIOR_TRIALS, DECAY = 1.0, 2.0, 0.8

    def __init__(self) -> None:
        self.accepted = 0.0
        self.trials = 0.0

    @property
    def rate(self) -> float:
        return (self.accepted + self.PRIOR_ACCEPTED) / (self.trials + self.PRIOR_TRIALS)

    def observe(self, num_drafts: int, num_accepted: int) -> None:
        """num_accepted of num_drafts leading drafts matched: that many successes, then one failure unless all did."""
        if num_drafts <= 0:
            return
        trials = num_accepted + (num_accepted < num_drafts)
        self.accepted = self.accepted * self.DECAY**trials + num_accepted
        self.trials = self.trials * self.DECAY**trials + trials


class SpecPolicy:
    """Chooses each decoding request's number of draft tokens for this step by expected throughput.

    A request with acceptance rate a gains a**j expected tokens from its j-th draft token. Each draft token also
    costs: the target model's step grows by one token (StepCost) and, with a draft model, by its share of one more
    draft forward. Draft tokens are added best-gain first while they raise (tokens out) / (step seconds); at a batch
    size where the measured cost of more tokens outweighs the expected gain, none is added: speculation is off.
    """

    def __init__(self, max_tokens: int, target_cost: StepCost, draft_cost: StepCost | None = None,
                 span_cost: float = 0.0) -> None:
        self.max_tokens = max_tokens
        self.target_cost = target_cost
        self.draft_cost = draft_cost
        self.span_cost = span_cost  # a request's first draft turns its decode row into a span: attention per span
        self.acceptance: dict[str, Acceptance] = {}

    def rate(self, request_id: str) -> float:
        acceptance = self.acceptance.get(request_id)
        return acceptance.rate if acceptance is not None else Acceptance().rate

    def observe(self, request_id: str, num_drafts: int, num_accepted: int) -> None:
        acceptance = self.acceptance.get(request_id)
        if acceptance is None:
            acceptance = self.acceptance[request_id] = Acceptance()
        acceptance.observe(num_drafts, num_accepted)

    def remove(self, request_id: str) -> None:
        self.acceptance.pop(request_id, None)

    def choose(self, num_decoding: int, available: dict[str, int], extra_tokens: int = 0) -> dict[str, int]:
        """Draft tokens per request (only requests given one); `num_decoding` requests decode this step in all,
        `available[rid]` is the most drafts rid could verify, `extra_tokens` other tokens the step feeds (prefill).

        Candidates are taken best gain first. A request's first drafts carry its fixed costs (the span; with a draft
        model, maybe a new draft forward), so they are judged as a run: the most paying run of 1..n drafts is taken
        whole. A continuation that does not pay ends that request; others, cheaper per token, may still pay."""
        chosen = dict.fromkeys(available, 0)
        step = _Step(tokens=num_decoding + extra_tokens, gain=float(num_decoding))
        step.cost = self.target_cost(step.tokens)
        heap = [(-self.rate(rid), rid) for rid, n in available.items() if n > 0]
        heapq.heapify(heap)
        while heap:
            _, rid = heapq.heappop(heap)
            limit = min(available[rid], self.max_tokens)
            j = chosen[rid]
            run = self._best_run(step, rid, j, limit)
            if run == 0:
                continue
            for depth in range(j + 1, j + run + 1):
                step.take(self.rate(rid) ** depth, self._added_cost(step, depth, first=depth == 1), depth)
            chosen[rid] = j + run
            if j + run < limit:
                heapq.heappush(heap, (-(self.rate(rid) ** (j + run + 1)), rid))
        return chosen

    def _best_run(self, step: _Step, rid: str, j: int, limit: int) -> int:
        """How many drafts after the request's first j to add now: 1 for a continuation that pays, the most paying
        run for a request's first drafts, 0 when none pays."""
        rate = self.rate(rid)
        best, best_ratio = 0, step.gain / step.cost
        trial = step.copy()
        for depth in range(j + 1, (limit if j == 0 else j + 1) + 1):
            trial.take(rate**depth, self._added_cost(trial, depth, first=depth == 1), depth)
            if trial.gain / trial.cost > best_ratio * (1 + 1e-12):
                best, best_ratio = depth - j, trial.gain / trial.cost
        return best

    def _added_cost(self, step: _Step, depth: int, first: bool) -> float:
        added = self.target_cost(step.tokens + 1) - self.target_cost(step.tokens) + self._draft_cost(step.depths, depth)
        return added + (self.span_cost if first else 0.0)

    def _draft_cost(self, depth_count: list[int], depth: int) -> float:
        if self.draft_cost is None:
            return 0.0
        n = depth_count[depth - 1] if depth <= len(depth_count) else 0
        return self.draft_cost(n + 1) - (self.draft_cost(n) if n else 0.0)


@dataclass
class _Step:
    """A step's tokens, expected tokens out and cost as drafts are added; depths[j]: requests with > j drafts."""

    tokens: int
    gain: float
    cost: float = 0.0
    depths: list[int] = field(default_factory=list)

    def take(self, gain: float, cost: float, depth: int) -> None:
        self.tokens += 1
        self.gain += gain
        self.cost += cost
        if len(self.depths) < depth:
            self.depths.append(0)
        self.depths[depth - 1] += 1

    def copy(self) -> _Step:
        return _Step(self.tokens, self.gain, self.cost, list(self.depths))


class SpecStats:
    """Cumulative draft and accepted tokens, in all and per draft position (metrics read them after each step)."""

    def __init__(self, max_tokens: int) -> None:
        self.drafted = [0] * max_tokens
        self.accepted = [0] * max_tokens

    def record(self, num_drafts: int, num_accepted: int) -> None:
        for j in range(num_drafts):
            self.drafted[j] += 1
        for j in range(num_accepted):
            self.accepted[j] += 1

    @property
    def num_drafted(self) -> int:
        return sum(self.drafted)

    @property
    def num_accepted(self) -> int:
        return sum(self.accepted)
