"""Hostile OpenAI request content against a real `ladle serve`: client chat templates (refused, or bounded in time
when trusted), reserved chat_template_kwargs, seeds past int64, long stop strings, oversized collections, and
megabyte prompts, none of which may stall the event loop, crash an engine step or answer 500."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.fixtures.checkpoints import save_tiny_checkpoint
from tests.repos import write_model
from tests.server import LadleServer

MODEL, TRUSTING = "tiny", "trusting"
RUNAWAY = "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}"
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`tiny` (--model) keeps the defaults; the repository's `trusting` accepts client templates for 1 s."""
    root = tmp_path_factory.mktemp("hostile")
    checkpoint = save_tiny_checkpoint(root / "ckpt", "llama")
    repo = root / "repo"
    params = {"dtype": "float32", "num_kv_blocks": 32, "max_model_len": 256, "trust_request_chat_template": True,
              "chat_template_timeout": 1.0}
    write_model(repo, TRUSTING, {"backend": "llm", "parameters": params})
    save_tiny_checkpoint(repo / TRUSTING / "1", "llama")
    args = [repo, "--model", checkpoint, "--served-model-name", MODEL, "--dtype", "float32", "--num-kv-blocks", "32",
            "--max-model-len", "256"]
    with LadleServer(args) as s:
        yield s


def post(server, path: str, body: dict, timeout: float = 60.0) -> httpx.Response:
    return httpx.post(server.url + path, json={"model": MODEL, "max_tokens": 2, **body}, timeout=timeout)


def assert_400(r: httpx.Response, param: str, words: str = "") -> None:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks of 1/100 s


def health_latencies(server, busy: threading.Thread) -> list[float]:
    """Times of /v2/health/live answered one after another while `busy` runs (a stalled event loop shows here)."""
    latencies = []
    with httpx.Client(base_url=server.url, timeout=30) as http:
        while busy.is_alive():
            started = time.monotonic()
            assert http.get("/v2/health/live").status_code == 200
            latencies.append(time.monotonic() - started)
            time.sleep(0.02)
    return latencies


def in_background(fn) -> tuple[threading.Thread, list]:
    result: list = []
    thread = threading.Thread(target=lambda: result.append(fn()))
    thread.start()
    return thread, result


# ---------------------------------------------------------------- chat templates


def test_client_chat_templates_are_refused_by_default(server) -> None:
    started = time.monotonic()
    assert_400(post(server, "/v1/chat/completions", {"messages": USER, "chat_template": RUNAWAY}),
               "chat_template", "--trust-request-chat-template")
    assert_400(post(server, "/v1/chat/completions", {"messages": USER,
                                                     "chat_template_kwargs": {"chat_template": RUNAWAY}}),
               "chat_template_kwargs", "--trust-request-chat-template")
    assert time.monotonic() - started < 2.0  # refused at once, never rendered


@pytest.mark.parametrize("key", ["tokenize", "add_generation_prompt", "messages", "return_dict", "tools",
                                 "truncation", "continue_final_message"])
def test_reserved_chat_template_kwargs_are_400s(server, key: str) -> None:
    value = USER if key in ("messages", "tools") else True
    r = post(server, "/v1/chat/completions", {"messages": USER, "chat_template_kwargs": {key: value}})
    assert_400(r, "chat_template_kwargs", key)


def test_other_chat_template_kwargs_reach_the_template(server) -> None:
    r = post(server, "/v1/chat/completions", {"messages": USER, "chat_template_kwargs": {"enable_thinking": False}})
    assert r.status_code == 200, r.text


def test_runaway_trusted_template_is_stopped_after_its_timeout(server) -> None:
    body = {"model": TRUSTING, "messages": USER, "chat_template_kwargs": {"chat_template": RUNAWAY}}
    busy, result = in_background(lambda: post(server, "/v1/chat/completions", body))
    started = time.monotonic()
    latencies = health_latencies(server, busy)
    elapsed = time.monotonic() - started
    assert_400(result[0], "chat_template_kwargs", "did not finish rendering")
    assert 0.9 < elapsed < 5.0  # the 1 s chat_template_timeout, then the answer
    assert len(latencies) >= 5 and max(latencies) < 0.2, latencies  # the event loop kept answering
    before = cpu_seconds(server.process.pid)
    time.sleep(1.0)
    assert cpu_seconds(server.process.pid) - before < 0.3  # the rendering thread really stopped
    # the server and the same engine still serve, a benign client template included
    assert post(server, "/v1/chat/completions", {"model": TRUSTING, "messages": USER}).status_code == 200
    r = post(server, "/v1/chat/completions", {"model": TRUSTING, "messages": USER, "max_tokens": 1, "logprobs": True,
                                               "chat_template": "{{ messages[0]['content'] }}!"})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] <= 3, r.text


def test_template_errors_are_400s(server) -> None:
    bad = "{{ raise_exception('roles must alternate') }}"
    assert_400(post(server, "/v1/chat/completions", {"model": TRUSTING, "messages": USER, "chat_template": bad}),
               "chat_template", "roles must alternate")
    assert_400(post(server, "/v1/chat/completions", {"model": TRUSTING, "messages": USER, "chat_template": "{% if"}),
               "chat_template", "TemplateSyntaxError")


# ---------------------------------------------------------------- seeds, stop strings and other bounds


@pytest.mark.parametrize(("seed", "n", "ok"), [
    (2**63, 1, False), (2**64, 1, False), (2**63 - 1, 2, False), (-(2**63) - 1, 1, False),
    (2**63 - 2, 2, True), (-(2**63), 1, True),
])
def test_seed_must_fit_int64_for_every_choice(server, seed: int, n: int, ok: bool) -> None:
    r = post(server, "/v1/completions", {"prompt": "hi", "seed": seed, "n": n, "max_tokens": 1})
    if ok:
        assert r.status_code == 200 and len(r.json()["choices"]) == n, r.text
    else:
        assert_400(r, "seed")  # "seed must be in [...]" (2**64 already fails as a float past int64)


def test_stop_strings_are_bounded_in_length(server) -> None:
    assert_400(post(server, "/v1/completions", {"prompt": "hi", "stop": ["x" * 1025]}), "stop", "1024")
    r = post(server, "/v1/completions", {"prompt": "hi", "stop": [c * 1024 for c in "abcdefghijklmnop"],
                                         "max_tokens": 16})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "hi", "stop_token_ids": [1] * 257}, "stop_token_ids"),
    ({"prompt": "hi", "logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ({"prompt": "hi", "logit_bias": {"\u00b2": 1}}, "logit_bias"),  # "²".isdigit(), but not a token id
    ({"prompt": "hi", "logit_bias": {"9" * 5000: 1}}, "logit_bias"),  # past int()'s digit limit
    ({"prompt": "hi", "top_k": 2**63}, "top_k"),  # would overflow the engine step's int64 column
])
def test_collections_and_ids_past_their_bounds_are_400s(server, body: dict, param: str) -> None:
    assert_400(post(server, "/v1/completions", body), param)


def test_chat_collections_past_their_bounds_are_400s(server) -> None:
    assert_400(post(server, "/v1/chat/completions", {"messages": USER * 2049}), "messages")
    parts = [{"type": "text", "text": "a"}] * 257
    assert_400(post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": parts}]}), "messages")


# ---------------------------------------------------------------- large prompts stay off the event loop


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/completions", {"prompt": "The quick brown fox jumps over the lazy dog. " * 33000}),
    ("/v1/completions", {"prompt": ["hi", "The quick brown fox jumps over the lazy dog. " * 33000]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Lorem ipsum dolor sit amet. " * 50000}]}),
])
def test_megabyte_prompts_past_the_window_are_refused_without_tokenizing(server, path: str, body: dict) -> None:
    # tokenized, a megabyte costs the server ~2 s of a core and stalls its event loop 100-200 ms (freeing a
    # million-token result holds the GIL); its length alone proves it cannot fit a 256-token window
    started = time.monotonic()
    busy, result = in_background(lambda: post(server, path, body))
    latencies = health_latencies(server, busy)
    assert_400(result[0], "prompt" if "prompt" in body else "messages", "context window")
    assert "at least" in result[0].json()["error"]["message"]
    assert time.monotonic() - started < 1.0 and max(latencies, default=0.0) < 0.2, latencies


def test_openai_bodies_past_their_limit_are_413_before_parsing(server) -> None:
    # 14 MB of token ids would hold the GIL ~170 ms while parsed: past --max-openai-request-bytes (4 MiB) it is not
    started = time.monotonic()
    r = post(server, "/v1/completions", {"prompt": [[5, 6, 7, 8] * 500_000] * 2})
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
    assert "--max-openai-request-bytes" in r.json()["error"]["message"]
    assert time.monotonic() - started < 2.0
