"""Two versions of one LLM under a traffic split (an A/B test): every ladle_llm_* series carries the version, so
each arm's tokens and finished requests are counted apart, and the arms add up to what the clients received."""

from __future__ import annotations

import re

import httpx
import openai
import pytest

from tests.api.test_llm_repository import LLM_PARAMS
from tests.fixtures.checkpoints import save_tiny_checkpoint
from tests.repos import write_model
from tests.server import LadleServer

MODEL = "ab"
REQUESTS = 24  # 50/50: both arms get some unless a ~1e-7 coin flip says otherwise


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("abrepo")
    write_model(repo, MODEL, {"backend": "llm", "parameters": LLM_PARAMS, "version_policy": {"all": True},
                              "traffic_split": {1: 50, 2: 50}})
    save_tiny_checkpoint(repo / MODEL / "1", "llama")
    save_tiny_checkpoint(repo / MODEL / "2", "gpt2")
    with LadleServer([repo]) as s:
        yield s


def per_version(server: LadleServer, family: str, labels: str = "") -> dict[str, float]:
    """version -> value of `family`'s samples for MODEL (`labels`: the sorted ones before model="...")."""
    text = httpx.get(server.url + "/metrics").text
    pattern = rf'^{family}\{{{labels}model="{MODEL}",version="(\d+)"\}} (\S+)$'
    return {version: float(value) for version, value in re.findall(pattern, text, re.M)}


def test_each_version_counts_its_own_tokens_and_requests(server) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    generated = 0
    for i in range(REQUESTS):
        r = client.completions.create(model=MODEL, prompt=f"Tell me {i}", max_tokens=3 + i % 4,
                                      extra_body={"ignore_eos": True})
        generated += r.usage.completion_tokens
    tokens = per_version(server, "ladle_llm_generation_tokens_total")
    assert set(tokens) == {"1", "2"} and all(tokens.values()), tokens
    assert sum(tokens.values()) == generated
    finished = per_version(server, "ladle_llm_requests_total", 'finish_reason="length",')
    assert set(finished) == {"1", "2"} and sum(finished.values()) == REQUESTS, finished
    # the gauges and histograms are per version too: one series for each arm
    assert set(per_version(server, "ladle_llm_requests_running")) == {"1", "2"}
    assert set(per_version(server, "ladle_llm_time_to_first_token_seconds_count")) == {"1", "2"}
