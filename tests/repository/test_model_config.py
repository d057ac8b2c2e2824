"""Model config parsing: valid configs become frozen pydantic models; every mistake names the file and field;
the published JSON schema is the one the models generate."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import httpx
import pydantic
import pytest

from ladle.repository.model_config import (
    ConfigError,
    DynamicBatching,
    ModelConfig,
    VersionPolicy,
    config_schema,
    load_model_config,
    load_version_config,
    parse_model_config,
)
from ladle.tensors import TensorSpec
from tests.repos import write_probe
from tests.server import LadleServer

SCHEMA = Path(__file__).resolve().parents[2] / "docs" / "model-config.schema.json"

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


@pytest.mark.parametrize(
    ("change", "field", "expected"),
    [
        ({"backend": "python", "max_batch_size": 0, "dynamic_batching": None}, "max_batch_size", None),
        ({"dynamic_batching": {"eager": "yes"}}, "dynamic_batching.eager", "true or false, got 'yes'"),
        ({"dynamic_batching": {"max_queue_delay_ms": float("nan")}}, "dynamic_batching.max_queue_delay_ms", ">= 0"),
        ({"dynamic_batching": 5}, "dynamic_batching", "a mapping"),
        ({"execution_timeout_ms": float("inf")}, "execution_timeout_ms", "a finite number >= 0, got inf"),
        ({"instance_count": 1.5}, "instance_count", "an integer >= 1, got 1.5"),
        ({"inputs": ["x"]}, "inputs[0]", "a mapping"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [4]}] * 2}, "inputs", "unique tensor names"),
        ({"version_policy": {"latest": 0}}, "version_policy.latest", "an integer >= 1, got 0"),
        ({"version_policy": {"kind": "all"}}, "version_policy", "exactly one"),
        ({"version_policy": {"all": "yes"}}, "version_policy.all", "true"),
        ({"parameters": [1]}, "parameters", "a mapping, got list"),
        ({"inline_max_us": "x" * 1000}, "inline_max_us", "..."),
    ],
)
def test_more_mistakes_are_named(change: dict, field: str, expected: str | None) -> None:
    if expected is None:  # a control: this change alone is valid
        assert parse_model_config({**GOOD, **change}, name="m", path="c.yaml").max_batch_size == 0
        return
    with pytest.raises(ConfigError) as info:
        parse_model_config({**GOOD, **change}, name="m", path="repo/m/config.yaml")
    assert (info.value.field, info.value.path) == (field, "repo/m/config.yaml")
    assert expected in info.value.expected
    assert len(str(info.value)) < 600  # a hostile value is cut short, not echoed whole


def test_missing_and_unknown_fields_say_what_is_known() -> None:
    with pytest.raises(ConfigError) as info:
        parse_model_config({}, name="m", path="c.yaml")
    assert info.value.field == "backend" and info.value.expected.startswith("required; one of ['onnx'")
    with pytest.raises(ConfigError) as info:
        parse_model_config({**GOOD, "dynamic_batching": {"max_queue_delay": 2}}, name="m", path="c.yaml")
    assert "'max_queue_delay_ms'" in info.value.expected  # the typo's fix is in the message


def test_version_config_unknown_field_and_bad_backend(tmp_path: Path) -> None:
    base = parse_model_config(GOOD, name="m", path="c.yaml")
    (tmp_path / "2").mkdir()
    (tmp_path / "2" / "config.yaml").write_text("instance_count: 4\n")
    with pytest.raises(ConfigError) as info:
        load_version_config(base, tmp_path / "2")
    assert info.value.field == "instance_count"
    assert info.value.expected == "unknown field; a version config may set only ['backend', 'parameters']"
    (tmp_path / "2" / "config.yaml").write_text("backend: tensorflow\n")
    with pytest.raises(ConfigError, match=r"field 'backend': one of \['onnx'"):
        load_version_config(base, tmp_path / "2")
    (tmp_path / "2" / "config.yaml").write_text("parameters: {a: 1}\n")
    assert load_version_config(base, tmp_path / "2").backend == "onnx"  # unset: the model's own


def test_configs_are_frozen_strict_and_picklable() -> None:
    c = parse_model_config({**GOOD, "traffic_split": {1: 3}}, name="m", path="c.yaml")
    with pytest.raises(pydantic.ValidationError):
        c.max_batch_size = 4  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError, match="colour"):
        ModelConfig(name="m", backend="onnx", colour="red")  # type: ignore[call-arg]
    assert pickle.loads(pickle.dumps(c)) == c  # process instances receive their config pickled
    built = ModelConfig(name="m", backend="python", max_batch_size=2, inputs=(TensorSpec("x", "FP32", (-1,)),),
                        dynamic_batching=DynamicBatching(priority_levels=2))
    assert built.inputs == (TensorSpec("x", "FP32", (-1,)),) and built.dynamic_batching.default_priority_level == 1
    assert VersionPolicy("specific", specific=(5, 1)).select([1, 2, 5]) == [1, 5]


def test_config_endpoint_shows_batching_and_version_policy(tmp_path: Path) -> None:
    write_probe(tmp_path, "probe", version_policy={"specific": [1]},
                dynamic_batching={"max_queue_delay_ms": 5, "preferred_batch_sizes": [8, 2], "priority_levels": 2})
    with LadleServer([tmp_path]) as server:
        config = httpx.get(f"{server.url}/v2/models/probe/config", timeout=30).json()
    assert config["dynamic_batching"] == {
        "max_queue_delay_ms": 5.0, "preferred_batch_sizes": [2, 8], "max_queue_size": 1024, "priority_levels": 2,
        "default_priority_level": 2, "default_queue_timeout_ms": 0.0, "ragged": "group", "padding_value": 0.0,
        "eager": True,
    }
    assert config["version_policy"] == {"specific": {"kind": "specific", "latest": 1, "specific": [1]}}


def test_schema_describes_config_yaml() -> None:
    schema = config_schema()
    assert schema["required"] == ["backend"]  # the directory names the model
    assert schema["additionalProperties"] is False
    props = schema["properties"]
    assert {"backend", "inputs", "dynamic_batching", "version_policy", "traffic_split", "parameters"} <= set(props)
    forms = [schema["$defs"][ref["$ref"].rsplit("/", 1)[1]] for ref in props["version_policy"]["anyOf"]]
    assert [list(form["properties"]) for form in forms] == [["latest"], ["all"], ["specific"]]
    assert props["traffic_split"]["type"] == "object" and props["traffic_split"]["default"] == {}
    assert "max_queue_delay_ms" in schema["$defs"]["DynamicBatching"]["properties"]


def test_published_schema_is_up_to_date() -> None:
    printed = subprocess.run([sys.executable, "-m", "ladle", "config-schema"],
                             capture_output=True, text=True, check=True).stdout
    assert json.loads(printed) == config_schema()
    assert SCHEMA.read_text(encoding="utf-8") == printed, (
        "docs/model-config.schema.json is stale: run `ladle config-schema > docs/model-config.schema.json`"
    )
