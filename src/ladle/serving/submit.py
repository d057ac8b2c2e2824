"""Running one request on a classic model version: check it against the signature, queue it on the version's
batcher, wait for the result, and count its outcome — the one path KServe inference and /v1/embeddings share.

Invariants: nothing reaches a batcher unchecked; a request whose caller stops waiting (its client went away) is
dropped from the queue at once, before it runs; every request's outcome is counted once, on the version that took it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from types import TracebackType

import numpy as np

from ladle.batching.batcher import InferResult
from ladle.errors import InvalidInput, LadleError
from ladle.repository.signature import check_inputs, check_outputs
from ladle.serving.versions import ModelVersion

log = logging.getLogger(__name__)

#: waits for a queued request's future, e.g. until the client disconnects (then it raises, and the request is dropped)
Wait = Callable[[asyncio.Future], Awaitable[InferResult]]


async def submit(
    mv: ModelVersion, inputs: dict[str, tuple[str, np.ndarray]], wait: Wait, priority: int = 0,
    timeout_s: float | None = None, outputs: Iterable[str] | None = None, background: bool = False,
) -> InferResult:
    """`inputs`: name -> (datatype, array); `outputs`: the outputs the client asked for, if it named any;
    `background`: a batch-job line, queued below every priority level."""
    if mv.batcher is None:  # the version routed to may be an LLM
        raise InvalidInput(f"model '{mv.name}' is an LLM: use the OpenAI API (POST /v1/completions)")
    label = f"{mv.name}:{mv.version}"
    rows = check_inputs(label, mv.config, mv.inputs, inputs)
    if outputs is not None:
        check_outputs(label, mv.outputs, outputs)
    arrays = {name: array for name, (_, array) in inputs.items()}
    pending = mv.batcher.submit(arrays, rows, priority, timeout_s, background=background)
    try:
        result = await wait(pending.future)
    except BaseException:
        mv.batcher.cancel(pending)  # a no-op once resolved; else the client is gone: drop it before it runs
        raise
    mv.metrics.queue_duration.observe(result.queue_s)
    stats = mv.metrics.stats
    stats.queue_count += 1
    stats.queue_ns += int(result.queue_s * 1e9)
    log.debug("infer %s rows=%d queue=%.2fms compute=%.2fms batch=%d", label, rows, result.queue_s * 1e3,
              result.compute_s * 1e3, result.batch_rows)
    return result


class Outcome:
    """Counts one request's outcome on its version's metrics: `with Outcome(mv, started, ClientGone) as o:` ...;
    set `o.mv` when another version takes the request over (a reload while its body arrived)."""

    __slots__ = ("gone", "mv", "started")

    def __init__(self, mv: ModelVersion, started: float, gone: type[BaseException]) -> None:
        self.mv, self.started, self.gone = mv, started, gone

    def __enter__(self) -> Outcome:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        metrics = self.mv.metrics
        now = time.monotonic()
        elapsed = now - self.started
        if exc is None:
            metrics.outcome("success")
            metrics.request_duration.observe(elapsed)
            metrics.window.record(elapsed, False)
            metrics.stats.request(True, elapsed, now)
        elif isinstance(exc, self.gone):
            metrics.outcome("cancelled")
        elif isinstance(exc, LadleError):
            failed = exc.status >= 500
            metrics.outcome("error" if failed else "rejected")
            metrics.stats.request(False, elapsed, now)  # Triton's `fail`: any request that got no answer, 4xx or 5xx
            if failed:  # a client's bad request says nothing about the version's health
                metrics.window.record(elapsed, True)
