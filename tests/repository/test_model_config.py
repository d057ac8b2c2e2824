"""Model config parsing: valid configs become dataclasses; every mistake names the file and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from ladle.repository.model_config import (
    ConfigError,
    VersionPolicy,
    load_model_config,
    load_version_config,
    parse_model_config,
)
from ladle.tensors import TensorSpec

GOOD = {
    "backend": "onnx",
    "max_batch_size": 8,
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [4]}],
    "outputs": [{"name": "y", "datatype": "INT64", "shape": []}],
    "dynamic_batching": {"max_queue_delay_ms": 2, "preferred_batch_sizes": [4, 8], "priority_levels": 2},
    "instance_count": 2,
    "instance_kind": "process",
    "version_policy": {"latest": 2},
    "parameters": {"intra_op_threads": 1},
}


def test_full_config_parses() -> None:
    c = parse_model_config(GOOD, name="m", path="m/config.yaml")
    assert c.inputs == (TensorSpec("x", "FP32", (4,)),)
    assert c.outputs == (TensorSpec("y", "INT64", ()),)
    assert c.dynamic_batching.preferred_batch_sizes == (4, 8)
    assert c.dynamic_batching.default_priority_level == 2  # lowest level unless set
    assert c.instance_count == 2 and c.instance_kind == "process"
    assert c.version_policy == VersionPolicy(kind="latest", latest=2)
    assert c.batched and c.platform == "onnxruntime_onnx"


@pytest.mark.parametrize(
    ("change", "field", "expected"),
    [
        ({"backend": "tensorflow"}, "backend", "one of"),
        ({"backend": None}, "backend", "one of"),
        ({"max_batch_size": -1}, "max_batch_size", ">= 0"),
        ({"max_batch_size": "8"}, "max_batch_size", "integer"),
        ({"inputs": [{"name": "x", "datatype": "FLOAT", "shape": [4]}]}, "inputs[0].datatype", "FP32"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [0]}]}, "inputs[0].shape", "positive"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [4], "dims": 1}]}, "inputs[0].dims", "only"),
        ({"inputs": [{"datatype": "FP32", "shape": [4]}]}, "inputs[0].name", "non-empty"),
        ({"inputs": {"name": "x"}}, "inputs", "a list"),
        ({"dynamic_batching": {"max_queue_delay": 2}}, "dynamic_batching.max_queue_delay", "one of"),
        ({"dynamic_batching": {"preferred_batch_sizes": [16]}}, "dynamic_batching.preferred_batch_sizes", "[1, max"),
        ({"dynamic_batching": {"max_queue_size": 0}}, "dynamic_batching.max_queue_size", ">= 1"),
        ({"dynamic_batching": {"default_priority_level": 3}}, "dynamic_batching.default_priority_level", "in [1"),
        ({"instance_kind": "gpu"}, "instance_kind", "thread"),
        ({"instance_count": 0}, "instance_count", ">= 1"),
        ({"inline_max_us": -1}, "inline_max_us", ">= 0"),
        ({"version_policy": {"newest": 1}}, "version_policy", "exactly one"),
        ({"version_policy": {"specific": []}}, "version_policy.specific", "non-empty"),
        ({"name": "other"}, "name", "directory name"),
        ({"colour": "red"}, "colour", "unknown field"),
        ({"traffic_split": [1, 2]}, "traffic_split", "a mapping"),
        ({"traffic_split": {"v1": 10}}, "traffic_split (a version)", "integer >= 1"),
        ({"traffic_split": {0: 10}}, "traffic_split (a version)", "integer >= 1"),
        ({"traffic_split": {1: -5}}, "traffic_split.1", ">= 0"),
        ({"traffic_split": {1: 0, 2: 0}}, "traffic_split", "weight > 0"),
        ({"traffic_split": {1: 5, "1": 5}}, "traffic_split.1", "once"),
    ],
)
def test_bad_fields_are_named(change: dict, field: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_model_config({**GOOD, **change}, name="m", path="repo/m/config.yaml")
    assert info.value.field == field
    assert expected in info.value.expected
    assert "repo/m/config.yaml" in str(info.value)


def test_traffic_split_parses_versions_as_integers() -> None:
    c = parse_model_config({**GOOD, "traffic_split": {2: 10, "1": 90}}, name="m", path="c.yaml")
    assert c.traffic_split == ((1, 90.0), (2, 10.0))
    assert parse_model_config(GOOD, name="m", path="c.yaml").traffic_split == ()


def test_batching_needs_a_batch_dimension() -> None:
    with pytest.raises(ConfigError, match="max_batch_size > 0"):
        parse_model_config({**GOOD, "max_batch_size": 0}, name="m", path="c.yaml")


def test_version_policies_select() -> None:
    assert VersionPolicy("latest", latest=2).select([3, 1, 2]) == [2, 3]
    assert VersionPolicy("all").select([3, 1]) == [1, 3]
    assert VersionPolicy("specific", specific=(1, 5)).select([1, 2, 3]) == [1]


def test_yaml_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.yaml").write_text("backend: [onnx\n")
    with pytest.raises(ConfigError, match="valid YAML"):
        load_model_config(tmp_path / "m")


def test_version_config_overrides_backend_and_parameters(tmp_path: Path) -> None:
    base = parse_model_config({**GOOD, "parameters": {"a": 1, "b": 2}}, name="m", path="c.yaml")
    (tmp_path / "2").mkdir()
    (tmp_path / "2" / "config.yaml").write_text("backend: sklearn\nparameters: {b: 3}\n")
    v2 = load_version_config(base, tmp_path / "2")
    assert v2.backend == "sklearn" and dict(v2.parameters) == {"a": 1, "b": 3}
    (tmp_path / "2" / "config.yaml").write_text("max_batch_size: 4\n")
    with pytest.raises(ConfigError, match="max_batch_size"):
        load_version_config(base, tmp_path / "2")
