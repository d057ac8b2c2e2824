"""Shadow traffic of one model: a copy of a fraction of the requests its split routes goes to a candidate version,
after the primary answered; the two answers are compared into metrics and a bounded sample log.

Invariants: the caller's answer, status and latency never depend on the shadow (copies start once the primary has
answered, run at the lowest priority — the batcher's background level, the LLM engine's background class — and
every failure of theirs ends here); copies are shed first: none is made while `max_in_flight` copies run or the
primary has a backlog, and a full shadow queue drops the copy; the sample log keeps the newest LOG_SIZE verdicts.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import numpy as np

from ladle.errors import LadleError, QueueFull, Unavailable
from ladle.repository.model_config import ShadowOptions
from ladle.serving.shadow_compare import TensorDiff, TokenDiff, compare_tensors, compare_tokens
from ladle.serving.shadow_metrics import ShadowMetrics
from ladle.serving.submit import submit
from ladle.serving.versions import ModelVersion

log = logging.getLogger(__name__)

LOG_SIZE = 100
#: answers larger than this are compared on a worker thread, off the event loop
INLINE_COMPARE_BYTES = 256 * 1024

#: runs an LLM request again on another version; returns each choice's token ids
Replay = Callable[[ModelVersion], Awaitable[list[list[int]]]]


class Shadow:
    def __init__(self, model: str, options: ShadowOptions, metrics: ShadowMetrics) -> None:
        self.model = model
        self.options = options
        self.metrics = metrics
        self.in_flight = 0
        self.counts = {"compared": 0, "mismatches": 0, "failed": 0, "dropped": 0}
        self.samples: deque[dict[str, Any]] = deque(maxlen=LOG_SIZE)
        self._tasks: set[asyncio.Task] = set()

    # -- which requests are copied ----------------------------------------------------------------
    def draw(self, primary: ModelVersion, busy: bool) -> bool:
        """Whether this request (answered by `primary`) is copied; counts the copies shed."""
        if primary.version == self.options.version or random.random() >= self.options.fraction:
            return False
        if busy or self.in_flight >= self.options.max_in_flight:
            self._count("dropped")
            return False
        return True

    # -- copies -----------------------------------------------------------------------------------------
    def copy_tensors(self, target: ModelVersion, primary: ModelVersion, inputs: dict[str, tuple[str, np.ndarray]],
                     outputs: Mapping[str, np.ndarray], primary_s: float) -> None:
        """Run `inputs` on `target` in the background and compare with the primary's `outputs`."""
        self._spawn(self._tensors(target, primary, inputs, outputs, primary_s))

    def copy_tokens(self, target: ModelVersion, primary: ModelVersion, tokens: list[list[int]], replay: Replay,
                    primary_s: float) -> None:
        """Replay an LLM request on `target` in the background and compare each choice's tokens."""
        self._spawn(self._tokens(target, primary, tokens, replay, primary_s))

    def _spawn(self, work: Awaitable[None]) -> None:
        self.in_flight += 1
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self.in_flight -= 1

    async def _tensors(self, target: ModelVersion, primary: ModelVersion, inputs: dict,
                       outputs: Mapping[str, np.ndarray], primary_s: float) -> None:
        started = time.monotonic()
        try:
            result = await submit(target, inputs, _wait, background=True)
        except Exception as exc:  # the shadow's failure ends here: the caller has its answer already
            self._failed(target, primary, exc)
            return
        o = self.options
        if sum(getattr(a, "nbytes", 0) for a in outputs.values()) > INLINE_COMPARE_BYTES:
            diffs = await asyncio.to_thread(compare_tensors, outputs, result.outputs, o.atol, o.rtol)
        else:
            diffs = compare_tensors(outputs, result.outputs, o.atol, o.rtol)
        self._record(target, primary, diffs, primary_s, time.monotonic() - started)

    async def _tokens(self, target: ModelVersion, primary: ModelVersion, tokens: list[list[int]], replay: Replay,
                      primary_s: float) -> None:
        started = time.monotonic()
        try:
            shadow_tokens = await replay(target)
        except Exception as exc:
            self._failed(target, primary, exc)
            return
        diffs = [compare_tokens(p, s) for p, s in zip(tokens, shadow_tokens, strict=False)]
        self._record(target, primary, diffs, primary_s, time.monotonic() - started)

    # -- verdicts ---------------------------------------------------------------------------------------
    def _failed(self, target: ModelVersion, primary: ModelVersion, exc: Exception) -> None:
        if isinstance(exc, (QueueFull, Unavailable)):  # the shadow is busy or going away: shed, not broken
            self._count("dropped")
            return
        if not isinstance(exc, LadleError):
            log.warning("shadow %s:%d failed: %s: %s", self.model, target.version, type(exc).__name__, exc)
        self._count("failed")
        self.samples.append({**_head(target, primary), "outcome": "failed",
                             "error": f"{type(exc).__name__}: {exc}"[:500]})

    def _record(self, target: ModelVersion, primary: ModelVersion, diffs: list[TensorDiff] | list[TokenDiff],
                primary_s: float, shadow_s: float) -> None:
        mismatch = any(d.mismatch for d in diffs)
        self._count("compared")
        if mismatch:
            self.counts["mismatches"] += 1
            self.metrics.mismatches.labels(self.model, str(target.version)).inc()
        self._observe(str(target.version), diffs)
        key = "outputs" if diffs and isinstance(diffs[0], TensorDiff) else "choices"
        self.samples.append({**_head(target, primary), "outcome": "mismatch" if mismatch else "match",
                             "latency_ms": {"primary": round(primary_s * 1e3, 3), "shadow": round(shadow_s * 1e3, 3)},
                             key: [d.as_dict() for d in diffs]})

    def _observe(self, version: str, diffs: list[TensorDiff] | list[TokenDiff]) -> None:
        m = self.metrics
        for d in diffs:
            if isinstance(d, TensorDiff) and d.max_abs is not None:
                m.tensor_difference.labels(self.model, version, "max_abs").observe(d.max_abs)
                m.tensor_difference.labels(self.model, version, "max_rel").observe(d.max_rel or 0.0)
            elif isinstance(d, TokenDiff) and d.first_difference is not None:
                m.token_difference.labels(self.model, version, "first_difference").observe(d.first_difference)
                m.token_difference.labels(self.model, version, "length_difference").observe(abs(d.length_difference))

    def _count(self, outcome: str) -> None:
        self.counts[outcome] += 1
        self.metrics.requests.labels(self.model, str(self.options.version), outcome).inc()

    # -- status and lifecycle ---------------------------------------------------------------------------
    def status(self, target_ready: bool) -> dict[str, Any]:
        """What GET /v2/models/{m}/shadow answers: the settings, the counts and the newest samples first."""
        return {"model": self.model, **self.options.model_dump(), "ready": target_ready,
                "in_flight": self.in_flight, "counts": dict(self.counts), "samples": list(reversed(self.samples))}

    async def close(self) -> None:
        """The model is unloaded or its shadow removed: copies still running are cancelled."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _wait(future: asyncio.Future) -> Any:
    return await future


def _head(target: ModelVersion, primary: ModelVersion) -> dict[str, Any]:
    return {"time": round(time.time(), 3), "primary_version": primary.version, "shadow_version": target.version}
