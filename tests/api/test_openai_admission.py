"""LLM admission over HTTP against a real `ladle serve --model`: fan-out bounds (defect 5), a bounded waiting queue
(503 + Retry-After), refusals as real status codes before the first byte of a stream (defect 8), and per-request
deadlines (`timeout`, X-Request-Timeout) that finish queued or running requests and free their KV blocks."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from starlette.requests import Request

from ladle.api.openai_limits import deadline
from ladle.config import LLMConfig
from ladle.errors import InvalidInput
from tests.fixtures.checkpoints import save_tiny_checkpoint
from tests.server import LadleServer

MODEL = "tiny"
WAITING = 4  # --max-waiting-requests
LONG = {"model": MODEL, "prompt": "a long story", "max_tokens": 4000, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    checkpoint = save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llama", "llama",
                                      max_position_embeddings=4096)
    args = ["--model", checkpoint, "--served-model-name", MODEL, "--dtype", "float32", "--num-kv-blocks", "600",
            "--max-num-seqs", "2", "--max-waiting-requests", str(WAITING), "--max-waiting-tokens", "2048",
            "--max-sequences-per-request", "64"]
    with LadleServer(args) as s:
        yield s


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def metric(server, name: str, labels: str = "") -> float:
    text = httpx.get(server.url + "/metrics").text
    match = re.search(rf'^{name}\{{{labels}model="{MODEL}",version="1"\}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def wait_idle(server) -> None:
    """Nothing running or waiting and every KV block free (what an aborted or expired request leaves)."""
    names = ("ladle_llm_requests_running", "ladle_llm_requests_waiting", "ladle_llm_kv_cache_usage_ratio")
    deadline = time.monotonic() + 10
    while any(metric(server, n) for n in names) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [metric(server, n) for n in names] == [0, 0, 0]


@contextlib.contextmanager
def saturated(server, waiting: int = WAITING) -> Iterator[None]:
    """Two long streams running (--max-num-seqs 2) and `waiting` more queued behind them (by default the queue is
    full); nothing leaves the queue meanwhile. Leaving closes them all (client disconnects abort them)."""
    wait_idle(server)
    lines = []  # kept: dropping a line iterator makes httpx close its connection (a disconnect)
    with contextlib.ExitStack() as stack:
        for i in range(2 + waiting):
            r = stack.enter_context(httpx.stream("POST", server.url + "/v1/completions", timeout=30,
                                                 json={**LONG, "stream": True}))
            assert r.status_code == 200
            lines.append(r.iter_lines())
            if i < 2:  # read its first token: it is running, so it no longer counts as waiting
                assert next(lines[-1]).startswith("data: ")
        yield
    wait_idle(server)


def assert_openai_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    return error


def test_defect_5_fan_out_bomb_is_a_fast_400_and_health_stays_live(server, client) -> None:
    started = time.monotonic()
    r = httpx.post(server.url + "/v1/completions", timeout=10,
                   json={"model": MODEL, "prompt": ["a"] * 4096, "n": 128, "max_tokens": 1})
    assert time.monotonic() - started < 1.0
    assert "524288 sequences" in assert_openai_error(r, 400, "n")["message"]
    assert httpx.get(server.url + "/v2/health/live", timeout=1).status_code == 200
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": ["a"] * 65, "max_tokens": 1})
    assert_openai_error(r, 400, "prompt")  # n = 1: the prompts are what is too many
    with pytest.raises(openai.BadRequestError, match="sequences"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], n=65)
    with pytest.raises(openai.BadRequestError, match="at most 4 may wait"):  # could never fit: 400, not 503
        client.completions.create(model=MODEL, prompt="x", n=WAITING + 1, max_tokens=1)
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": [[7] * 600] * 4, "max_tokens": 1})
    assert_openai_error(r, 400, "prompt")  # 2400 prompt tokens can never wait behind a 2048-token bound
    assert metric(server, "ladle_llm_requests_waiting") == 0


def test_a_flood_beyond_the_waiting_bound_is_shed_with_503_and_admitted_requests_finish(server) -> None:
    body = {"model": MODEL, "prompt": "the same prompt", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    before = metric(server, "ladle_llm_requests_total", 'finish_reason="length",')

    async def flood() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            return await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(3 * WAITING)))

    with saturated(server, waiting=0):  # the engine is busy and nothing leaves the queue: exactly WAITING places
        loop = asyncio.new_event_loop()
        pending = loop.create_task(flood())
        loop.run_until_complete(asyncio.sleep(1.0))  # every request answered or queued
        assert metric(server, "ladle_llm_requests_waiting") == WAITING
        health = time.monotonic()
        assert httpx.get(server.url + "/v2/health/live", timeout=1).status_code == 200
        assert time.monotonic() - health < 0.5
    responses = loop.run_until_complete(pending)  # the long streams are gone: the queued ones run
    loop.close()
    shed = [r for r in responses if r.status_code == 503]
    served = [r for r in responses if r.status_code == 200]
    assert len(shed) == 2 * WAITING and len(served) == WAITING
    refused = re.search(r'^ladle_requests_refused_total\{reason="llm_queue_full"\} (\S+)$',
                        httpx.get(server.url + "/metrics").text, re.M)
    assert refused is not None and float(refused.group(1)) >= 2 * WAITING  # earlier tests may have refused some too
    for r in shed:
        assert r.headers["retry-after"] == "1"
        assert assert_openai_error(r, 503)["type"] == "service_unavailable"
    texts = {r.json()["choices"][0]["text"] for r in served}
    assert len(texts) == 1 and all(r.json()["usage"]["completion_tokens"] == 24 for r in served)
    assert metric(server, "ladle_llm_requests_total", 'finish_reason="length",') == before + WAITING
    wait_idle(server)


def test_defect_8_streams_are_admitted_before_the_first_byte(server, client) -> None:
    body = {**LONG, "max_tokens": 4, "stream": True}
    with saturated(server):
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=10) as r:
            r.read()
            assert_openai_error(r, 503)
            assert r.headers["retry-after"] == "1"
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=chat, timeout=10) as r:
            r.read()
            assert_openai_error(r, 503)
        with pytest.raises(openai.APIStatusError) as refused:
            client.completions.create(model=MODEL, prompt="x", max_tokens=4, stream=True)
        assert refused.value.status_code == 503
    with pytest.raises(openai.BadRequestError):  # a request refused for what it is: 400, also before the stream
        client.completions.create(model=MODEL, prompt="x", n=WAITING + 1, max_tokens=1, stream=True)
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "timeout": -1}, timeout=10) as r:
        r.read()
        assert_openai_error(r, 400, "timeout")


def test_a_deadline_stops_a_long_generation_with_504_and_frees_its_blocks(server, client) -> None:
    wait_idle(server)
    before = metric(server, "ladle_llm_requests_total", 'finish_reason="timeout",')
    started = time.monotonic()
    r = httpx.post(server.url + "/v1/completions", json={**LONG, "timeout": 0.5}, timeout=30)
    assert 0.5 <= time.monotonic() - started < 3.0
    assert assert_openai_error(r, 504, "timeout")["type"] == "timeout"
    wait_idle(server)
    assert metric(server, "ladle_llm_requests_total", 'finish_reason="timeout",') == before + 1
    # the header works on chat too, and the smallest deadline given wins
    with pytest.raises(openai.APIStatusError) as late:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "tell me"}],
                                       max_tokens=4000, extra_body={"ignore_eos": True, "timeout": 600},
                                       extra_headers={"X-Request-Timeout": "0.3"})
    assert late.value.status_code == 504
    r = httpx.post(server.url + "/v1/completions", json=LONG, headers={"X-Request-Timeout": "soon"})
    assert_openai_error(r, 400, "X-Request-Timeout")
    wait_idle(server)


def test_a_streamed_request_past_its_deadline_ends_with_an_error_event(server) -> None:
    wait_idle(server)
    with httpx.stream("POST", server.url + "/v1/completions", timeout=30,
                      json={**LONG, "stream": True, "timeout": 0.5}) as r:
        assert r.status_code == 200
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line]
    assert events[-1] == "[DONE]" and len(events) > 3  # some tokens came first
    assert '"type":"timeout"' in events[-2] and '"param":"timeout"' in events[-2]
    wait_idle(server)


def test_a_queued_request_past_its_deadline_leaves_the_queue(server) -> None:
    before = metric(server, "ladle_llm_requests_total", 'finish_reason="timeout",')
    with saturated(server, waiting=WAITING - 1):  # one place left
        started = time.monotonic()
        r = httpx.post(server.url + "/v1/completions", json={**LONG, "max_tokens": 4, "timeout": 0.3}, timeout=10)
        assert 0.3 <= time.monotonic() - started < 2.0
        assert_openai_error(r, 504, "timeout")  # it waited behind the running streams and was dropped from the queue
        assert metric(server, "ladle_llm_requests_waiting") == WAITING - 1
        with httpx.stream("POST", server.url + "/v1/completions", json={**LONG, "stream": True}, timeout=10) as r:
            assert r.status_code == 200  # its place was given back
    assert metric(server, "ladle_llm_requests_total", 'finish_reason="timeout",') == before + 1


def test_the_smallest_deadline_given_wins_and_the_server_default_applies() -> None:
    def request(headers: dict[str, str]) -> Request:
        return Request({"type": "http", "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]})

    default = LLMConfig(request_timeout=5.0)
    assert deadline(request({}), None, LLMConfig(), 100.0) is None
    assert deadline(request({}), None, default, 100.0) == 105.0
    assert deadline(request({}), 1.5, default, 100.0) == 101.5
    assert deadline(request({"X-Request-Timeout": "2"}), 3.0, default, 100.0) == 102.0
    assert deadline(request({"X-Request-Timeout": "9"}), None, default, 100.0) == 105.0
    for bad in ("0", "-1", "nan", "inf", "1e9", "soon"):
        with pytest.raises(InvalidInput):
            deadline(request({"X-Request-Timeout": bad}), None, default, 100.0)
