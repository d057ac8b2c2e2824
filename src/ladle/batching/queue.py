"""The bounded, priority-ordered queue of requests waiting for one model version.

Below the configured priority levels sits one more, the background level (batch jobs): its requests join a batch
only after every real-time request has.

Invariant: `len(queue)` counts live requests only (cancelled or expired ones are discounted the
moment they are marked, and skipped when reached), so the bound is exact and a full queue
answers 503 at once instead of growing; a discarded request drops its input arrays at once, and
discarded husks are compacted away before they outnumber the bound.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(eq=False)
class PendingRequest:
    """One request in the queue: its inputs (with batch dim), priority, deadline and outcome."""

    inputs: dict[str, np.ndarray]
    rows: int
    priority: int  # 1 is the highest level (Triton's convention); priority_levels + 1 is the background level
    deadline: float | None  # time.monotonic() after which it must not start
    future: Any  # asyncio.Future resolved by the batcher
    shape_key: tuple = ()
    enqueued_at: float = field(default_factory=time.monotonic)
    done: bool = False  # taken, cancelled or expired: no longer waiting
    timer: Any = None  # the asyncio handle that expires it at its deadline

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


class RequestQueue:
    """FIFO within a priority level; higher levels (smaller numbers) always go first, the background level last."""

    def __init__(self, max_size: int, priority_levels: int) -> None:
        self.max_size = max_size
        # the configured levels, then the background level (index priority_levels)
        self._levels: list[deque[PendingRequest]] = [deque() for _ in range(priority_levels + 1)]
        self.background_level = priority_levels + 1
        self._live = 0
        self._rows = 0
        self._dead = 0  # discarded requests still sitting in the deques (skipped when reached)

    def __len__(self) -> int:
        return self._live

    @property
    def rows(self) -> int:
        """Batch rows of all live requests (what a batch could be filled with now)."""
        return self._rows

    @property
    def full(self) -> bool:
        return self._live >= self.max_size

    def push(self, request: PendingRequest) -> None:
        """Enqueue; the caller checks `full` first (a full queue is the caller's 503)."""
        self._levels[request.priority - 1].append(request)
        self._live += 1
        self._rows += request.rows

    def discard(self, request: PendingRequest) -> bool:
        """Mark a waiting request gone (cancelled or expired); it is skipped when reached."""
        if request.done:
            return False
        request.done = True
        # the inputs are views into a request body (up to the body limit): free them now, not when reached
        request.inputs = {}
        self._live -= 1
        self._rows -= request.rows
        self._dead += 1
        if self._dead > max(self.max_size, 64):
            self._compact()
        return True

    def _compact(self) -> None:
        """Drop discarded husks, so clients that queue and cancel in a loop cannot grow the deques."""
        for i, level in enumerate(self._levels):
            self._levels[i] = deque(r for r in level if not r.done)
        self._dead = 0

    def oldest_arrival(self) -> float | None:
        """Enqueue time of the oldest live request, for the max-queue-delay clock."""
        heads = [r.enqueued_at for r in self._live_heads()]
        return min(heads) if heads else None

    def take_batch(self, max_rows: int, group: bool, max_requests: int = 0) -> list[PendingRequest]:
        """Remove and return the next batch: the best request first, then compatible ones.

        With `group`, only requests whose shape key equals the first one's join it; the others
        keep their places. A request with more rows than fit is left for a later batch (the first
        request always goes, so an oversized one fails in the model rather than waiting forever).
        `max_requests` (0: no limit) caps how many requests share the batch.
        """
        batch: list[PendingRequest] = []
        rows = 0
        limit = max_requests or max_rows
        for level in self._levels:
            if rows >= max_rows or len(batch) >= limit:
                break
            rows = self._take_from(level, batch, rows, max_rows, group, limit)
        return batch

    def _take_from(
        self, level: deque[PendingRequest], batch: list[PendingRequest], rows: int, max_rows: int, group: bool,
        limit: int,
    ) -> int:
        kept: list[PendingRequest] = []
        while level and rows < max_rows and len(batch) < limit:
            request = level.popleft()
            if request.done:
                self._dead -= 1
                continue
            fits = not batch or rows + request.rows <= max_rows
            compatible = not group or not batch or request.shape_key == batch[0].shape_key
            if fits and compatible:
                request.done = True
                self._live -= 1
                self._rows -= request.rows
                batch.append(request)
                rows += request.rows
            else:
                kept.append(request)
        level.extendleft(reversed(kept))
        return rows

    def drain(self) -> Iterator[PendingRequest]:
        """Remove and yield every live request (server shutdown / model unload)."""
        for level in self._levels:
            while level:
                request = level.popleft()
                if request.done:
                    self._dead -= 1
                    continue
                request.done = True
                request.inputs = {}
                self._live -= 1
                self._rows -= request.rows
                yield request

    def _live_heads(self) -> Iterator[PendingRequest]:
        for level in self._levels:
            while level and level[0].done:
                level.popleft()
                self._dead -= 1
            if level:
                yield level[0]
