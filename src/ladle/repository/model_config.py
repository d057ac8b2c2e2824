"""Per-model configuration: `<repo>/<model>/config.yaml`, validated into frozen pydantic models whose JSON
schema is published (`ladle config-schema`, docs/model-config.schema.json).

Invariant: a ModelConfig that exists is valid. Every problem is a ConfigError naming the file, the field
and what was expected (config_errors.py), so one bad model never stops the others from loading.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, GetCoreSchemaHandler, Strict, field_validator, model_validator
from pydantic_core import CoreSchema, ValidationError, core_schema

from ladle.repository.config_errors import ConfigError, bad, config_error
from ladle.tensors import DATATYPES, TensorSpec

Backend = Literal["onnx", "sklearn", "torchscript", "torch_export", "python", "sentence_transformers", "llm"]
BACKENDS: tuple[str, ...] = get_args(Backend)
PLATFORMS = {"onnx": "onnxruntime_onnx", "sklearn": "sklearn", "torchscript": "pytorch_libtorch",
             "torch_export": "pytorch_export", "python": "python", "sentence_transformers": "sentence_transformers",
             "llm": "ladle_llm"}
# Strict: YAML's "8" or `true` is not silently an integer; a float field still takes an integer
Count = Annotated[int, Strict(), Field(ge=0)]
Positive = Annotated[int, Strict(), Field(ge=1)]
Number = Annotated[float, Strict(), Field(ge=0)]
FiniteNumber = Annotated[float, Strict(), Field(ge=0, allow_inf_nan=False)]


class _Config(BaseModel):
    """Frozen, and an unknown field is an error (a typo must not silently fall back to a default)."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)
    unknown_hint: ClassVar[str] = "unknown field; known fields are {known}"


class TensorConfig(_Config):
    """One input or output as written in config.yaml; kept as a `ladle.tensors.TensorSpec`."""

    model_config = ConfigDict(from_attributes=True)  # a TensorSpec built in code passes as is
    unknown_hint: ClassVar[str] = "unknown field; only name, datatype and shape"

    name: Annotated[str, Strict(), Field(min_length=1)]
    datatype: Literal[DATATYPES]  # type: ignore[valid-type]
    shape: tuple[Literal[-1] | Positive, ...]
    """Dimensions without the batch dimension; -1 marks one of any size."""

    @field_validator("shape", mode="before")
    @classmethod
    def _dims(cls, shape: Any) -> Any:
        if not isinstance(shape, (list, tuple)) or not all(
            isinstance(d, int) and not isinstance(d, bool) and (d == -1 or d > 0) for d in shape
        ):
            raise bad(f"a list of positive ints or -1, got {shape!r}"[:200])  # a hostile shape stays short
        return shape


class _AsTensorSpec:
    """Annotated marker: an entry is validated as a TensorConfig and stored as the TensorSpec runtimes use."""

    model = TensorConfig

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.no_info_after_validator_function(
            lambda t: TensorSpec(t.name, t.datatype, t.shape), handler(TensorConfig),
            serialization=core_schema.plain_serializer_function_ser_schema(dataclasses.asdict),
        )


Tensors = tuple[Annotated[TensorSpec, _AsTensorSpec], ...]


class DynamicBatching(_Config):
    """How requests to one model version are gathered into batches."""

    unknown_hint: ClassVar[str] = "unknown field; one of {known}"

    max_queue_delay_ms: Number = 0.0
    """How long a request may wait for others to batch with."""
    preferred_batch_sizes: tuple[Annotated[int, Strict()], ...] = ()
    """Dispatch at once when one of these sizes can be formed; each in [1, max_batch_size]."""
    max_queue_size: Positive = 1024
    """A full queue answers 503 at once (queues are always bounded)."""
    priority_levels: Positive = 1
    """Requests' `priority` parameter: 1 is the highest."""
    default_priority_level: Positive = 1
    """The level of a request that sets none; in config.yaml it defaults to priority_levels (the lowest)."""
    default_queue_timeout_ms: Number = 0.0
    """0: no timeout; requests may set `timeout` (microseconds) themselves."""
    ragged: Literal["group", "pad"] = "group"
    """Variable-shaped inputs: batch equal shapes together (group), or pad them to one shape (pad)."""
    padding_value: Number = 0.0
    eager: Annotated[bool, Strict()] = True
    """Skip the delay when every request the model holds is queued (none can join); false: Triton's strict delay."""

    @field_validator("preferred_batch_sizes")
    @classmethod
    def _sorted(cls, sizes: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(sorted(sizes))

    @model_validator(mode="after")
    def _levels(self) -> DynamicBatching:
        if self.default_priority_level > self.priority_levels:
            raise bad(f"an integer in [1, priority_levels={self.priority_levels}]",
                      "dynamic_batching.default_priority_level")
        return self


class VersionPolicy(_Config):
    """Which versions on disk are served: the newest `latest`, `all`, or a `specific` list."""

    kind: Literal["latest", "all", "specific"] = "latest"
    latest: Positive = 1
    specific: tuple[Positive, ...] = ()

    def __init__(self, kind: str = "latest", /, **data: Any) -> None:  # VersionPolicy("all") reads best
        super().__init__(**{"kind": kind, **data})

    def select(self, available: list[int]) -> list[int]:
        """The versions to serve out of those on disk, ascending."""
        ordered = sorted(available)
        if self.kind == "all":
            return ordered
        if self.kind == "specific":
            return [v for v in ordered if v in self.specific]
        return ordered[-self.latest :]


# how config.yaml spells a VersionPolicy: for the JSON schema (ModelConfig._policy converts)
class LatestVersions(_Config):
    latest: Positive


class AllVersions(_Config):
    all: Literal[True]


class SpecificVersions(_Config):
    specific: Annotated[list[Positive], Field(min_length=1)]


_POLICY_FORMS = LatestVersions | AllVersions | SpecificVersions


class ClusterOptions(_Config):
    """This model's replicas when ladle runs on Ray (`ladle serve --ray`); unset fields take the server's flags."""

    unknown_hint: ClassVar[str] = "unknown field; one of {known}"

    replicas: Positive | None = None
    """Fixed number of replicas."""
    min_replicas: Positive | None = None
    """Autoscale from this many replicas ..."""
    max_replicas: Positive | None = None
    """... up to this many."""
    target_ongoing_requests: Annotated[float, Strict(), Field(gt=0)] | None = None
    """Autoscaling: requests in flight per replica to aim for."""
    num_cpus: Number | None = None
    """CPUs Ray reserves for each replica."""
    num_gpus: Number | None = None
    """GPUs Ray reserves for each replica."""
    max_ongoing_requests: Positive | None = None
    """Most requests one replica holds at once."""

    @model_validator(mode="after")
    def _range(self) -> ClusterOptions:
        if self.min_replicas is not None and self.max_replicas is not None and self.max_replicas < self.min_replicas:
            raise bad(f"max_replicas >= min_replicas ({self.min_replicas})", "cluster.max_replicas")
        return self


class ShadowOptions(_Config):
    """Copy a fraction of the requests a model's traffic split routes to a candidate version and compare the answers;
    the caller only ever sees the primary's answer."""

    unknown_hint: ClassVar[str] = "unknown field; one of {known}"

    version: Positive
    """The candidate: it must be loaded (list it in version_policy); it takes no traffic of its own unless the
    traffic_split gives it some."""
    fraction: Annotated[float, Strict(), Field(ge=0, le=1)]
    """Share of the routed requests copied to it, in [0, 1]."""
    max_in_flight: Positive = 16
    """Copies running at once; a request arriving while this many run is not copied (shadow is shed first)."""
    atol: FiniteNumber = 1e-5
    """Tensors: an element differs when |primary - shadow| > atol + rtol * |primary| (numpy.isclose)."""
    rtol: FiniteNumber = 1e-4


StickyKey = Annotated[str, Strict(), Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$")]


class ModelConfig(_Config):
    """One model's configuration. `inputs`/`outputs` may be empty when the backend infers them."""

    model_config = ConfigDict(title="ladle model config")

    name: str
    """The model's directory name (may be omitted)."""
    backend: Backend
    inputs: Tensors = ()
    """May be omitted when the backend can infer them (ONNX, torch.export, sklearn, encoders)."""
    outputs: Tensors = ()
    max_batch_size: Count = 0
    """0: the model has no batch dimension; > 0: tensor shapes exclude it."""
    dynamic_batching: DynamicBatching | None = None
    """Omit to run each request on its own."""
    instance_count: Positive = 1
    """Instances running batches concurrently."""
    instance_kind: Literal["thread", "process"] = "thread"
    """process: a worker process per instance (GIL-bound Python scales)."""
    inline_max_us: Number = 100.0
    """Thread instances whose batches keep finishing under this run them on the event loop; 0: always the thread."""
    execution_timeout_ms: FiniteNumber = 60000.0
    """A batch running longer fails with 504 (a process worker is restarted, a thread leaves rotation); 0: no limit."""
    version_policy: VersionPolicy = Field(VersionPolicy(), json_schema_extra={"default": {"latest": 1}})
    """{latest: N}, {all: true} or {specific: [v, ...]}."""
    parameters: Mapping[str, Any] = {}
    """Backend-specific (see the README's Backends table)."""
    traffic_split: tuple[tuple[int, float], ...] = Field(
        (), json_schema_extra={"default": {}, "propertyNames": {"pattern": "^[1-9][0-9]*$"}})
    """{version: weight}: how requests naming no version are shared out (relative weights); empty: the newest."""
    sticky_key: StickyKey | None = None
    """Keep each client on one version of the split: a header name (e.g. X-User-Id; a KServe request parameter of
    that name counts too), or `user` for the OpenAI `user` field. Consistent: moving weights moves only the keys
    that must move."""
    shadow: ShadowOptions | None = None
    """Shadow traffic: {version: 3, fraction: 0.1} also sends a copy of 10% of the routed requests to version 3."""
    cluster: ClusterOptions = ClusterOptions()
    """Replicas, autoscaling and per-replica resources on a Ray cluster (`ladle serve --ray`)."""

    @property
    def platform(self) -> str:
        return PLATFORMS[self.backend]

    @property
    def is_llm(self) -> bool:
        """Served by an LLM engine over the OpenAI API rather than by a batcher over KServe."""
        return self.backend == "llm"

    @property
    def batched(self) -> bool:
        """Whether tensors carry a leading batch dimension not listed in `shape`."""
        return self.max_batch_size > 0

    @field_validator("inputs", "outputs")
    @classmethod
    def _unique_names(cls, specs: tuple[TensorSpec, ...]) -> tuple[TensorSpec, ...]:
        if len({s.name for s in specs}) != len(specs):
            raise bad("unique tensor names")
        return specs

    @field_validator("dynamic_batching", mode="before")
    @classmethod
    def _default_level(cls, value: Any) -> Any:
        """In config.yaml a request without a priority gets the lowest level unless the config says otherwise."""
        if isinstance(value, Mapping) and "priority_levels" in value:
            return {"default_priority_level": value["priority_levels"], **value}
        return value

    @field_validator("version_policy", mode="before", json_schema_input_type=_POLICY_FORMS)
    @classmethod
    def _policy(cls, value: Any) -> Any:
        """config.yaml's {latest: N} / {all: true} / {specific: [...]} -> VersionPolicy's fields."""
        if isinstance(value, VersionPolicy):
            return value
        if not isinstance(value, Mapping) or len(value) != 1 or next(iter(value)) not in ("latest", "all", "specific"):
            raise bad("exactly one of {latest: N}, {all: true}, {specific: [v, ...]}")
        kind, arg = next(iter(value.items()))
        if kind == "all" and arg is not True:
            raise bad("true", "version_policy.all")
        if kind == "specific":
            if not isinstance(arg, list) or not arg or not all(isinstance(v, int) and v > 0 for v in arg):
                raise bad("a non-empty list of positive integer versions", "version_policy.specific")
            arg = tuple(sorted(set(arg)))
        return {"kind": kind} if kind == "all" else {"kind": kind, kind: arg}

    @field_validator("traffic_split", mode="before", json_schema_input_type=dict[int, Number])
    @classmethod
    def _split(cls, value: Any) -> Any:
        """{version: weight} -> ((version, weight), ...) ascending; YAML may quote a version ("1")."""
        if isinstance(value, tuple):  # built in code, already pairs
            return value
        if not isinstance(value, Mapping):
            raise bad(f"a mapping, got {type(value).__name__}")
        split: dict[int, float] = {}
        for version, weight in value.items():
            key = int(version) if isinstance(version, str) and version.isdigit() else version
            if key in split:
                raise bad("each version once", f"traffic_split.{key}")
            if isinstance(key, bool) or not isinstance(key, int) or key < 1:
                raise bad(f"an integer >= 1, got {key!r}", "traffic_split (a version)")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
                raise bad(f"a number >= 0, got {weight!r}", f"traffic_split.{key}")
            split[key] = float(weight)
        if split and not any(weight > 0 for weight in split.values()):
            raise bad("at least one version with a weight > 0")
        return tuple(sorted(split.items()))

    @model_validator(mode="after")
    def _batching_fits(self) -> ModelConfig:
        if self.dynamic_batching is None:
            return self
        if self.max_batch_size == 0:
            raise bad("max_batch_size > 0 (a model without a batch dim cannot batch)", "dynamic_batching")
        if not all(1 <= s <= self.max_batch_size for s in self.dynamic_batching.preferred_batch_sizes):
            raise bad(f"a list of ints in [1, max_batch_size={self.max_batch_size}]",
                      "dynamic_batching.preferred_batch_sizes")
        return self


class _VersionOverride(_Config):
    """`<version>/config.yaml`: what one version may change of its model's config."""

    unknown_hint: ClassVar[str] = "unknown field; a version config may set only {known}"

    backend: Backend | None = None
    parameters: Mapping[str, Any] = {}


def load_model_config(model_dir: Path) -> ModelConfig:
    """Parse `<model_dir>/config.yaml`; the model's name is its directory's name."""
    path = model_dir / "config.yaml"
    return parse_model_config(_read_yaml(path), name=model_dir.name, path=path)


def load_version_config(base: ModelConfig, version_dir: Path) -> ModelConfig:
    """Apply `<version>/config.yaml` (backend, parameters) over the model's config, if present."""
    path = version_dir / "config.yaml"
    if not path.is_file():
        return base
    try:
        override = _VersionOverride.model_validate(_read_yaml(path))
    except ValidationError as exc:
        raise config_error(exc, path, _VersionOverride) from None
    # validated above, so model_copy's unvalidated update keeps the invariant
    return base.model_copy(update={"backend": override.backend or base.backend,
                                   "parameters": {**base.parameters, **override.parameters}})


def parse_model_config(raw: Mapping[str, Any], name: str, path: Path | str) -> ModelConfig:
    """Validate a config mapping; raises ConfigError on the first problem found."""
    if "name" in raw and raw["name"] != name:
        raise ConfigError(path, "name", f"must match the directory name '{name}'")
    try:
        return ModelConfig.model_validate({**raw, "name": name})
    except ValidationError as exc:
        raise config_error(exc, path, ModelConfig) from None


def config_schema() -> dict[str, Any]:
    """The JSON schema of config.yaml (what `ladle config-schema` prints)."""
    schema = ModelConfig.model_json_schema()
    schema["required"] = [f for f in schema["required"] if f != "name"]  # the directory names the model
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(path, "(file)", "a config.yaml next to the version directories") from None
    except yaml.YAMLError as exc:
        raise ConfigError(path, "(file)", f"valid YAML ({exc})") from None
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(path, "(file)", f"a mapping, got {type(raw).__name__}")
    return dict(raw)
