"""The output processor records each finished sequence into its version's rollout window exactly once: latency is
the time to first token (arrival to finish when none came), engine errors are failures, and aborts and timeouts are
left out (they say nothing about the version's health). Fake core outputs, the real processor and metrics."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from ladle.llm.output_processor import OutputProcessor
from ladle.llm.outputs import RequestOutput
from ladle.llm.request import Request
from ladle.llm.sampling_params import SamplingParams
from ladle.llm.tokenizer import Tokenizer
from ladle.metrics import LLMMetricFamilies, LLMMetrics
from ladle.windows import RequestWindow
from tests.fixtures.tiny_tokenizer import save_tiny_tokenizer

TOKEN = 300  # any ordinary id of the tiny tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_dir(save_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def processor(tokenizer, registry) -> OutputProcessor:
    metrics = LLMMetrics(LLMMetricFamilies(registry), "tiny", "2", RequestWindow())
    return OutputProcessor(tokenizer, metrics)


def add(processor: OutputProcessor, request_id: str, arrival: float) -> None:
    processor.add_request(Request(request_id, [5, 6, 7], SamplingParams(max_tokens=4), arrival_time=arrival))


def step(processor: OutputProcessor, request_id: str, tokens: list[int], finish: str | None = None) -> None:
    processor.process([RequestOutput(request_id, tokens, [None] * len(tokens), finish)], {})


def window(processor: OutputProcessor) -> RequestWindow:
    assert processor.metrics is not None
    return processor.metrics.window


def test_a_finished_request_lands_once_with_its_time_to_first_token(processor, registry) -> None:
    add(processor, "a", arrival=0.0)
    step(processor, "a", [TOKEN])
    assert window(processor).since(0).requests == 0  # not finished yet
    step(processor, "a", [TOKEN], finish="length")
    step(processor, "a", [TOKEN], finish="length")  # a late duplicate output of a finished request: ignored
    labels = {"model": "tiny", "version": "2"}
    ttft = registry.get_sample_value("ladle_llm_time_to_first_token_seconds_sum", labels)
    stats = window(processor).since(0)
    assert (stats.requests, stats.errors, stats.p99_s) == (1, 0, ttft)
    assert registry.get_sample_value("ladle_llm_generation_tokens_total", labels) == 2


def test_a_request_without_tokens_counts_arrival_to_finish(processor) -> None:
    add(processor, "s", arrival=0.0)
    step(processor, "s", [], finish="stop")
    stats = window(processor).since(0)
    assert stats.requests == 1 and stats.errors == 0 and stats.p99_s is not None and stats.p99_s > 1.0


@pytest.mark.parametrize("reason", ["abort", "timeout"])
def test_aborts_and_timeouts_are_left_out(processor, reason) -> None:
    add(processor, "x", arrival=0.0)
    step(processor, "x", [TOKEN])
    step(processor, "x", [], finish=reason)
    assert window(processor).since(0).requests == 0


@pytest.mark.parametrize("how", ["error finish", "failed step"])
def test_an_engine_error_is_a_failure(processor, how) -> None:
    add(processor, "e", arrival=0.0)
    add(processor, "ok", arrival=0.0)
    step(processor, "ok", [TOKEN], finish="stop")
    if how == "error finish":
        step(processor, "e", [], finish="error")
    else:
        processor.fail("e")  # what AsyncEngine._restart does for each request of a step that raised
        processor.fail("e")  # already gone: not recorded a second time
    stats = window(processor).since(0)
    assert (stats.requests, stats.errors) == (2, 1)
    assert "e" not in processor._states
