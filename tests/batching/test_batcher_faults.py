"""The batcher under faults: inline backlogs drain one batch per loop turn, discarded requests free their
arrays, overrunning batches fail with 504, dead workers are restarted with back-off, and a model with no
runnable instance refuses at once instead of queueing on nothing."""

from __future__ import annotations

import asyncio
import threading
import time
import weakref

import numpy as np
import pytest

from ladle.batching.batcher import Batcher
from ladle.batching.instances import Backoff, Instance, WorkerDied
from ladle.batching.queue import PendingRequest, RequestQueue
from ladle.errors import DeadlineExceeded, QueueFull, QueueTimeout, Unavailable
from ladle.repository.model_config import ConfigError, DynamicBatching, ModelConfig, parse_model_config
from tests.batching.test_batcher import RecordingInstance, config, gather_results, row


class BeatRecordingInstance(RecordingInstance):
    """Records, for each batch, how many turns a heartbeat task had taken on the loop by then."""

    def __init__(self, beats: list[int]) -> None:
        super().__init__("beats")
        self.beats = beats
        self.seen: list[int] = []

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.seen.append(self.beats[0])
        return super().predict(inputs)


def test_an_inline_backlog_drains_one_batch_per_loop_turn_without_recursion() -> None:
    """Defect 6: a backlog met by a model that just turned inline drained recursively inside one callback
    (RecursionError after a few hundred batches, the loop starved meanwhile)."""

    async def main() -> None:
        beats = [0]
        inst = BeatRecordingInstance(beats)
        cfg = ModelConfig(name="m", backend="python", max_batch_size=1, inline_max_us=1e6,
                          dynamic_batching=DynamicBatching(max_queue_size=4096))
        b = Batcher("m:1", cfg, [inst])
        for i in range(49):  # one short of the inline warm-up: these ran on the instance's thread
            await gather_results(b, [float(i)])
        hold = threading.Event()
        inst.worker.submit(asyncio.get_running_loop(), hold.wait, 5)  # keeps the thread busy, outside the timing
        pendings = [b.submit(row(float(i)), 1) for i in range(2001)]  # the 50th batch, then a 2000-deep backlog
        assert len(b.queue) == 2000

        async def heartbeat() -> None:
            while True:
                beats[0] += 1
                await asyncio.sleep(0)

        beat = asyncio.ensure_future(heartbeat())
        hold.set()
        results = await asyncio.wait_for(asyncio.gather(*(p.future for p in pendings)), 30)
        beat.cancel()
        assert [r.outputs["y"][0, 0] for r in results] == [2.0 * i for i in range(2001)]
        inline = inst.seen[50:]  # the batches after the 50th ran on the loop
        assert len(inline) == 2000
        assert len(set(inline)) > 1500, "the heartbeat ran between inline batches"
        await b.close()

    asyncio.run(main())


def _held_view() -> tuple[dict[str, np.ndarray], weakref.ref]:
    """A request's input as the codec makes it: a view into a buffer; the weakref watches the buffer."""
    body = np.zeros((1, 1), dtype=np.float32)
    return {"x": body[:]}, weakref.ref(body)


def test_cancelled_and_expired_requests_free_their_arrays_at_once() -> None:
    """Defect 7: a discarded request kept its inputs (views into a body of up to 64 MiB) until reached."""

    async def main() -> None:
        inst = RecordingInstance()
        inst.gate.clear()
        b = Batcher("m:1", config(max_batch=1), [inst])
        running = b.submit(row(0), 1)
        await asyncio.sleep(0.05)  # the instance is now blocked: the next requests wait in the queue
        inputs, cancelled_body = _held_view()
        cancelled = b.submit(inputs, 1)
        inputs, expired_body = _held_view()
        expired = b.submit(inputs, 1, timeout_s=0.05)
        del inputs
        assert cancelled_body() is not None and expired_body() is not None  # queued: the queue holds them
        b.cancel(cancelled)
        assert cancelled_body() is None, "a cancelled request's arrays are freed when it is discarded"
        with pytest.raises(QueueTimeout):
            await expired.future
        assert expired_body() is None, "an expired request's arrays are freed when it is discarded"
        assert cancelled.inputs == {} and expired.inputs == {}
        inst.gate.set()
        await running.future
        await b.close()

    asyncio.run(main())


def test_discarded_requests_do_not_count_against_max_queue_size() -> None:
    async def main() -> None:
        inst = RecordingInstance()
        inst.gate.clear()
        b = Batcher("m:1", config(max_batch=1, max_queue_size=2), [inst])
        running = b.submit(row(0), 1)
        await asyncio.sleep(0.05)
        gone = [b.submit(row(1), 1), b.submit(row(2), 1, timeout_s=0.01)]
        b.cancel(gone[0])
        with pytest.raises(QueueTimeout):
            await gone[1].future
        kept = [b.submit(row(3), 1), b.submit(row(4), 1)]  # both slots are free again
        with pytest.raises(QueueFull):
            b.submit(row(5), 1)
        inst.gate.set()
        await asyncio.gather(running.future, *(p.future for p in kept))
        assert [v for batch in inst.batches for v in batch] == [0.0, 3.0, 4.0]
        await b.close()

    asyncio.run(main())


def test_the_queue_compacts_discarded_requests_it_has_not_reached() -> None:
    q = RequestQueue(max_size=4, priority_levels=1)
    head = PendingRequest(inputs={}, rows=1, priority=1, deadline=None, future=None)
    q.push(head)  # never taken: every discarded request behind it stays in the deque until compacted
    for _ in range(1000):
        r = PendingRequest(inputs={}, rows=1, priority=1, deadline=None, future=None)
        q.push(r)
        q.discard(r)
    assert sum(len(level) for level in q._levels) <= 66, "discarded husks were compacted away"
    assert len(q) == 1 and q.take_batch(4, group=False) == [head]


def test_a_thread_batch_past_the_timeout_fails_504_and_its_instance_waits_out_of_rotation() -> None:
    async def main() -> None:
        stuck, spare = RecordingInstance("stuck"), RecordingInstance("spare")
        stuck.gate.clear()
        cfg = ModelConfig(name="m", backend="python", max_batch_size=1, inline_max_us=0, execution_timeout_ms=100)
        b = Batcher("m:1", cfg, [stuck, spare])
        started = time.monotonic()
        first = b.submit(row(1), 1)  # the first instance takes it and blocks
        with pytest.raises(DeadlineExceeded, match="execution_timeout_ms=100"):
            await first.future
        assert 0.09 < time.monotonic() - started < 1.0
        for i in range(3):  # only the spare serves while the stuck thread has not returned
            await gather_results(b, [float(10 + i)])
        assert spare.batches == [[10.0], [11.0], [12.0]]
        stuck.gate.set()  # the thread returns: its late result is dropped, the instance is back
        await asyncio.sleep(0.05)
        spare.gate.clear()  # now only the returned instance can answer
        both = [b.submit(row(20), 1).future, b.submit(row(21), 1).future]
        done, _ = await asyncio.wait(both, timeout=2, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1, "the returned instance serves again"
        value = next(iter(done)).result().outputs["y"][0, 0] / 2
        assert stuck.batches[-1] == [value] and first.future.exception() is not None
        spare.gate.set()
        await asyncio.gather(*both)
        await b.close()

    asyncio.run(main())


def test_with_every_instance_stuck_requests_are_refused_with_503_until_one_returns() -> None:
    async def main() -> None:
        inst = RecordingInstance()
        inst.gate.clear()
        cfg = ModelConfig(name="m", backend="python", max_batch_size=1, inline_max_us=0, execution_timeout_ms=100,
                          dynamic_batching=DynamicBatching())
        b = Batcher("m:1", cfg, [inst])
        first = b.submit(row(1), 1)
        queued = b.submit(row(2), 1)
        with pytest.raises(DeadlineExceeded):
            await first.future
        with pytest.raises(Unavailable, match="no instance can run"):
            await queued.future  # failed at once, not left waiting on a thread that may never return
        with pytest.raises(Unavailable, match="no instance can run") as refused:
            b.submit(row(3), 1)
        assert refused.value.status == 503 and refused.value.retry_after_s == 1
        inst.gate.set()
        await asyncio.sleep(0.05)
        (result,) = await gather_results(b, [4.0])
        assert result.outputs["y"].tolist() == [[8.0]]
        await b.close()

    asyncio.run(main())


class DyingInstance(Instance):
    """Its 'worker' dies on inputs of 13; restart() fails `failures` times before it succeeds."""

    def __init__(self, failures: int = 0) -> None:
        super().__init__("dying")
        self.failures = failures
        self.restarts = 0

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if inputs["x"][0, 0] == 13:
            raise WorkerDied("worker died")
        return {"y": inputs["x"] * 2}

    def restart(self) -> None:
        self.restarts += 1
        if self.restarts <= self.failures:
            raise RuntimeError("cannot load")


def test_a_dead_worker_fails_only_its_batch_and_is_restarted_before_serving_again() -> None:
    async def main() -> None:
        inst = DyingInstance()
        b = Batcher("m:1", config(max_batch=1), [inst])
        doomed = b.submit(row(13), 1)
        waiting = b.submit(row(2), 1)  # queued behind the batch that dies: it waits for the restart
        with pytest.raises(WorkerDied) as died:
            await doomed.future
        assert died.value.status == 503 and died.value.retry_after_s == 1
        assert (await waiting.future).outputs["y"].tolist() == [[4.0]]
        assert inst.restarts == 1
        await b.close()

    asyncio.run(main())


def test_while_no_worker_can_restart_requests_get_503_and_it_keeps_trying() -> None:
    async def main() -> None:
        inst = DyingInstance(failures=1)
        b = Batcher("m:1", config(max_batch=1), [inst])
        doomed = b.submit(row(13), 1)
        waiting = b.submit(row(2), 1)
        with pytest.raises(WorkerDied):
            await doomed.future
        with pytest.raises(Unavailable, match="no instance can run"):
            await waiting.future  # the restart failed: nothing can run it, so it is answered at once
        for _ in range(100):
            if inst.restarts >= 2:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.01)
        (result,) = await gather_results(b, [3.0])  # the second attempt brought it back
        assert result.outputs["y"].tolist() == [[6.0]]
        await b.close()

    asyncio.run(main())


def test_restart_back_off_doubles_to_a_cap_and_resets_after_a_healthy_run() -> None:
    backoff = Backoff(first_s=0.1, cap_s=1.0, healthy_s=30.0)
    assert [backoff.next_delay(0.5) for _ in range(6)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert backoff.next_delay(31.0) == pytest.approx(0.1)
    assert backoff.next_delay(0.0) == pytest.approx(0.2)


@pytest.mark.parametrize("value", [-1, "soon", float("inf"), True])
def test_execution_timeout_ms_is_validated(value) -> None:
    with pytest.raises(ConfigError, match="field 'execution_timeout_ms'"):
        parse_model_config({"backend": "python", "execution_timeout_ms": value}, name="m", path="m/config.yaml")
    assert parse_model_config({"backend": "python"}, name="m", path="x").execution_timeout_ms == 60000.0
