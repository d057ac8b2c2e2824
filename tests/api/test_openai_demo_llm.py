"""The demo chat model over the OpenAI API, with the real openai client: served from the demo repository (what
`make serve` runs, and what the README's first LLM example shows) and straight from its GGUF file with `--model`."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.llm.test_demo_model import DEMO_GGUF
from tests.server import LadleServer

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]

pytestmark = pytest.mark.skipif(
    not DEMO_GGUF.exists(), reason="the demo GGUF is fetched by `python examples/build_demo.py` (make install)"
)


@pytest.fixture(scope="module")
def client(demo_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=demo_server.url + "/v1", api_key="unused", max_retries=0)


def test_the_demo_repository_serves_smollm2(client: openai.OpenAI) -> None:
    assert "smollm2" in {m.id for m in client.models.list().data}
    reply = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=20)
    choice = reply.choices[0]
    assert choice.message.content == "The capital of France is Paris."
    assert choice.finish_reason == "stop"  # the GGUF's eos (<|im_end|>) ends the answer
    assert reply.usage.prompt_tokens > 20 and reply.usage.completion_tokens == 8


def test_streaming_gives_the_same_answer(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=20,
                                            stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == "The capital of France is Paris."


def test_json_schema_answers_parse_and_fit(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
              "required": ["city", "country"], "additionalProperties": False}
    reply = client.chat.completions.create(
        model="smollm2", temperature=0, max_tokens=60,
        messages=[{"role": "user", "content": "Name a big city and its country as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": schema}},
    )
    place = json.loads(reply.choices[0].message.content)
    assert set(place) == {"city", "country"} and all(isinstance(v, str) and v for v in place.values())


def test_ladle_serve_model_gguf_file() -> None:
    with LadleServer(["--model", DEMO_GGUF, "--served-model-name", "smol", "--quantization", "int8",
                      "--kv-cache-memory", "64MiB", "--max-model-len", "1024"]) as server:
        models = httpx.get(server.url + "/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["smol"]
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="smol", messages=QUESTION, temperature=0, max_tokens=20)
        assert "Paris" in reply.choices[0].message.content
        assert "int8" in server.log()  # the weight format is logged at load
