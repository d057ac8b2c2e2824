"""The background level of the classic queue (batch jobs): below every configured priority, FIFO among itself,
filling a batch only after real-time requests, and counted, discarded, drained and refused like the others."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ladle.batching.batcher import Batcher
from ladle.batching.queue import PendingRequest, RequestQueue
from ladle.errors import QueueFull, QueueTimeout
from tests.batching.test_batcher import RecordingInstance, config, row


def req(rows: int = 1, priority: int = 1, tag: int = 0) -> PendingRequest:
    return PendingRequest(inputs={"x": np.full((rows, 1), tag)}, rows=rows, priority=priority, deadline=None,
                          future=None)


def test_background_requests_come_after_every_level_fifo_among_themselves() -> None:
    q = RequestQueue(max_size=10, priority_levels=2)
    assert q.background_level == 3
    b1, b2 = req(priority=3, tag=1), req(priority=3, tag=2)
    low, high = req(priority=2, tag=3), req(priority=1, tag=4)
    for r in (b1, b2, low, high):
        q.push(r)
    assert q.take_batch(max_rows=1, group=False) == [high]
    assert q.take_batch(max_rows=1, group=False) == [low]
    assert q.take_batch(max_rows=1, group=False) == [b1]
    assert q.take_batch(max_rows=1, group=False) == [b2]
    assert len(q) == 0 and q.rows == 0


def test_a_batch_is_filled_with_real_time_requests_first() -> None:
    q = RequestQueue(max_size=10, priority_levels=1)
    bs = [req(priority=2, tag=i) for i in range(3)]
    rts = [req(priority=1, tag=10 + i) for i in range(2)]
    for r in (*bs, *rts):
        q.push(r)
    assert q.take_batch(max_rows=4, group=False) == [*rts, bs[0], bs[1]]
    assert q.take_batch(max_rows=4, group=False) == [bs[2]]


def test_background_requests_are_counted_discarded_and_drained_like_others() -> None:
    q = RequestQueue(max_size=3, priority_levels=1)
    b, big, r = req(priority=2), req(rows=3, priority=2), req(priority=1)
    b.enqueued_at, big.enqueued_at, r.enqueued_at = 1.0, 2.0, 3.0
    for x in (b, big, r):
        q.push(x)
    assert (len(q), q.rows, q.full) == (3, 5, True)
    assert q.oldest_arrival() == 1.0  # the max-queue-delay clock counts a waiting job too
    assert q.discard(b) is True and q.discard(b) is False
    assert (len(q), q.rows, q.full) == (2, 4, False) and b.inputs == {}
    assert q.oldest_arrival() == 2.0
    assert list(q.drain()) == [r, big] and len(q) == 0 and q.rows == 0


def test_discarded_background_husks_are_compacted() -> None:
    q = RequestQueue(max_size=2, priority_levels=1)
    for _ in range(200):  # a job that queues and gives up in a loop
        r = req(priority=2)
        q.push(r)
        q.discard(r)
    kept = req(priority=2)
    q.push(kept)
    assert sum(len(level) for level in q._levels) < 70  # compacted at 65 husks
    assert q.take_batch(max_rows=4, group=False) == [kept]


@given(st.lists(st.tuples(st.integers(1, 3), st.integers(1, 4), st.booleans()), max_size=40), st.integers(1, 8),
       st.booleans())
def test_every_live_request_comes_out_once_real_time_levels_before_background(ops, max_rows, one_row) -> None:
    q = RequestQueue(max_size=100, priority_levels=2)  # level 3 is the background level
    pushed = []
    for i, (priority, rows, cancel) in enumerate(ops):
        r = req(rows=1 if one_row else rows, priority=priority, tag=i)
        q.push(r)
        pushed.append((r, cancel))
    for r, cancel in pushed:
        if cancel:
            q.discard(r)
    live = [r for r, cancel in pushed if not cancel]
    taken = []
    while len(q):
        batch = q.take_batch(max_rows=max_rows, group=False)
        assert batch and (sum(r.rows for r in batch) <= max_rows or len(batch) == 1)
        taken.extend(batch)
    assert sorted(map(id, taken)) == sorted(map(id, live))
    if one_row:  # (else a request with more rows than fit may be passed over for a later batch)
        levels = [r.priority for r in taken]
        assert levels == sorted(levels)  # nobody is taken before a live request of a higher level
        for level in (1, 2, 3):  # FIFO within each level
            order = [pushed.index((r, False)) for r in taken if r.priority == level]
            assert order == sorted(order)


# ------------------------------------------------------------------------------------------- the batcher


def test_submit_background_runs_after_real_time_whatever_its_priority() -> None:
    async def main() -> None:
        inst = RecordingInstance()
        inst.gate.clear()
        b = Batcher("m:1", config(max_batch=2, priority_levels=2, default_priority_level=2), [inst])
        running = b.submit(row(0), 1)
        await asyncio.sleep(0.05)
        jobs = [b.submit(row(float(i)), 1, priority=1, background=True) for i in (1, 2, 3)]
        low = b.submit(row(7), 1)
        high = b.submit(row(9), 1, priority=1)
        extra = b.submit(row(4), 1, priority=99, background=True)  # priority is not even checked
        inst.gate.set()
        await asyncio.gather(running.future, low.future, high.future, extra.future, *(p.future for p in jobs))
        assert inst.batches == [[0.0], [9.0, 7.0], [1.0, 2.0], [3.0, 4.0]]
        await b.close()

    asyncio.run(main())


def test_a_full_queue_refuses_background_requests_and_they_time_out_like_others() -> None:
    async def main() -> None:
        inst = RecordingInstance()
        inst.gate.clear()
        b = Batcher("m:1", config(max_batch=1, max_queue_size=2), [inst])
        running = b.submit(row(0), 1)
        await asyncio.sleep(0.05)
        doomed = b.submit(row(5), 1, timeout_s=0.05, background=True)
        queued = b.submit(row(6), 1, background=True)
        with pytest.raises(QueueFull, match="queue is full"):
            b.submit(row(7), 1, background=True)
        with pytest.raises(QueueTimeout):
            await doomed.future
        assert len(b.queue) == 1 and b.inflight == 2
        inst.gate.set()
        await asyncio.gather(running.future, queued.future)
        assert inst.batches == [[0.0], [6.0]]
        await b.close()

    asyncio.run(main())


def test_close_drains_background_requests() -> None:
    async def main() -> None:
        inst = RecordingInstance(delay=0.01)
        b = Batcher("m:1", config(max_batch=1), [inst])
        pend = [b.submit(row(float(i)), 1, background=True) for i in range(3)]
        await b.close()
        assert [p.future.result().outputs["y"][0, 0] for p in pend] == [0.0, 2.0, 4.0]

    asyncio.run(main())
