"""How each model is deployed on Ray Serve: replicas or autoscaling bounds, per-replica resources, queue bounds and
the router — the model's own `cluster:` config over the server's --ray flags. Plain data, no ray import.

Invariant: every deployment gets ladle's router (prefix-aware for LLMs), a bounded front-end queue, and a replica
limit large enough to keep the model's batcher or engine fed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ladle.config import ClusterConfig, LLMConfig
from ladle.repository.model_config import ClusterOptions, ModelConfig

ROUTER = "ladle.cluster.routing.LadleRouter"
METRICS_INTERVAL_S = 1.0
APP_PREFIX = "ladle-"

#: Ray Serve settings for the lowest per-call overhead (measured in benchmarks/cluster): handle calls over gRPC,
#: the router on the caller's event loop, replica code on the replica's main loop. Set in the front end's process
#: and in every replica's. Each stays as the user set it, if they did.
SERVE_ENV = {
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
}


def serve_env() -> dict[str, str]:
    return {key: os.environ.get(key, value) for key, value in SERVE_ENV.items()}


def app_name(model: str, prefix: str = APP_PREFIX) -> str:
    """The Serve application of a model this front end deploys (one per model, so each loads and unloads alone)."""
    return prefix + model


def deployment_name(model: str, prefix: str = APP_PREFIX) -> str:
    """A model's deployment, also inside one Serve application of all models (cluster/serve_app.py)."""
    return prefix + model


def model_of(deployment: str, prefix: str = APP_PREFIX) -> str | None:
    return deployment[len(prefix):] if deployment.startswith(prefix) else None


@dataclass(frozen=True)
class Plan:
    model: str
    is_llm: bool
    options: dict[str, Any]  # keyword arguments of Deployment.options(), request_router_config as a dict


def plan(model: str, config: ModelConfig, cluster: ClusterConfig, llm: LLMConfig, drain_s: float,
         pinned: bool = False) -> Plan:
    """`pinned`: the --model LLM, whose engine runs the server's LLM flags (a repository LLM runs its parameters)."""
    own = config.cluster
    options: dict[str, Any] = {
        "ray_actor_options": {
            "num_cpus": _pick(own.num_cpus, cluster.num_cpus),
            "num_gpus": _pick(own.num_gpus, cluster.num_gpus),
            "runtime_env": {"env_vars": serve_env()},
        },
        "max_ongoing_requests": _pick(own.max_ongoing_requests, cluster.max_ongoing_requests)
        or _default_ongoing(config, llm if pinned else LLMConfig()),
        "max_queued_requests": cluster.max_queued_requests,
        "request_router_config": {
            "request_router_class": ROUTER,
            "request_router_kwargs": {"prefix_aware": config.is_llm and cluster.llm_routing == "prefix",
                                      "imbalance": cluster.prefix_imbalance},
        },
        "health_check_period_s": 2.0,
        "health_check_timeout_s": 30.0,
        "graceful_shutdown_timeout_s": drain_s,
        "graceful_shutdown_wait_loop_s": 0.5,
    }
    options.update(_scale(own, cluster))
    return Plan(model, config.is_llm, options)


def _scale(own: ClusterOptions, cluster: ClusterConfig) -> dict[str, Any]:
    """The model's fixed `replicas` wins; else autoscaling bounds, each the model's own or the server's flag; else
    the server's --replicas."""
    if own.replicas is not None:
        return {"num_replicas": own.replicas}
    low = _pick(own.min_replicas, cluster.min_replicas)
    high = _pick(own.max_replicas, cluster.max_replicas)
    if low is None and high is None:
        return {"num_replicas": cluster.replicas}
    low = low or 1
    high = max(high or low, low)
    return {"autoscaling_config": {
        "min_replicas": low, "max_replicas": high, "initial_replicas": low,
        "target_ongoing_requests": _pick(own.target_ongoing_requests, cluster.target_ongoing_requests),
        "upscale_delay_s": cluster.upscale_delay, "downscale_delay_s": cluster.downscale_delay,
        # load is sampled every second and averaged over at least two samples (Ray wants look-back > interval)
        "metrics_interval_s": METRICS_INTERVAL_S,
        "look_back_period_s": max(2 * METRICS_INTERVAL_S, cluster.upscale_delay),
    }}


def _default_ongoing(config: ModelConfig, llm: LLMConfig) -> int:
    if config.is_llm:
        seqs = config.parameters.get("max_num_seqs", llm.max_num_seqs)
        return max(16, 2 * int(seqs)) if isinstance(seqs, int) else max(16, 2 * llm.max_num_seqs)
    return max(16, 4 * max(config.max_batch_size, 1) * config.instance_count)


def _pick(own: Any, default: Any) -> Any:
    return default if own is None else own
