"""The model host: every served model — repository versions with their batchers, `backend: llm` engines, the
`--model` LLM (a pinned in-memory entry), embeddings — behind one lookup, one lifecycle and one readiness rule.

Invariants: a request only ever reaches a READY version; a (re)load swaps the new versions in only after they
loaded, and the old versions drain their queues before they are closed, so loading or unloading a model never
drops requests (to it or to any other model). Ready = not draining, every wanted model has a READY version, and
every LLM engine of a READY version is alive.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from ladle.config import LLMConfig
from ladle.errors import InvalidInput, NotFound, Unavailable
from ladle.metrics import Metrics
from ladle.repository.layout import check_model_name, is_model_name, model_dir, model_names, version_numbers
from ladle.repository.model_config import ConfigError, ModelConfig, load_model_config, load_version_config
from ladle.serving import traffic
from ladle.serving.builders import build_llm_engine, build_version, llm_parameters, llm_version
from ladle.serving.shadow import Shadow
from ladle.serving.shadow_metrics import ShadowMetrics
from ladle.serving.versions import LLMEngine, ModelRecord, ModelVersion, VersionStatus

log = logging.getLogger(__name__)


class ModelHost:
    def __init__(self, root: Path | None, metrics: Metrics, llm: LLMConfig | None = None) -> None:
        self.root = root
        self.metrics = metrics
        self.llm = llm  # the server's LLM flags: repository LLMs take its speculation options where they set none
        self.models: dict[str, ModelRecord] = {}
        self.wanted: set[str] = set()  # models that should be loaded (readiness)
        self.draining = False  # SIGTERM: not ready any more, whatever the models say
        # runtime traffic splits that replace a config's traffic_split (rollouts write them; serving/rollout.py)
        self.overrides: dict[str, traffic.Split] = {}
        self.shadows: dict[str, Shadow] = {}  # models whose config has `shadow:` (serving/shadow.py)
        self.shadow_metrics = ShadowMetrics(metrics.registry)
        # one load at a time: loads are CPU-bound anyway, and frameworks' lazy imports (transformers)
        # are not safe to race from two threads
        self._load_slot = asyncio.Lock()

    # -- lookups (hot path) -------------------------------------------------------------------
    def get(self, name: str, version: int | None = None, key: str | None = None) -> ModelVersion:
        """The version to serve: the one asked for, or one routed by the model's traffic split (by sticky `key` when
        the request carries one; serving/traffic.py), or the newest READY."""
        record = self.models.get(name)
        if record is None:
            check_model_name(name)  # only on a miss: a name that could never exist is a 400
            raise NotFound(f"unknown model '{name}'; POST /v2/repository/index lists the models")
        if version is None:
            if record.ready:
                return record.route(key, self.overrides.get(name))
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

    def lookup(self, name: str, version: int | None = None,
               key_of: Callable[[str], str | None] | None = None) -> ModelVersion:
        """What every protocol adapter asks: the version a request goes to. `key_of(sticky_key)` reads the request's
        sticky key (a header, metadata entry, parameter or field of that name) when the model has one; it is cut to
        traffic.MAX_KEY_CHARS, since keys are hashed on the event loop."""
        mv = self.get(name, version)
        sticky = mv.config.sticky_key
        if version is not None or sticky is None or key_of is None:
            return mv
        key = key_of(sticky)
        return self.get(name, key=None if key is None else key[: traffic.MAX_KEY_CHARS])

    def ready_versions(self, name: str) -> list[int]:
        record = self.models.get(name)
        return sorted(record.ready) if record is not None else []

    def llm_engines(self) -> dict[str, LLMEngine]:
        """Every servable LLM by name, a model by its newest READY version (what /v1/models describes)."""
        served = {}
        for name, record in self.models.items():
            if record.ready:
                newest = record.ready[max(record.ready)]
                if newest.engine is not None:
                    served[name] = newest.engine
        return served

    def llm_version(self, name: str, key_of: Callable[[str], str | None] | None = None) -> ModelVersion | None:
        """The LLM version a request to `name` goes to (traffic split, sticky key: see `lookup`); None when `name` is
        no model that ever loaded a config, or not an LLM. A known model that is not ready raises Unavailable (503)."""
        record = self.models.get(name)
        if record is None or record.config is None:
            return None
        mv = self.lookup(name, None, key_of)
        return mv if mv.engine is not None else None

    # -- traffic: splits and their runtime overrides -------------------------------------------------
    def split_of(self, name: str) -> tuple[traffic.Split, str]:
        """The split requests to `name` follow now and where it comes from: "rollout" (a runtime override),
        "config" (config.yaml's traffic_split) or "newest" (no split: the newest READY version)."""
        if name in self.overrides:
            return self.overrides[name], "rollout"
        record = self.models.get(name)
        split = record.config.traffic_split if record is not None and record.config is not None else ()
        return split, "config" if split else "newest"

    def set_override(self, name: str, split: traffic.Split | None) -> None:
        """Replace `name`'s traffic split at run time (None: back to config.yaml's). Survives reloads of the model."""
        if split is None:
            self.overrides.pop(name, None)
        else:
            self.overrides[name] = split

    # -- shadow traffic ---------------------------------------------------------------------------------
    def shadow_for(self, primary: ModelVersion) -> tuple[Shadow, ModelVersion] | None:
        """The shadow and its candidate version when the request `primary` answered is to be copied (a draw)."""
        shadow = self.shadows.get(primary.name)
        if shadow is None:
            return None
        target = self.version(primary.name, shadow.options.version)
        if target is None or not shadow.draw(primary, _busy(primary)):
            return None
        return shadow, target

    def _update_shadow(self, record: ModelRecord) -> Shadow | None:
        """After a (re)load: the model's Shadow follows its config (counts and samples survive a reload); returns
        a Shadow that is no longer wanted, to close."""
        options = record.config.shadow if record.config is not None else None
        if options is None:
            return self.shadows.pop(record.name, None)
        shadow = self.shadows.get(record.name)
        if shadow is None:
            self.shadows[record.name] = Shadow(record.name, options, self.shadow_metrics)
        else:
            shadow.options = options
        if options.version not in record.ready:
            log.warning("model %s: shadow version %d is not loaded (list it in version_policy); no requests are "
                        "copied until it is", record.name, options.version)
        return None

    def version(self, name: str, version: int) -> ModelVersion | None:
        """A READY version, or None (no lookup side effects: for rollouts and shadows watching a version)."""
        record = self.models.get(name)
        return record.ready.get(version) if record is not None else None

    def is_ready(self) -> bool:
        """The readiness rule (also read from the --health-port thread: it only takes snapshots of the dicts)."""
        if self.draining:
            return False
        records = tuple(self.models.values())
        for record in records:
            if any(mv.engine is not None and not mv.engine.alive for mv in tuple(record.ready.values())):
                return False
        for name in tuple(self.wanted):
            record = self.models.get(name)
            if record is None or not record.ready:
                return False
        return True

    def relax_readiness(self) -> None:
        """--no-strict-readiness: what start-up could not load does not hold readiness back."""
        self.wanted.clear()

    def index(self, ready_only: bool = False) -> list[dict]:
        rows = []
        for name in sorted(set(self.models) | set(self._on_disk())):
            record = self.models.get(name)
            if record is None or not record.status:
                state, reason = (record.state, record.reason) if record else ("UNAVAILABLE", "not loaded")
                rows.append({"name": name, "state": state, "reason": reason})
                continue
            split = self._split_row(name)
            for version, status in sorted(record.status.items()):
                rows.append({"name": name, "version": str(version), "state": status.state, "reason": status.reason,
                             **split})
        return [r for r in rows if r["state"] == "READY"] if ready_only else rows

    def _split_row(self, name: str) -> dict:
        """What the index says of a model's split (nothing when it has none): the weights in percent, and whether
        config.yaml or a rollout set them."""
        split, source = self.split_of(name)
        if not split:
            return {}
        return {"traffic_split": {str(v): round(w, 4) for v, w in traffic.normalized(split)}, "split_source": source}

    def _on_disk(self) -> list[str]:
        if self.root is None:
            return []
        try:
            return model_names(self.root)
        except FileNotFoundError:
            return []

    # -- the --model LLM ----------------------------------------------------------------------------
    def pin_llm(self, llm: LLMConfig) -> str:
        """Build the --model engine now (blocking, before the port is bound: a checkpoint that cannot load stops
        start-up) as version 1 of an in-memory `backend: llm` entry; `start` starts it. Returns its name."""
        from ladle.llm.factory import resolve_model_dir  # torch: only when an LLM is served

        checkpoint = resolve_model_dir(llm.model)
        name = llm.served_model_name or checkpoint.name
        if self.root is not None and is_model_name(name) and model_dir(self.root, name) is not None:
            raise ValueError(f"the repository has a model named '{name}' too; give --served-model-name another name")
        config = ModelConfig(name=name, backend="llm", parameters=llm_parameters(llm))
        started = time.monotonic()
        mv = llm_version(self.metrics, name, 1, config, build_llm_engine(
            self.metrics, name, checkpoint, config, window=(vm := self.metrics.for_version(name, 1)).window), vm)
        mv.load_seconds = time.monotonic() - started
        mv.metrics.load_duration.set(mv.load_seconds)
        self.models[name] = ModelRecord(name, config, {1: mv}, {1: VersionStatus("READY")}, "READY", pinned=True)
        self.metrics.set_state(name, 1, "READY")
        self.wanted.add(name)
        return name

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the engines built before the loop ran (--model)."""
        for record in self.models.values():
            if record.pinned:
                for mv in record.ready.values():
                    if mv.engine is not None:
                        mv.engine.start(loop)

    # -- load / unload ------------------------------------------------------------------------
    async def load_all(self, names: list[str] | None = None) -> None:
        """Load the given models (default: all in the repository), a few at a time."""
        names = names or self._on_disk()
        await asyncio.gather(*(self.load(name) for name in names))

    async def load(self, name: str) -> str | None:
        """Load (or reload) a model; failures are recorded as UNAVAILABLE with the reason, which is returned
        (None when a version is READY)."""
        self._refuse_pinned(name, "loaded or reloaded")
        # never a filesystem path in the answer: the client only learns whether the model exists
        if self.root is None or model_dir(self.root, check_model_name(name)) is None:
            raise NotFound(f"no model '{name}' in the repository")
        self.wanted.add(name)
        record = self.models.setdefault(name, ModelRecord(name))
        async with record.lock:
            await self._load_locked(record)
        if record.ready:
            return None
        reasons = [f"version {v}: {s.reason}" for v, s in sorted(record.status.items()) if s.reason]
        return "; ".join(reasons) or record.reason

    def _refuse_pinned(self, name: str, what: str) -> None:
        record = self.models.get(name)
        if record is not None and record.pinned:
            raise InvalidInput(f"model '{name}' was given with --model: it is served for the life of the process "
                               f"and cannot be {what} through the repository API; restart ladle to change it")

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
        if unserved := [v for v, _ in self.split_of(record.name)[0] if v not in record.ready]:
            log.warning("model %s: traffic_split names version(s) %s that are not loaded; their share goes to the "
                        "other versions of the split (or to the newest version)", record.name, unserved)
        dropped = self._update_shadow(record)
        await _retire(old.values())
        if dropped is not None:
            await dropped.close()

    async def _load_version(self, record: ModelRecord, config: ModelConfig, version: int) -> ModelVersion | None:
        name = record.name
        self._set_status(record, version, "LOADING")
        log.info("loading model %s version %d ...", name, version)
        started = time.monotonic()
        try:
            version_dir = self.root / name / str(version)
            effective = load_version_config(config, version_dir)
            async with self._load_slot:
                loaded = await build_version(self.metrics, name, version, version_dir, effective, self.llm)
        except Exception as exc:  # any load failure becomes a reason the index shows
            log.error("model %s version %d failed to load: %s", name, version, exc)
            self._set_status(record, version, "UNAVAILABLE", f"{type(exc).__name__}: {exc}")
            return None
        loaded.load_seconds = time.monotonic() - started
        loaded.metrics.load_duration.set(loaded.load_seconds)
        self._set_status(record, version, "READY")
        log.info("loaded model %s version %d in %.2fs", name, version, loaded.load_seconds)
        return loaded

    def _set_status(self, record: ModelRecord, version: int, state: str, reason: str = "") -> None:
        record.status[version] = VersionStatus(state, reason)
        self.metrics.set_state(record.name, version, state)

    async def unload(self, name: str) -> None:
        """Stop serving a model; queued requests finish first."""
        record = self.models.get(check_model_name(name))
        if record is None:
            raise NotFound(f"unknown model '{name}'")
        self._refuse_pinned(name, "unloaded")
        await self._unload(record)

    async def _unload(self, record: ModelRecord) -> None:
        self.wanted.discard(record.name)
        async with record.lock:
            old = record.ready
            record.ready = {}
            for version in record.status:
                self._set_status(record, version, "UNLOADING")
            record.state, record.reason = "UNLOADING", ""
            shadow = self.shadows.pop(record.name, None)
            if shadow is not None:
                await shadow.close()
            await _retire(old.values())
            for version in record.status:
                self._set_status(record, version, "UNAVAILABLE", "unloaded")
            record.state, record.reason = "UNAVAILABLE", "unloaded"
            log.info("unloaded model %s", record.name)

    async def close(self) -> None:
        """Shutdown: every model (the --model one too) drains its queue, then stops."""
        for record in list(self.models.values()):
            if record.ready:
                await self._unload(record)


def _busy(mv: ModelVersion) -> bool:
    """Whether a version has a backlog (more queued than one batch, or LLM sequences waiting): then no shadow copy
    is made — under load the shadow is shed first."""
    if mv.batcher is not None:
        return len(mv.batcher.queue) > max(mv.config.max_batch_size, 1)
    return getattr(mv.engine, "waiting_sequences", 0) > 0


async def _retire(versions: Iterable[ModelVersion]) -> None:
    await asyncio.gather(*(mv.close() for mv in versions))
