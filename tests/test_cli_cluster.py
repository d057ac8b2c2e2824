"""`ladle serve`'s --ray flags (cli.py, options.py's nargs/const/metavar passthrough): parsing, the problems caught
before anything starts (exit 2), and the validation of a model's own `cluster:` block in config.yaml."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

import ladle.server
from ladle.cli import build_parser, build_server_config, cluster_problem, main
from ladle.config import ClusterConfig, ServerConfig
from ladle.repository.model_config import ClusterOptions, ConfigError, ModelConfig, load_model_config


def parse(*argv: str) -> ClusterConfig:
    return build_server_config(build_parser().parse_args(["serve", *argv])).cluster


@pytest.fixture(autouse=True)
def no_keys_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LADLE_API_KEY", raising=False)
    monkeypatch.delenv("LADLE_ADMIN_KEY", raising=False)


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[ServerConfig]:
    """ladle.server.serve replaced by a recorder: what `ladle serve` would have started with, if anything."""
    calls: list[ServerConfig] = []

    def serve(config: ServerConfig) -> int:
        calls.append(config)
        return 0

    monkeypatch.setattr(ladle.server, "serve", serve)
    return calls


# -- parsing -------------------------------------------------------------------------------------------------------


def test_no_ray_by_default() -> None:
    cluster = parse("repo")
    assert cluster == ClusterConfig()
    assert cluster.ray is None and cluster.replicas == 1 and not cluster.autoscaling


def test_ray_alone_means_auto() -> None:
    assert parse("repo", "--ray").ray == "auto"
    assert parse("--ray", "--replicas", "2", "repo").ray == "auto"  # followed by another flag


def test_ray_address_is_kept() -> None:
    assert parse("repo", "--ray", "10.0.0.1:6379").ray == "10.0.0.1:6379"
    assert parse("repo", "--ray=ray://head:10001").ray == "ray://head:10001"
    assert parse("repo", "--ray", "auto").ray == "auto"


def test_ray_flags_parse_to_their_types() -> None:
    cluster = parse("repo", "--ray", "--min-replicas", "2", "--max-replicas", "5", "--target-ongoing-requests", "3.5",
                    "--num-cpus", "0.5", "--num-gpus", "1", "--max-ongoing-requests", "9", "--max-queued-requests",
                    "11", "--llm-routing", "power-of-two", "--prefix-imbalance", "4", "--upscale-delay", "1.5",
                    "--downscale-delay", "20")
    assert cluster == ClusterConfig(ray="auto", min_replicas=2, max_replicas=5, target_ongoing_requests=3.5,
                                    num_cpus=0.5, num_gpus=1.0, max_ongoing_requests=9, max_queued_requests=11,
                                    llm_routing="power-of-two", prefix_imbalance=4, upscale_delay=1.5,
                                    downscale_delay=20.0)
    assert cluster.autoscaling


def test_llm_routing_choices_are_enforced(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse("repo", "--ray", "--llm-routing", "random")
    assert exit_.value.code == 2
    assert "--llm-routing" in capsys.readouterr().err


def test_help_shows_the_ray_metavar() -> None:
    text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()  # type: ignore[union-attr]
    assert "--ray [auto|ADDRESS]" in text


# -- problems caught before anything starts ------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "words"), [
    (["--replicas", "2"], "need --ray"),
    (["--min-replicas", "2"], "need --ray"),
    (["--max-replicas", "3"], "need --ray"),
    (["--ray", "--min-replicas", "4", "--max-replicas", "2"], "--max-replicas (2) is below --min-replicas (4)"),
    (["--ray", "--replicas", "0"], "at least 1"),
    (["--ray", "--min-replicas", "0"], "at least 1"),
    (["--replicas", "-1"], "at least 1"),
])
def test_bad_ray_flags_exit_2_before_starting(argv: list[str], words: str, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str], started: list[ServerConfig]) -> None:
    assert main(["serve", str(tmp_path), *argv]) == 2
    assert words in capsys.readouterr().err
    assert started == []


def test_good_ray_flags_reach_the_server(tmp_path: Path, started: list[ServerConfig]) -> None:
    assert main(["serve", str(tmp_path), "--ray", "--replicas", "2"]) == 0
    assert len(started) == 1
    assert (started[0].cluster.ray, started[0].cluster.replicas) == ("auto", 2)
    assert started[0].repository.repository == tmp_path


def test_one_replica_without_ray_is_fine(tmp_path: Path, started: list[ServerConfig]) -> None:
    assert main(["serve", str(tmp_path), "--replicas", "1"]) == 0
    assert started[0].cluster.ray is None


@pytest.mark.parametrize(("cluster", "on_ray", "problem"), [
    (ClusterConfig(), False, None),
    (ClusterConfig(ray="auto", replicas=4), True, None),
    (ClusterConfig(ray="auto", min_replicas=2, max_replicas=2), True, None),
    (ClusterConfig(ray="auto", max_replicas=3), True, None),
    (ClusterConfig(replicas=2), False, "--replicas, --min-replicas and --max-replicas need --ray"),
    (ClusterConfig(replicas=2), True, None),  # serve_app: on Ray without --ray
    (ClusterConfig(ray="auto", min_replicas=3, max_replicas=1), True, "--max-replicas (1) is below"),
    (ClusterConfig(ray="auto", replicas=0), True, "--replicas, --min-replicas and --max-replicas must be at least 1"),
])
def test_cluster_problem(cluster: ClusterConfig, on_ray: bool, problem: str | None) -> None:
    found = cluster_problem(cluster, on_ray=on_ray)
    if problem is None:
        assert found is None
    else:
        assert found is not None and found.startswith(problem)


def test_max_replicas_below_one_is_a_problem() -> None:
    assert cluster_problem(ClusterConfig(ray="auto", max_replicas=0), on_ray=True) is not None


# -- a model's cluster: block --------------------------------------------------------------------------------------


def model(cluster: Any) -> ModelConfig:
    return ModelConfig.model_validate({"name": "m", "backend": "onnx", "cluster": cluster})


def test_cluster_block_defaults_to_all_unset() -> None:
    assert ModelConfig.model_validate({"name": "m", "backend": "onnx"}).cluster == ClusterOptions()
    assert all(value is None for value in ClusterOptions().model_dump().values())


def test_cluster_block_fields() -> None:
    own = model({"replicas": 2, "min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 4,
                 "num_cpus": 0.5, "num_gpus": 1, "max_ongoing_requests": 8}).cluster
    assert (own.replicas, own.min_replicas, own.max_replicas, own.target_ongoing_requests) == (2, 1, 3, 4.0)
    assert (own.num_cpus, own.num_gpus, own.max_ongoing_requests) == (0.5, 1.0, 8)


@pytest.mark.parametrize("cluster", [
    {"min_replicas": 3, "max_replicas": 2},
    {"replicas": 0},
    {"min_replicas": 0},
    {"max_replicas": 0},
    {"replicas": "2"},  # YAML's quoted number is not silently an int
    {"replicas": 1.5},
    {"replicas": True},
    {"num_cpus": -1},
    {"target_ongoing_requests": 0},
    {"max_ongoing_requests": 0},
    {"replica": 2},  # a typo
    "two replicas",
])
def test_bad_cluster_blocks_are_rejected(cluster: Any) -> None:
    with pytest.raises(ValidationError):
        model(cluster)


def write_config(tmp_path: Path, text: str) -> Path:
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.yaml").write_text(text)
    return model_dir


def test_max_below_min_names_the_field(tmp_path: Path) -> None:
    model_dir = write_config(tmp_path, "backend: onnx\ncluster:\n  min_replicas: 3\n  max_replicas: 2\n")
    with pytest.raises(ConfigError) as error:
        load_model_config(model_dir)
    assert error.value.field == "cluster.max_replicas"
    assert "max_replicas >= min_replicas (3)" in error.value.expected
    assert str(model_dir / "config.yaml") in str(error.value)


def test_unknown_cluster_field_lists_the_known_ones(tmp_path: Path) -> None:
    model_dir = write_config(tmp_path, "backend: onnx\ncluster:\n  replica: 2\n")
    with pytest.raises(ConfigError) as error:
        load_model_config(model_dir)
    assert error.value.field == "cluster.replica"
    assert "unknown field" in error.value.expected and "'replicas'" in error.value.expected


def test_zero_replicas_names_the_field(tmp_path: Path) -> None:
    model_dir = write_config(tmp_path, "backend: onnx\ncluster:\n  replicas: 0\n")
    with pytest.raises(ConfigError) as error:
        load_model_config(model_dir)
    assert error.value.field == "cluster.replicas"


def test_a_good_cluster_block_loads(tmp_path: Path) -> None:
    model_dir = write_config(tmp_path, "backend: llm\ncluster:\n  min_replicas: 1\n  max_replicas: 4\n  num_gpus: 1\n")
    own = load_model_config(model_dir).cluster
    assert (own.min_replicas, own.max_replicas, own.num_gpus) == (1, 4, 1.0)
