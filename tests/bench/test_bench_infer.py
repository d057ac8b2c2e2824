"""`ladle bench infer` against a real `ladle serve` of a tiny Python-backend repository.

What it prints and saves must agree with the per-request records it saved (recomputed here with
numpy); error responses are counted by status; binary bodies match tritonclient's own encoding.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest
import tritonclient.http as triton

from ladle.bench.infer import binary_body
from ladle.bench.stats import percentile, summarize
from ladle.cli import main
from tests.server import LadleServer

MODEL_PY = '''
import numpy as np


class Echo:
    def load(self) -> None:
        pass

    def predict(self, batch):
        total = batch["x"].sum(axis=1, keepdims=True).astype(np.float32)
        lengths = np.array([[len(t)] for t in batch["text"].reshape(-1)], dtype=np.int32)
        return {"total": total, "length": lengths}
'''
CONFIG_YAML = """backend: python
max_batch_size: 8
inputs:
  - {name: x, datatype: FP32, shape: [4]}
  - {name: text, datatype: BYTES, shape: [1]}
outputs:
  - {name: total, datatype: FP32, shape: [1]}
  - {name: length, datatype: INT32, shape: [1]}
dynamic_batching:
  max_queue_delay_ms: 1
"""
REQUEST = {"inputs": [
    {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1.0, 2.0, 3.5, -4.25]},
    {"name": "text", "datatype": "BYTES", "shape": [1, 1], "data": ["h\u00e9llo"]},
]}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LadleServer]:
    repo = tmp_path_factory.mktemp("bench-repo")
    (repo / "echo" / "1").mkdir(parents=True)
    (repo / "echo" / "config.yaml").write_text(CONFIG_YAML)
    (repo / "echo" / "1" / "model.py").write_text(MODEL_PY)
    with LadleServer([repo]) as running:
        yield running


def bench(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = main(["bench", "infer", "--no-progress", "--warmup", "2", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def printed(out: str, label: str) -> str:
    match = re.search(rf"^{re.escape(label)}\s+(.*)$", out, re.MULTILINE)
    assert match, f"no '{label}' line in:\n{out}"
    return match.group(1)


def check_consistent(document: dict, out: str) -> None:
    """Recompute counts, duration, throughput and latency percentiles from the saved records."""
    records = document["requests"]
    summary = document["summary"]
    ok = np.array([r["latency_s"] for r in records if r["status"] == 200]) * 1e3
    assert summary["requests"] == len(records)
    assert summary["successes"] == len(ok)
    ends = [r["start_s"] + r["latency_s"] for r in records]
    duration = max(ends) - min(r["start_s"] for r in records)
    assert summary["duration_s"] == pytest.approx(duration)
    assert summary["throughput_rps"] == pytest.approx(len(ok) / duration)
    # The printout shows the same figures, rounded.
    errors = len(records) - len(ok)
    assert printed(out, "requests") == f"{len(records)} ({len(ok)} ok, {errors} errors)"
    assert float(printed(out, "throughput").split()[0]) == pytest.approx(summary["throughput_rps"], abs=0.06)
    latency = summary["latency_ms"]
    assert latency["count"] == len(ok)
    if not len(ok):  # latency of successful requests only: undefined, shown as '-'
        assert latency["p50"] is None and "p50 -" in printed(out, "latency (ms)")
        return
    for key, q in (("p50", 50), ("p90", 90), ("p99", 99)):
        assert latency[key] == pytest.approx(np.percentile(ok, q))
    assert latency["mean"] == pytest.approx(ok.mean())
    assert latency["max"] == pytest.approx(ok.max())
    shown = dict(re.findall(r"(\w+) ([\d.]+)", printed(out, "latency (ms)")))
    for key in ("mean", "p50", "p90", "p99", "max"):
        assert float(shown[key]) == pytest.approx(latency[key], abs=0.006)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_generated_inputs_at_concurrency_2(server, capsys, tmp_path: Path, binary: bool) -> None:
    result = tmp_path / "result.json"
    args = ["--url", server.url, "--model", "echo", "--concurrency", "2", "--num-requests", "12",
            "--result-json", str(result), *(["--binary"] if binary else [])]
    code, out, err = bench(capsys, *args)
    assert code == 0, err
    document = orjson.loads(result.read_bytes())
    assert document["config"]["binary"] is binary and document["config"]["concurrency"] == 2
    assert [r["status"] for r in document["requests"]] == [200] * 12
    assert document["summary"]["errors"] == {}
    check_consistent(document, out)


def test_input_file_to_unknown_model_counts_errors(server, capsys, tmp_path: Path) -> None:
    request = tmp_path / "request.json"
    request.write_bytes(orjson.dumps(REQUEST))
    result = tmp_path / "result.json"
    code, out, _ = bench(capsys, "--url", server.url, "--model", "nope", "--input", str(request),
                         "--concurrency", "2", "--num-requests", "6", "--result-json", str(result))
    assert code == 0
    document = orjson.loads(result.read_bytes())
    assert document["summary"]["errors"] == {"404": 6}
    assert "unknown model 'nope'" in document["error_samples"]["404"]
    assert document["summary"]["successes"] == 0
    assert re.search(r"status 404: 6 .*unknown model 'nope'", out)
    check_consistent(document, out)


def test_input_file_binary_and_poisson_arrivals(server, capsys, tmp_path: Path) -> None:
    request = tmp_path / "request.json"
    request.write_bytes(orjson.dumps([REQUEST, REQUEST]))
    result = tmp_path / "result.json"
    code, out, err = bench(capsys, "--url", server.url, "--model", "echo", "--input", str(request), "--binary",
                           "--request-rate", "200", "--num-requests", "10", "--result-json", str(result))
    assert code == 0, err
    document = orjson.loads(result.read_bytes())
    assert document["summary"]["successes"] == 10
    assert "Poisson 200 req/s" in out
    check_consistent(document, out)


def test_ctrl_c_prints_what_was_measured(server, tmp_path: Path) -> None:
    result = tmp_path / "result.json"
    command = [sys.executable, "-m", "ladle", "bench", "infer", "--url", server.url, "--model", "echo",
               "--duration", "60", "--result-json", str(result)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ})
    try:
        # The progress bar appears once the measured phase runs (the SIGINT handler is in place by then);
        # wait until it counts some requests, so there is something to report.
        seen = b""
        while not re.search(rb"bench echo: [1-9]\d*req", seen):
            assert process.poll() is None, "bench exited before its progress bar counted requests"
            seen = seen[-200:] + process.stderr.read1(4096)
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130
    document = orjson.loads(result.read_bytes())
    assert document["summary"]["interrupted"] is True
    assert "(interrupted)" in out.decode()
    check_consistent(document, out.decode())


def test_metadata_of_unknown_model_is_a_clear_failure(server, capsys) -> None:
    code, _, err = bench(capsys, "--url", server.url, "--model", "nope")
    assert code == 1
    assert "404" in err and "unknown model 'nope'" in err


@pytest.mark.parametrize("flags", [["--concurrency", "2", "--request-rate", "5"], ["--num-requests", "3",
                                   "--duration", "1"], ["--concurrency", "0"], []])
def test_bad_flags_exit_2(capsys, flags: list[str]) -> None:
    model = ["--model", "m"] if flags else []
    code, _, err = bench(capsys, *model, *flags)
    assert code == 2 and err.startswith("ladle bench infer:")


def test_binary_body_matches_tritonclient() -> None:
    inputs = []
    for entry in REQUEST["inputs"]:
        array = np.array(entry["data"], dtype=np.float32 if entry["datatype"] == "FP32" else np.object_)
        tensor = triton.InferInput(entry["name"], entry["shape"], entry["datatype"])
        tensor.set_data_from_numpy(array.reshape(entry["shape"]), binary_data=True)
        inputs.append(tensor)
    theirs, their_length = triton.InferenceServerClient.generate_request_body(inputs)
    ours, our_length = binary_body(REQUEST)
    assert ours[our_length:] == theirs[their_length:]
    assert orjson.loads(ours[:our_length]) == orjson.loads(theirs[:their_length])


def test_percentiles_match_numpy() -> None:
    rng = np.random.default_rng(1)
    for size in (1, 2, 7, 100):
        values = rng.exponential(size=size).tolist()
        ordered = sorted(values)
        for q in (0, 25, 50, 90, 99, 99.9, 100):
            assert percentile(ordered, q) == pytest.approx(np.percentile(values, q))
        summary = summarize(values)
        assert summary.median == pytest.approx(np.median(values))
        assert summary.to_dict()["p99"] == pytest.approx(np.percentile(values, 99))
    empty = summarize([])
    assert empty.count == 0 and empty.to_dict()["p50"] is None
