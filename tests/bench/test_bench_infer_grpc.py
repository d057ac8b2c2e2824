"""`ladle bench infer --protocol grpc` against a real `ladle serve --grpc-port`: the same records, summary and report
as over REST, statuses as gRPC code numbers, and the model's answers checked by tritonclient.grpc."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest
import tritonclient.grpc as grpcclient

from ladle.bench import InferBenchConfig
from ladle.bench.infer_grpc import infer_message
from tests.bench.test_bench_infer import CONFIG_YAML, MODEL_PY, REQUEST, bench, check_consistent
from tests.server import LadleServer, free_port


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LadleServer]:
    repo = tmp_path_factory.mktemp("bench-grpc-repo")
    (repo / "echo" / "1").mkdir(parents=True)
    (repo / "echo" / "config.yaml").write_text(CONFIG_YAML)
    (repo / "echo" / "1" / "model.py").write_text(MODEL_PY)
    port = free_port()
    with LadleServer([repo, "--grpc-port", str(port)]) as running:
        running.grpc_address = f"127.0.0.1:{port}"
        yield running


def test_generated_inputs_over_grpc(server, capsys, tmp_path: Path) -> None:
    result = tmp_path / "result.json"
    code, out, err = bench(capsys, "--protocol", "grpc", "--grpc-address", server.grpc_address, "--model", "echo",
                           "--concurrency", "4", "--num-requests", "20", "--result-json", str(result))
    assert code == 0, err
    document = orjson.loads(result.read_bytes())
    assert document["config"]["protocol"] == "grpc"
    assert [r["status"] for r in document["requests"]] == [200] * 20
    assert f"at grpc {server.grpc_address}" in out and "raw tensors" in out
    check_consistent(document, out)


def test_unknown_model_over_grpc_counts_status_codes(server, capsys, tmp_path: Path) -> None:
    request = tmp_path / "request.json"
    request.write_bytes(orjson.dumps(REQUEST))
    result = tmp_path / "result.json"
    code, out, _ = bench(capsys, "--protocol", "grpc", "--grpc-address", server.grpc_address, "--model", "nope",
                         "--input", str(request), "--num-requests", "5", "--result-json", str(result))
    assert code == 0
    document = orjson.loads(result.read_bytes())
    assert document["summary"]["errors"] == {"5": 5}  # NOT_FOUND
    assert document["error_samples"]["5"].startswith("NOT_FOUND: unknown model 'nope'")
    check_consistent(document, out)


def test_metadata_failure_and_bad_protocol(server, capsys) -> None:
    code, _, err = bench(capsys, "--protocol", "grpc", "--grpc-address", server.grpc_address, "--model", "nope")
    assert code == 1 and "NOT_FOUND" in err
    code, _, err = bench(capsys, "--protocol", "smoke-signals", "--model", "echo")
    assert code == 2 and "--protocol must be http or grpc" in err


def test_request_message_is_what_the_server_answers(server) -> None:
    """The bench's message, sent by tritonclient's own stub, gets the model's answer (sum and length)."""
    message = infer_message(InferBenchConfig(model="echo"), REQUEST)
    client = grpcclient.InferenceServerClient(server.grpc_address)
    response = client._client_stub.ModelInfer(message)
    outputs = {o.name: i for i, o in enumerate(response.outputs)}
    total = np.frombuffer(response.raw_output_contents[outputs["total"]], np.float32)
    length = np.frombuffer(response.raw_output_contents[outputs["length"]], np.int32)
    assert total.tolist() == [2.25] and length.tolist() == [6]  # 1 + 2 + 3.5 - 4.25; len("héllo".encode())
