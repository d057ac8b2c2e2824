"""The composition root: logging, LLM engines given on the command line, the repository's LLM loader,
and uvicorn with the fastest event loop and HTTP parser available.

Invariant: an LLM named by --model that cannot load stops start-up with a clear message (exit 1),
before the port is bound, so an orchestrator never routes to a half-working server.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from pathlib import Path

import uvicorn

from ladle.api.app import create_app
from ladle.config import LLMConfig, ServerConfig
from ladle.logs import setup_logging
from ladle.metrics import LLMMetricFamilies, Metrics
from ladle.repository.model_config import ConfigError, ModelConfig

log = logging.getLogger("ladle")


def serve(config: ServerConfig) -> int:
    setup_logging(config.http.log_level, config.http.log_format)
    metrics = Metrics()
    try:
        engines = _command_line_engines(config.llm, metrics.llm)
    except Exception as exc:  # a bad checkpoint or option: say so plainly and exit
        log.error("cannot serve --model %s: %s", config.llm.model, exc)
        return 1
    app = create_app(config, metrics, engines, repository_llm_loader(metrics.llm))
    has = importlib.util.find_spec
    uv_config = uvicorn.Config(
        app,
        host=config.http.host,
        port=config.http.port,
        loop="uvloop" if has("uvloop") else "asyncio",
        http="httptools" if has("httptools") else "h11",
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=30,
    )
    server = uvicorn.Server(uv_config)
    server.run()
    return 0 if server.started else 1


def _command_line_engines(config: LLMConfig, families: LLMMetricFamilies) -> dict:
    if not config.model:
        return {}
    from ladle.llm.factory import build_engine, resolve_model_dir

    model_dir = resolve_model_dir(config.model)
    name = config.served_model_name or model_dir.name
    return {name: build_engine(config, name, model_dir, families)}


def llm_config_from_parameters(parameters: dict, model_dir: Path, where: str) -> LLMConfig:
    """An LLMConfig from a repository model's `parameters` (the CLI flags' names, underscored)."""
    known = {f.name for f in dataclasses.fields(LLMConfig)} - {"model"}
    unknown = set(parameters) - known
    if unknown:
        raise ConfigError(where, f"parameters.{sorted(unknown)[0]}", f"one of {sorted(known)}")
    return LLMConfig(model=str(model_dir), **parameters)


def repository_llm_loader(families: LLMMetricFamilies):
    """The registry's hook for `backend: llm` models: each version directory is a checkpoint."""

    def load(name: str, version: int, version_dir: Path, config: ModelConfig):
        from ladle.llm.factory import build_engine

        llm_config = llm_config_from_parameters(dict(config.parameters), version_dir, str(version_dir.parent))
        return build_engine(llm_config, name, version_dir, families)

    return load
