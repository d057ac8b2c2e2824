"""What a rollout's gates read: the recent requests of one version (when each ended, how long it took, whether it
failed), kept in a bounded ring so a gate can look at exactly the requests of its own time window.

Invariant: recording is one deque append (the classic hot path pays ~100 ns); reading copies a snapshot, so
the window is safe to record into from the engine thread while the event loop reads it.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

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
        """Requests that ended at or after `start` (a time.monotonic() value) and before `end`. Read on the event
        loop once a second per rollout: a C-level copy, a bisection to the window, a partition for the p99 (a full
        ring of 65,536 requests: ~10 ms)."""
        snapshot = tuple(self._ring)  # deque iteration while another thread appends would raise
        # rows are appended in time order (one clock), so the window is one slice
        first = bisect.bisect_left(snapshot, start, key=_ended)
        last = len(snapshot) if end is None else bisect.bisect_left(snapshot, end, lo=first, key=_ended)
        rows = snapshot[first:last]
        truncated = len(snapshot) == self._ring.maxlen and bool(snapshot) and snapshot[0][0] > start
        # latency of the requests that succeeded: a failure's latency says nothing about the model's speed
        latencies = np.array([row[1] for row in rows if not row[2]])
        errors = len(rows) - len(latencies)
        if not len(latencies):
            return WindowStats(len(rows), errors, None, truncated)
        k = min(len(latencies) - 1, max(0, math.ceil(0.99 * len(latencies)) - 1))  # the nearest-rank p99
        return WindowStats(len(rows), errors, float(np.partition(latencies, k)[k]), truncated)


def _ended(row: tuple[float, float, bool]) -> float:
    return row[0]
