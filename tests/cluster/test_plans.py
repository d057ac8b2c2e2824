"""Deployment plans (cluster/plans.py): the Ray Serve options of each model from the server's --ray flags and the
model's own `cluster:` block — replicas or autoscaling, resources, queue bounds, the router — checked exactly, and
checked against Ray Serve's own option validation (no cluster needed)."""

from __future__ import annotations

import warnings
from typing import Any

import pytest

from ladle.cluster.plans import APP_PREFIX, ROUTER, SERVE_ENV, app_name, plan, serve_env
from ladle.config import ClusterConfig, LLMConfig
from ladle.repository.model_config import ModelConfig
from ladle.serving.builders import llm_config_from_parameters

RAY = ClusterConfig(ray="auto")
AUTOSCALE = ClusterConfig(ray="auto", min_replicas=2, max_replicas=6, target_ongoing_requests=3.0, upscale_delay=4.0,
                          downscale_delay=30.0)


def model(backend: str = "onnx", **fields: Any) -> ModelConfig:
    return ModelConfig.model_validate({"name": "m", "backend": backend, **fields})


def llm_model(**fields: Any) -> ModelConfig:
    return model("llm", **fields)


def options(config: ModelConfig, cluster: ClusterConfig = RAY, llm: LLMConfig | None = None,
            drain_s: float = 30.0) -> dict[str, Any]:
    return plan("m", config, cluster, llm or LLMConfig(), drain_s).options


# -- defaults ------------------------------------------------------------------------------------------------------


def test_classic_defaults() -> None:
    p = plan("m", model(), RAY, LLMConfig(), 12.5)
    assert (p.model, p.is_llm) == ("m", False)
    o = p.options
    assert o["num_replicas"] == 1 and "autoscaling_config" not in o
    assert o["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.0, "runtime_env": {"env_vars": serve_env()}}
    assert o["max_ongoing_requests"] == 16
    assert o["max_queued_requests"] == 1024
    assert o["request_router_config"] == {"request_router_class": ROUTER,
                                          "request_router_kwargs": {"prefix_aware": False, "imbalance": 8}}
    assert o["graceful_shutdown_timeout_s"] == 12.5


def test_router_class_path_names_ladles_router() -> None:
    assert ROUTER == "ladle.cluster.routing.LadleRouter"


def test_replicas_and_resources_from_the_flags() -> None:
    o = options(model(), ClusterConfig(ray="auto", replicas=3, num_cpus=2.5, num_gpus=1.0, max_queued_requests=7))
    assert o["num_replicas"] == 3
    assert (o["ray_actor_options"]["num_cpus"], o["ray_actor_options"]["num_gpus"]) == (2.5, 1.0)
    assert o["max_queued_requests"] == 7


def test_pinned_llm_defaults_to_twice_the_servers_max_num_seqs() -> None:
    p = plan("m", llm_model(), RAY, LLMConfig(max_num_seqs=100), 30.0, pinned=True)
    assert p.is_llm
    assert p.options["max_ongoing_requests"] == 200
    assert p.options["request_router_config"]["request_router_kwargs"] == {"prefix_aware": True, "imbalance": 8}


def test_llm_ongoing_is_at_least_16() -> None:
    p = plan("m", llm_model(), RAY, LLMConfig(max_num_seqs=3), 30.0, pinned=True)
    assert p.options["max_ongoing_requests"] == 16
    assert options(llm_model(parameters={"max_num_seqs": 2}))["max_ongoing_requests"] == 16


def test_llm_parameters_max_num_seqs_counts() -> None:
    o = options(llm_model(parameters={"max_num_seqs": 40}), llm=LLMConfig(max_num_seqs=4))
    assert o["max_ongoing_requests"] == 80


def test_llm_non_int_max_num_seqs_parameter_falls_back_to_the_engine_default() -> None:
    o = options(llm_model(parameters={"max_num_seqs": "many"}), llm=LLMConfig(max_num_seqs=30))
    assert o["max_ongoing_requests"] == 2 * LLMConfig().max_num_seqs


def test_repository_llm_ongoing_follows_the_engine_it_runs() -> None:
    server = LLMConfig(max_num_seqs=4)
    engine = llm_config_from_parameters({}, "/models/m/1", "/models/m", server)  # what its replicas build
    assert engine.max_num_seqs == LLMConfig().max_num_seqs == 64
    assert options(llm_model(), llm=server)["max_ongoing_requests"] == 2 * engine.max_num_seqs


@pytest.mark.parametrize(("batch", "instances", "expected"), [(0, 1, 16), (1, 1, 16), (4, 1, 16), (8, 1, 32),
                                                              (8, 3, 96), (0, 5, 20)])
def test_classic_ongoing_is_4_x_batch_x_instances_at_least_16(batch: int, instances: int, expected: int) -> None:
    fields: dict[str, Any] = {"max_batch_size": batch, "instance_count": instances}
    assert options(model(**fields))["max_ongoing_requests"] == expected


def test_max_ongoing_flag_overrides_the_default() -> None:
    assert options(model(max_batch_size=64), ClusterConfig(ray="auto", max_ongoing_requests=5))[
        "max_ongoing_requests"] == 5


def test_power_of_two_routing_is_not_prefix_aware() -> None:
    o = options(llm_model(), ClusterConfig(ray="auto", llm_routing="power-of-two", prefix_imbalance=3))
    assert o["request_router_config"]["request_router_kwargs"] == {"prefix_aware": False, "imbalance": 3}


def test_classic_models_are_never_prefix_aware() -> None:
    for backend in ("onnx", "sentence_transformers", "python"):
        kwargs = options(model(backend), ClusterConfig(ray="auto", prefix_imbalance=5))["request_router_config"][
            "request_router_kwargs"]
        assert kwargs == {"prefix_aware": False, "imbalance": 5}


# -- the model's own cluster: block --------------------------------------------------------------------------------


def test_own_fields_win_field_by_field() -> None:
    cluster = ClusterConfig(ray="auto", replicas=4, num_cpus=2.0, num_gpus=1.0, max_ongoing_requests=50)
    o = options(model(cluster={"num_cpus": 0.5}), cluster)
    assert o["ray_actor_options"]["num_cpus"] == 0.5
    assert o["ray_actor_options"]["num_gpus"] == 1.0  # unset: the flag's
    assert o["max_ongoing_requests"] == 50
    assert o["num_replicas"] == 4
    o = options(model(cluster={"num_gpus": 0, "max_ongoing_requests": 3, "replicas": 2}), cluster)
    assert o["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 0, "runtime_env": {"env_vars": serve_env()}}
    assert o["max_ongoing_requests"] == 3
    assert o["num_replicas"] == 2


def test_own_fixed_replicas_win_over_autoscaling_flags() -> None:
    o = options(model(cluster={"replicas": 3}), AUTOSCALE)
    assert o["num_replicas"] == 3 and "autoscaling_config" not in o


def test_own_fixed_replicas_win_over_own_bounds() -> None:
    o = options(model(cluster={"replicas": 2, "min_replicas": 1, "max_replicas": 5}), AUTOSCALE)
    assert o["num_replicas"] == 2 and "autoscaling_config" not in o


def test_own_bounds_autoscale_a_model_under_fixed_flags() -> None:
    o = options(model(cluster={"min_replicas": 2, "max_replicas": 5, "target_ongoing_requests": 7.0}),
                ClusterConfig(ray="auto", replicas=3))
    assert "num_replicas" not in o
    scale = o["autoscaling_config"]
    assert (scale["min_replicas"], scale["max_replicas"], scale["initial_replicas"]) == (2, 5, 2)
    assert scale["target_ongoing_requests"] == 7.0


def test_own_bounds_win_over_autoscaling_flags() -> None:
    scale = options(model(cluster={"min_replicas": 1, "max_replicas": 3}), AUTOSCALE)["autoscaling_config"]
    assert (scale["min_replicas"], scale["max_replicas"]) == (1, 3)
    assert scale["target_ongoing_requests"] == 3.0  # unset in the model: the flag's


def test_own_max_alone_starts_from_one() -> None:
    scale = options(model(cluster={"max_replicas": 4}), RAY)["autoscaling_config"]
    assert (scale["min_replicas"], scale["max_replicas"], scale["initial_replicas"]) == (1, 4, 1)


def test_own_min_alone_is_its_own_max_without_flags() -> None:
    scale = options(model(cluster={"min_replicas": 3}), RAY)["autoscaling_config"]
    assert (scale["min_replicas"], scale["max_replicas"]) == (3, 3)


def test_own_min_alone_keeps_the_flags_max() -> None:
    scale = options(model(cluster={"min_replicas": 3}), AUTOSCALE)["autoscaling_config"]
    assert (scale["min_replicas"], scale["max_replicas"]) == (3, 6)
    scale = options(model(cluster={"max_replicas": 4}), AUTOSCALE)["autoscaling_config"]
    assert (scale["min_replicas"], scale["max_replicas"]) == (2, 4)


# -- autoscaling from the flags ------------------------------------------------------------------------------------


def test_autoscaling_config_from_the_flags() -> None:
    o = options(model(), AUTOSCALE)
    assert "num_replicas" not in o
    assert o["autoscaling_config"] == {
        "min_replicas": 2, "max_replicas": 6, "initial_replicas": 2, "target_ongoing_requests": 3.0,
        "upscale_delay_s": 4.0, "downscale_delay_s": 30.0, "metrics_interval_s": 1.0, "look_back_period_s": 4.0,
    }


@pytest.mark.parametrize(("upscale", "interval", "look_back"), [(0.0, 1.0, 2.0), (0.5, 1.0, 2.0), (5.0, 1.0, 5.0),
                                                               (60.0, 1.0, 60.0)])
def test_metrics_interval_and_look_back_follow_the_upscale_delay(upscale: float, interval: float,
                                                                 look_back: float) -> None:
    scale = options(model(), ClusterConfig(ray="auto", max_replicas=3, upscale_delay=upscale))["autoscaling_config"]
    assert (scale["metrics_interval_s"], scale["look_back_period_s"]) == (interval, look_back)


@pytest.mark.parametrize(("low", "high", "expected"), [(None, 4, (1, 4)), (3, None, (3, 3)), (2, 2, (2, 2))])
def test_flag_bounds(low: int | None, high: int | None, expected: tuple[int, int]) -> None:
    scale = options(model(), ClusterConfig(ray="auto", min_replicas=low, max_replicas=high))["autoscaling_config"]
    assert (scale["min_replicas"], scale["max_replicas"], scale["initial_replicas"]) == (*expected, expected[0])


def test_no_autoscaling_without_bounds() -> None:
    o = options(model(), ClusterConfig(ray="auto", replicas=2, upscale_delay=1.0))
    assert o["num_replicas"] == 2 and "autoscaling_config" not in o


# -- names and environment -----------------------------------------------------------------------------------------


def test_app_name() -> None:
    assert app_name("resnet") == APP_PREFIX + "resnet" == "ladle-resnet"


def test_serve_env_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in SERVE_ENV:
        monkeypatch.delenv(key, raising=False)
    assert serve_env() == SERVE_ENV
    assert serve_env()["RAY_SERVE_USE_GRPC_BY_DEFAULT"] == "1"


def test_serve_env_keeps_the_users_own_value(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in SERVE_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RAY_SERVE_USE_GRPC_BY_DEFAULT", "0")
    env = serve_env()
    assert env["RAY_SERVE_USE_GRPC_BY_DEFAULT"] == "0"
    assert env["RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP"] == SERVE_ENV["RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP"]
    assert options(model())["ray_actor_options"]["runtime_env"]["env_vars"] == env


# -- Ray Serve accepts the plans -----------------------------------------------------------------------------------


def _ray_validates(o: dict[str, Any], future_warnings: str = "error") -> None:
    """What Cluster._run does with a plan, short of deploying it: Ray builds and validates the deployment config."""
    serve = pytest.importorskip("ray.serve", reason="the ray extra is not installed")
    from ray.serve.config import RequestRouterConfig

    class Dummy:
        pass

    o = dict(o)
    o["request_router_config"] = RequestRouterConfig(**o["request_router_config"])
    with warnings.catch_warnings():
        warnings.simplefilter(future_warnings, FutureWarning)  # Ray's "this will raise in a future release"
        warnings.simplefilter("ignore", DeprecationWarning)  # metrics_interval_s itself is deprecated
        serve.deployment(Dummy, name="LadleReplica").options(**o)


@pytest.mark.parametrize("cluster", [RAY, AUTOSCALE, ClusterConfig(ray="auto", replicas=3, num_gpus=0.5),
                                     ClusterConfig(ray="auto", max_replicas=2, upscale_delay=0.5)])
def test_ray_accepts_the_plan(cluster: ClusterConfig) -> None:
    _ray_validates(options(llm_model(), cluster))
    _ray_validates(options(model(max_batch_size=8, cluster={"min_replicas": 1, "max_replicas": 2}), cluster))


def test_ray_accepts_a_zero_upscale_delay() -> None:
    _ray_validates(options(model(), ClusterConfig(ray="auto", max_replicas=2, upscale_delay=0.0)), "ignore")


@pytest.mark.parametrize("upscale", [1.0, 2.0])
def test_ray_accepts_a_short_upscale_delay(upscale: float) -> None:
    _ray_validates(options(model(), ClusterConfig(ray="auto", max_replicas=2, upscale_delay=upscale)))
