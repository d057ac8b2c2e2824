"""The front end's view of the models it serves on Ray: what each one is (read from the repository on disk, or the
--model LLM), the config its replicas start with, and its state as Ray Serve last reported it. No ray import.

Invariant: a replica's config names one model and absolute paths (a replica's working directory is not ours), and
carries no keys (the front end checks them; replicas are reached only through Ray).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ladle.config import ClusterConfig, RepositoryConfig, SecurityConfig, ServerConfig
from ladle.repository.model_config import ModelConfig


@dataclass
class ServedModel:
    name: str
    config: ModelConfig | None  # None: its config.yaml is invalid (reason says why)
    pinned: bool = False  # the --model LLM: not loadable or unloadable through the repository API
    generation: int = 0  # bumped on every (re)load: Serve then starts fresh replicas
    reason: str = ""  # why it is not deployed (a bad config), or Serve's last failure message
    handle: object | None = None  # its Serve application's DeploymentHandle, once deployed

    @property
    def kind(self) -> str:
        if self.config is None:
            return "unknown"
        if self.config.is_llm:
            return "llm"
        return "embeddings" if self.config.backend == "sentence_transformers" else "classic"


@dataclass(frozen=True)
class AppState:
    """One model's deployment as `serve.status()` last described it."""

    status: str  # the deployment's: UPDATING, HEALTHY, UPSCALING, DOWNSCALING, DEPLOY_FAILED, UNHEALTHY; or DELETING
    message: str
    running: int  # replicas RUNNING
    total: int  # replicas in any state


def replica_config(config: ServerConfig, model: ServedModel) -> ServerConfig:
    """The ServerConfig one replica of `model` runs with."""
    llm = config.llm
    if model.pinned:
        repository = RepositoryConfig(repository=None)
        llm = dataclasses.replace(llm, model=_absolute(llm.model))
    else:
        root = config.repository.repository
        repository = RepositoryConfig(repository=Path(root).resolve() if root else None, load_model=(model.name,))
        llm = dataclasses.replace(llm, model=None)
    llm = dataclasses.replace(llm, speculative_model=_absolute(llm.speculative_model))
    return dataclasses.replace(config, repository=repository, llm=llm, security=SecurityConfig(),
                               cluster=ClusterConfig())


def state_of(model: ServedModel, app: AppState | None, wanted: bool) -> tuple[str, str]:
    """(KServe repository state, reason) of a model from its application's state."""
    if model.config is None:
        return "UNAVAILABLE", model.reason
    if app is None:
        return ("LOADING", "") if wanted else ("UNAVAILABLE", model.reason or "not loaded")
    if app.running > 0 and app.status not in ("DELETING",):
        return "READY", ""
    if app.status == "DELETING":
        return "UNLOADING", ""
    if app.status in ("DEPLOY_FAILED", "UNHEALTHY"):
        return "UNAVAILABLE", app.message or "its replicas failed to start"
    return "LOADING", ""


def _absolute(path: str | None) -> str | None:
    if path is None:
        return None
    local = Path(path).expanduser()
    return str(local.resolve()) if local.exists() else path  # a hub id stays as it is
