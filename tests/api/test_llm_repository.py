"""Several LLMs in one server next to classic models (`backend: llm` in the repository), each with its
own engine chosen by the request's `model`; and checkpoints that cannot be served are refused clearly."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.fixtures.checkpoints import save_tiny_checkpoint
from tests.repos import write_model, write_probe
from tests.server import LadleServer

LLM_PARAMS = {"dtype": "float32", "num_kv_blocks": 24, "max_model_len": 128, "max_num_seqs": 8}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("llmrepo")
    for name, arch in (("chat-llama", "llama"), ("story-gpt2", "gpt2")):
        write_model(repo, name, {"backend": "llm", "parameters": LLM_PARAMS})
        save_tiny_checkpoint(repo / name / "1", arch)
    write_probe(repo, "probe")
    return repo


@pytest.fixture(scope="module")
def server(repo):
    with LadleServer([repo, "--allow-admin-without-key"]) as s:  # test_unload_and_reload_an_llm uses the API
        yield s


def reference(model_dir, prompt: str, n: int) -> str:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = tok(prompt)["input_ids"]
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True)


def test_each_model_name_reaches_its_own_engine(server, repo) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    assert sorted(m.id for m in client.models.list().data) == ["chat-llama", "story-gpt2"]
    for name in ("chat-llama", "story-gpt2"):
        r = client.completions.create(model=name, prompt="Tell me", max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert r.model == name
        assert r.choices[0].text == reference(repo / name / "1", "Tell me", 8)
    index = {row["name"]: row["state"] for row in httpx.post(server.url + "/v2/repository/index").json()}
    assert index == {"chat-llama": "READY", "story-gpt2": "READY", "probe": "READY"}


def test_traffic_split_between_llm_versions(tmp_path) -> None:
    """An A/B test of two LLM versions under one name: unversioned requests are shared by weight."""
    write_model(tmp_path, "ab", {"backend": "llm", "parameters": LLM_PARAMS, "version_policy": {"all": True},
                                 "traffic_split": {1: 50, 2: 50}})
    save_tiny_checkpoint(tmp_path / "ab" / "1", "llama")
    save_tiny_checkpoint(tmp_path / "ab" / "2", "gpt2")
    expected = {reference(tmp_path / "ab" / str(v), "Tell me", 6): v for v in (1, 2)}
    assert len(expected) == 2, "the two versions must answer differently for the test to tell them apart"
    with LadleServer([tmp_path]) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        texts = [client.completions.create(model="ab", prompt="Tell me", max_tokens=6, temperature=0,
                                           extra_body={"ignore_eos": True}).choices[0].text for _ in range(40)]
    served = [expected[text] for text in texts]  # KeyError: an answer from neither version
    assert served.count(1) >= 5 and served.count(2) >= 5  # 50/50 over 40: each ~20


def test_classic_and_llm_side_by_side(server) -> None:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [2.0]}]}
    assert httpx.post(server.url + "/v2/models/probe/infer", json=body).json()["outputs"][0]["data"] == [4.0]
    r = httpx.post(server.url + "/v2/models/chat-llama/infer", json=body)
    assert r.status_code == 400 and "/v1/completions" in r.json()["error"]


def test_unload_and_reload_an_llm(server) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    assert httpx.post(server.url + "/v2/repository/models/story-gpt2/unload").status_code == 200
    assert [m.id for m in client.models.list().data] == ["chat-llama"]
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(model="story-gpt2", prompt="x", max_tokens=2)
    assert info.value.status_code == 503
    assert httpx.post(server.url + "/v2/repository/models/story-gpt2/load").status_code == 200
    assert client.completions.create(model="story-gpt2", prompt="x", max_tokens=2).choices[0].text is not None


def serve_fails(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "ladle", "serve", *args, "--port", "1"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1
    return result.stderr


def test_corrupt_checkpoint_is_refused(tmp_path) -> None:
    ckpt = save_tiny_checkpoint(tmp_path / "corrupt", "llama")
    (ckpt / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    assert "model.safetensors" in serve_fails("--model", str(ckpt))


def test_unsupported_architecture_is_refused(tmp_path) -> None:
    ckpt = save_tiny_checkpoint(tmp_path / "odd", "llama")
    config = json.loads((ckpt / "config.json").read_text())
    config["architectures"] = ["MambaForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(config))
    err = serve_fails("--model", str(ckpt))
    assert "MambaForCausalLM" in err and "LlamaForCausalLM" in err


def test_missing_model_dir_is_refused(tmp_path) -> None:
    assert "not a checkpoint directory" in serve_fails("--model", str(tmp_path / "nothing" / "."))
