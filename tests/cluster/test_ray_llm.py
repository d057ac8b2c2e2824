"""`ladle serve --ray` with an LLM on two replicas: prompts sharing a prefix reach the replica caching it (asserted
through `cached_tokens`), streams pass through, and a session key keeps its replica."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.cluster.ray_helpers import PREFIX, per_replica, settle_metrics
from tests.fixtures.checkpoints import save_tiny_checkpoint
from tests.server import LadleServer

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def llm_on_ray(ray_address: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LadleServer]:
    checkpoint = save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")
    with LadleServer(["--model", checkpoint, "--ray", ray_address, "--replicas", "2", "--num-cpus", "1",
                      "--kv-cache-memory", "64MiB", "--ray-app-prefix", PREFIX], ready_timeout=180) as server:
        yield server


def test_llm_prompts_sharing_a_prefix_go_to_the_replica_that_caches_it(llm_on_ray: LadleServer) -> None:
    url = llm_on_ray.url
    heads = ["You are a pirate. " + "Arr, the sea. " * 16, "You are a poet. " + "Roses and verse. " * 13]
    cached = {0: [], 1: []}
    for question in range(4):
        for group, head in enumerate(heads):
            body = {"model": "tiny", "prompt": f"{head} Question {question}?", "max_tokens": 2}
            r = httpx.post(url + "/v1/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            cached[group].append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
    for group in cached.values():  # the first of a group fills the cache; every later one finds its head there
        assert group[0] == 0 and all(c >= 64 for c in group[1:]), cached
    settle_metrics()
    hits = per_replica(url, "ladle_llm_prefix_cache_hit_tokens_total")  # the replicas count the same hits
    assert sum(hits.values()) == sum(sum(group) for group in cached.values()), hits


def test_llm_streams_and_sessions_stick(llm_on_ray: LadleServer) -> None:
    import openai

    url = llm_on_ray.url
    client = openai.OpenAI(base_url=url + "/v1", api_key="none")
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=4, stream=True))
    assert chunks and chunks[-1].choices[0].finish_reason is not None
    settle_metrics()  # /metrics shares one scrape of the replicas per second: a fresh one
    before = per_replica(url, "ladle_llm_prompt_tokens_total")
    for i in range(6):
        body = {"model": "tiny", "prompt": f"unrelated prompt number {i} " * (i + 1), "max_tokens": 1,
                "user": "session-7"}
        assert httpx.post(url + "/v1/completions", json=body, timeout=60).status_code == 200
    settle_metrics()
    after = per_replica(url, "ladle_llm_prompt_tokens_total")
    grew = [label for label in after if after[label] > before.get(label, 0.0)]
    assert len(grew) == 1, (before, after)




def test_an_openai_batch_runs_over_the_replicas(llm_on_ray: LadleServer) -> None:
    import io

    import openai

    from tests.jobs.helpers import jsonl, wait_batch

    client = openai.OpenAI(base_url=llm_on_ray.url + "/v1", api_key="none")
    lines = [{"custom_id": f"q{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": "tiny", "prompt": f"line {i}", "max_tokens": 2}} for i in range(4)]
    uploaded = client.files.create(file=("b.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h")
    done = wait_batch(client, batch.id)
    assert done.status == "completed" and done.request_counts.completed == 4, done
