"""scikit-learn backend: parity with the estimator's own methods, inference, trust rules, errors."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import skops.io as sio
from sklearn.ensemble import RandomForestClassifier
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import make_pipeline
from sklearn.svm import SVC

from ladle.errors import InvalidInput, Unprocessable
from ladle.repository.model_config import ModelConfig
from ladle.runtimes import RuntimeLoadError, load_runtime
from ladle.tensors import TensorSpec


def _config(**kwargs: Any) -> ModelConfig:
    return ModelConfig(name=kwargs.pop("name", "m"), backend="sklearn", **kwargs)


def _skops(tmp_path: Path, estimator: Any, name: str = "model.skops") -> Path:
    sio.dump(estimator, tmp_path / name)
    return tmp_path


def test_iris_inferred_specs_and_bit_exact_parity(tmp_path: Path, iris, iris_model) -> None:
    features, _ = iris
    runtime = load_runtime(_skops(tmp_path, iris_model), _config(max_batch_size=16))
    assert runtime.inputs == (TensorSpec("input", "FP32", (4,)),)
    assert runtime.outputs == (TensorSpec("label", "INT64", ()), TensorSpec("probabilities", "FP32", (3,)))
    out = runtime.predict({"input": features})
    np.testing.assert_array_equal(out["label"], iris_model.predict(features))
    np.testing.assert_array_equal(out["probabilities"], iris_model.predict_proba(features).astype(np.float32))
    assert out["label"].dtype == np.int64 and out["probabilities"].dtype == np.float32


def test_regressor_unbatched_inference_keeps_float64(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3))
    model = Ridge().fit(x, x @ [1.0, -2.0, 0.5])
    runtime = load_runtime(_skops(tmp_path, model), _config())
    assert runtime.inputs == (TensorSpec("input", "FP32", (-1, 3)),)
    assert runtime.outputs == (TensorSpec("predict", "FP64", (-1,)),)
    batch = x[:7].astype(np.float32)
    np.testing.assert_array_equal(runtime.predict({"input": batch})["predict"], model.predict(batch))


def test_configured_outputs_map_by_parameter_name_and_position(tmp_path: Path, iris, iris_model) -> None:
    features, _ = iris
    outputs = (
        TensorSpec("cls", "INT32", ()),
        TensorSpec("p", "FP64", (3,)),
        TensorSpec("margin", "FP32", (3,)),
    )
    config = _config(
        max_batch_size=8,
        inputs=(TensorSpec("x", "FP32", (4,)),),
        outputs=outputs,
        parameters={"methods": {"margin": "decision_function"}},
    )
    out = load_runtime(_skops(tmp_path, iris_model), config).predict({"x": features[:5]})
    np.testing.assert_array_equal(out["cls"], iris_model.predict(features[:5]).astype(np.int32))
    np.testing.assert_array_equal(out["p"], iris_model.predict_proba(features[:5]))
    np.testing.assert_array_equal(out["margin"], iris_model.decision_function(features[:5]).astype(np.float32))
    assert out["cls"].dtype == np.int32


def test_string_classes_become_bytes_labels(tmp_path: Path, iris) -> None:
    features, labels = iris
    names = np.array(["setosa", "versicolor", "virginica"])[labels]
    model = LogisticRegression(max_iter=1000).fit(features, names)
    runtime = load_runtime(_skops(tmp_path, model), _config(max_batch_size=4))
    assert runtime.outputs[0] == TensorSpec("label", "BYTES", ())
    label = runtime.predict({"input": features[[0, 60, 149]]})["label"]
    assert label.dtype == np.object_
    assert label.tolist() == [s.encode() for s in model.predict(features[[0, 60, 149]])]


def test_missing_artifact_names_the_files_looked_for(tmp_path: Path) -> None:
    with pytest.raises(RuntimeLoadError, match=r"model\.skops.*model\.joblib.*model\.pkl"):
        load_runtime(tmp_path, _config())


def test_pickle_needs_explicit_trust(tmp_path: Path, iris, iris_model) -> None:
    (tmp_path / "model.pkl").write_bytes(pickle.dumps(iris_model))
    with pytest.raises(RuntimeLoadError, match=r"runs whatever code.*trusted: true"):
        load_runtime(tmp_path, _config())
    runtime = load_runtime(tmp_path, _config(parameters={"trusted": True}))
    features, _ = iris
    np.testing.assert_array_equal(runtime.predict({"input": features})["label"], iris_model.predict(features))


def test_skops_untrusted_types_need_trusted_types(tmp_path: Path, iris) -> None:
    features, labels = iris
    forest = RandomForestClassifier(n_estimators=3, random_state=0).fit(features, labels)
    _skops(tmp_path, forest)
    with pytest.raises(RuntimeLoadError, match=r"sklearn\.tree\._tree\.Tree.*parameters\.trusted_types"):
        load_runtime(tmp_path, _config(max_batch_size=4))
    config = _config(max_batch_size=4, parameters={"trusted_types": ["sklearn.tree._tree.Tree"]})
    out = load_runtime(tmp_path, config).predict({"input": features})
    np.testing.assert_array_equal(out["probabilities"], forest.predict_proba(features).astype(np.float32))


def test_missing_method_and_extra_inputs_are_load_errors(tmp_path: Path, iris) -> None:
    features, labels = iris
    _skops(tmp_path, SVC().fit(features, labels))  # no predict_proba without probability=True
    assert [s.name for s in load_runtime(tmp_path, _config(max_batch_size=2)).outputs] == ["label"]
    wanted = (TensorSpec("label", "INT64", ()), TensorSpec("probabilities", "FP32", (3,)))
    with pytest.raises(RuntimeLoadError, match=r"no method 'predict_proba' \(for output 'probabilities'\)"):
        load_runtime(tmp_path, _config(max_batch_size=2, outputs=wanted))
    two_inputs = (TensorSpec("a", "FP32", (2,)), TensorSpec("b", "FP32", (2,)))
    with pytest.raises(RuntimeLoadError, match="exactly one input"):
        load_runtime(tmp_path, _config(max_batch_size=2, inputs=two_inputs, outputs=wanted[:1]))


def test_unknown_output_name_without_method_is_a_load_error(tmp_path: Path, iris_model) -> None:
    outputs = (TensorSpec("a", "INT64", ()), TensorSpec("b", "FP32", (3,)), TensorSpec("c", "FP32", (3,)))
    with pytest.raises(RuntimeLoadError, match=r"no estimator method for output 'c'.*parameters\.methods"):
        load_runtime(_skops(tmp_path, iris_model), _config(max_batch_size=2, outputs=outputs))


def test_text_pipeline_takes_bytes_and_bad_values_are_unprocessable(tmp_path: Path) -> None:
    texts = ["good movie", "bad movie", "great film", "awful film"]
    pipeline = make_pipeline(TfidfVectorizer(), LogisticRegression()).fit(texts, [1, 0, 1, 0])
    _skops(tmp_path, pipeline)
    config = _config(max_batch_size=4, inputs=(TensorSpec("text", "BYTES", (1,)),),
                     outputs=(TensorSpec("label", "INT64", ()),))
    runtime = load_runtime(tmp_path, config)
    batch = np.array([[b"good film"], [b"awful movie"]], dtype=np.object_)
    expected = pipeline.predict(["good film", "awful movie"])
    np.testing.assert_array_equal(runtime.predict({"text": batch})["label"], expected)
    with pytest.raises(InvalidInput, match="not valid UTF-8"):
        runtime.predict({"text": np.array([[b"\xff"]], dtype=np.object_)})


def test_nan_features_are_unprocessable(tmp_path: Path, iris_model) -> None:
    runtime = load_runtime(_skops(tmp_path, iris_model), _config(max_batch_size=2))
    with pytest.raises(Unprocessable, match=r"LogisticRegression\.predict rejected the input.*NaN"):
        runtime.predict({"input": np.full((1, 4), np.nan, dtype=np.float32)})
