"""AsyncEngine.submit admits a request's sequences all together or not at all, synchronously, against exact
bounds on waiting sequences and waiting prompt tokens; refusals (full queue, never fits, id in use, engine
stopped or closing) are raised before anything runs. Deadlines finish queued requests with "timeout".
The real engine on a tiny checkpoint; it is left unstarted while the queue is filled, so nothing leaves it."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import CollectorRegistry

from ladle.config import LLMConfig
from ladle.errors import InvalidInput, QueueFull, Unavailable
from ladle.llm.factory import build_engine
from ladle.llm.request import SequenceSpec
from ladle.llm.sampling_params import SamplingParams
from ladle.metrics import LLMMetricFamilies
from tests.fixtures.checkpoints import save_tiny_checkpoint

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


def spec(request_id: str, num_tokens: int = 10, params: SamplingParams = GREEDY) -> SequenceSpec:
    return SequenceSpec(request_id, list(range(5, 5 + num_tokens)), params)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "llama", "llama")


def engine_for(model_dir, registry: CollectorRegistry | None = None, **limits):
    config = LLMConfig(model=str(model_dir), dtype="float32", num_kv_blocks=32, block_size=16, max_model_len=128,
                       **limits)
    return build_engine(config, "tiny", model_dir, LLMMetricFamilies(registry or CollectorRegistry()))


async def drain(stream) -> list:
    return [delta async for delta in stream]


def test_admission_is_exact_and_all_or_none(model_dir) -> None:
    engine = engine_for(model_dir, max_waiting_requests=4, max_waiting_tokens=100)
    budget = engine._admission

    async def main() -> None:
        first = engine.submit([spec("a"), spec("b")])  # not started: both stay waiting
        with pytest.raises(QueueFull):
            engine.submit([spec("c"), spec("d"), spec("e")])  # 3 sequences, 2 places: none of them is admitted
        assert (budget.sequences, budget.tokens) == (2, 20)
        with pytest.raises(InvalidInput) as never:
            engine.submit([spec(f"n{i}") for i in range(5)])  # more than can ever wait: 400, not 503
        assert never.value.param == "n"
        with pytest.raises(InvalidInput) as too_long:
            engine.submit([spec("big", 101)], prompt_param="messages")
        assert too_long.value.param == "messages"
        with pytest.raises(QueueFull):
            engine.submit([spec("t", 81)])  # 20 + 81 prompt tokens > 100
        with pytest.raises(InvalidInput, match="in use"):
            engine.submit([spec("a")])
        second = engine.submit([spec("c"), spec("d")])
        with pytest.raises(QueueFull):
            engine.submit([spec("e")])
        second[1].close()  # its consumer left before it ran: the place is free at once
        third = engine.submit([spec("e")])
        assert (budget.sequences, budget.tokens) == (4, 40)
        engine.start(asyncio.get_running_loop())
        results = await asyncio.gather(*(drain(s) for s in [*first, second[0], *third]))
        assert all(sum(len(d.token_ids) for d in r) == 4 and r[-1].finish_reason == "length" for r in results)
        assert (budget.sequences, budget.tokens) == (0, 0) and not engine._streams
        assert engine.core.scheduler.kv.usage == 0.0 and not engine.core.requests
        await engine.close()
        with pytest.raises(Unavailable, match="shutting down"):
            engine.submit([spec("late")])

    asyncio.run(main())


def test_a_dead_engine_refuses_at_submit(model_dir) -> None:
    engine = engine_for(model_dir)

    def broken() -> bool:
        raise RuntimeError("injected engine-loop fault")

    async def main() -> None:
        engine.core.has_unfinished_requests = broken  # the engine loop itself fails (not one step)
        engine.start(asyncio.get_running_loop())
        deadline = time.monotonic() + 5
        while engine._dead is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        with pytest.raises(Unavailable, match="injected engine-loop fault"):
            engine.submit([spec("x")])
        await engine.close(drain_timeout_s=0)

    asyncio.run(main())


def test_a_deadline_finishes_queued_and_running_requests_as_timeout(model_dir) -> None:
    registry = CollectorRegistry()
    engine = engine_for(model_dir, registry, max_num_seqs=1)
    long = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)

    async def main() -> None:
        now = time.monotonic()
        running, queued = engine.submit([spec("r", params=long)], now + 0.3), engine.submit([spec("q")], now + 0.2)
        kept = engine.submit([spec("k")])  # no deadline: unaffected
        fast = engine.core.runner.execute

        def execute(sched):  # ~10 ms a step, so "r" is still running at its deadline
            time.sleep(0.01)
            return fast(sched)

        engine.core.runner.execute = execute
        engine.start(asyncio.get_running_loop())
        r, q, k = await asyncio.gather(drain(running[0]), drain(queued[0]), drain(kept[0]))
        assert r[-1].finish_reason == "timeout" and 0 < sum(len(d.token_ids) for d in r) < 100
        assert q[-1].finish_reason == "timeout" and sum(len(d.token_ids) for d in q) == 0  # never ran
        assert k[-1].finish_reason == "length"
        assert engine.core.scheduler.kv.usage == 0.0 and not engine.core.requests
        assert (engine._admission.sequences, engine._admission.tokens) == (0, 0)
        await engine.close()

    asyncio.run(main())
    timeouts = {"model": "tiny", "version": "1", "finish_reason": "timeout"}
    assert registry.get_sample_value("ladle_llm_requests_total", timeouts) == 2


def test_precheck_refuses_only_what_admit_would_refuse_now() -> None:
    from ladle.errors import QueueFull
    from ladle.llm.admission import WaitingBudget

    budget = WaitingBudget("m", max_sequences=4, max_tokens=100)
    budget.precheck(4)  # empty: fits
    budget.precheck(5)  # could never fit: left to admit(), which says 400, not 503
    budget.admit([("a", 10), ("b", 10), ("c", 10)])
    budget.precheck(1)
    with pytest.raises(QueueFull):
        budget.precheck(2)
    budget.release("a")
    budget.precheck(2)
    budget.admit([("d", 70)])  # 90 of 100 tokens: fits
    budget.precheck(1)  # tokens not yet at the bound: the exact check is admit()'s, with the prompt's size
    budget.admit([("e", 10)])
    with pytest.raises(QueueFull):  # sequences are full now too
        budget.precheck(1)
    tokens = WaitingBudget("m", max_sequences=10, max_tokens=100)
    tokens.admit([("a", 100)])
    with pytest.raises(QueueFull):  # 100 of 100 tokens waiting: nothing more fits, however few sequences
        tokens.precheck(1)
