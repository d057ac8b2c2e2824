"""The live registry: which model versions are loaded, loading or unavailable, and why.

Invariants: a request only ever reaches a READY version; a (re)load swaps the new versions in
only after they loaded, and the old versions drain their queues before they are closed, so
loading or unloading a model never drops requests (to it or to any other model).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ladle.batching.batcher import Batcher
from ladle.batching.instances import create_instances
from ladle.errors import NotFound, Unavailable
from ladle.metrics import Metrics, VersionMetrics
from ladle.repository.layout import check_model_name, model_dir, model_names, version_numbers
from ladle.repository.model_config import ConfigError, ModelConfig, load_model_config, load_version_config
from ladle.tensors import TensorSpec

log = logging.getLogger(__name__)


class LLMEngine(Protocol):
    """What the registry needs of an LLM engine (ladle.llm.async_engine.AsyncEngine)."""

    @property
    def alive(self) -> bool: ...  # False once the engine thread has died (readiness)
    def start(self, loop: asyncio.AbstractEventLoop) -> None: ...
    async def close(self) -> None: ...


#: builds an LLM engine for one version directory (blocking); injected so the repository never imports llm
LLMLoader = Callable[[str, int, Path, ModelConfig], Any]


@dataclass
class ModelVersion:
    """One loaded version: its effective config, served signature, metrics, and what runs it —
    a batcher (classic models) or an LLM engine (backend: llm)."""

    name: str
    version: int
    config: ModelConfig
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batcher: Batcher | None
    metrics: VersionMetrics
    load_seconds: float
    engine: LLMEngine | None = None

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.close()
        if self.engine is not None:
            await self.engine.close()


@dataclass
class VersionStatus:
    state: str
    reason: str = ""


@dataclass
class ModelRecord:
    """Everything known about one model name."""

    name: str
    config: ModelConfig | None = None
    ready: dict[int, ModelVersion] = field(default_factory=dict)
    status: dict[int, VersionStatus] = field(default_factory=dict)
    state: str = "UNAVAILABLE"
    reason: str = ""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def route(self) -> ModelVersion:
        """The version for a request that names none: drawn by the config's traffic_split among its READY
        versions, else (no split, or none of its versions ready) the newest READY one. Needs a READY version."""
        split = self.config.traffic_split if self.config is not None else ()
        if split:
            choices = [(version, weight) for version, weight in split if weight > 0 and version in self.ready]
            if choices:
                versions, weights = zip(*choices, strict=True)
                return self.ready[random.choices(versions, weights)[0]]
        return self.ready[max(self.ready)]


class ModelRegistry:
    def __init__(self, root: Path | None, metrics: Metrics, llm_loader: LLMLoader | None = None) -> None:
        self.root = root
        self.metrics = metrics
        self.llm_loader = llm_loader
        self.models: dict[str, ModelRecord] = {}
        self.wanted: set[str] = set()  # models that should be loaded (readiness)
        # one load at a time: loads are CPU-bound anyway, and frameworks' lazy imports (transformers)
        # are not safe to race from two threads
        self._load_slot = asyncio.Lock()

    # -- lookups (hot path) -------------------------------------------------------------------
    def get(self, name: str, version: int | None = None) -> ModelVersion:
        """The version to serve: the one asked for, or one routed by the model's traffic_split, or the newest READY."""
        record = self.models.get(name)
        if record is None:
            check_model_name(name)  # only on a miss: a name that could never exist is a 400
            raise NotFound(f"unknown model '{name}'; POST /v2/repository/index lists the models")
        if version is None:
            if record.ready:
                return record.route()
            # the reason (a load failure's exception text) stays in the repository index, off inference answers
            raise Unavailable(f"model '{name}' is not ready (state {record.state}); the repository index says why")
        served = record.ready.get(version)
        if served is not None:
            return served
        status = record.status.get(version)
        if status is None:
            known = ", ".join(str(v) for v in sorted(record.status)) or "none"
            raise NotFound(f"model '{name}' has no version {version} (versions: {known})")
        raise Unavailable(f"model '{name}' version {version} is not ready (state {status.state}); "
                          "the repository index says why")

    def is_ready(self) -> bool:
        """Every wanted model has a READY version, and none of its LLM engines has died."""
        for name in self.wanted:
            record = self.models.get(name)
            if record is None or not record.ready:
                return False
            if any(mv.engine is not None and not mv.engine.alive for mv in record.ready.values()):
                return False
        return True

    def index(self, ready_only: bool = False) -> list[dict]:
        rows = []
        for name in sorted(set(self.models) | set(self._on_disk())):
            record = self.models.get(name)
            if record is None or not record.status:
                state, reason = (record.state, record.reason) if record else ("UNAVAILABLE", "not loaded")
                rows.append({"name": name, "state": state, "reason": reason})
                continue
            for version, status in sorted(record.status.items()):
                rows.append({"name": name, "version": str(version), "state": status.state, "reason": status.reason})
        return [r for r in rows if r["state"] == "READY"] if ready_only else rows

    def _on_disk(self) -> list[str]:
        if self.root is None:
            return []
        try:
            return model_names(self.root)
        except FileNotFoundError:
            return []

    # -- load / unload ------------------------------------------------------------------------
    async def load_all(self, names: list[str] | None = None) -> None:
        """Load the given models (default: all in the repository), a few at a time."""
        names = names or self._on_disk()
        await asyncio.gather(*(self.load(name) for name in names))

    async def load(self, name: str) -> None:
        """Load (or reload) a model; failures are recorded as UNAVAILABLE with the reason."""
        # never a filesystem path in the answer: the client only learns whether the model exists
        if self.root is None or model_dir(self.root, check_model_name(name)) is None:
            raise NotFound(f"no model '{name}' in the repository")
        self.wanted.add(name)
        record = self.models.setdefault(name, ModelRecord(name))
        async with record.lock:
            await self._load_locked(record)

    async def _load_locked(self, record: ModelRecord) -> None:
        record.state, record.reason = "LOADING", ""
        path = self.root / record.name  # load() checked the name and where the directory resolves
        try:
            config = load_model_config(path)
            versions = config.version_policy.select(version_numbers(path))
        except ConfigError as exc:
            log.error("model %s: bad config: %s", record.name, exc)
            record.state, record.reason = "UNAVAILABLE", str(exc)
            return
        if not versions:
            record.state = "UNAVAILABLE"
            record.reason = f"no version directory of {record.name} matches the version policy"
            return
        loaded = await asyncio.gather(*(self._load_version(record, config, v) for v in versions))
        old = record.ready
        record.config = config
        record.ready = {mv.version: mv for mv in loaded if mv is not None}
        for version in set(record.status) - set(versions):
            del record.status[version]
        record.state = "READY" if record.ready else "UNAVAILABLE"
        record.reason = "" if record.ready else "no version loaded; see the version reasons"
        if unserved := [v for v, _ in config.traffic_split if v not in record.ready]:
            log.warning("model %s: traffic_split names version(s) %s that are not loaded; their share goes to the "
                        "other versions of the split (or to the newest version)", record.name, unserved)
        await self._retire(old.values())

    async def _load_version(self, record: ModelRecord, config: ModelConfig, version: int) -> ModelVersion | None:
        name = record.name
        record.status[version] = VersionStatus("LOADING")
        self.metrics.set_state(name, version, "LOADING")
        log.info("loading model %s version %d ...", name, version)
        started = time.monotonic()
        try:
            effective = load_version_config(config, self.root / name / str(version))
            loaded = await self._build(name, version, self.root / name / str(version), effective)
        except Exception as exc:  # any load failure becomes a reason the index shows
            log.error("model %s version %d failed to load: %s", name, version, exc)
            record.status[version] = VersionStatus("UNAVAILABLE", f"{type(exc).__name__}: {exc}")
            self.metrics.set_state(name, version, "UNAVAILABLE")
            return None
        loaded.load_seconds = time.monotonic() - started
        loaded.metrics.load_duration.set(loaded.load_seconds)
        record.status[version] = VersionStatus("READY")
        self.metrics.set_state(name, version, "READY")
        log.info("loaded model %s version %d in %.2fs", name, version, loaded.load_seconds)
        return loaded

    async def _build(self, name: str, version: int, version_dir: Path, config: ModelConfig) -> ModelVersion:
        async with self._load_slot:
            return await self._build_locked(name, version, version_dir, config)

    async def _build_locked(self, name: str, version: int, version_dir: Path, config: ModelConfig) -> ModelVersion:
        vm = self.metrics.for_version(name, version)
        if config.is_llm:
            if self.llm_loader is None:
                raise RuntimeError("this server was started without LLM support")
            engine = await asyncio.to_thread(self.llm_loader, name, version, version_dir, config)
            engine.start(asyncio.get_running_loop())
            return ModelVersion(name, version, config, (), (), None, vm, 0.0, engine=engine)
        instances = await asyncio.to_thread(create_instances, name, version, version_dir, config)
        batcher = Batcher(f"{name}:{version}", config, instances, observer=vm)
        vm.watch(lambda: len(batcher.queue), lambda: batcher.inflight)
        first = instances[0]
        return ModelVersion(name, version, config, first.inputs, first.outputs, batcher, vm, 0.0)

    async def unload(self, name: str) -> None:
        """Stop serving a model; queued requests finish first."""
        record = self.models.get(check_model_name(name))
        if record is None:
            raise NotFound(f"unknown model '{name}'")
        self.wanted.discard(name)
        async with record.lock:
            old = record.ready
            record.ready = {}
            for version in record.status:
                record.status[version] = VersionStatus("UNLOADING")
                self.metrics.set_state(name, version, "UNLOADING")
            record.state, record.reason = "UNLOADING", ""
            await self._retire(old.values())
            for version in record.status:
                record.status[version] = VersionStatus("UNAVAILABLE", "unloaded")
                self.metrics.set_state(name, version, "UNAVAILABLE")
            record.state, record.reason = "UNAVAILABLE", "unloaded"
            log.info("unloaded model %s", name)

    async def _retire(self, versions) -> None:
        await asyncio.gather(*(mv.close() for mv in versions))

    async def close(self) -> None:
        for name in list(self.models):
            if self.models[name].ready:
                await self.unload(name)
