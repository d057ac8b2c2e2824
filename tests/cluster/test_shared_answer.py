"""SharedAnswer (cluster/shared_answer.py), without Ray: what the front end's fan-outs (/metrics, /v1/models, the
repository index) rest on — one computation per window however many clients ask, failures not kept, invalidation."""

from __future__ import annotations

import asyncio

import pytest

from ladle.cluster.shared_answer import SharedAnswer


class Counting:
    def __init__(self, delay: float = 0.0, fail: bool = False) -> None:
        self.calls, self.delay, self.fail = 0, delay, fail

    async def __call__(self) -> int:
        self.calls += 1
        await asyncio.sleep(self.delay)
        if self.fail:
            raise RuntimeError("a replica went away")
        return self.calls


def test_concurrent_and_later_callers_in_the_window_share_one_computation() -> None:
    async def main() -> None:
        compute = Counting(delay=0.05)
        answer = SharedAnswer(60.0, compute)
        assert await asyncio.gather(*(answer.get() for _ in range(50))) == [1] * 50
        assert await answer.get() == 1 and compute.calls == 1

    asyncio.run(main())


def test_a_stale_or_invalidated_answer_is_computed_again() -> None:
    async def main() -> None:
        compute = Counting()
        answer = SharedAnswer(0.05, compute)
        assert await answer.get() == 1
        await asyncio.sleep(0.1)
        assert await answer.get() == 2
        answer.invalidate()
        assert await answer.get() == 3 and compute.calls == 3

    asyncio.run(main())


def test_a_failure_reaches_its_callers_and_is_not_kept() -> None:
    async def main() -> None:
        compute = Counting(fail=True)
        answer = SharedAnswer(60.0, compute)
        with pytest.raises(RuntimeError, match="went away"):
            await answer.get()
        compute.fail = False
        assert await answer.get() == 2  # computed again, not the failure remembered

    asyncio.run(main())


def test_an_invalidation_during_a_computation_discards_its_answer_for_later_callers() -> None:
    """A load that finishes while an index fan-out runs: that fan-out may have read the old state, so the next
    caller must not be given it."""
    async def main() -> None:
        compute = Counting(delay=0.05)
        answer = SharedAnswer(60.0, compute)
        running = asyncio.ensure_future(answer.get())
        await asyncio.sleep(0.01)  # the computation has begun
        answer.invalidate()
        assert await running == 1  # its own caller still gets it
        assert await answer.get() == 2 and compute.calls == 2
        assert await answer.get() == 2  # and the fresh answer is kept

    asyncio.run(main())
