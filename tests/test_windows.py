"""The per-version request window rollout gates read: exact counts, the nearest-rank p99 of successes only, the
time slice, and the flag that says the ring forgot part of a window."""

from __future__ import annotations

from ladle.windows import RequestWindow


def filled(capacity: int = 1000) -> RequestWindow:
    window = RequestWindow(capacity)
    for i in range(200):  # one request per second, t = 0..199; latency i ms; every 10th failed (and slow)
        window.record(10.0 if i % 10 == 0 else i / 1000, i % 10 == 0, now=float(i))
    return window


def test_counts_and_p99_of_the_successes_only() -> None:
    stats = filled().since(0.0)
    assert (stats.requests, stats.errors, stats.truncated) == (200, 20, False)
    assert stats.error_rate == 0.1
    # 180 successes with latencies 1..199 ms minus multiples of 10: nearest rank ceil(0.99 * 180) = 179th -> 198 ms
    assert stats.p99_s == 0.198


def test_a_time_slice() -> None:
    stats = filled().since(100.0, 150.0)
    assert (stats.requests, stats.errors) == (50, 5)
    assert stats.p99_s == 0.149
    assert filled().since(500.0).requests == 0 and filled().since(500.0).p99_s is None


def test_only_failures_have_no_p99() -> None:
    window = RequestWindow()
    window.record(0.5, True, now=1.0)
    assert (window.since(0.0).requests, window.since(0.0).errors, window.since(0.0).p99_s) == (1, 1, None)


def test_a_wrapped_ring_says_so() -> None:
    stats = filled(capacity=50).since(0.0)
    assert stats.requests == 50 and stats.truncated  # the window began before the oldest request remembered
    assert not filled(capacity=50).since(160.0).truncated
