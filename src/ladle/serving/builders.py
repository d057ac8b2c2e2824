"""Building one loaded ModelVersion from a version directory: a batcher over instances (classic models and
embeddings) or an LLM engine (backend: llm). Blocking model work runs off the event loop.

Invariant: llm/ (which imports torch) is imported only when an LLM is built, so a classic-only server never
loads torch for it; a version is returned only once it can serve.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import threading
from pathlib import Path
from typing import Any

from ladle.batching.batcher import Batcher
from ladle.batching.instances import Instance, create_instances
from ladle.config import INHERITED_FIELDS, LLMConfig
from ladle.metrics import Metrics, VersionMetrics
from ladle.repository.model_config import ConfigError, ModelConfig
from ladle.serving.versions import LLMEngine, ModelVersion, TokenCounter
from ladle.windows import RequestWindow


def llm_config_from_parameters(parameters: dict, model_dir: Path, where: str,
                               server: LLMConfig | None = None) -> LLMConfig:
    """An LLMConfig from a `backend: llm` model's `parameters` (the CLI flags' names, underscored). Speculation
    options and batch_share it leaves unset come from the server's flags (`server`); a relative speculative_model is
    read from the model's directory (`where`)."""
    fields = {f.name: f for f in dataclasses.fields(LLMConfig) if f.name != "model"}
    unknown = set(parameters) - set(fields)
    if unknown:
        raise ConfigError(where, f"parameters.{sorted(unknown)[0]}", f"one of {sorted(fields)}")
    for name, value in parameters.items():  # the flags' choices bind a config file too
        choices = fields[name].metadata.get("choices")
        if choices is not None and value is not None and value not in choices:
            raise ConfigError(where, f"parameters.{name}", f"one of {list(choices)}, not {value!r}")
    parameters = dict(parameters)
    draft = parameters.get("speculative_model")
    if draft and not Path(draft).expanduser().is_absolute():
        parameters["speculative_model"] = str(Path(where) / draft)
    for name in INHERITED_FIELDS:
        if parameters.get(name) is None and server is not None:
            parameters[name] = getattr(server, name)
    return LLMConfig(model=str(model_dir), **parameters)


def llm_parameters(llm: LLMConfig) -> dict[str, Any]:
    """The inverse for `--model`: its command-line options as the `parameters` of an in-memory `backend: llm` entry."""
    parameters = {f.name: getattr(llm, f.name) for f in dataclasses.fields(LLMConfig) if f.name != "model"}
    if llm.speculative_model:  # a flag's relative path is the working directory's, not the checkpoint's
        parameters["speculative_model"] = str(Path(llm.speculative_model).expanduser().absolute())
    return parameters


def build_llm_engine(metrics: Metrics, name: str, version_dir: Path, config: ModelConfig,
                     server: LLMConfig | None = None, version: int = 1,
                     window: RequestWindow | None = None) -> LLMEngine:
    """Load a checkpoint into an engine, not started (blocking: call off the event loop, or before it runs). Its
    metrics carry the version label; it records finished requests into `window` (the version's, for rollouts)."""
    from ladle.llm.factory import build_engine  # torch: only when an LLM is served

    llm_config = llm_config_from_parameters(dict(config.parameters), version_dir, str(version_dir.parent), server)
    return build_engine(llm_config, name, version_dir, metrics.llm, str(version), window)


def llm_version(metrics: Metrics, name: str, version: int, config: ModelConfig, engine: LLMEngine,
                vm: VersionMetrics | None = None) -> ModelVersion:
    """`vm`: the version's metrics whose window the engine records into (made here when the caller made none)."""
    vm = vm if vm is not None else metrics.for_version(name, version)
    return ModelVersion(name, version, config, (), (), None, vm, 0.0, engine=engine)


async def build_version(metrics: Metrics, name: str, version: int, version_dir: Path,
                        config: ModelConfig, server_llm: LLMConfig | None = None) -> ModelVersion:
    """Load one version, ready to serve (an LLM engine is started on the running loop); `server_llm`: the server's
    LLM flags, whose speculation options apply where the model's config sets none."""
    if config.is_llm:
        vm = metrics.for_version(name, version)  # first: the engine records into this version's window
        engine = await asyncio.to_thread(build_llm_engine, metrics, name, version_dir, config, server_llm, version,
                                         vm.window)
        engine.start(asyncio.get_running_loop())
        return llm_version(metrics, name, version, config, engine, vm)
    instances, counter = await asyncio.to_thread(_load_instances, name, version, version_dir, config)
    vm = metrics.for_version(name, version)
    batcher = Batcher(f"{name}:{version}", config, instances, observer=vm)
    vm.watch(lambda: len(batcher.queue), lambda: batcher.inflight)
    first = instances[0]
    return ModelVersion(name, version, config, first.inputs, first.outputs, batcher, vm, 0.0, count_tokens=counter)


def _load_instances(name: str, version: int, version_dir: Path,
                    config: ModelConfig) -> tuple[list[Instance], TokenCounter | None]:
    instances = create_instances(name, version, version_dir, config)
    return instances, token_counter(instances[0]) if config.backend == "sentence_transformers" else None


def token_counter(instance: Instance) -> TokenCounter | None:
    """Counts tokens as the encoder's own tokenizer does (special tokens and truncation included), on a private
    copy: sentence-transformers sets truncation on the shared tokenizer per call, so one tokenizer is never used
    from two threads. None when the model lives in a worker process (instance_kind: process)."""
    model = getattr(getattr(instance, "runtime", None), "model", None)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None or not callable(tokenizer):
        return None
    private = copy.deepcopy(tokenizer)
    max_length = getattr(model, "max_seq_length", None)
    lock = threading.Lock()

    def count(texts: list[str]) -> int:
        stripped = [text.strip() for text in texts]  # as sentence-transformers' Transformer.tokenize does
        with lock:
            encoded = private(stripped, truncation=max_length is not None, max_length=max_length)
        return sum(len(ids) for ids in encoded["input_ids"])

    return count
