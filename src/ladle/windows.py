"""What a rollout's gates read: the recent requests of one version (when each ended, how long it took, whether it
failed), kept in a bounded ring so a gate can look at exactly the requests of its own time window.

Invariant: recording is one deque append (the classic hot path pays ~100 ns); reading copies a snapshot, so
the window is safe to record into from the engine thread while the event loop reads it.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass

#: requests remembered per version: at 2,000 req/s, the last 30 s (a gate window longer than that is sampled
#: from its most recent requests, which the status says)
CAPACITY = 65536


@dataclass(frozen=True)
class WindowStats:
    """Requests that ended in a window: how many, how many failed (server errors), and the p99 latency."""

    requests: int
    errors: int
    p99_s: float | None
    truncated: bool = False  # the ring had wrapped: older requests of the window were forgotten

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


class RequestWindow:
    __slots__ = ("_ring",)

    def __init__(self, capacity: int = CAPACITY) -> None:
        self._ring: deque[tuple[float, float, bool]] = deque(maxlen=capacity)

    def record(self, latency_s: float, failed: bool, now: float | None = None) -> None:
        self._ring.append((time.monotonic() if now is None else now, latency_s, failed))

    def since(self, start: float, end: float | None = None) -> WindowStats:
        """Requests that ended at or after `start` (a time.monotonic() value) and before `end`."""
        snapshot = tuple(self._ring)  # deque iteration while another thread appends would raise
        rows = [row for row in snapshot if row[0] >= start and (end is None or row[0] < end)]
        truncated = len(snapshot) == self._ring.maxlen and bool(snapshot) and snapshot[0][0] > start
        errors = sum(1 for row in rows if row[2])
        # latency of the requests that succeeded: a failure's latency says nothing about the model's speed
        latencies = sorted(row[1] for row in rows if not row[2])
        return WindowStats(len(rows), errors, percentile(latencies, 0.99), truncated)


def percentile(ordered: list[float], q: float) -> float | None:
    """The nearest-rank percentile of an ascending list (None when empty)."""
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]
