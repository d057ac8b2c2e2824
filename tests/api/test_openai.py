"""The official `openai` client against a real `ladle serve --model` of a tiny checkpoint:
completions, chat, streaming, n > 1, stop strings, logprobs, seeds, usage, and the error cases."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.fixtures.checkpoints import save_tiny_checkpoint
from tests.server import LadleServer

MODEL = "tiny"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llama", "llama")


@pytest.fixture(scope="module")
def server(checkpoint):
    args = ["--model", checkpoint, "--served-model-name", MODEL, "--dtype", "float32", "--num-kv-blocks", "64",
            "--max-model-len", "256"]
    with LadleServer(args) as s:
        yield s


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return AutoTokenizer.from_pretrained(checkpoint)


def greedy(client, prompt, **kw):
    return client.completions.create(model=MODEL, prompt=prompt, temperature=0, **kw)


def test_models_list(client) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]


def test_greedy_completion_matches_transformers(client, checkpoint, tokenizer) -> None:
    prompt = "The quick brown fox"
    r = greedy(client, prompt, max_tokens=12, extra_body={"ignore_eos": True})
    ids = tokenizer(prompt)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    ref = model.generate(torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    assert r.choices[0].text == tokenizer.decode(ref[0, len(ids):], skip_special_tokens=True)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 12
    assert r.usage.total_tokens == 12 + len(ids)


def test_prompt_forms_and_choice_indices(client, tokenizer) -> None:
    ids = tokenizer("hello there")["input_ids"]
    by_text = greedy(client, "hello there", max_tokens=5).choices[0].text
    assert greedy(client, ids, max_tokens=5).choices[0].text == by_text
    r = greedy(client, ["hello there", "general kenobi"], max_tokens=5, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text == by_text
    r = greedy(client, [ids, ids[:2]], max_tokens=3)
    assert r.choices[0].text == by_text[: len(r.choices[0].text)] and len(r.choices) == 2


def test_echo_prepends_the_prompt(client) -> None:
    r = greedy(client, "echo me", max_tokens=3, echo=True)
    assert r.choices[0].text.startswith("echo me")


def test_streaming_equals_non_streaming(client) -> None:
    kw = {"max_tokens": 16, "extra_body": {"ignore_eos": True}}
    full = greedy(client, "Streams of text", **kw).choices[0].text
    chunks = list(greedy(client, "Streams of text", stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_completion_and_stream(client) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi!"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    text = r.choices[0].message.content
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens


def test_stop_strings_are_never_partly_emitted(client) -> None:
    kw = {"max_tokens": 40, "extra_body": {"ignore_eos": True}}
    full = greedy(client, "Once upon a time", **kw).choices[0].text
    assert len(full) > 12
    stop = full[6:10]
    cut = full[: full.index(stop)]
    r = greedy(client, "Once upon a time", stop=[stop, "never-appears"], **kw)
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra["stop_reason"] == stop
    streamed = "".join(c.choices[0].text for c in greedy(client, "Once upon a time", stop=stop, stream=True, **kw))
    assert streamed == cut
    inclusive = greedy(client, "Once upon a time", stop=stop, extra_body={"include_stop_str_in_output": True,
                                                                          "ignore_eos": True}, max_tokens=40)
    assert inclusive.choices[0].text == cut + stop


def test_stop_token_ids(client, checkpoint, tokenizer) -> None:
    ids = tokenizer("Counting")["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    ref = model.generate(torch.tensor([ids]), max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    third = ref[0, len(ids) + 2].item()
    r = greedy(client, "Counting", max_tokens=10, extra_body={"ignore_eos": True, "stop_token_ids": [third]})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens <= 3
    assert r.model_extra.get("choices") is None and r.choices[0].model_extra["stop_reason"] == third


def test_completion_logprobs(client) -> None:
    r = greedy(client, "log probs", max_tokens=4, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    for value, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert value <= 0 and 1 <= len(top) <= 3
        assert max(top.values()) == pytest.approx(value, abs=1e-5)  # greedy picks the most likely
    assert lp.text_offset == sorted(lp.text_offset)


def test_echo_with_logprobs_scores_the_prompt_like_transformers(client, checkpoint, tokenizer) -> None:
    prompt = "score every token of this prompt"
    ids = tokenizer(prompt)["input_ids"]
    kw = {"max_tokens": 3, "logprobs": 2, "extra_body": {"ignore_eos": True}}
    plain = greedy(client, prompt, **kw).choices[0]
    echoed = greedy(client, prompt, echo=True, **kw).choices[0]
    lp = echoed.logprobs
    assert echoed.text.endswith(plain.text) and echoed.text.startswith(prompt)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == len(ids) + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing precedes the first token
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
    expected = [ref[pos - 1, ids[pos]].item() for pos in range(1, len(ids))]
    assert lp.token_logprobs[1 : len(ids)] == pytest.approx(expected, abs=1e-4)
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs[1:])
    assert lp.token_logprobs[len(ids):] == pytest.approx(plain.logprobs.token_logprobs, abs=1e-5)
    assert lp.text_offset[len(ids)] == len(echoed.text) - len(plain.text) and lp.text_offset == sorted(lp.text_offset)
    chunks = [c.choices[0].logprobs for c in greedy(client, prompt, echo=True, stream=True, **kw) if c.choices]
    assert [t for c in chunks for t in c.tokens] == lp.tokens
    assert [v for c in chunks for v in c.token_logprobs][1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-5)
    assert [o for c in chunks for o in c.text_offset] == lp.text_offset


def test_logit_bias_steers_completions_and_chat(client, tokenizer) -> None:
    forced = tokenizer("fox")["input_ids"][-1]
    r = greedy(client, "anything at all", max_tokens=4, logit_bias={str(forced): 100}, logprobs=0,
               extra_body={"ignore_eos": True})
    assert r.choices[0].text == tokenizer.decode([forced] * 4)
    plain = greedy(client, "anything at all", max_tokens=1).choices[0].text
    first = tokenizer(plain, add_special_tokens=False)["input_ids"][0]
    banned = greedy(client, "anything at all", max_tokens=1, logit_bias={str(first): -100}).choices[0].text
    assert banned != plain
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                          temperature=0, logit_bias={str(forced): 100})
    assert chat.choices[0].message.content == tokenizer.decode([forced] * 3)


def test_structured_output_through_the_openai_client(client) -> None:
    schema = {"type": "object", "additionalProperties": False, "required": ["city", "rank"],
              "properties": {"city": {"enum": ["Oslo", "Lima", "Pune"]}, "rank": {"type": "integer", "minimum": 1,
                                                                                "maximum": 9}}}
    messages = [{"role": "user", "content": "a city"}]
    # a random model pads every gap the grammar allows (up to 17 whitespace characters in each of the object's ~9
    # gaps): 200 tokens always fit the whole object, so it must close with "stop"
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=200, temperature=1.0, seed=2, n=3,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "city", "schema": schema}})
    for choice in r.choices:
        answer = json.loads(choice.message.content)
        assert answer["city"] in {"Oslo", "Lima", "Pune"} and 1 <= answer["rank"] <= 9
        assert choice.finish_reason == "stop"
    colours = ["red", "green", "light blue"]
    r = greedy(client, "pick", max_tokens=20, n=2, extra_body={"guided_choice": colours})
    assert all(c.text in colours and c.finish_reason == "stop" for c in r.choices)
    code = {"structured_outputs": {"regex": "[A-Z]{2}-[0-9]{3}"}}
    stream = greedy(client, "code", max_tokens=20, stream=True, extra_body=code)
    assert re.fullmatch(r"[A-Z]{2}-[0-9]{3}", "".join(c.choices[0].text for c in stream if c.choices))


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"guided_regex": "([a-"}, "guided_regex"),
        ({"guided_json": {"type": "nope"}}, "guided_json"),
        ({"guided_grammar": "start: missing"}, "guided_grammar"),
        ({"guided_regex": "a", "guided_choice": ["x"]}, "guided_choice"),
        ({"guided_choice": []}, "guided_choice"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
    ],
)
def test_invalid_output_constraints_are_400s(server, extra: dict, param: str) -> None:
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "x", **extra})
    assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_chat_logprobs(client) -> None:
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                       temperature=0, logprobs=True, top_logprobs=4)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 4 and t.top_logprobs[0].logprob == pytest.approx(t.logprob) for t in content)


def test_n_with_seed_is_reproducible_and_choices_differ(client) -> None:
    kw = {"model": MODEL, "prompt": "Random", "max_tokens": 12, "temperature": 1.0, "n": 3, "seed": 11,
          "extra_body": {"ignore_eos": True}}
    a = [c.text for c in client.completions.create(**kw).choices]
    b = [c.text for c in client.completions.create(**kw).choices]
    assert a == b
    assert len(set(a)) > 1


def test_seeded_sampling_is_independent_of_the_batch(server) -> None:
    seeded = {"model": MODEL, "prompt": "Seeded", "max_tokens": 20, "temperature": 0.9, "top_p": 0.95,
              "seed": 1234, "ignore_eos": True}

    async def main() -> tuple[str, str]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            alone = (await http.post("/v1/completions", json=seeded)).json()["choices"][0]["text"]
            others = [http.post("/v1/completions", json={**seeded, "seed": None, "prompt": f"noise {i} " * (i + 1),
                                                         "max_tokens": 30}) for i in range(6)]
            together = await asyncio.gather(http.post("/v1/completions", json=seeded), *others)
            return alone, together[0].json()["choices"][0]["text"]

    alone, together = asyncio.run(main())
    assert alone == together


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"prompt": "x" * 2000, "max_tokens": 5}, 400, "prompt"),
        ({"prompt": "hi there", "max_tokens": 255}, 400, "max_tokens"),
        ({"prompt": "hi", "temperature": -1}, 400, "temperature"),
        ({"prompt": "hi", "n": 0}, 400, "n"),
        ({"prompt": "hi", "top_p": 0}, 400, "top_p"),
        ({"prompt": [], "max_tokens": 5}, 400, "prompt"),
        ({"prompt": [[1, 99999]], "max_tokens": 5}, 400, "prompt"),
        ({"max_tokens": 5}, 400, "prompt"),
        ({"prompt": "hi", "model": "nope"}, 404, "model"),
        ({"prompt": "hi", "logit_bias": {"99999": 1}}, 400, "logit_bias"),
        ({"prompt": "hi", "logit_bias": {"ten": 1}}, 400, "logit_bias"),
        ({"prompt": "hi", "logit_bias": {"10": 101}}, 400, "logit_bias"),
        ({"prompt": "hi", "stop_token_ids": [99999], "min_tokens": 2}, 400, "stop_token_ids"),
    ],
)
def test_errors_in_openai_shape(server, body, status: int, param: str) -> None:
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, **body})
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["message"]


def test_malformed_json_and_chat_errors(server, client) -> None:
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{nope")
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=3)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])


def metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    match = re.search(rf'^{name}\{{model="{MODEL}",version="1"\}} (\S+)$', text, re.M)
    assert match, name
    return float(match.group(1))


def test_disconnect_mid_stream_frees_the_blocks(server) -> None:
    body = {"model": MODEL, "prompt": "a long story", "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        first = [next(lines) for _ in range(3)]
        assert all(line.startswith("data: ") or line == "" for line in first)
        assert metric(server, "ladle_llm_kv_cache_usage_ratio") > 0 or metric(server, "ladle_llm_requests_running")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (
        metric(server, "ladle_llm_requests_running") or metric(server, "ladle_llm_kv_cache_usage_ratio")
    ):
        time.sleep(0.05)
    assert metric(server, "ladle_llm_requests_running") == 0
    assert metric(server, "ladle_llm_kv_cache_usage_ratio") == 0
    text = httpx.get(server.url + "/metrics").text
    assert 'ladle_llm_requests_total{finish_reason="abort",model="tiny",version="1"}' in text


def test_llm_metrics_are_exported(server, client) -> None:
    greedy(client, "metrics please", max_tokens=4)
    text = httpx.get(server.url + "/metrics").text
    for family in ("ladle_llm_time_to_first_token_seconds_bucket", "ladle_llm_inter_token_latency_seconds_bucket",
                   "ladle_llm_e2e_request_latency_seconds_bucket", "ladle_llm_queue_time_seconds_bucket",
                   "ladle_llm_requests_running", "ladle_llm_requests_waiting", "ladle_llm_kv_cache_usage_ratio",
                   "ladle_llm_prompt_tokens_total", "ladle_llm_generation_tokens_total",
                   "ladle_llm_preemptions_total", "ladle_llm_prefix_cache_hit_tokens_total"):
        assert family in text, family
    assert metric(server, "ladle_llm_generation_tokens_total") >= 4
