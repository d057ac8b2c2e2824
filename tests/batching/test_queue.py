"""RequestQueue: priority order, FIFO within a level, exact bounds, grouping, lazy discards."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from ladle.batching.queue import PendingRequest, RequestQueue


def req(rows: int = 1, priority: int = 1, key: tuple = (), tag: int = 0) -> PendingRequest:
    return PendingRequest(inputs={"x": np.full((rows, 1), tag)}, rows=rows, priority=priority, deadline=None,
                          future=None, shape_key=key)


def test_priority_first_then_fifo() -> None:
    q = RequestQueue(max_size=10, priority_levels=3)
    a, b, c, d = req(priority=3, tag=1), req(priority=1, tag=2), req(priority=2, tag=3), req(priority=1, tag=4)
    for r in (a, b, c, d):
        q.push(r)
    assert q.take_batch(max_rows=1, group=False) == [b]
    assert q.take_batch(max_rows=2, group=False) == [d, c]
    assert q.take_batch(max_rows=5, group=False) == [a]
    assert len(q) == 0 and q.rows == 0


def test_bound_is_exact_and_discard_frees_a_slot() -> None:
    q = RequestQueue(max_size=2, priority_levels=1)
    a, b = req(), req()
    q.push(a)
    q.push(b)
    assert q.full
    assert q.discard(a) is True
    assert q.discard(a) is False  # a second discard changes nothing
    assert not q.full and len(q) == 1
    assert q.take_batch(max_rows=4, group=False) == [b]


def test_rows_limit_skips_what_does_not_fit_but_keeps_its_place() -> None:
    q = RequestQueue(max_size=10, priority_levels=1)
    big, small1, small2 = req(rows=3), req(rows=1), req(rows=1)
    first = req(rows=2)
    for r in (first, big, small1, small2):
        q.push(r)
    assert q.take_batch(max_rows=4, group=False) == [first, small1, small2]
    assert q.take_batch(max_rows=4, group=False) == [big]


def test_first_request_always_goes_even_if_oversized() -> None:
    q = RequestQueue(max_size=10, priority_levels=1)
    huge = req(rows=9)
    q.push(huge)
    assert q.take_batch(max_rows=4, group=False) == [huge]


def test_grouping_by_shape_key() -> None:
    q = RequestQueue(max_size=10, priority_levels=1)
    a, b, c = req(key=("x", 3)), req(key=("x", 5)), req(key=("x", 3))
    for r in (a, b, c):
        q.push(r)
    assert q.take_batch(max_rows=8, group=True) == [a, c]
    assert q.take_batch(max_rows=8, group=True) == [b]


def test_max_requests_caps_the_batch() -> None:
    q = RequestQueue(max_size=10, priority_levels=1)
    rs = [req() for _ in range(3)]
    for r in rs:
        q.push(r)
    assert q.take_batch(max_rows=8, group=False, max_requests=1) == [rs[0]]


def test_oldest_arrival_ignores_discarded() -> None:
    q = RequestQueue(max_size=10, priority_levels=2)
    a, b = req(priority=1), req(priority=2)
    a.enqueued_at, b.enqueued_at = 5.0, 7.0
    q.push(a)
    q.push(b)
    assert q.oldest_arrival() == 5.0
    q.discard(a)
    assert q.oldest_arrival() == 7.0
    assert list(q.drain()) == [b]
    assert q.oldest_arrival() is None


@given(st.lists(st.tuples(st.integers(1, 3), st.integers(1, 4), st.booleans()), max_size=40), st.integers(1, 8))
def test_every_live_request_comes_out_exactly_once_in_priority_order(ops, max_rows) -> None:
    q = RequestQueue(max_size=100, priority_levels=3)
    pushed = []
    for i, (priority, rows, cancel) in enumerate(ops):
        r = req(rows=rows, priority=priority, tag=i)
        q.push(r)
        pushed.append((r, cancel))
    for r, cancel in pushed:
        if cancel:
            q.discard(r)
    live = [r for r, cancel in pushed if not cancel]
    taken = []
    while len(q):
        batch = q.take_batch(max_rows=max_rows, group=False)
        assert batch, "a non-empty queue always yields a batch"
        assert sum(r.rows for r in batch) <= max_rows or len(batch) == 1
        taken.extend(batch)
    assert sorted(map(id, taken)) == sorted(map(id, live))
    assert q.rows == 0
