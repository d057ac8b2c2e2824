"""--kv-cache-dtype (and `kv_cache_dtype` in a repository LLM's parameters): a float32 model over a 16-bit KV cache
serves the same greedy text as transformers, with twice the blocks in the same memory (an 8-bit one serves, with four
times the blocks); auto is float16 under int8
weights computing in float32; a value outside the choices is refused, on the command line and in a config file,
naming the field."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import httpx
import openai
import pytest

from ladle.repository.config_errors import ConfigError
from ladle.serving.builders import llm_config_from_parameters
from tests.api.test_llm_repository import reference
from tests.fixtures.checkpoints import save_tiny_checkpoint
from tests.repos import write_model
from tests.server import LadleServer

ENGINE = ["--dtype", "float32", "--max-model-len", "128", "--kv-cache-memory", "256KiB"]


def blocks_in_log(log: str, name: str) -> tuple[int, str]:
    """(KV blocks, cache dtype) from the engine's ready line."""
    match = re.search(rf"LLM {name} \(.*?\) ready in .*?(\d+) KV blocks of 16 tokens \((\w+)\)", log)
    assert match, log
    return int(match.group(1)), match.group(2)


def bytes_per_token(model_dir, element_bytes: int) -> int:
    config = json.loads((model_dir / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * element_bytes


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("kvrepo")
    write_model(repo, "bf16-cache", {"backend": "llm", "parameters": {
        "dtype": "float32", "kv_cache_dtype": "bfloat16", "num_kv_blocks": 24, "max_model_len": 128}})
    save_tiny_checkpoint(repo / "bf16-cache" / "1", "qwen2")
    for name, kv in (("int8-auto", {}), ("int8-exact", {"kv_cache_dtype": "float32"})):
        write_model(repo, name, {"backend": "llm", "parameters": {
            "dtype": "float32", "quantization": "int8", "num_kv_blocks": 24, "max_model_len": 128, **kv}})
        save_tiny_checkpoint(repo / name / "1", "llama")
    return repo


def test_16_bit_caches_serve_what_transformers_generates(repo, tmp_path) -> None:
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny", "llama")
    args = [repo, "--model", checkpoint, "--served-model-name", "tiny", *ENGINE, "--kv-cache-dtype", "float16",
            "--allow-admin-without-key"]
    with LadleServer(args) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        for name, model_dir in (("tiny", checkpoint), ("bf16-cache", repo / "bf16-cache" / "1")):
            r = client.completions.create(model=name, prompt="Tell me a story", max_tokens=10, temperature=0,
                                          extra_body={"ignore_eos": True})
            assert r.choices[0].text == reference(model_dir, "Tell me a story", 10)
        stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=6, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        blocks, dtype = blocks_in_log(server.log(), "tiny")
        # float16: 2 bytes an element, so 256 KiB holds twice the blocks a float32 cache would
        assert dtype == "float16" and blocks == 256 * 1024 // (16 * bytes_per_token(checkpoint, 2))
        assert blocks_in_log(server.log(), "bf16-cache") == (24, "bfloat16")
        # auto under int8 weights computing in float32: a float16 cache (llama.cpp's default), unless asked otherwise
        assert blocks_in_log(server.log(), "int8-auto") == (24, "float16")
        assert blocks_in_log(server.log(), "int8-exact") == (24, "float32")
        for name in ("int8-auto", "int8-exact"):
            assert client.completions.create(model=name, prompt="hi", max_tokens=4, temperature=0,
                                             extra_body={"ignore_eos": True}).usage.completion_tokens == 4
        # a repository LLM whose config names a dtype the cache cannot take is refused, naming the field
        write_model(repo, "bad-cache", {"backend": "llm", "parameters": {"kv_cache_dtype": "int3"}})
        save_tiny_checkpoint(repo / "bad-cache" / "1", "llama")
        refused = httpx.post(server.url + "/v2/repository/models/bad-cache/load", timeout=60)
        assert refused.status_code == 400 and "kv_cache_dtype" in refused.json()["error"], refused.text
        assert client.completions.create(model="tiny", prompt="x", max_tokens=2).choices[0].text is not None


@pytest.mark.parametrize(("flag", "dtype"), [("fp8", "float8_e4m3fn"), ("fp8_e5m2", "float8_e5m2")])
def test_an_8_bit_cache_holds_four_times_the_tokens_and_serves(tmp_path, flag, dtype) -> None:
    """vLLM's names: fp8 is e4m3. A quarter of float32's bytes per token; greedy text is not transformers' exactly
    (keys and values keep 3 or 2 mantissa bits), but every token and logprob comes back, streamed or not."""
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny", "llama")
    args = ["--model", checkpoint, "--served-model-name", "tiny", *ENGINE, "--kv-cache-dtype", flag]
    with LadleServer(args) as server:
        blocks, cache = blocks_in_log(server.log(), "tiny")
        assert cache == dtype and blocks == 256 * 1024 // (16 * bytes_per_token(checkpoint, 1))
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        r = client.completions.create(model="tiny", prompt="Tell me a story", max_tokens=40, temperature=0, logprobs=1,
                                      extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 40
        assert all(lp is not None and lp <= 0.0 and lp > -1e4 for lp in r.choices[0].logprobs.token_logprobs)
        stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=6, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def test_a_value_outside_the_choices_is_refused(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"parameters\.kv_cache_dtype.*'int3'"):
        llm_config_from_parameters({"kv_cache_dtype": "int3"}, tmp_path, str(tmp_path))
    with pytest.raises(ConfigError, match=r"parameters\.quantization_group_size"):
        llm_config_from_parameters({"quantization_group_size": 48}, tmp_path, str(tmp_path))
    result = subprocess.run([sys.executable, "-m", "ladle", "serve", "--model", str(tmp_path), "--kv-cache-dtype",
                             "int3"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--kv-cache-dtype" in result.stderr and "float16" in result.stderr
