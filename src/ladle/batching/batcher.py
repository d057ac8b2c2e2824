"""The dynamic batcher of one model version: gathers queued requests into batches for instances.

Invariants: at most one batch per instance runs at a time; every submitted request's future is
resolved exactly once (result, model error, queue timeout, or cancelled by its client); a request
whose client went away or whose deadline passed never starts running. The event loop only moves
references: concatenating, running and splitting happen on the instance's thread. A batch that overruns
`execution_timeout_ms` fails (504) and its instance leaves rotation until it is back (see faults below).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ladle.batching.batch import concat_inputs, padding_groups, shape_key, split_outputs
from ladle.batching.inline import InlinePolicy
from ladle.batching.instances import Instance, WorkerDied
from ladle.batching.queue import PendingRequest, RequestQueue
from ladle.errors import DeadlineExceeded, InvalidInput, LadleError, ModelError, QueueFull, QueueTimeout, Unavailable
from ladle.repository.model_config import DynamicBatching, ModelConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferResult:
    """A request's own outputs, and how long it queued and computed."""

    outputs: dict[str, np.ndarray]
    queue_s: float
    compute_s: float
    batch_rows: int
    batch_started: float = 0.0  # time.monotonic() when its batch started (tracing places its spans by it)


class BatchObserver(Protocol):
    """Receives per-batch facts for metrics; called on the event loop. `phases`: (gather inputs, model call, split
    outputs) in ns, measured on the instance thread; None when the batch failed."""

    def on_batch(self, rows: int, requests: int, compute_s: float, phases: tuple[int, int, int] | None = None) -> None:
        ...


class Batcher:
    def __init__(
        self, label: str, config: ModelConfig, instances: Sequence[Instance], observer: BatchObserver | None = None
    ) -> None:
        self.label = label
        self.config = config
        self.instances = list(instances)
        self.observer = observer
        self._policy = config.dynamic_batching or DynamicBatching()
        self._merge = config.dynamic_batching is not None
        self._max_rows = max(config.max_batch_size, 1)
        self.queue = RequestQueue(self._policy.max_queue_size, self._policy.priority_levels)
        self._group = self._policy.ragged == "group"
        self._delay_s = self._policy.max_queue_delay_ms / 1000.0
        self._idle: list[Instance] = list(reversed(self.instances))  # a stack: the first instance runs first
        self._running = 0  # batches on instances now
        self._timer: asyncio.TimerHandle | None = None
        self._inflight = 0  # submitted and not yet resolved (queued + running)
        self._closing = False
        self._refusal: str | None = None  # why submit answers 503 at once (unloading, no instance can run)
        self._down: set[Instance] = set()  # can't run: a failed restart, or a thread stuck past the timeout
        self._loop = asyncio.get_running_loop()
        inline_ok = config.instance_kind == "thread" and config.inline_max_us > 0
        self._inline = InlinePolicy(config.inline_max_us / 1e6) if inline_ok else None
        self._redispatch: asyncio.Handle | None = None  # the next loop turn's dispatch, after an inline batch
        self._execution_timeout_s = config.execution_timeout_ms / 1000.0

    # -- the request side -------------------------------------------------------------------
    def submit(
        self, inputs: dict[str, np.ndarray], rows: int, priority: int = 0, timeout_s: float | None = None,
        background: bool = False,
    ) -> PendingRequest:
        """Queue a request; await `.future` for its InferResult. Raises at once when it can't queue (a full queue
        refuses background requests too: the job retries). A background (batch-job) request goes to the level
        below every configured one, whatever `priority` says, so batches take it only after real-time requests."""
        if self._refusal is not None:
            raise Unavailable(self._refusal)
        if self.queue.full:
            raise QueueFull(f"model {self.label}: queue is full ({self.queue.max_size} requests); retry later")
        level = self.queue.background_level if background else self._priority_level(priority)
        if timeout_s is None and self._policy.default_queue_timeout_ms:
            timeout_s = self._policy.default_queue_timeout_ms / 1000.0
        now = time.monotonic()
        pending = PendingRequest(
            inputs=inputs, rows=rows, priority=level, future=self._loop.create_future(),
            deadline=None if timeout_s is None else now + timeout_s,
            shape_key=shape_key(inputs) if self._merge else (), enqueued_at=now,
        )
        if timeout_s is not None:
            pending.timer = self._loop.call_later(timeout_s, self._expire, pending)
        self.queue.push(pending)
        self._inflight += 1
        pending.future.add_done_callback(self._resolved)
        self._dispatch()
        return pending

    @property
    def inflight(self) -> int:
        """Requests submitted and not yet answered (queued or running)."""
        return self._inflight

    def _resolved(self, future: asyncio.Future) -> None:
        if future.cancelled():  # resolutions by _resolve were counted there, synchronously
            self._inflight -= 1

    def _resolve(self, pending: PendingRequest, outcome: InferResult | LadleError) -> None:
        """Resolve a request exactly once; counted at once so the next _dispatch sees it."""
        if pending.future.done():
            return
        self._inflight -= 1
        if isinstance(outcome, LadleError):
            pending.future.set_exception(outcome)
        else:
            pending.future.set_result(outcome)

    def cancel(self, pending: PendingRequest) -> None:
        """The client went away: drop the request if it has not started."""
        if self.queue.discard(pending) and pending.timer is not None:
            pending.timer.cancel()
        if not pending.future.done():
            pending.future.cancel()

    def _priority_level(self, priority: int) -> int:
        if priority == 0:
            return self._policy.default_priority_level
        if not 1 <= priority <= self._policy.priority_levels:
            raise InvalidInput(
                f"priority {priority} is out of range: model {self.label} has priority levels "
                f"1 (highest) to {self._policy.priority_levels}, or 0 for the default"
            )
        return priority

    def _expire(self, pending: PendingRequest) -> None:
        if self.queue.discard(pending):
            message = f"model {self.label}: request timed out in the queue before it could run"
            self._resolve(pending, QueueTimeout(message))

    # -- the dispatch side ------------------------------------------------------------------
    # Event-driven, no dispatcher task: a submit, a finished batch or the delay timer each call
    # _dispatch, which starts batches while instances are idle. Every await saved here is latency.
    # An inline batch runs on the loop itself, so at most one runs per loop turn: a backlog then drains
    # one batch per turn (call_soon) with every other callback getting its turn in between, never recursively.
    def _dispatch(self) -> None:
        if self._redispatch is not None:
            return  # an inline batch ran this turn: the scheduled dispatch takes it from here
        while self._idle and len(self.queue):
            max_rows = self._ready_rows()
            if max_rows is None:
                self._arm_timer()
                return
            batch = self.queue.take_batch(max_rows, group=self._group, max_requests=0 if self._merge else 1)
            if batch and self._start(self._idle.pop(), batch) and len(self.queue):
                self._redispatch = self._loop.call_soon(self._dispatch_next_turn)
                return

    def _dispatch_next_turn(self) -> None:
        self._redispatch = None
        self._dispatch()

    def _ready_rows(self) -> int | None:
        """How many rows to take now, or None to keep waiting for a fuller batch."""
        if not self._merge:
            return self._max_rows
        queued = self.queue.rows
        if queued >= self._max_rows:
            return self._max_rows
        fitting = [p for p in self._policy.preferred_batch_sizes if p <= queued]
        if fitting:
            return fitting[-1]
        if self._policy.eager and len(self.queue) == self._inflight:
            return self._max_rows  # every request we hold is waiting: no one else is about to join
        oldest = self.queue.oldest_arrival()
        if oldest is None or time.monotonic() >= oldest + self._delay_s:
            return self._max_rows
        return None

    def _arm_timer(self) -> None:
        if self._timer is None:
            oldest = self.queue.oldest_arrival() or time.monotonic()
            remaining = oldest + self._delay_s - time.monotonic()
            # the loop clock may be coarser than monotonic(): never spin on a zero delay
            self._timer = self._loop.call_later(max(remaining, 0.0002), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch()

    def _start(self, instance: Instance, batch: list[PendingRequest]) -> bool:
        """Run a batch on `instance`; True if it ran inline (already finished when this returns)."""
        for pending in batch:
            if pending.timer is not None:
                pending.timer.cancel()
        started = time.monotonic()
        self._running += 1
        if self._inline is not None and self._inline.allowed:
            try:
                outcome: tuple | BaseException = self._timed_execute(instance, batch)
            except Exception as exc:  # handled like a failure on the thread
                outcome = exc
            self._complete(instance, batch, started, outcome)
            return True
        future = instance.worker.submit(self._loop, self._timed_execute, instance, batch)
        watchdog = None
        if self._execution_timeout_s > 0:
            watchdog = self._loop.call_later(self._execution_timeout_s, self._overran, instance, batch)
        future.add_done_callback(lambda f: self._finished(instance, batch, started, f, watchdog))
        return False

    def _finished(
        self, instance: Instance, batch: list[PendingRequest], started: float, future: asyncio.Future,
        watchdog: asyncio.TimerHandle | None,
    ) -> None:
        if watchdog is not None:
            watchdog.cancel()
        self._complete(instance, batch, started, future.exception() or future.result())
        self._dispatch()

    def _complete(self, instance: Instance, batch: list[PendingRequest], started: float, outcome) -> None:
        self._running -= 1
        if isinstance(outcome, WorkerDied):
            self._restart(instance)
        else:
            self._idle.append(instance)
            if self._down:
                self._mark_up(instance)
        phases = None
        if isinstance(outcome, LadleError):
            pieces = [outcome] * len(batch)
        elif isinstance(outcome, BaseException):  # a model's own failure must not take the batcher down
            log.error("model %s failed on a batch of %d requests", self.label, len(batch), exc_info=outcome)
            pieces = [ModelError(f"model {self.label} failed: {type(outcome).__name__}: {outcome}")] * len(batch)
        else:
            pieces, model_s, phases = outcome
            if self._inline is not None:
                self._inline.record(model_s)
        compute_s = time.monotonic() - started
        rows = sum(p.rows for p in batch)
        for pending, piece in zip(batch, pieces, strict=True):
            if isinstance(piece, LadleError):
                self._resolve(pending, piece)
            else:
                self._resolve(pending, InferResult(piece, started - pending.enqueued_at, compute_s, rows, started))
        if self.observer is not None:
            self.observer.on_batch(rows, len(batch), compute_s, phases)

    def _timed_execute(self, instance: Instance, batch: list[PendingRequest]) -> tuple[list, float, tuple]:
        """(pieces, seconds, phases): `phases` is (gather, predict, split) in ns (statistics). A lone request has
        nothing to gather or split: its whole time is the model call, with no clock reads beyond these two."""
        phases = [0, 0, 0]
        started = time.perf_counter_ns()
        pieces = self._execute(instance, batch, phases)
        elapsed = time.perf_counter_ns() - started
        return pieces, elapsed / 1e9, (0, elapsed, 0) if len(batch) == 1 else tuple(phases)

    def _execute(
        self, instance: Instance, batch: list[PendingRequest], phases: list[int]
    ) -> list[dict[str, np.ndarray]]:
        """On the instance thread (or inline, see inline.py): assemble, run, split."""
        if not self.config.batched or len(batch) == 1:  # one request: concat and split would return it as it is
            return [instance.predict(batch[0].inputs)]
        requests = [p.inputs for p in batch]
        pad = self._policy.ragged == "pad"
        groups = padding_groups(requests) if pad else [list(range(len(batch)))]
        if len(groups) == 1:
            return self._run_group(instance, requests, [p.rows for p in batch], pad, phases)
        pieces: list[dict[str, np.ndarray] | LadleError] = [{}] * len(batch)
        for group in groups:  # shapes that would pad too far run apart; a failure stays with its own group
            try:
                outputs = self._run_group(instance, [requests[i] for i in group], [batch[i].rows for i in group], pad,
                                          phases)
            except LadleError as exc:
                outputs = [exc] * len(group)
            except Exception as exc:
                log.error("model %s failed on a group of %d requests", self.label, len(group), exc_info=exc)
                outputs = [ModelError(f"model {self.label} failed: {type(exc).__name__}: {exc}")] * len(group)
            for i, piece in zip(group, outputs, strict=True):
                pieces[i] = piece
        return pieces

    def _run_group(
        self, instance: Instance, requests: list[dict[str, np.ndarray]], rows: list[int], pad: bool, phases: list[int]
    ) -> list[dict[str, np.ndarray]]:
        """One model call; adds its gather/predict/split times to `phases` (a few clock reads per batch)."""
        clock = time.perf_counter_ns
        t0 = clock()
        inputs = concat_inputs(requests, pad=pad, padding_value=self._policy.padding_value)
        t1 = clock()
        outputs = instance.predict(inputs)
        t2 = clock()
        pieces = split_outputs(outputs, rows)
        phases[0] += t1 - t0
        phases[1] += t2 - t1
        phases[2] += clock() - t2
        return pieces

    # -- faults -------------------------------------------------------------------------------
    # A batch past execution_timeout_ms fails with 504 at once. A process instance's worker is killed (its
    # predict then raises WorkerDied and the worker is restarted); a thread cannot be stopped, so its instance
    # stays out of rotation until the thread returns. While no instance at all can run, the queue is failed
    # and new requests are refused (503 + Retry-After) rather than left waiting on nothing.
    def _overran(self, instance: Instance, batch: list[PendingRequest]) -> None:
        timeout_ms = self.config.execution_timeout_ms
        error = DeadlineExceeded(
            f"model {self.label}: the batch running this request took longer than execution_timeout_ms="
            f"{timeout_ms:g} and was stopped"
        )
        for pending in batch:
            self._resolve(pending, error)
        if instance.abort():
            log.warning("model %s: instance %s overran %g ms; killing its worker", self.label, instance.name,
                        timeout_ms)
            return
        log.warning("model %s: instance %s overran %g ms; its thread cannot be stopped, so the instance is out "
                    "of rotation until the batch returns", self.label, instance.name, timeout_ms)
        self._mark_down(instance)

    def _restart(self, instance: Instance) -> None:
        """Replace a dead worker on the instance's own thread (the back-off sleeps there, not on the loop)."""
        future = instance.worker.submit(self._loop, instance.restart)
        future.add_done_callback(lambda f: self._restarted(instance, f))

    def _restarted(self, instance: Instance, future: asyncio.Future) -> None:
        error = None if future.cancelled() else future.exception()
        if error is None:  # back in rotation (even while closing: it may still drain the queue)
            self._idle.append(instance)
            self._mark_up(instance)
            self._dispatch()
            return
        if self._closing:
            return
        log.error("model %s: instance %s could not restart its worker: %s", self.label, instance.name, error)
        self._mark_down(instance)
        self._restart(instance)

    def _mark_down(self, instance: Instance) -> None:
        self._down.add(instance)
        if len(self._down) < len(self.instances) or self._closing:
            return
        self._refusal = (
            f"model {self.label}: no instance can run requests now (workers restarting or stuck past "
            "execution_timeout_ms); retry later"
        )
        for pending in self.queue.drain():
            self._resolve(pending, Unavailable(self._refusal))

    def _mark_up(self, instance: Instance) -> None:
        if instance in self._down:
            self._down.discard(instance)
            log.info("model %s: instance %s is back in rotation", self.label, instance.name)
        if not self._closing:
            self._refusal = None

    # -- lifecycle ----------------------------------------------------------------------------
    async def close(self, drain_timeout_s: float = 30.0) -> None:
        """Stop taking requests, let queued and running ones finish (up to the timeout), free instances."""
        self._closing = True
        self._refusal = f"model {self.label} is unloading; retry against another version or later"
        deadline = time.monotonic() + drain_timeout_s
        while (len(self.queue) or self._running) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._timer is not None:
            self._timer.cancel()
        if self._redispatch is not None:
            self._redispatch.cancel()
        for pending in self.queue.drain():
            self._resolve(pending, Unavailable(f"model {self.label} was unloaded before the request could run"))
        for instance in self.instances:
            await asyncio.to_thread(instance.close)

