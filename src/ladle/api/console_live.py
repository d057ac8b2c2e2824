"""The console's live view (issue 15, its data): each model version's recent figures, derived on the server from its
own Prometheus registry, so the browser never parses Prometheus text. A sampler snapshots the watched families every
INTERVAL_S while someone reads them (the first read starts it; IDLE_S without a read stops it) and keeps the last
KEEP snapshots; every figure is a difference between two consecutive snapshots (rates, histogram quantiles) or a
gauge's value.

Invariants: bounded (KEEP snapshots of the watched families only); sampling costs one registry collect on the event
loop every INTERVAL_S, and nothing while nobody watches.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry

INTERVAL_S = 2.0
KEEP = 151  # 150 intervals: five minutes of figures
IDLE_S = 60.0

Labels = tuple[str, str]  # (model, version)
#: sample name -> {(model, version, le or outcome or ""): value}
Snapshot = dict[str, dict[tuple[str, str, str], float]]

CLASSIC = "ladle_model_"
LLM = "ladle_llm_"
WATCHED = {
    CLASSIC + "requests_total", CLASSIC + "request_duration_seconds_bucket", CLASSIC + "queue_depth",
    CLASSIC + "batch_size_sum", CLASSIC + "batch_size_count",
    LLM + "time_to_first_token_seconds_bucket", LLM + "inter_token_latency_seconds_bucket",
    LLM + "generation_tokens_total", LLM + "requests_running", LLM + "requests_waiting",
    LLM + "kv_cache_usage_ratio", LLM + "prefix_cache_hit_tokens_total", LLM + "prefix_cache_query_tokens_total",
}


def snapshot(registry: CollectorRegistry) -> Snapshot:
    """The watched samples of `registry` now, keyed by (model, version, le | outcome | "")."""
    taken: Snapshot = {name: {} for name in WATCHED}
    for family in registry.collect():
        if not family.name.startswith(("ladle_model_", "ladle_llm_")):
            continue
        for sample in family.samples:
            values = taken.get(sample.name)
            if values is None or "model" not in sample.labels:
                continue
            labels = sample.labels
            extra = labels.get("le") or labels.get("outcome") or ""
            key = (labels["model"], labels.get("version", ""), extra)
            values[key] = values.get(key, 0.0) + sample.value
    return taken


def quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """Prometheus's histogram_quantile over (upper bound, cumulative count) pairs: linear within the bucket; None
    without observations; the highest finite bound when the rank falls in the +Inf bucket."""
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if math.isinf(bound):
                return lower
            span = count - below
            return bound if span <= 0 else lower + (bound - lower) * (rank - below) / span
        lower, below = bound, count
    return lower


def figures(before: Snapshot, after: Snapshot, seconds: float) -> dict[Labels, dict[str, float | None]]:
    """Every model version's figures over one interval."""
    out: dict[Labels, dict[str, float | None]] = {}
    for (model, version, _), _value in after[CLASSIC + "requests_total"].items():
        out.setdefault((model, version), _classic(before, after, seconds, model, version))
    for (model, version, _), _value in after[LLM + "requests_running"].items():
        out.setdefault((model, version), _llm(before, after, seconds, model, version))
    return out


def _delta(before: Snapshot, after: Snapshot, name: str, model: str, version: str) -> dict[str, float]:
    """Per extra label (le, outcome, ""), how much `name` grew over the interval (a counter reset reads as 0)."""
    old = before.get(name, {})
    return {extra: max(0.0, value - old.get((m, v, extra), 0.0))
            for (m, v, extra), value in after.get(name, {}).items() if m == model and v == version}


def _gauge(after: Snapshot, name: str, model: str, version: str) -> float | None:
    return after.get(name, {}).get((model, version, ""))


def _quantiles_ms(deltas: dict[str, float], *qs: float) -> list[float | None]:
    buckets = [(float(le), count) for le, count in deltas.items()]
    return [None if (x := quantile(q, buckets)) is None else round(x * 1e3, 3) for q in qs]


def _classic(before: Snapshot, after: Snapshot, seconds: float, model: str, version: str) -> dict[str, Any]:
    outcomes = _delta(before, after, CLASSIC + "requests_total", model, version)
    p50, p99 = _quantiles_ms(_delta(before, after, CLASSIC + "request_duration_seconds_bucket", model, version),
                             0.5, 0.99)
    rows = sum(_delta(before, after, CLASSIC + "batch_size_sum", model, version).values())
    batches = sum(_delta(before, after, CLASSIC + "batch_size_count", model, version).values())
    return {"kind": "classic", "requests_per_s": round(sum(outcomes.values()) / seconds, 3),
            "errors_per_s": round(outcomes.get("error", 0.0) / seconds, 3), "p50_ms": p50, "p99_ms": p99,
            "queue_depth": _gauge(after, CLASSIC + "queue_depth", model, version),
            "batch_size": round(rows / batches, 3) if batches else None}


def _llm(before: Snapshot, after: Snapshot, seconds: float, model: str, version: str) -> dict[str, Any]:
    ttft = _quantiles_ms(_delta(before, after, LLM + "time_to_first_token_seconds_bucket", model, version), 0.5, 0.99)
    itl = _quantiles_ms(_delta(before, after, LLM + "inter_token_latency_seconds_bucket", model, version), 0.5, 0.99)
    tokens = sum(_delta(before, after, LLM + "generation_tokens_total", model, version).values())
    hits = sum(_delta(before, after, LLM + "prefix_cache_hit_tokens_total", model, version).values())
    queries = sum(_delta(before, after, LLM + "prefix_cache_query_tokens_total", model, version).values())
    return {"kind": "llm", "ttft_p50_ms": ttft[0], "ttft_p99_ms": ttft[1], "itl_p50_ms": itl[0], "itl_p99_ms": itl[1],
            "tokens_per_s": round(tokens / seconds, 3),
            "running": _gauge(after, LLM + "requests_running", model, version),
            "waiting": _gauge(after, LLM + "requests_waiting", model, version),
            "kv_usage": _gauge(after, LLM + "kv_cache_usage_ratio", model, version),
            "prefix_hit_rate": round(hits / queries, 4) if queries else None}


class LiveSampler:
    """Snapshots the registry while the console reads; `view()` is what GET /console/api/live answers. Each new
    snapshot is turned into one interval's figures at once, so a read only assembles series."""

    def __init__(self, registry: CollectorRegistry, interval_s: float = INTERVAL_S, keep: int = KEEP) -> None:
        self.registry = registry
        self.interval_s = interval_s
        self.intervals: deque[dict[Labels, dict[str, float | None]]] = deque(maxlen=keep - 1)
        self._last: tuple[float, Snapshot] | None = None
        self._task: asyncio.Task | None = None
        self._read_at = 0.0

    def view(self) -> dict[str, Any]:
        """Per model and version, each figure as a series (oldest first) over the intervals sampled so far."""
        self._read_at = time.monotonic()
        if self._task is None or self._task.done():
            self._take()
            self._task = asyncio.get_running_loop().create_task(self._sample())
        models: dict[str, dict[str, dict[str, Any]]] = {}
        for index, interval in enumerate(self.intervals):
            for (model, version), values in interval.items():
                series = models.setdefault(model, {}).setdefault(version, {"kind": values["kind"]})
                for name, value in values.items():
                    if name != "kind":  # a version that appeared later starts with gaps: series line up with points
                        series.setdefault(name, [None] * index).append(value)
        for versions in models.values():  # a version unloaded since ends with gaps: every series has `points` values
            for series in versions.values():
                for values in series.values():
                    if isinstance(values, list):
                        values.extend([None] * (len(self.intervals) - len(values)))
        return {"interval_s": self.interval_s, "points": len(self.intervals), "models": models}

    def _take(self) -> None:
        now, taken = time.monotonic(), snapshot(self.registry)
        if self._last is not None:
            self.intervals.append(figures(self._last[1], taken, max(now - self._last[0], 1e-6)))
        self._last = (now, taken)

    async def _sample(self) -> None:
        while time.monotonic() - self._read_at < IDLE_S:
            await asyncio.sleep(self.interval_s)
            self._take()
        self._last = None  # a pause: the next read starts a fresh interval rather than one spanning the gap

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
