"""Per-model configuration: `<repo>/<model>/config.yaml`, parsed and validated into frozen dataclasses.

Invariant: a ModelConfig that exists is valid. Every problem is a ConfigError naming the file,
the field and what was expected, so one bad model never stops the others from loading.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from ladle.tensors import DATATYPES, TensorSpec

BACKENDS = ("onnx", "sklearn", "torchscript", "torch_export", "python", "sentence_transformers", "llm")
PLATFORMS = {
    "onnx": "onnxruntime_onnx",
    "sklearn": "sklearn",
    "torchscript": "pytorch_libtorch",
    "torch_export": "pytorch_export",
    "python": "python",
    "sentence_transformers": "sentence_transformers",
    "llm": "ladle_llm",
}
INSTANCE_KINDS = ("thread", "process")
RAGGED_MODES = ("group", "pad")


class ConfigError(ValueError):
    """A model config is invalid: which file, which field, what was expected."""

    def __init__(self, path: Path | str, field_name: str, expected: str) -> None:
        super().__init__(f"{path}: field '{field_name}': {expected}")
        self.path = str(path)
        self.field = field_name
        self.expected = expected


@dataclass(frozen=True)
class DynamicBatching:
    """How requests to one model version are gathered into batches."""

    max_queue_delay_ms: float = 0.0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 1024
    priority_levels: int = 1
    default_priority_level: int = 1
    default_queue_timeout_ms: float = 0.0
    ragged: str = "group"
    padding_value: float = 0.0
    # dispatch without waiting out max_queue_delay_ms when every request the model holds is already
    # queued: nothing else is on its way, so waiting would only add latency (false: Triton's strict delay)
    eager: bool = True


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions on disk are served: the newest `latest`, `all`, or a `specific` list."""

    kind: str = "latest"
    latest: int = 1
    specific: tuple[int, ...] = ()

    def select(self, available: list[int]) -> list[int]:
        """The versions to serve out of those on disk, ascending."""
        ordered = sorted(available)
        if self.kind == "all":
            return ordered
        if self.kind == "specific":
            return [v for v in ordered if v in self.specific]
        return ordered[-self.latest :]


@dataclass(frozen=True)
class ModelConfig:
    """One model's configuration. `inputs`/`outputs` may be empty when the backend infers them."""

    name: str
    backend: str
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    max_batch_size: int = 0
    dynamic_batching: DynamicBatching | None = None
    instance_count: int = 1
    instance_kind: str = "thread"
    # thread instances whose batches keep finishing under this many microseconds run them on the event
    # loop instead (batching/inline.py); 0 always uses the thread
    inline_max_us: float = 100.0
    # a batch running longer than this fails with 504; a process instance's worker is then killed and restarted,
    # a thread instance leaves rotation until its thread returns (batching/batcher.py); 0: no limit
    execution_timeout_ms: float = 60000.0
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
    parameters: Mapping[str, Any] = field(default_factory=dict)
    # (version, weight): how requests that name no version are shared out (canaries, A/B tests); empty: newest
    traffic_split: tuple[tuple[int, float], ...] = ()

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


_TOP_FIELDS = {
    "name", "backend", "inputs", "outputs", "max_batch_size", "dynamic_batching",
    "instance_count", "instance_kind", "inline_max_us", "version_policy", "parameters", "traffic_split",
    "execution_timeout_ms",
}
_VERSION_FIELDS = {"backend", "parameters"}


def load_model_config(model_dir: Path) -> ModelConfig:
    """Parse `<model_dir>/config.yaml`; the model's name is its directory's name."""
    path = model_dir / "config.yaml"
    raw = _read_yaml(path)
    return parse_model_config(raw, name=model_dir.name, path=path)


def load_version_config(base: ModelConfig, version_dir: Path) -> ModelConfig:
    """Apply `<version>/config.yaml` (backend, parameters) over the model's config, if present."""
    path = version_dir / "config.yaml"
    if not path.is_file():
        return base
    raw = _read_yaml(path)
    unknown = set(raw) - _VERSION_FIELDS
    if unknown:
        raise ConfigError(path, sorted(unknown)[0], f"a version config may set only {sorted(_VERSION_FIELDS)}")
    backend = _backend(raw.get("backend", base.backend), path)
    params = {**base.parameters, **_mapping(raw.get("parameters", {}), path, "parameters")}
    return replace(base, backend=backend, parameters=params)


def parse_model_config(raw: Mapping[str, Any], name: str, path: Path | str) -> ModelConfig:
    """Validate a config mapping; raises ConfigError on the first problem found."""
    unknown = set(raw) - _TOP_FIELDS
    if unknown:
        raise ConfigError(path, sorted(unknown)[0], f"unknown field; known fields are {sorted(_TOP_FIELDS)}")
    if "name" in raw and raw["name"] != name:
        raise ConfigError(path, "name", f"must match the directory name '{name}'")
    max_batch = _int(raw.get("max_batch_size", 0), path, "max_batch_size", minimum=0)
    batching = raw.get("dynamic_batching")
    return ModelConfig(
        name=name,
        backend=_backend(raw.get("backend"), path),
        inputs=_tensors(raw.get("inputs", []), path, "inputs"),
        outputs=_tensors(raw.get("outputs", []), path, "outputs"),
        max_batch_size=max_batch,
        dynamic_batching=None if batching is None else _batching(batching, path, max_batch),
        instance_count=_int(raw.get("instance_count", 1), path, "instance_count", minimum=1),
        instance_kind=_choice(raw.get("instance_kind", "thread"), INSTANCE_KINDS, path, "instance_kind"),
        inline_max_us=_number(raw.get("inline_max_us", 100.0), path, "inline_max_us"),
        execution_timeout_ms=_finite(raw.get("execution_timeout_ms", 60000.0), path, "execution_timeout_ms"),
        version_policy=_version_policy(raw.get("version_policy", {"latest": 1}), path),
        parameters=_mapping(raw.get("parameters", {}), path, "parameters"),
        traffic_split=_traffic_split(raw.get("traffic_split", {}), path),
    )


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(path, "(file)", "a config.yaml next to the version directories") from None
    except yaml.YAMLError as exc:
        raise ConfigError(path, "(file)", f"valid YAML ({exc})") from None
    if raw is None:
        return {}
    return _mapping(raw, path, "(file)")


def _mapping(value: Any, path: Path | str, name: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(path, name, f"a mapping, got {type(value).__name__}")
    return dict(value)


def _int(value: Any, path: Path | str, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(path, name, f"an integer >= {minimum}, got {value!r}")
    return value


def _number(value: Any, path: Path | str, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(path, name, f"a number >= 0, got {value!r}")
    return float(value)


def _finite(value: Any, path: Path | str, name: str) -> float:
    number = _number(value, path, name)
    if not math.isfinite(number):
        raise ConfigError(path, name, f"a finite number >= 0 (0: no limit), got {value!r}")
    return number


def _bool(value: Any, path: Path | str, name: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(path, name, f"true or false, got {value!r}")
    return value


def _choice(value: Any, choices: tuple[str, ...], path: Path | str, name: str) -> str:
    if value not in choices:
        raise ConfigError(path, name, f"one of {list(choices)}, got {value!r}")
    return value


def _backend(value: Any, path: Path | str) -> str:
    if value is None:
        raise ConfigError(path, "backend", f"required; one of {list(BACKENDS)}")
    return _choice(value, BACKENDS, path, "backend")


def _tensors(value: Any, path: Path | str, name: str) -> tuple[TensorSpec, ...]:
    if not isinstance(value, list):
        raise ConfigError(path, name, f"a list of {{name, datatype, shape}}, got {type(value).__name__}")
    specs = [_tensor(item, path, f"{name}[{i}]") for i, item in enumerate(value)]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(path, name, "unique tensor names")
    return tuple(specs)


def _tensor(item: Any, path: Path | str, where: str) -> TensorSpec:
    item = _mapping(item, path, where)
    unknown = set(item) - {"name", "datatype", "shape"}
    if unknown:
        raise ConfigError(path, f"{where}.{sorted(unknown)[0]}", "only name, datatype and shape")
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(path, f"{where}.name", "a non-empty string")
    datatype = _choice(item.get("datatype"), DATATYPES, path, f"{where}.datatype")
    shape = item.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and (d == -1 or d > 0) for d in shape
    ):
        raise ConfigError(path, f"{where}.shape", f"a list of positive ints or -1, got {shape!r}")
    return TensorSpec(name=name, datatype=datatype, shape=tuple(shape))


def _batching(value: Any, path: Path | str, max_batch: int) -> DynamicBatching:
    raw = _mapping(value, path, "dynamic_batching")
    known = set(DynamicBatching.__dataclass_fields__)
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(path, f"dynamic_batching.{sorted(unknown)[0]}", f"one of {sorted(known)}")
    if max_batch == 0:
        raise ConfigError(path, "dynamic_batching", "max_batch_size > 0 (a model without a batch dim cannot batch)")
    f = "dynamic_batching."
    preferred = raw.get("preferred_batch_sizes", [])
    if not isinstance(preferred, list) or not all(
        isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= max_batch for s in preferred
    ):
        raise ConfigError(path, f + "preferred_batch_sizes", f"a list of ints in [1, max_batch_size={max_batch}]")
    levels = _int(raw.get("priority_levels", 1), path, f + "priority_levels", minimum=1)
    default_level = _int(raw.get("default_priority_level", levels), path, f + "default_priority_level", minimum=1)
    if default_level > levels:
        raise ConfigError(path, f + "default_priority_level", f"an integer in [1, priority_levels={levels}]")
    return DynamicBatching(
        max_queue_delay_ms=_number(raw.get("max_queue_delay_ms", 0.0), path, f + "max_queue_delay_ms"),
        preferred_batch_sizes=tuple(sorted(preferred)),
        max_queue_size=_int(raw.get("max_queue_size", 1024), path, f + "max_queue_size", minimum=1),
        priority_levels=levels,
        default_priority_level=default_level,
        default_queue_timeout_ms=_number(
            raw.get("default_queue_timeout_ms", 0.0), path, f + "default_queue_timeout_ms"
        ),
        ragged=_choice(raw.get("ragged", "group"), RAGGED_MODES, path, f + "ragged"),
        padding_value=_number(raw.get("padding_value", 0.0), path, f + "padding_value"),
        eager=_bool(raw.get("eager", True), path, f + "eager"),
    )


def _version_policy(value: Any, path: Path | str) -> VersionPolicy:
    raw = _mapping(value, path, "version_policy")
    if len(raw) != 1 or next(iter(raw)) not in ("latest", "all", "specific"):
        raise ConfigError(path, "version_policy", "exactly one of {latest: N}, {all: true}, {specific: [v, ...]}")
    kind, arg = next(iter(raw.items()))
    if kind == "latest":
        return VersionPolicy(kind="latest", latest=_int(arg, path, "version_policy.latest", minimum=1))
    if kind == "all":
        if arg is not True:
            raise ConfigError(path, "version_policy.all", "true")
        return VersionPolicy(kind="all")
    if not isinstance(arg, list) or not arg or not all(isinstance(v, int) and v > 0 for v in arg):
        raise ConfigError(path, "version_policy.specific", "a non-empty list of positive integer versions")
    return VersionPolicy(kind="specific", specific=tuple(sorted(set(arg))))


def _traffic_split(value: Any, path: Path | str) -> tuple[tuple[int, float], ...]:
    """{version: weight}: weights are relative (90/10 and 9/1 are the same split); at least one must be > 0."""
    raw = _mapping(value, path, "traffic_split")
    split = []
    for version, weight in raw.items():
        if isinstance(version, str) and version.isdigit():
            version = int(version)
        if any(version == seen for seen, _ in split):
            raise ConfigError(path, f"traffic_split.{version}", "each version once")
        split.append((_int(version, path, "traffic_split (a version)", minimum=1),
                      _number(weight, path, f"traffic_split.{version}")))
    if split and not any(weight > 0 for _, weight in split):
        raise ConfigError(path, "traffic_split", "at least one version with a weight > 0")
    return tuple(sorted(split))
