"""Speculative decoding through the OpenAI API: a `--speculative-method ngram` server answers exactly as a plain
server of the same tiny checkpoint (greedy, seeded sampling, stops, logprobs, usage), counts its drafts in /metrics,
and repository LLMs inherit, opt out of, or replace (draft_model) the server's speculation."""

from __future__ import annotations

import contextlib
import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from tests.fixtures.checkpoints import save_tiny_checkpoint
from tests.fixtures.tiny_llm import save_tiny_model
from tests.fixtures.tiny_tokenizer import save_tiny_tokenizer
from tests.repos import write_model
from tests.server import LadleServer

MODEL = "tiny"
# One torch thread: less noise in the start-up step timings the speculation policy is sized from.
ENGINE = ["--dtype", "float32", "--num-kv-blocks", "64", "--max-model-len", "256", "--num-threads", "1"]
# Greedy continuations of these from the tiny llama fall into loops within ~40 tokens: n-gram lookup finds drafts.
LOOPING = ["print(add(1, 2))", "the the the the", "User: hi\nAssistant:", "Numbers: 0 1 2 3"]
IGNORE_EOS = {"ignore_eos": True}
ALWAYS = {"LADLE_SPEC_COST": "flat"}
LLM_PARAMS = {"dtype": "float32", "num_kv_blocks": 48, "max_model_len": 256, "max_num_seqs": 8, "num_threads": 1}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llama", "llama")


def start_servers(*servers: LadleServer) -> contextlib.ExitStack:
    """Start the servers side by side; the stack stops them (and they stop if any fails to start)."""
    stack = contextlib.ExitStack()
    for server in servers:
        stack.callback(server.__exit__, None, None, None)
    try:
        with ThreadPoolExecutor(len(servers)) as pool:
            for future in [pool.submit(server.__enter__) for server in servers]:
                future.result()
    except BaseException:
        stack.close()
        raise
    return stack


@pytest.fixture(scope="module")
def servers(checkpoint):
    common = ["--model", checkpoint, "--served-model-name", MODEL, *ENGINE]
    # LADLE_SPEC_COST=flat: the policy always bets, so drafts happen whatever this box's timings at start-up
    plain, spec = LadleServer(common), LadleServer([*common, "--speculative-method", "ngram"], env=ALWAYS)
    with start_servers(plain, spec):
        yield plain, spec


@pytest.fixture(scope="module")
def plain(servers) -> LadleServer:
    return servers[0]


@pytest.fixture(scope="module")
def spec(servers) -> LadleServer:
    return servers[1]


def client_of(server: LadleServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return AutoTokenizer.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def clients(servers) -> tuple[openai.OpenAI, openai.OpenAI]:
    return client_of(servers[0]), client_of(servers[1])


def spec_samples(server: LadleServer) -> dict[tuple[str, str], float]:
    """(counter, labels) -> value for every ladle_llm_spec_decode_*_total sample in /metrics."""
    text = httpx.get(server.url + "/metrics").text
    return {(name, labels): float(value) for name, labels, value in
            re.findall(r"^(ladle_llm_spec_decode_\w+_total)\{([^}]*)\} (\S+)$", text, re.M)}


def spec_totals(server: LadleServer, model: str = MODEL) -> tuple[float, float]:
    """(draft tokens, accepted tokens) the server counted for `model` so far."""
    samples = spec_samples(server)
    return tuple(samples.get((f"ladle_llm_spec_decode_{kind}_tokens_total", f'model="{model}",version="1"'), 0.0)
                 for kind in ("draft", "accepted"))


def drafted(server: LadleServer, model: str = MODEL) -> float:
    return spec_totals(server, model)[0]


def policy(server: LadleServer) -> str:
    """The start-up log line with the step costs the speculation policy decides from (for failure messages)."""
    return next((line for line in server.log().splitlines() if "step cost" in line), "no policy line in the log")


def completion(client: openai.OpenAI, prompt, **kw):
    return client.completions.create(model=MODEL, prompt=prompt, **{"temperature": 0, "max_tokens": 40, **kw})


def both(clients, prompt, **kw) -> list:
    return [completion(c, prompt, **kw) for c in clients]


def choices(response) -> list[tuple[str, str]]:
    return [(c.text, c.finish_reason) for c in response.choices]


def test_greedy_completions_are_identical_and_drafts_were_verified(clients, spec) -> None:
    before = drafted(spec)
    for prompt in LOOPING[:2]:
        plain_r, spec_r = both(clients, prompt)
        assert choices(spec_r) == choices(plain_r)
        assert spec_r.usage.model_dump() == plain_r.usage.model_dump()
    plain_r, spec_r = both(clients, LOOPING, extra_body=IGNORE_EOS)  # four sequences decoded together
    assert choices(spec_r) == choices(plain_r) and len(spec_r.choices) == len(LOOPING)
    assert spec_r.usage.model_dump() == plain_r.usage.model_dump()
    assert spec_r.usage.completion_tokens == 40 * len(LOOPING)
    assert drafted(spec) > before, f"no draft token was verified, the comparison proved nothing: {policy(spec)}"


def test_greedy_chat_is_identical(clients) -> None:
    for content in ("print(add(1, 2)) print(add(1, 2))", "the the the the"):
        messages = [{"role": "system", "content": "repeat"}, {"role": "user", "content": content}]
        plain_r, spec_r = (c.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, temperature=0)
                           for c in clients)
        assert spec_r.choices[0].message.content == plain_r.choices[0].message.content
        assert spec_r.choices[0].finish_reason == plain_r.choices[0].finish_reason
        assert spec_r.usage.model_dump() == plain_r.usage.model_dump()


def test_streams_concatenate_to_the_plain_answer(clients) -> None:
    plain_c, spec_c = clients
    stream_kw = {"stream": True, "stream_options": {"include_usage": True}, "extra_body": IGNORE_EOS}
    full = completion(spec_c, LOOPING[0], extra_body=IGNORE_EOS)
    assert full.choices[0].text == completion(plain_c, LOOPING[0], extra_body=IGNORE_EOS).choices[0].text
    chunks = list(completion(spec_c, LOOPING[0], **stream_kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens == 40
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"

    messages = [{"role": "user", "content": LOOPING[1]}]
    chat = {"model": MODEL, "messages": messages, "max_tokens": 40, "temperature": 0}
    expected = plain_c.chat.completions.create(**chat)
    chunks = list(spec_c.chat.completions.create(**chat, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == expected.usage.completion_tokens


def late_stop_string(text: str) -> str:
    """The 3-character substring of `text` (no U+FFFD) whose first occurrence is latest: the stop lands in the
    loop, where drafts run ahead of it."""
    candidates = [text[i : i + 3] for i in range(1, len(text) - 3) if "\ufffd" not in text[i : i + 3]]
    return max(candidates, key=text.index)


@pytest.mark.parametrize("prompt", LOOPING[:3])
def test_stop_strings_cut_both_servers_at_the_same_place(clients, spec, prompt: str) -> None:
    full = completion(clients[0], prompt, extra_body=IGNORE_EOS).choices[0].text
    stop = late_stop_string(full)
    cut = full[: full.index(stop)]
    before = drafted(spec)
    plain_r, spec_r = both(clients, prompt, stop=[stop, "never-appears"], extra_body=IGNORE_EOS)
    for r in (plain_r, spec_r):
        assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    assert spec_r.usage.completion_tokens == plain_r.usage.completion_tokens < 40
    streamed = completion(clients[1], prompt, stop=stop, stream=True, extra_body=IGNORE_EOS)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut
    assert drafted(spec) > before, f"no draft token was verified before the stop: {policy(spec)}"


# A random model's sampled text rarely repeats itself; biased towards " the" it is mostly runs of " the" broken at
# random places, so n-gram drafts are made, and some are accepted and some rejected.
@pytest.mark.parametrize(("n", "sampling", "bias"), [(3, {"temperature": 0.8}, 7),
                                                     (2, {"temperature": 0.8, "top_p": 0.9}, 6)])
def test_seeded_sampling_is_identical(clients, spec, tokenizer, n: int, sampling: dict, bias: int) -> None:
    (the,) = tokenizer(" the", add_special_tokens=False)["input_ids"]
    before = spec_totals(spec)
    plain_r, spec_r = both(clients, LOOPING[:2], seed=7, n=n, logit_bias={str(the): bias}, extra_body=IGNORE_EOS,
                           **sampling)
    assert choices(spec_r) == choices(plain_r)
    # sampled: a prompt's n choices differ (seeds 7, 8, 9, ...). Choices of the two prompts may coincide: choice i of
    # each prompt draws with the same seed, and biased towards " the" both prompts' distributions are nearly the same
    texts = [text for text, _ in choices(spec_r)]
    assert all(len(set(texts[k * n : (k + 1) * n])) == n for k in range(2)), texts
    assert spec_r.usage.model_dump() == plain_r.usage.model_dump()
    drafts, accepted = (after - earlier for after, earlier in zip(spec_totals(spec), before, strict=True))
    assert drafts > accepted > 0, f"{drafts} drafts, {accepted} accepted: {policy(spec)}"


def test_unbiased_seeded_sampling_and_chat_are_identical(clients) -> None:
    plain_r, spec_r = both(clients, LOOPING[1], temperature=0.8, seed=11, n=3, extra_body=IGNORE_EOS)
    assert choices(spec_r) == choices(plain_r)
    messages = [{"role": "user", "content": LOOPING[0]}]
    plain_r, spec_r = (c.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, temperature=0.8,
                                                 top_p=0.95, seed=99, n=2, extra_body={"top_k": 3}) for c in clients)
    assert [c.message.content for c in spec_r.choices] == [c.message.content for c in plain_r.choices]
    assert spec_r.usage.model_dump() == plain_r.usage.model_dump()


def test_logprobs_match(clients) -> None:
    for prompt, kw in ((LOOPING[0], {"temperature": 0}), (LOOPING[3], {"temperature": 0.8, "seed": 5})):
        plain_lp, spec_lp = (r.choices[0].logprobs for r in both(clients, prompt, logprobs=3, **kw))
        assert spec_lp.tokens == plain_lp.tokens and len(spec_lp.tokens) == 40
        assert spec_lp.token_logprobs == pytest.approx(plain_lp.token_logprobs, abs=1e-4)
        assert spec_lp.text_offset == plain_lp.text_offset
        for spec_top, plain_top in zip(spec_lp.top_logprobs, plain_lp.top_logprobs, strict=True):
            assert set(spec_top) == set(plain_top)  # keys are decoded tokens: two may decode alike
            assert spec_top == pytest.approx(plain_top, abs=1e-4)


def test_structured_output_fits_the_schema(clients, spec) -> None:
    schema = {"type": "object", "additionalProperties": False, "required": ["word", "count"],
              "properties": {"word": {"enum": ["the", "print", "add"]},
                             "count": {"type": "integer", "minimum": 1, "maximum": 99}}}
    response_format = {"type": "json_schema", "json_schema": {"name": "tally", "schema": schema}}
    # 200 tokens: room for the bounded whitespace (<= 17 characters) the grammar allows in each of the 8 gaps
    messages = [{"role": "user", "content": "the the the the"}]
    before = drafted(spec)
    plain_r, spec_r = (c.chat.completions.create(model=MODEL, messages=messages, max_tokens=200, temperature=0,
                                                 response_format=response_format) for c in clients)
    answer = json.loads(spec_r.choices[0].message.content)
    assert answer["word"] in {"the", "print", "add"} and 1 <= answer["count"] <= 99
    assert spec_r.choices[0].finish_reason == "stop"
    assert spec_r.choices[0].message.content == plain_r.choices[0].message.content
    assert drafted(spec) > before, f"no draft was verified under the grammar: {policy(spec)}"
    sampled = clients[1].chat.completions.create(model=MODEL, messages=messages, max_tokens=200, temperature=1.0,
                                                 seed=3, n=3, response_format=response_format)
    for choice in sampled.choices:
        assert set(json.loads(choice.message.content)) == {"word", "count"}


def test_metrics_count_drafts_on_the_spec_server_only(clients, plain, spec) -> None:
    both(clients, LOOPING[0], extra_body=IGNORE_EOS)
    samples = spec_samples(spec)
    total = {name: value for (name, labels), value in samples.items() if labels == f'model="{MODEL}",version="1"'}
    drafts = total["ladle_llm_spec_decode_draft_tokens_total"]
    accepted = total.get("ladle_llm_spec_decode_accepted_tokens_total", 0.0)
    assert drafts > 0 and 0 <= accepted <= drafts

    def per_position(kind: str) -> list[float]:
        found = {int(m.group(1)): value for (name, labels), value in samples.items()
                 if name == f"ladle_llm_spec_decode_{kind}_tokens_per_pos_total"
                 and (m := re.fullmatch(rf'model="{MODEL}",position="(\d+)",version="1"', labels))}
        return [found.get(i, 0.0) for i in range(max(found, default=-1) + 1)]

    drafted_pos, accepted_pos = per_position("draft"), per_position("accepted")
    assert sum(drafted_pos) == drafts and sum(accepted_pos) == accepted
    assert drafted_pos == sorted(drafted_pos, reverse=True)  # a draft at position j has drafts before it
    assert accepted_pos == sorted(accepted_pos, reverse=True)  # accepting j means accepting all before it
    assert all(a <= d for a, d in zip(accepted_pos, drafted_pos, strict=False))  # accepted may be shorter
    assert not [key for key, value in spec_samples(plain).items() if value], "plain server counted drafts"


def test_repository_llms_inherit_opt_out_of_or_replace_the_servers_speculation(tmp_path, clients) -> None:
    configs = {
        "inherits": LLM_PARAMS,
        "opts-out": {**LLM_PARAMS, "speculative_method": "none"},
        "drafted": {**LLM_PARAMS, "speculative_method": "draft_model", "speculative_model": "draft"},
    }
    for name, parameters in configs.items():
        write_model(tmp_path, name, {"backend": "llm", "parameters": parameters})
        save_tiny_checkpoint(tmp_path / name / "1", "llama")  # the module's checkpoint, byte for byte
    draft = save_tiny_model(tmp_path / "drafted" / "draft", "llama", seed=1)  # other weights, same tokenizer
    save_tiny_tokenizer(draft)
    expected = [completion(clients[0], prompt, extra_body=IGNORE_EOS).choices[0].text for prompt in LOOPING[:2]]
    with LadleServer([tmp_path, "--speculative-method", "ngram"], env=ALWAYS) as server:
        client = client_of(server)
        for name in configs:
            answers = [client.completions.create(model=name, prompt=prompt, temperature=0, max_tokens=40,
                                                 extra_body=IGNORE_EOS).choices[0].text for prompt in LOOPING[:2]]
            assert answers == expected, name
        assert drafted(server, "inherits") > 0, policy(server)
        assert drafted(server, "opts-out") == 0
        assert drafted(server, "drafted") > 0  # the draft model proposed, and verification kept the plain answers
        assert "draft model draft" in server.log()  # the draft checkpoint was loaded from the model's directory


def serve_until_ready_or_exit(*args) -> LadleServer:
    """Start `ladle serve`; returns the server once it has exited, or fails the test if it comes up serving."""
    server = LadleServer(list(args))
    try:
        with server:
            pass
    except RuntimeError:
        assert server.process.returncode != 0
        return server
    pytest.fail(f"ladle serve {' '.join(map(str, args))} started serving")


def test_a_draft_with_another_tokenizer_is_refused(checkpoint, tmp_path) -> None:
    other = save_tiny_model(tmp_path / "other-draft", "llama", seed=1)
    save_tiny_tokenizer(other, kind="metaspace")
    server = serve_until_ready_or_exit("--model", checkpoint, "--speculative-model", other, *ENGINE)
    assert "--speculative-model" in server.log() and "tokenizer" in server.log()


def test_zero_speculative_tokens_is_refused(checkpoint) -> None:
    server = serve_until_ready_or_exit("--model", checkpoint, "--speculative-method", "ngram",
                                       "--num-speculative-tokens", "0", *ENGINE)
    assert re.search(r"num[-_]speculative[-_]tokens must be in \[1, 16\], got 0", server.log())
