"""Shadow traffic and sticky splits for LLMs on a real server: reproducible requests (greedy) are replayed on the
shadow version and compared token by token; others are not copied; the OpenAI `user` field keeps a user on one
version of a split."""

from __future__ import annotations

import shutil
import time

import httpx
import openai
import pytest
import yaml

from tests.fixtures.checkpoints import save_tiny_checkpoint
from tests.repos import write_model
from tests.server import LadleServer

LLM_PARAMS = {"dtype": "float32", "num_kv_blocks": 32, "max_model_len": 128, "max_num_seqs": 4}
SHADOWED = {"backend": "llm", "parameters": LLM_PARAMS, "version_policy": {"all": True},
            "traffic_split": {1: 100}, "shadow": {"version": 2, "fraction": 1.0}}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("llmshadow")
    write_model(repo, "chat", SHADOWED, {1: {}, 2: {}, 3: {}})
    save_tiny_checkpoint(repo / "chat" / "1", "llama")
    shutil.rmtree(repo / "chat" / "2")
    shutil.copytree(repo / "chat" / "1", repo / "chat" / "2")  # an identical copy
    save_tiny_checkpoint(repo / "chat" / "3", "llama", seed=1)  # trained differently
    write_model(repo, "sticky", {"backend": "llm", "parameters": LLM_PARAMS, "version_policy": {"all": True},
                                 "traffic_split": {1: 50, 2: 50}, "sticky_key": "user"}, {1: {}, 2: {}})
    save_tiny_checkpoint(repo / "sticky" / "1", "llama")
    save_tiny_checkpoint(repo / "sticky" / "2", "gpt2")
    return repo


@pytest.fixture(scope="module")
def server(repo):
    with LadleServer([repo, "--allow-admin-without-key"]) as s:
        yield s


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)


def settled(server, compared: int) -> dict:
    deadline = time.monotonic() + 30
    while True:
        status = httpx.get(server.url + "/v2/models/chat/shadow").json()
        counts = status["counts"]
        if (counts["compared"] + counts["failed"] >= compared and status["in_flight"] == 0) \
                or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


def test_greedy_requests_are_replayed_on_an_identical_copy_and_agree(server, client) -> None:
    before = settled(server, 0)["counts"]
    for i in range(4):
        client.completions.create(model="chat", prompt=f"Tell me {i}", max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})
    chunks = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=6, temperature=0, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed is not None
    status = settled(server, before["compared"] + 5)
    assert status["counts"]["compared"] == before["compared"] + 5
    assert status["counts"]["mismatches"] == before["mismatches"]
    sample = status["samples"][0]
    assert sample["outcome"] == "match" and sample["choices"][0]["exact_match"] is True
    assert sample["choices"][0]["length_difference"] == 0


def test_requests_that_cannot_be_reproduced_are_not_copied(server, client) -> None:
    before = settled(server, 0)["counts"]
    client.completions.create(model="chat", prompt="Tell me", max_tokens=4, temperature=1.0)
    time.sleep(0.5)
    assert settled(server, 0)["counts"] == before


def test_a_differently_trained_shadow_is_caught_token_by_token(server, repo, client) -> None:
    path = repo / "chat" / "config.yaml"
    path.write_text(yaml.safe_dump({**SHADOWED, "shadow": {"version": 3, "fraction": 1.0}}))
    try:
        assert httpx.post(server.url + "/v2/repository/models/chat/load", timeout=120).status_code == 200
        before = settled(server, 0)["counts"]
        for i in range(3):
            client.completions.create(model="chat", prompt=f"Once upon {i}", max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True})
        status = settled(server, before["compared"] + 3)
    finally:
        path.write_text(yaml.safe_dump(SHADOWED))
        httpx.post(server.url + "/v2/repository/models/chat/load", timeout=120)
    assert status["counts"]["mismatches"] - before["mismatches"] == 3
    choice = status["samples"][0]["choices"][0]
    assert choice["exact_match"] is False and 0 <= choice["first_difference"] < 12
    metrics = httpx.get(server.url + "/metrics").text
    assert 'ladle_shadow_token_difference_count{measure="first_difference",model="chat",version="3"} 3.0' in metrics


def test_the_user_field_keeps_a_user_on_one_version(server, client) -> None:
    def ask(user: str) -> str:
        return client.completions.create(model="sticky", prompt="Tell me", max_tokens=6, temperature=0, user=user,
                                         extra_body={"ignore_eos": True}).choices[0].text

    first = {f"u{i}": ask(f"u{i}") for i in range(16)}
    assert {user: ask(user) for user in first} == first  # each user: the same version, so the same text
    assert len(set(first.values())) == 2  # and both versions have users (16 users at 50/50)
