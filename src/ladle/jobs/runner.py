"""The job runner: one asyncio task per server that moves jobs through their phases and feeds their lines to the
engines, a window of lines per model at a time, through the server's own routes at batch priority.

Invariants: a line runs only while this server holds its claim; its result is stored by finish_lines (which ignores
a line whose claim was lost), so a line is never stored twice; a line aborted (cancel, expiry, shutdown) or refused
for now (503/429) goes back to pending, never into the output. The event loop never touches the store directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ladle.jobs import phases
from ladle.jobs.dispatch import ABORTED, Call, Dispatcher
from ladle.jobs.lines import CheckModel, line_result
from ladle.jobs.metrics import JobMetrics
from ladle.jobs.records import (
    CANCELLING,
    FINALIZING,
    IN_PROGRESS,
    VALIDATING,
    JobRecord,
    LineRecord,
    LineResult,
)
from ladle.jobs.store import AsyncStore

log = logging.getLogger(__name__)

LEASE_S = 60.0  # a claim outlives a stalled server this long; renewed every RENEW_S while the server lives
RENEW_S = 10.0
TICK_S = 0.25  # the longest a runner sleeps with nothing to wake it (new jobs and finished lines wake it)
COALESCE_S = 0.02
BACKOFF_S = 0.25  # after the engine refused a line for now (queue full)
RETRY_STATUSES = (429, 503)

#: how many lines of one model may run at once (the model's window)
WindowSize = Callable[[str | None], int]


@dataclass
class _Flight:
    """A line this server is running."""

    job: JobRecord
    line: LineRecord
    call: Call
    task: asyncio.Task | None = None


@dataclass
class _State:
    flights: dict[tuple[str, int], _Flight] = field(default_factory=dict)
    per_model: dict[str | None, int] = field(default_factory=dict)
    done: list[LineResult] = field(default_factory=list)
    released: list[tuple[str, int]] = field(default_factory=list)
    backoff_until: dict[str | None, float] = field(default_factory=dict)


class JobRunner:
    def __init__(self, store: AsyncStore, dispatcher: Dispatcher, owner: str, window: WindowSize,
                 check_model: Callable[[], CheckModel], metrics: JobMetrics) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.owner = owner
        self.window = window
        self.check_model = check_model  # a snapshot of what the host serves, taken on the event loop
        self.metrics = metrics
        self._state = _State()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closing = False
        self._renewed = self._counted = 0.0

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._main())

    def wake(self) -> None:
        self._wake.set()

    async def _main(self) -> None:
        s = self.store.store
        await self.store.call(s.recover, self.owner)
        while not self._closing:
            self._wake.clear()
            try:
                await self._tick()
            except Exception:  # a store hiccup (locked database, lost connection) must not end the runner
                log.exception("job runner tick failed; retrying")
                await asyncio.sleep(1.0)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), TICK_S)
            await asyncio.sleep(COALESCE_S)  # lines finishing together are stored and refilled together

    async def _tick(self) -> None:
        await self._flush()
        now = time.monotonic()
        s = self.store.store
        if now - self._renewed > RENEW_S:
            self._renewed = now
            await self.store.call(s.renew_leases, self.owner, LEASE_S)
        if now - self._counted > 2.0:
            self._counted = now
            self.metrics.set_statuses(await self.store.call(s.status_counts))
            self.metrics.queue_depth.set(await self.store.call(s.pending_lines))
        jobs = await self.store.call(s.jobs_with_status, (VALIDATING, IN_PROGRESS, FINALIZING, CANCELLING))
        self._abort_stopped(jobs)
        for job in jobs:
            await self._advance(job)
        self.metrics.in_flight.set(len(self._state.flights))

    async def _advance(self, job: JobRecord) -> None:
        if job.status == VALIDATING:
            await self._validate(job)
        elif job.status == IN_PROGRESS:
            if job.expires_at <= time.time():
                await self._finalize(job)  # in_progress -> expired
            else:
                await self._feed(job)
        elif job.status == FINALIZING or (job.status == CANCELLING and self._settled(job)):
            await self._finalize(job)

    # -- phases ---------------------------------------------------------------------------------
    async def _validate(self, job: JobRecord) -> None:
        s = self.store.store
        if not await self.store.call(s.claim_job, job.id, self.owner, LEASE_S):
            return
        try:
            status = await self.store.call(phases.validate, s, job, self.check_model())
            log.info("job %s validated: %s", job.id, status)
        finally:
            await self.store.call(s.release_job, job.id, self.owner)

    async def _finalize(self, job: JobRecord) -> None:
        s = self.store.store
        if any(f.job.id == job.id for f in self._state.flights.values()):
            return  # its lines are being aborted: finalize once they are back
        if not await self.store.call(s.claim_job, job.id, self.owner, LEASE_S):
            return
        try:
            status = await self.store.call(phases.finalize, s, job)
            log.info("job %s %s", job.id, status)
        finally:
            await self.store.call(s.release_job, job.id, self.owner)

    def _settled(self, job: JobRecord) -> bool:
        """A cancelled job is finalized once no line of it runs here, and other servers had a lease's time to
        give theirs back."""
        mine = any(f.job.id == job.id for f in self._state.flights.values())
        return not mine and (job.cancelling_at is None or time.time() - job.cancelling_at > TICK_S * 4)

    # -- lines ----------------------------------------------------------------------------------
    async def _feed(self, job: JobRecord) -> None:
        st = self._state
        model = job.model
        if st.backoff_until.get(model, 0.0) > time.monotonic():
            return
        free = self.window(model) - st.per_model.get(model, 0)
        if free <= 0:
            return
        s = self.store.store
        lines = await self.store.call(s.claim_lines, job.id, self.owner, free, LEASE_S)
        for line in lines:
            self._launch(job, line)
        if not lines and not any(f.job.id == job.id for f in st.flights.values()):
            counts = await self.store.call(s.line_counts, job.id)
            if counts.get("pending", 0) == 0 and counts.get("running", 0) == 0:
                await self.store.call(s.update_job, job.id, expect=[IN_PROGRESS], status=FINALIZING,
                                      finalizing_at=int(time.time()))
                self.wake()

    def _launch(self, job: JobRecord, line: LineRecord) -> None:
        st = self._state
        flight = _Flight(job, line, Call(line.url, line.body))
        st.flights[(job.id, line.line_no)] = flight
        st.per_model[job.model] = st.per_model.get(job.model, 0) + 1
        flight.task = asyncio.ensure_future(self._run(flight))

    async def _run(self, flight: _Flight) -> None:
        st = self._state
        try:
            status, body = await self.dispatcher.run(flight.call)
        finally:
            key = (flight.job.id, flight.line.line_no)
            st.flights.pop(key, None)
            st.per_model[flight.job.model] -= 1
        if status == ABORTED or status in RETRY_STATUSES:
            st.released.append(key)
            if status != ABORTED:
                st.backoff_until[flight.job.model] = time.monotonic() + BACKOFF_S
        else:
            st.done.append(line_result(flight.job, flight.line, status, body))
        self.wake()

    def _abort_stopped(self, jobs: list[JobRecord]) -> None:
        """Lines of jobs no longer in progress (cancelled, or expired) stop at once."""
        active = {j.id for j in jobs if j.status == IN_PROGRESS and j.expires_at > time.time()}
        for flight in list(self._state.flights.values()):
            if flight.job.id not in active:
                flight.call.abort()

    async def _flush(self) -> None:
        st = self._state
        s = self.store.store
        if st.done:
            done, st.done = st.done, []
            await self.store.call(s.finish_lines, self.owner, done)
            for result in done:
                self.metrics.line_done(result.ok)
        if st.released:
            released, st.released = st.released, []
            await self.store.call(s.release_lines, self.owner, released)

    async def close(self) -> None:
        """Stop claiming, abort what runs (those lines are pending again for the next start), store what finished."""
        self._closing = True
        self.wake()
        for flight in list(self._state.flights.values()):
            flight.call.abort()
        tasks = [f.task for f in self._state.flights.values() if f.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=10.0)
        if self._task is not None:
            await asyncio.wait([self._task], timeout=5.0)
        await self._flush()
