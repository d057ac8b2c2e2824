"""ONNX backend: skl2onnx and torch.onnx exports, metadata inference, config checks, BYTES tensors."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from skl2onnx import to_onnx

from ladle.errors import InvalidInput
from ladle.repository.model_config import ModelConfig
from ladle.runtimes import RuntimeLoadError, load_runtime
from ladle.tensors import TensorSpec

IRIS_OUTPUTS = (TensorSpec("label", "INT64", ()), TensorSpec("probabilities", "FP32", (3,)))


def _config(**kwargs: Any) -> ModelConfig:
    return ModelConfig(name="m", backend="onnx", **kwargs)


@pytest.fixture(scope="module")
def iris_onnx(tmp_path_factory: pytest.TempPathFactory, build_demo, iris_model) -> Path:
    version_dir = tmp_path_factory.mktemp("iris_onnx")
    build_demo.export_onnx(iris_model, version_dir / "model.onnx")
    return version_dir


@pytest.fixture(scope="module")
def torch_mlp(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    version_dir = tmp_path_factory.mktemp("torch_onnx")
    with warnings.catch_warnings():
        # The dynamo exporter needs onnxscript, which is not installed; the TorchScript one is deprecated.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            mlp, (torch.zeros(2, 4),), str(version_dir / "model.onnx"), dynamo=False,
            input_names=["x"], output_names=["scores"], dynamic_axes={"x": {0: "batch"}, "scores": {0: "batch"}},
        )
    return version_dir, mlp


def test_skl2onnx_iris_inferred_and_bit_exact_with_onnxruntime(iris_onnx: Path, iris, iris_model) -> None:
    features, _ = iris
    runtime = load_runtime(iris_onnx, _config(max_batch_size=64))
    assert runtime.inputs == (TensorSpec("input", "FP32", (4,)),)
    assert runtime.outputs == IRIS_OUTPUTS
    out = runtime.predict({"input": features})
    session = ort.InferenceSession(str(iris_onnx / "model.onnx"), providers=["CPUExecutionProvider"])
    label, probabilities = session.run(["label", "probabilities"], {"input": features})
    np.testing.assert_array_equal(out["label"], label)
    np.testing.assert_array_equal(out["probabilities"], probabilities)
    # And it still agrees with scikit-learn itself, to float32 precision.
    np.testing.assert_array_equal(out["label"], iris_model.predict(features))
    np.testing.assert_allclose(out["probabilities"], iris_model.predict_proba(features), atol=1e-5)


def test_torch_onnx_export_parity(torch_mlp: tuple[Path, torch.nn.Module]) -> None:
    version_dir, mlp = torch_mlp
    runtime = load_runtime(version_dir, _config(max_batch_size=8))
    assert runtime.inputs == (TensorSpec("x", "FP32", (4,)),)
    assert runtime.outputs == (TensorSpec("scores", "FP32", (3,)),)
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    with torch.inference_mode():
        expected = mlp(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(runtime.predict({"x": x})["scores"], expected, rtol=1e-5, atol=1e-6)


def test_unbatched_inference_keeps_the_leading_dim(torch_mlp: tuple[Path, torch.nn.Module]) -> None:
    runtime = load_runtime(torch_mlp[0], _config())
    assert runtime.inputs == (TensorSpec("x", "FP32", (-1, 4)),)
    assert runtime.outputs == (TensorSpec("scores", "FP32", (-1, 3)),)


def test_configured_output_not_in_model_names_the_real_ones(iris_onnx: Path) -> None:
    config = _config(max_batch_size=4, inputs=(TensorSpec("input", "FP32", (4,)),),
                     outputs=(TensorSpec("label", "INT64", ()), TensorSpec("probs", "FP32", (3,))))
    match = r"config output 'probs' is not in the model.*\['label', 'probabilities'\]"
    with pytest.raises(RuntimeLoadError, match=match):
        load_runtime(iris_onnx, config)


def test_configured_input_with_wrong_datatype_or_rank(iris_onnx: Path) -> None:
    wrong_type = _config(max_batch_size=4, inputs=(TensorSpec("input", "FP64", (4,)),), outputs=IRIS_OUTPUTS)
    with pytest.raises(RuntimeLoadError, match=r"'input' is FP64, but the model's is tensor\(float\)"):
        load_runtime(iris_onnx, wrong_type)
    wrong_rank = _config(inputs=(TensorSpec("input", "FP32", (4,)),), outputs=IRIS_OUTPUTS)  # unbatched: [-1, 4]
    with pytest.raises(RuntimeLoadError, match=r"has shape \[4\], but the model's is \[-1, 4\]"):
        load_runtime(iris_onnx, wrong_rank)


def test_configured_subset_of_outputs(iris_onnx: Path, iris) -> None:
    config = _config(max_batch_size=4, inputs=(TensorSpec("input", "FP32", (4,)),), outputs=IRIS_OUTPUTS[:1])
    out = load_runtime(iris_onnx, config).predict({"input": iris[0][:3]})
    assert list(out) == ["label"] and out["label"].shape == (3,)


def test_zipmap_output_is_explained(tmp_path: Path, iris, iris_model) -> None:
    onnx_model = to_onnx(iris_model, iris[0][:1])  # zipmap on: probabilities is a seq(map)
    (tmp_path / "model.onnx").write_bytes(onnx_model.SerializeToString())
    with pytest.raises(RuntimeLoadError, match="zipmap"):
        load_runtime(tmp_path, _config(max_batch_size=4))


def test_string_tensors_round_trip_as_bytes(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["same"])], "echo",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["batch", 1])],
        [helper.make_tensor_value_info("same", TensorProto.STRING, ["batch", 1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "echo.onnx")
    runtime = load_runtime(tmp_path, _config(max_batch_size=4, parameters={"model_filename": "echo.onnx"}))
    assert runtime.inputs == (TensorSpec("text", "BYTES", (1,)),)
    text = np.array([["héllo".encode()], [b"x"]], dtype=np.object_)
    out = runtime.predict({"text": text})["same"]
    assert out.dtype == np.object_ and out.tolist() == text.tolist()
    with pytest.raises(InvalidInput, match=r"item \[1, 0\] is not valid UTF-8"):
        runtime.predict({"text": np.array([[b"ok"], [b"\xff"]], dtype=np.object_)})


def test_missing_and_corrupt_artifacts(tmp_path: Path) -> None:
    with pytest.raises(RuntimeLoadError, match=r"looked for 'model\.onnx'"):
        load_runtime(tmp_path, _config())
    (tmp_path / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(RuntimeLoadError, match=r"model\.onnx: not a loadable ONNX model"):
        load_runtime(tmp_path, _config())
