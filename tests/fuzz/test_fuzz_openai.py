"""Fuzzing the OpenAI-compatible API of a live server with a tiny LLM: requests generated from the server's own
pydantic request models, valid and mutated (wrong types, huge numbers, long strings, deep nesting, unknown
fields), streamed or not. No 5xx, no hang, no error event after a 200, and the server still serves afterwards."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from tests.fixtures.checkpoints import save_tiny_checkpoint
from tests.fuzz.openai_strategies import MODEL, chat_bodies, completion_bodies, describe, sweep
from tests.server import LadleServer

# derandomize: every run (and CI) sends the same requests, so a failure reproduces from the printed body.
FUZZ = settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
#: a hang is a failure: every request (a whole stream included) must be answered within this many seconds
REQUEST_TIMEOUT_S = 20.0
#: 504 is a request's own deadline (its `timeout` field) passing: the client's doing, not a server failure
ALLOWED_5XX = {504}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    checkpoint = save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llama", "llama")
    args = ["--model", checkpoint, "--served-model-name", MODEL, "--dtype", "float32", "--num-kv-blocks", "64",
            "--max-model-len", "256"]
    with LadleServer(args) as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=REQUEST_TIMEOUT_S) as client:
        yield client


def post(http: httpx.Client, path: str, body: bytes) -> None:
    """POST a fuzzed body; fail on a 5xx, a hang, or a stream that breaks after its 200."""
    started = time.monotonic()
    with http.stream("POST", path, content=body, headers={"Content-Type": "application/json"}) as response:
        content = response.read()
    elapsed = time.monotonic() - started
    assert elapsed < REQUEST_TIMEOUT_S, f"answered after {elapsed:.1f}s"
    status, text = response.status_code, content.decode(errors="replace")
    assert status < 500 or status in ALLOWED_5XX, f"{status}: {text[:1000]}"
    if status >= 400:
        error = json.loads(content)["error"]  # OpenAI's shape, whatever went wrong
        assert isinstance(error["message"], str) and error["message"], text
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert_stream_ok(text)


def assert_stream_ok(text: str) -> None:
    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", text[-1000:]
    for event in events[:-1]:
        error = json.loads(event).get("error")
        # Refusals must come before the 200 (a status code), and a stream must not die of a server fault.
        assert error is None, f"error event after 200: {event}"


@FUZZ
@given(body=completion_bodies)
def test_completions_never_5xx(http: httpx.Client, body: bytes) -> None:
    note(f"POST /v1/completions {describe(body)}")
    post(http, "/v1/completions", body)


@FUZZ
@given(body=chat_bodies)
def test_chat_completions_never_5xx(http: httpx.Client, body: bytes) -> None:
    note(f"POST /v1/chat/completions {describe(body)}")
    post(http, "/v1/chat/completions", body)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_every_field_with_every_hostile_value(http: httpx.Client, path: str) -> None:
    """A deterministic sweep the random search would rarely hit (seed 2**70, a 100 kB stop string, n = 2 with
    seed 2**63 - 1, ...); every failing body is listed, not just the first."""
    failures = []
    for body in sweep(path):
        try:
            post(http, path, body)
        except (AssertionError, httpx.HTTPError) as exc:
            failures.append(f"POST {path} {describe(body, 300)}\n    -> {str(exc)[:300]}")
    assert not failures, f"{len(failures)} failing requests:\n" + "\n".join(failures)


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    path=st.sampled_from(["/v1/models", "/v1/models/tiny", "/v1/completion", "/v1/chat", "/v1/embeddings",
                          "/v1/completions/x", "/v1/../v2", "/v1/%00", "/v1/"]),
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
    body=st.one_of(st.just(b""), completion_bodies),
)
def test_other_v1_routes_never_5xx(http: httpx.Client, path: str, method: str, body: bytes) -> None:
    note(f"{method} {path} {describe(body)}")
    response = http.request(method, path, content=body)
    assert response.status_code < 500, f"{method} {path} -> {response.status_code}: {response.text[:500]}"


def test_server_healthy_and_serving_after_fuzzing(server, http: httpx.Client) -> None:
    # Runs after the fuzzers above (pytest keeps file order).
    for probe in ("/health", "/v2/health/live", "/v2/health/ready"):
        assert http.get(probe).status_code == 200, probe
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S)
    completion = client.completions.create(model=MODEL, prompt="hello there", max_tokens=3, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert completion.choices[0].finish_reason == "length" and completion.usage.completion_tokens == 3
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                          extra_body={"ignore_eos": True})
    assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 2
