"""A step that raises (a bug, a device error) fails the requests in the engine with the reason, and the engine
keeps serving: later requests get the same tokens as before the failure, the KV cache is empty again, and the
failure is counted on /metrics and in the version's rollout window. The fault is injected into the runner;
everything else is the real engine."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from ladle.config import LLMConfig
from ladle.llm.factory import build_engine
from ladle.llm.sampling_params import SamplingParams
from ladle.metrics import LLMMetricFamilies
from ladle.windows import RequestWindow
from tests.fixtures.checkpoints import save_tiny_checkpoint

POISON = 7  # a batch holding a prompt that starts with this token makes the runner raise (not a generated 7)
PROMPT = list(range(20, 45))


def test_a_failed_step_fails_its_requests_and_the_engine_continues(tmp_path) -> None:
    model_dir = save_tiny_checkpoint(tmp_path / "llama", "llama")
    registry = CollectorRegistry()
    config = LLMConfig(model=str(model_dir), dtype="float32", num_kv_blocks=32, block_size=16, max_model_len=128)
    window = RequestWindow()
    engine = build_engine(config, "tiny", model_dir, LLMMetricFamilies(registry), window=window)
    runner = engine.core.runner
    real_execute = runner.execute

    def execute(sched):
        if any(seq.start_pos == 0 and seq.token_ids[0] == POISON for seq in sched.seqs):
            raise RuntimeError("injected fault")
        return real_execute(sched)

    runner.execute = execute
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

    async def tokens(prompt: list[int], params: SamplingParams, started: asyncio.Event | None = None
                     ) -> tuple[list[int], str | None]:
        ids, error = [], None
        async for delta in engine.generate(prompt, params):
            ids += delta.token_ids
            error = delta.error or error
            if started is not None:
                started.set()
        return ids, error

    async def main() -> None:
        engine.start(asyncio.get_running_loop())
        try:
            before, error = await tokens(PROMPT, greedy)
            assert error is None and len(before) == 12
            decoding = asyncio.Event()
            long_params = SamplingParams(max_tokens=110, ignore_eos=True)
            long_running = asyncio.ensure_future(tokens(PROMPT[:10], long_params, decoding))
            await decoding.wait()
            poisoned = await tokens([POISON, *PROMPT], greedy)
            assert poisoned[1] is not None and "injected fault" in poisoned[1]
            bystander = await long_running
            assert bystander[1] is not None and "injected fault" in bystander[1]  # in the failed step too
            after, error = await tokens(PROMPT, greedy)
            assert error is None and after == before  # the engine kept serving, with the same numbers
            assert engine.core.scheduler.kv.usage == 0.0 and not engine.core.requests
        finally:
            await engine.close()

    asyncio.run(main())
    assert registry.get_sample_value("ladle_llm_engine_step_failures_total", {"model": "tiny", "version": "1"}) == 1
    errors = {"model": "tiny", "version": "1", "finish_reason": "error"}
    assert registry.get_sample_value("ladle_llm_requests_total", errors) == 2
    stats = window.since(0)  # the two that failed in the raising step, and the two served before and after it
    assert (stats.requests, stats.errors) == (4, 2)
