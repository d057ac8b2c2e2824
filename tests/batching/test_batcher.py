"""The async batcher: batches form, bounds hold, deadlines and priorities are honoured, errors stay local."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from ladle.batching.batcher import Batcher, InferResult
from ladle.batching.instances import Instance
from ladle.errors import ModelError, QueueFull, QueueTimeout
from ladle.repository.model_config import DynamicBatching, ModelConfig


class RecordingInstance(Instance):
    """Doubles its input; records each batch's first-column values; can block until released."""

    def __init__(self, name: str = "rec", delay: float = 0.0, fail_on: float | None = None) -> None:
        super().__init__(name)
        self.batches: list[list[float]] = []
        self.delay = delay
        self.fail_on = fail_on
        self.gate = threading.Event()
        self.gate.set()

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.gate.wait(5)
        x = inputs["x"]
        self.batches.append(x[:, 0].tolist())
        if self.fail_on is not None and self.fail_on in x[:, 0]:
            raise ValueError("boom")
        time.sleep(self.delay)
        return {"y": x * 2}


def config(max_batch: int = 8, **batching) -> ModelConfig:
    return ModelConfig(name="m", backend="python", max_batch_size=max_batch,
                       dynamic_batching=DynamicBatching(**batching) if batching is not None else None)


def row(v: float) -> dict[str, np.ndarray]:
    return {"x": np.array([[v]], dtype=np.float32)}


async def gather_results(batcher: Batcher, values: list[float], **kw) -> list[InferResult]:
    pendings = [batcher.submit(row(v), 1, **kw) for v in values]
    return await asyncio.gather(*(p.future for p in pendings))


def test_requests_arriving_while_busy_are_batched_and_each_gets_its_own_rows() -> None:
    async def main() -> None:
        inst = RecordingInstance()
        inst.gate.clear()
        b = Batcher("m:1", config(max_batch=8, max_queue_delay_ms=0), [inst])
        first = b.submit(row(100), 1)
        await asyncio.sleep(0.05)  # the first request is now running, blocked on the gate
        rest = [b.submit(row(float(i)), 1) for i in range(10)]
        inst.gate.set()
        results = await asyncio.gather(first.future, *(p.future for p in rest))
        for i, r in enumerate(results[1:]):
            assert r.outputs["y"].tolist() == [[2.0 * i]]
        assert inst.batches[0] == [100.0]
        assert inst.batches[1] == [float(i) for i in range(8)]  # capped at max_batch_size
        assert inst.batches[2] == [8.0, 9.0]
        await b.close()

    asyncio.run(main())


def test_max_queue_delay_gathers_a_batch_from_an_idle_start() -> None:
    async def main() -> None:
        inst = RecordingInstance()
        b = Batcher("m:1", config(max_batch=16, max_queue_delay_ms=50, eager=False), [inst])
        pend = [b.submit(row(float(i)), 1) for i in range(3)]
        await asyncio.sleep(0.01)
        pend += [b.submit(row(float(i)), 1) for i in range(3, 5)]
        await asyncio.gather(*(p.future for p in pend))
        assert inst.batches == [[0.0, 1.0, 2.0, 3.0, 4.0]]
        await b.close()

    asyncio.run(main())


def test_eager_dispatch_skips_the_delay_when_nothing_else_is_coming() -> None:
    async def main() -> None:
        inst = RecordingInstance()
        b = Batcher("m:1", config(max_batch=16, max_queue_delay_ms=5000), [inst])
        started = time.monotonic()
        await gather_results(b, [1.0])
        await gather_results(b, [2.0])
        assert time.monotonic() - started < 1.0  # neither waited out the 5 s delay
        assert inst.batches == [[1.0], [2.0]]
        await b.close()

    asyncio.run(main())


def test_eager_still_waits_while_requests_are_running() -> None:
    async def main() -> None:
        insts = [RecordingInstance("a"), RecordingInstance("b")]
        insts[0].gate.clear()
        b = Batcher("m:1", config(max_batch=16, max_queue_delay_ms=200), insts)
        busy = b.submit(row(0.0), 1)  # occupies instance a: others are in flight, so b waits for company
        await asyncio.sleep(0.05)
        first = b.submit(row(1.0), 1)
        await asyncio.sleep(0.05)
        second = b.submit(row(2.0), 1)
        await asyncio.gather(first.future, second.future)
        assert insts[1].batches == [[1.0, 2.0]]
        insts[0].gate.set()
        await busy.future
        await b.close()

    asyncio.run(main())


def test_preferred_batch_size_dispatches_without_waiting_out_the_delay() -> None:
    async def main() -> None:
        inst = RecordingInstance()
        b = Batcher("m:1", config(max_batch=16, max_queue_delay_ms=5000, preferred_batch_sizes=(4,), eager=False),
                    [inst])
        started = time.monotonic()
        await gather_results(b, [1.0, 2.0, 3.0, 4.0])
        assert time.monotonic() - started < 1.0
        assert inst.batches == [[1.0, 2.0, 3.0, 4.0]]
        await b.close()

    asyncio.run(main())


def test_full_queue_rejects_at_once() -> None:
    async def main() -> None:
        inst = RecordingInstance()
        inst.gate.clear()
        b = Batcher("m:1", config(max_batch=1, max_queue_size=2), [inst])
        running = b.submit(row(0), 1)
        await asyncio.sleep(0.05)
        queued = [b.submit(row(1), 1), b.submit(row(2), 1)]
        with pytest.raises(QueueFull, match="queue is full"):
            b.submit(row(3), 1)
        inst.gate.set()
        await asyncio.gather(running.future, *(p.future for p in queued))
        assert [v for batch in inst.batches for v in batch] == [0.0, 1.0, 2.0]
        await b.close()

    asyncio.run(main())


def test_queue_timeout_fails_the_request_and_it_never_runs() -> None:
    async def main() -> None:
        inst = RecordingInstance()
        inst.gate.clear()
        b = Batcher("m:1", config(max_batch=1), [inst])
        running = b.submit(row(0), 1)
        await asyncio.sleep(0.05)
        doomed = b.submit(row(7), 1, timeout_s=0.05)
        with pytest.raises(QueueTimeout):
            await doomed.future
        inst.gate.set()
        await running.future
        await asyncio.sleep(0.05)
        assert 7.0 not in [v for batch in inst.batches for v in batch]
        assert len(b.queue) == 0
        await b.close()

    asyncio.run(main())


def test_higher_priority_runs_first() -> None:
    async def main() -> None:
        inst = RecordingInstance()
        inst.gate.clear()
        b = Batcher("m:1", config(max_batch=1, priority_levels=2, default_priority_level=2), [inst])
        running = b.submit(row(0), 1)
        await asyncio.sleep(0.05)
        low = [b.submit(row(float(i)), 1) for i in (1, 2)]
        high = b.submit(row(9), 1, priority=1)
        inst.gate.set()
        await asyncio.gather(running.future, high.future, *(p.future for p in low))
        assert [batch[0] for batch in inst.batches] == [0.0, 9.0, 1.0, 2.0]
        await b.close()

    asyncio.run(main())


def test_cancelled_request_never_runs() -> None:
    async def main() -> None:
        inst = RecordingInstance()
        inst.gate.clear()
        b = Batcher("m:1", config(max_batch=1), [inst])
        running = b.submit(row(0), 1)
        await asyncio.sleep(0.05)
        gone = b.submit(row(5), 1)
        kept = b.submit(row(6), 1)
        b.cancel(gone)
        inst.gate.set()
        await asyncio.gather(running.future, kept.future)
        assert [batch[0] for batch in inst.batches] == [0.0, 6.0]
        assert gone.future.cancelled()
        await b.close()

    asyncio.run(main())


def test_a_failing_batch_errors_its_requests_and_the_batcher_keeps_serving() -> None:
    async def main() -> None:
        inst = RecordingInstance(fail_on=3.0)
        b = Batcher("m:1", config(max_batch=1), [inst])
        bad = b.submit(row(3), 1)
        with pytest.raises(ModelError, match="boom"):
            await bad.future
        (good,) = await gather_results(b, [4.0])
        assert good.outputs["y"].tolist() == [[8.0]]
        await b.close()

    asyncio.run(main())


def test_two_instances_run_batches_concurrently() -> None:
    async def main() -> None:
        insts = [RecordingInstance("a", delay=0.2), RecordingInstance("b", delay=0.2)]
        b = Batcher("m:1", ModelConfig(name="m", backend="python", max_batch_size=1), insts)
        started = time.monotonic()
        await gather_results(b, [1.0, 2.0])
        assert time.monotonic() - started < 0.35
        assert insts[0].batches and insts[1].batches
        await b.close()

    asyncio.run(main())


def test_close_drains_queued_requests() -> None:
    async def main() -> None:
        inst = RecordingInstance(delay=0.02)
        b = Batcher("m:1", config(max_batch=1), [inst])
        pend = [b.submit(row(float(i)), 1) for i in range(5)]
        await b.close()
        results = [p.future.result() for p in pend]
        assert [r.outputs["y"][0, 0] for r in results] == [0.0, 2.0, 4.0, 6.0, 8.0]

    asyncio.run(main())


class ThreadRecordingInstance(RecordingInstance):
    """Also records which thread ran each batch; sleeps `slow_s` for inputs of 999."""

    def __init__(self, slow_s: float = 0.0) -> None:
        super().__init__("threads")
        self.threads: list[str] = []
        self.slow_s = slow_s

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.threads.append(threading.current_thread().name)
        if inputs["x"][0, 0] == 999:
            time.sleep(self.slow_s)
        return super().predict(inputs)


def test_microsecond_models_run_inline_after_a_warm_up_and_go_back_when_slow() -> None:
    async def main() -> None:
        inst = ThreadRecordingInstance(slow_s=0.01)
        cfg = ModelConfig(name="m", backend="python", max_batch_size=4, inline_max_us=5000)
        b = Batcher("m:1", cfg, [inst])
        for i in range(60):
            (result,) = await gather_results(b, [float(i)])
            assert result.outputs["y"].tolist() == [[2.0 * i]]
        loop_thread = threading.current_thread().name
        assert inst.threads[0] != loop_thread, "a model starts on its own thread"
        assert inst.threads[-1] == loop_thread, "proven fast (50 batches under the threshold): inline"
        await gather_results(b, [999.0])  # one slow batch (inline: the last time) ...
        await gather_results(b, [1.0])
        assert inst.threads[-1] != loop_thread, "... sends the model back to its thread"
        await b.close()

    asyncio.run(main())


def test_inline_is_off_when_disabled() -> None:
    async def main() -> None:
        inst = ThreadRecordingInstance()
        b = Batcher("m:1", ModelConfig(name="m", backend="python", max_batch_size=4, inline_max_us=0), [inst])
        for i in range(60):
            await gather_results(b, [float(i)])
        assert threading.current_thread().name not in inst.threads
        await b.close()

    asyncio.run(main())


def test_pad_mode_runs_a_hostile_shape_apart_and_its_batch_mates_get_their_rows() -> None:
    async def main() -> None:
        inst = RecordingInstance()
        inst.gate.clear()
        b = Batcher("m:1", config(max_batch=8, max_queue_delay_ms=0, ragged="pad"), [inst])
        first = b.submit({"x": np.ones((1, 3, 2), dtype=np.float32)}, 1)
        await asyncio.sleep(0.05)  # running, blocked on the gate: the next three queue up and batch together
        normal = [b.submit({"x": np.full((1, 3, 2), v, dtype=np.float32)}, 1) for v in (1.0, 2.0)]
        # no data, but padded beside the others it would be [3, 3, 2**40] float32: 48 TiB
        hostile = b.submit({"x": np.empty((1, 0, 2**40), dtype=np.float32)}, 1)
        inst.gate.set()
        results = await asyncio.gather(first.future, *(p.future for p in normal))
        assert results[1].outputs["y"].tolist() == [[[2.0, 2.0]] * 3]
        assert results[2].outputs["y"].tolist() == [[[4.0, 4.0]] * 3]
        with pytest.raises(ModelError):  # RecordingInstance fails on an empty input: that fails it alone
            await hostile.future
        assert inst.batches[1] == [[1.0, 1.0], [2.0, 2.0]]  # the two normal ones together, without the hostile one
        await b.close()

    asyncio.run(main())
