"""An answer the front end computes by asking every replica (/metrics, GET /v1/models, the repository index), computed
at most once per `ttl` seconds however many clients ask: concurrent and later callers within the window share it.

Why: under --ray each of those requests fans out one Ray call per model (or per replica); a client that hammers them
would otherwise multiply that work on the cluster and on the front end's event loop by its request rate.

Invariant: one computation at a time; a failed computation is not kept (the next caller computes again); `invalidate`
makes the next caller compute afresh (after a load or unload, whose effect must show at once) — also when a
computation was already under way: begun before the change, it answers its own callers but is not kept.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class SharedAnswer(Generic[T]):
    def __init__(self, ttl: float, compute: Callable[[], Awaitable[T]]) -> None:
        self.ttl = ttl
        self._compute = compute
        self._lock = asyncio.Lock()
        self._at = float("-inf")
        self._value: T | None = None
        self._generation = 0  # bumped by invalidate: an answer begun in an older generation is not kept

    async def get(self) -> T:
        async with self._lock:
            if time.monotonic() - self._at <= self.ttl:
                return self._value  # type: ignore[return-value]  (set before _at leaves -inf)
            generation, started = self._generation, time.monotonic()
            value = await self._compute()
            self._value = value
            self._at = started if generation == self._generation else float("-inf")
            return value

    def invalidate(self) -> None:
        self._generation += 1
        self._at = float("-inf")
