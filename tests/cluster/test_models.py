"""The front end's model records (cluster/models.py): the config a replica starts with (one model, absolute paths,
no keys, no cluster flags), a model's repository state from its Serve deployment's, and its kind."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from ladle.cluster.models import AppState, ServedModel, replica_config, state_of
from ladle.config import ClusterConfig, HTTPConfig, LLMConfig, RepositoryConfig, SecurityConfig, ServerConfig
from ladle.repository.model_config import ModelConfig


def config(backend: str = "onnx") -> ModelConfig:
    return ModelConfig.model_validate({"name": "m", "backend": backend})


def server(repository: Path | None, llm: LLMConfig | None = None, **parts: Any) -> ServerConfig:
    return ServerConfig(
        repository=RepositoryConfig(repository=repository, load_model=("a", "b"), strict_readiness=False),
        llm=llm or LLMConfig(),
        security=SecurityConfig(api_key=("sk-user",), admin_key=("sk-admin",)),
        cluster=ClusterConfig(ray="10.0.0.1:6379", replicas=3, min_replicas=2, max_replicas=9),
        **parts,
    )


# -- replica_config ------------------------------------------------------------------------------------------------


def test_repository_model_replica_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path)
    http = HTTPConfig(port=9999)
    cfg = server(Path("repo"), LLMConfig(model="some/hub-id", max_num_seqs=7), http=http)
    out = replica_config(cfg, ServedModel("resnet", config()))
    assert out.repository.repository == (tmp_path / "repo").resolve()
    assert out.repository.repository.is_absolute()
    assert out.repository.load_model == ("resnet",)  # one model, whatever the server loads
    assert out.llm.model is None  # the --model LLM is not this replica's
    assert out.llm.max_num_seqs == 7  # the engine flags travel
    assert out.http == http
    assert out.security == SecurityConfig()
    assert not out.security.api_key and not out.security.admin_key
    assert out.cluster == ClusterConfig()
    assert out.cluster.ray is None and not out.cluster.autoscaling


def test_replica_config_without_a_repository() -> None:
    out = replica_config(server(None), ServedModel("m", config()))
    assert out.repository.repository is None and out.repository.load_model == ("m",)


def test_pinned_model_replica_config_has_an_absolute_checkpoint(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "draft").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = server(Path("."), LLMConfig(model="ckpt", speculative_model="draft", served_model_name="chat"))
    out = replica_config(cfg, ServedModel("chat", config("llm"), pinned=True))
    assert out.repository.repository is None and out.repository.load_model == ()
    assert out.llm.model == str((tmp_path / "ckpt").resolve())
    assert out.llm.speculative_model == str((tmp_path / "draft").resolve())
    assert out.llm.served_model_name == "chat"
    assert out.security == SecurityConfig() and out.cluster == ClusterConfig()


def test_pinned_hub_ids_stay_as_they_are(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = server(None, LLMConfig(model="org/model", speculative_model="org/draft"))
    out = replica_config(cfg, ServedModel("model", config("llm"), pinned=True))
    assert (out.llm.model, out.llm.speculative_model) == ("org/model", "org/draft")


def test_speculative_model_is_absolute_for_repository_models_too(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "draft").mkdir()
    monkeypatch.chdir(tmp_path)
    out = replica_config(server(tmp_path, LLMConfig(speculative_model="draft")), ServedModel("m", config("llm")))
    assert out.llm.speculative_model == str((tmp_path / "draft").resolve())


def test_replica_config_leaves_the_servers_config_alone(tmp_path: Path) -> None:
    cfg = server(tmp_path, LLMConfig(model="org/model"))
    before = dataclasses.replace(cfg)
    replica_config(cfg, ServedModel("m", config()))
    assert cfg == before and cfg.security.api_key == ("sk-user",)


# -- state_of ------------------------------------------------------------------------------------------------------


def app(status: str, running: int = 0, total: int = 1, message: str = "") -> AppState:
    return AppState(status, message, running, total)


GOOD = ServedModel("m", config())


def test_bad_config_is_unavailable_with_its_reason() -> None:
    broken = ServedModel("m", None, reason="config.yaml: field 'backend': one of ...")
    assert state_of(broken, app("HEALTHY", 1), True) == ("UNAVAILABLE", "config.yaml: field 'backend': one of ...")
    assert state_of(broken, None, False) == ("UNAVAILABLE", broken.reason)


def test_no_deployment_wanted_is_loading() -> None:
    assert state_of(GOOD, None, True) == ("LOADING", "")


def test_no_deployment_not_wanted_is_unavailable() -> None:
    assert state_of(GOOD, None, False) == ("UNAVAILABLE", "not loaded")
    failed = ServedModel("m", config(), reason="no replica started")
    assert state_of(failed, None, False) == ("UNAVAILABLE", "no replica started")


@pytest.mark.parametrize("status", ["HEALTHY", "UPSCALING", "DOWNSCALING", "UPDATING", "UNHEALTHY", "RUNNING"])
def test_a_running_replica_is_ready(status: str) -> None:
    assert state_of(GOOD, app(status, running=1, total=3), True) == ("READY", "")


@pytest.mark.parametrize("running", [0, 2])
def test_deleting_is_unloading(running: int) -> None:
    assert state_of(GOOD, app("DELETING", running=running), True) == ("UNLOADING", "")


@pytest.mark.parametrize("status", ["DEPLOY_FAILED", "UNHEALTHY"])
def test_failed_without_running_replicas_is_unavailable(status: str) -> None:
    assert state_of(GOOD, app(status, message="OOM in __init__"), True) == ("UNAVAILABLE", "OOM in __init__")
    assert state_of(GOOD, app(status), True) == ("UNAVAILABLE", "its replicas failed to start")


@pytest.mark.parametrize("status", ["UPDATING", "UPSCALING", "HEALTHY", "NOT_STARTED", "DEPLOYING"])
def test_no_running_replica_yet_is_loading(status: str) -> None:
    assert state_of(GOOD, app(status, running=0, total=2), False) == ("LOADING", "")


# -- kind ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("backend", "kind"), [("llm", "llm"), ("sentence_transformers", "embeddings"),
                                               ("onnx", "classic"), ("sklearn", "classic"), ("python", "classic")])
def test_kind(backend: str, kind: str) -> None:
    assert ServedModel("m", config(backend)).kind == kind


def test_unknown_kind_without_a_config() -> None:
    assert ServedModel("m", None, reason="bad").kind == "unknown"


def test_served_model_defaults() -> None:
    m = ServedModel("m", config())
    assert (m.pinned, m.generation, m.reason, m.handle) == (False, 0, "", None)
