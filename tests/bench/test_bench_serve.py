"""`ladle bench serve` against a real `ladle serve --model` of a tiny checkpoint, every dataset and both endpoints.

What it prints and saves must agree with the per-request records it saved (recomputed here with numpy, vLLM's
definitions); --ignore-eos gives exactly the requested output lengths; failures are counted, not fatal.
"""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from ladle.bench.datasets import BenchTokenizer, sample_custom, sample_prefix, sample_random, sample_sharegpt
from ladle.bench.serve import ServeBenchConfig, main, run
from ladle.bench.serve_client import SSEDecoder, StreamFold
from ladle.bench.serve_metrics import RequestRecord, parse_slo
from ladle.bench.serve_runner import arrival_offsets, load_samples
from tests.fixtures.checkpoints import save_tiny_checkpoint
from tests.fixtures.tiny_tokenizer import save_tiny_tokenizer
from tests.server import ROOT, LadleServer

MODEL = "tiny"
SHAREGPT = [
    {"id": "a", "conversations": [{"from": "human", "value": "What is the capital of France? Tell me more."},
                                  {"from": "gpt", "value": "The capital of France is Paris, a large city."}]},
    {"id": "b", "conversations": [{"from": "human", "value": "Write a short poem about a quick brown fox."},
                                  {"from": "gpt", "value": "The quick brown fox jumps over the lazy dog."}]},
    {"id": "c", "conversations": [{"from": "human", "value": "only one turn"}]},
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llama", "llama")


@pytest.fixture(scope="module")
def server(checkpoint: Path) -> Iterator[LadleServer]:
    args = ["--model", checkpoint, "--served-model-name", MODEL, "--dtype", "float32", "--num-kv-blocks", "64",
            "--max-model-len", "512"]
    with LadleServer(args) as running:
        yield running


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("datasets")
    (root / "sharegpt.json").write_text(json.dumps(SHAREGPT))
    lines = ["The quick brown fox", "Hello, world! How are you today?", "def add(a, b):"]
    (root / "custom.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in lines) + "\n")
    return {"sharegpt": root / "sharegpt.json", "custom": root / "custom.jsonl"}


def bench(server: LadleServer, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
          *args: str) -> tuple[int, str, dict]:
    out_file = tmp_path / "result.json"
    code = main(["--base-url", server.url, "--tokenizer", str(checkpoint), "--disable-tqdm", "--result-json",
                 str(out_file), *args])
    printed = capsys.readouterr().out
    return code, printed, orjson.loads(out_file.read_bytes())


def printed_value(out: str, label: str) -> float | None:
    match = re.search(rf"^{re.escape(label)}\s+(\S+)", out, re.MULTILINE)
    assert match, f"no '{label}' line in:\n{out}"
    return None if match.group(1) == "-" else float(match.group(1))


def check_consistent(document: dict, out: str) -> None:
    """Recompute every summary figure from the saved records (numpy, vLLM's definitions) and the printed report."""
    records, summary = document["requests"], document["summary"]
    ok = [r for r in records if r["success"]]
    duration = summary["duration"]
    assert summary["completed"] == len(ok) == printed_value(out, "Successful requests:")
    assert summary["failed"] == len(records) - len(ok) == printed_value(out, "Failed requests:")
    total_in, total_out = sum(r["prompt_len"] for r in ok), sum(r["output_len"] for r in ok)
    assert (summary["total_input_tokens"], summary["total_output_tokens"]) == (total_in, total_out)
    assert summary["request_throughput"] == pytest.approx(len(ok) / duration)
    assert summary["output_throughput"] == pytest.approx(total_out / duration)
    assert summary["total_token_throughput"] == pytest.approx((total_in + total_out) / duration)
    assert duration >= max(r["start_s"] + r["latency_s"] for r in ok) - 1e-9
    for r in ok:  # token events are timed once: E2EL = TTFT + sum(ITL); TPOT excludes the first token
        assert r["latency_s"] == pytest.approx(r["ttft_s"] + sum(r["itl_s"]), abs=1e-9)
        if r["output_len"] > 1:
            assert r["tpot_s"] == pytest.approx((r["latency_s"] - r["ttft_s"]) / (r["output_len"] - 1))
    series = {
        "ttft": [r["ttft_s"] for r in ok], "e2el": [r["latency_s"] for r in ok],
        "tpot": [r["tpot_s"] for r in ok if r["output_len"] > 1], "itl": [g for r in ok for g in r["itl_s"]],
    }
    names = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2EL"}
    for metric, values in series.items():
        ms = np.array(values) * 1e3
        expected = {"mean": ms.mean(), "median": np.median(ms), "std": ms.std(), "p90": np.percentile(ms, 90),
                    "p99": np.percentile(ms, 99)}
        for stat, value in expected.items():
            assert summary[f"{stat}_{metric}_ms"] == pytest.approx(value, rel=1e-9, abs=1e-9), (metric, stat)
        label = {"mean": "Mean", "median": "Median", "p90": "P90", "p99": "P99"}
        for stat, word in label.items():
            assert printed_value(out, f"{word} {names[metric]} (ms):") == pytest.approx(expected[stat], abs=0.006)
    assert printed_value(out, "Total generated tokens:") == total_out


LOADS = {"capped": ["--max-concurrency", "3"], "poisson": ["--request-rate", "40"],
         "both": ["--request-rate", "100", "--max-concurrency", "2"], "burst": []}
CASES = [  # (dataset flags, endpoint, load)
    (["--dataset-name", "random", "--random-input-len", "24", "--random-output-len", "6"], "completions", "capped"),
    (["--dataset-name", "random", "--random-input-len", "40", "--random-output-len", "5", "--random-range-ratio",
      "0.5"], "chat/completions", "poisson"),
    (["--dataset-name", "prefix", "--prefix-repetition-prefix-len", "48", "--prefix-repetition-suffix-len", "8",
      "--prefix-repetition-num-prefixes", "2", "--prefix-repetition-output-len", "4"], "chat/completions", "both"),
    (["--dataset-name", "prefix", "--prefix-repetition-prefix-len", "32", "--prefix-repetition-suffix-len", "8",
      "--prefix-repetition-num-prefixes", "3", "--prefix-repetition-output-len", "5"], "completions", "burst"),
    (["--dataset-name", "custom", "--custom-output-len", "7"], "completions", "poisson"),
    (["--dataset-name", "sharegpt", "--sharegpt-output-len", "6"], "chat/completions", "capped"),
    (["--dataset-name", "sharegpt"], "completions", "both"),
]


@pytest.mark.parametrize(("dataset", "endpoint", "load"), CASES,
                         ids=[f"{c[0][1]}-{c[1].split('/')[0]}-{c[2]}" for c in CASES])
def test_runs_are_consistent_with_their_records(server, checkpoint, files, tmp_path, capsys, dataset, endpoint,
                                                load) -> None:
    name = dataset[1]
    path = ["--dataset-path", str(files[name])] if name in files else []
    code, out, doc = bench(server, checkpoint, tmp_path, capsys, *dataset, *path, "--endpoint", f"/v1/{endpoint}",
                           "--num-prompts", "8", "--num-warmups", "2", "--ignore-eos", *LOADS[load])
    assert code == 0, out
    records = doc["requests"]
    assert [r["index"] for r in records] == list(range(8)) and all(r["success"] for r in records), records
    assert all(r["output_len"] == r["expected_output_len"] and r["output_len_source"] == "usage" for r in records)
    check_consistent(doc, out)
    if name == "random" and endpoint == "completions":  # prompts round-trip: the server counts what was asked
        assert {r["prompt_len"] for r in records} == {24}
    if load == "poisson":
        assert printed_value(out, "Request rate configured (RPS):") == 40.0
    if "--max-concurrency" in LOADS[load]:
        assert printed_value(out, "Maximum request concurrency:") == int(LOADS[load][-1])


def test_max_concurrency_caps_requests_in_flight(server, checkpoint, tmp_path, capsys) -> None:
    code, _, doc = bench(server, checkpoint, tmp_path, capsys, "--random-input-len", "16", "--random-output-len",
                         "12", "--num-prompts", "12", "--max-concurrency", "2", "--ignore-eos")
    assert code == 0
    spans = [(r["start_s"], r["start_s"] + r["latency_s"]) for r in doc["requests"]]
    most = max(sum(s <= t < e for s, e in spans) for t, _ in spans)
    assert most <= 2


def test_goodput_counts_requests_within_every_slo(server, checkpoint, tmp_path, capsys) -> None:
    args = ("--random-input-len", "16", "--random-output-len", "4", "--num-prompts", "6", "--ignore-eos")
    code, out, doc = bench(server, checkpoint, tmp_path, capsys, *args, "--slo", "ttft=60000,tpot=60000")
    assert code == 0
    assert doc["summary"]["request_goodput"] == pytest.approx(doc["summary"]["request_throughput"])
    assert printed_value(out, "Request goodput (req/s):") == pytest.approx(doc["summary"]["request_goodput"], abs=0.01)
    median_ttft = doc["summary"]["median_ttft_ms"]
    _, _, doc = bench(server, checkpoint, tmp_path, capsys, *args, "--slo", f"ttft={median_ttft}")
    good = sum(r["ttft_s"] * 1e3 <= median_ttft for r in doc["requests"])
    assert doc["summary"]["request_goodput"] == pytest.approx(good / doc["summary"]["duration"])
    _, _, doc = bench(server, checkpoint, tmp_path, capsys, *args, "--slo", "e2el:0")
    assert doc["summary"]["request_goodput"] == 0.0


def test_unknown_model_counts_every_request_as_failed(server, checkpoint, tmp_path, capsys) -> None:
    code, out, doc = bench(server, checkpoint, tmp_path, capsys, "--model", "no-such-model", "--num-prompts", "4",
                           "--random-input-len", "8", "--random-output-len", "2")
    assert code == 0
    assert (doc["summary"]["completed"], doc["summary"]["failed"]) == (0, 4)
    assert all(r["status"] == 404 and "no-such-model" in r["error"] for r in doc["requests"])
    assert printed_value(out, "Failed requests:") == 4 and printed_value(out, "Mean TTFT (ms):") is None
    assert "HTTP 404" in out


def test_python_api_resolves_the_model_from_the_server(server, checkpoint) -> None:
    config = ServeBenchConfig(base_url=server.url, tokenizer=checkpoint, random_input_len=12, random_output_len=3,
                              num_prompts=3, ignore_eos=True, disable_tqdm=True)
    result = run(config)
    assert result.model == MODEL and result.summary["completed"] == 3
    assert result.summary["total_output_tokens"] == 9


def generated_tokens(server: LadleServer) -> float:
    """The server's own count of generated tokens (Prometheus), to see when the load has started."""
    text = httpx.get(server.url + "/metrics", timeout=5.0).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("ladle_llm_generation_tokens_total"))


def test_ctrl_c_reports_what_was_measured(server, checkpoint, tmp_path) -> None:
    out_file = tmp_path / "partial.json"
    cmd = [sys.executable, "-m", "ladle.bench.serve", "--base-url", server.url, "--tokenizer", str(checkpoint),
           "--random-input-len", "8", "--random-output-len", "2", "--num-prompts", "2000", "--request-rate", "20",
           "--disable-tqdm", "--result-json", str(out_file)]
    before = generated_tokens(server)
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while generated_tokens(server) < before + 20 and time.monotonic() < deadline:  # a few requests in
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "Serving Benchmark Result (interrupted)" in out
    doc = orjson.loads(out_file.read_bytes())
    assert doc["interrupted"] and 0 < doc["summary"]["completed"] < 2000
    assert doc["summary"]["completed"] == printed_value(out, "Successful requests:")


def test_bad_arguments_exit_2(capsys) -> None:
    assert main(["--dataset-name", "sharegpt"]) == 2
    assert "needs --dataset-path" in capsys.readouterr().err
    assert main(["--slo", "ttft=fast"]) == 2
    assert main(["--percentile-metrics", "ttft,latency"]) == 2
    assert main(["--extra-body", "{not json"]) == 2 and "--extra-body" in capsys.readouterr().err


# -- units -------------------------------------------------------------------------------------------
def test_sse_decoder_handles_split_events_crlf_comments_and_multiline_data() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b'data: {"a"') == []
    assert decoder.feed(b': 1}\n\n: ping\n\ndata: x\r') == [b'{"a": 1}']
    assert decoder.feed(b"\n\r\ndata: [DONE]\n\n") == [b"x", b"[DONE]"]
    assert decoder.feed(b"data: one\ndata:two\n\ndata: tail") == [b"one\ntwo"]
    assert decoder.close() == [b"tail"]


def test_stream_fold_times_tokens_and_skips_the_chat_role_chunk() -> None:
    fold = StreamFold(chat=True, start=10.0)
    role = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
    assert not fold.on_event(orjson.dumps(role), 10.001)
    for now, text in ((10.5, "Hel"), (10.7, "lo")):
        fold.on_event(orjson.dumps({"choices": [{"delta": {"content": text}, "finish_reason": None}]}), now)
    fold.on_event(orjson.dumps({"choices": [{"delta": {}, "finish_reason": "length"}]}), 10.75)
    assert fold.on_event(b"[DONE]", 10.8)
    record = RequestRecord(0, 3)
    fold.into(record, tok=None)  # no usage, no tokenizer: one token per token event
    assert record.success and record.generated_text == "Hello"
    assert record.ttft_s == pytest.approx(0.5) and record.itl_s == pytest.approx([0.2, 0.05])
    assert record.latency_s == pytest.approx(0.75) and (record.output_len, record.output_len_source) == (3, "chunks")
    assert record.tpot_s == pytest.approx(0.125)


def test_stream_fold_reports_error_events_and_empty_streams(checkpoint) -> None:
    fold = StreamFold(chat=False, start=0.0)
    fold.on_event(b'{"choices": [{"text": "The quick"}]}', 0.1)
    assert fold.on_event(b'{"error": {"message": "engine died"}}', 0.2)
    record = RequestRecord(0, 4)
    fold.into(record, BenchTokenizer(checkpoint))
    assert not record.success and "engine died" in record.error
    empty = RequestRecord(1, 4)
    StreamFold(chat=False, start=0.0).into(empty, None)
    assert not empty.success and "before any token" in empty.error
    counted = StreamFold(chat=False, start=0.0)
    counted.on_event(b'{"choices": [{"text": "The quick brown fox"}]}', 0.1)
    record = RequestRecord(2, 4)
    counted.into(record, BenchTokenizer(checkpoint))
    assert record.output_len_source == "tokenizer"
    assert record.output_len == len(BenchTokenizer(checkpoint).encode("The quick brown fox"))


def test_parse_slo() -> None:
    assert parse_slo("ttft=200,tpot=50") == {"ttft": 200.0, "tpot": 50.0}
    assert parse_slo("ttft:200 e2el:1000") == {"ttft": 200.0, "e2el": 1000.0}
    assert parse_slo(None) == {}
    for bad in ("itl=3", "ttft", "ttft=-1", "ttft=soon"):
        with pytest.raises(ValueError, match="--slo"):
            parse_slo(bad)


def test_arrivals_are_poisson_with_the_configured_mean_rate() -> None:
    assert arrival_offsets(5, math.inf, 1.0, 0) == [0.0] * 5
    times = arrival_offsets(2000, 50.0, 1.0, 0)
    assert times[-1] == pytest.approx(2000 / 50.0) and bool(np.all(np.diff(times) >= 0))
    gaps = np.diff(times)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.1)  # exponential: coefficient of variation 1
    steady = np.diff(arrival_offsets(2000, 50.0, 100.0, 0))
    assert steady.std() / steady.mean() < 0.2
    assert arrival_offsets(10, 5.0, 1.0, 3) == arrival_offsets(10, 5.0, 1.0, 3)


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
def test_synthetic_prompts_round_trip_to_the_requested_length(tmp_path, kind) -> None:
    tok = BenchTokenizer(save_tiny_tokenizer(tmp_path / kind, 512, kind))
    for length in (16, 100, 400):
        for sample in sample_random(tok, 20, length, 8, 0.0, 0, seed=1):
            assert sample.prompt_len == tok.count(sample.prompt, add_special_tokens=True) == length
            ids = tok.encode(sample.prompt)
            assert tok.encode(tok.decode(ids)) == ids
    spread = sample_random(tok, 50, 100, 20, 0.5, 10, seed=2)
    assert {s.prompt_len for s in spread} <= set(range(10 + 50 + tok.num_special, 10 + 151 + tok.num_special))
    assert min(s.expected_output_len for s in spread) >= 10 and max(s.expected_output_len for s in spread) <= 30
    assert sample_random(tok, 5, 64, 8, 0.0, 0, seed=3) == sample_random(tok, 5, 64, 8, 0.0, 0, seed=3)
    groups = sample_prefix(tok, 9, 40, 6, 3, 4, seed=0)
    assert {s.messages[0][1] for s in groups[0::3]} == {groups[0].messages[0][1]}
    assert len({s.messages[0][1] for s in groups}) == 3
    assert all(tok.count(s.messages[0][1]) == 40 and tok.count(s.messages[1][1]) == 6 for s in groups)


def test_warm_ups_get_prompts_of_their_own(tmp_path) -> None:
    """A warm-up that replayed a measured prompt would leave its prefix cached on the server: the measured request
    would then skip its prefill. The measured prompts come first, the warm-ups' own after them."""
    tokenizer = save_tiny_tokenizer(tmp_path / "tok", 512, "bytelevel")
    config = ServeBenchConfig(base_url="http://127.0.0.1:1", tokenizer=tokenizer, random_input_len=32,
                              random_output_len=4, num_prompts=5, num_warmups=3)
    samples = load_samples(config, BenchTokenizer(tokenizer))
    assert len(samples) == 8 and len({s.prompt for s in samples}) == 8
    assert load_samples(config, BenchTokenizer(tokenizer)) == samples  # the same seed, the same workload


def test_file_datasets_shuffle_filter_and_oversample(tmp_path, checkpoint, files) -> None:
    tok = BenchTokenizer(checkpoint)
    shared = sample_sharegpt(tok, files["sharegpt"], 5, None, seed=0)
    assert len(shared) == 5 and {s.prompt for s in shared} <= {c["conversations"][0]["value"] for c in SHAREGPT[:2]}
    assert all(s.expected_output_len == tok.count(
        next(c["conversations"][1]["value"] for c in SHAREGPT if c["conversations"][0]["value"] == s.prompt), True)
        for s in shared)
    custom = sample_custom(None, files["custom"], 2, 9, seed=0)
    assert len(custom) == 2 and all(s.prompt_len is None and s.expected_output_len == 9 for s in custom)
    (tmp_path / "bad.jsonl").write_text('{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match="line 1"):
        sample_custom(None, tmp_path / "bad.jsonl", 2, 9, seed=0)
