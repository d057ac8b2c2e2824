"""ladle as one Ray Serve application, for clusters whose Serve applications are declared rather than started by
`ladle serve` — KubeRay's RayService, `serve run`, `serve deploy`:

    serve run ladle.cluster.serve_app:build repository=/models flags="--replicas 2 --num-cpus 1"

The application is ladle's front end (the ingress, behind Serve's HTTP proxy) and one deployment per model (the same
LadleReplica and LadleRouter as `ladle serve --ray`); the `flags` are `ladle serve`'s own.

Invariant: the same HTTP behaviour as `ladle serve --ray`, except that the Serve config, not the repository API, loads
and unloads models (load/unload answer 400 saying so).
"""

from __future__ import annotations

import shlex
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle
from starlette.applications import Starlette

from ladle.cli import build_parser, build_server_config, cluster_problem
from ladle.cluster.cluster import Cluster
from ladle.cluster.models import ServedModel, replica_config
from ladle.cluster.plans import deployment_name, plan, serve_env
from ladle.cluster.replica import LadleReplica
from ladle.cluster.server import create_cluster_app, describe_models
from ladle.config import ServerConfig
from ladle.logs import setup_logging


def build(args: dict[str, Any]) -> serve.Application:
    """Serve's application builder: `args` are `repository` (the model repository, on every node), `flags` (a
    string or list of `ladle serve` flags) and optionally `model` (an LLM checkpoint, as --model)."""
    config = server_config(args)
    models = describe_models(config)
    children = {m.name: _deployment(config, m) for m in models if m.config is not None}
    reasons = {m.name: m.reason for m in models if m.config is None}
    ingress = LadleIngress.options(ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": serve_env()}})
    return ingress.bind(config, children, reasons, [m.pinned for m in models if m.name in children])


def server_config(args: dict[str, Any]) -> ServerConfig:
    flags = args.get("flags", [])
    argv = ["serve", *(shlex.split(flags) if isinstance(flags, str) else [str(f) for f in flags])]
    if args.get("repository"):
        argv.insert(1, str(args["repository"]))
    if args.get("model"):
        argv += ["--model", str(args["model"])]
    config = build_server_config(build_parser().parse_args(argv))
    if problem := cluster_problem(config.cluster, on_ray=True):
        raise ValueError(problem)
    return config


def _deployment(config: ServerConfig, model: ServedModel) -> serve.Application:
    options = dict(plan(model.name, model.config, config.cluster, config.llm, config.http.drain_timeout,
                        model.pinned).options)
    options["request_router_config"] = RequestRouterConfig(**options["request_router_config"])
    name = deployment_name(model.name, config.cluster.ray_app_prefix)
    deployment = serve.deployment(LadleReplica, name=name).options(**options)
    return deployment.bind(replica_config(config, model), model.name, 0)


@serve.deployment(name="ladle", max_ongoing_requests=1024)
@serve.ingress()
class LadleIngress:
    def __init__(self, config: ServerConfig, handles: dict[str, DeploymentHandle], reasons: dict[str, str],
                 pinned: list[bool]) -> None:
        setup_logging(config.http.log_level, config.http.log_format)
        cluster = Cluster(config, managed=False)
        for (name, handle), is_pinned in zip(handles.items(), pinned, strict=True):
            model = next(m for m in describe_models(config) if m.name == name)
            model.handle, model.pinned = handle, is_pinned
            cluster.add(model)
            cluster.wanted.add(name)
        for name, reason in reasons.items():
            cluster.add(ServedModel(name, None, reason=reason))
        cluster.start_polling()
        self._front_app: Starlette = create_cluster_app(config, cluster)

    def __serve_build_asgi_app__(self) -> Starlette:
        return self._front_app
