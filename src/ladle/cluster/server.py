"""`ladle serve --ray`: join Ray, describe the models (the repository on disk, the --model LLM), then serve the front
end with uvicorn while Serve starts their replicas.

Invariant: the models are deployed before the front end reports ready, and deleted from the cluster when it stops
(SIGTERM drains in-flight requests first): the replicas live exactly as long as the `ladle serve` that made them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette

from ladle.api.app import dispatcher, install_edge
from ladle.api.errors import EXCEPTION_HANDLERS
from ladle.api.jobs import JobsAPI
from ladle.api.openai_batches import BatchesAPI
from ladle.cluster.cluster import Cluster
from ladle.cluster.frontend import FrontEnd
from ladle.cluster.jobs import is_llm, job_service
from ladle.cluster.models import ServedModel
from ladle.cluster.repository import discover
from ladle.config import ServerConfig
from ladle.metrics import Metrics
from ladle.repository.layout import model_names
from ladle.repository.model_config import ModelConfig

log = logging.getLogger("ladle")


def describe_models(config: ServerConfig) -> list[ServedModel]:
    models = []
    if config.llm.model:
        name = config.llm.served_model_name or Path(config.llm.model).expanduser().name
        models.append(ServedModel(name, ModelConfig(name=name, backend="llm"), pinned=True))
    root = config.repository.repository
    if root is not None:
        names = list(config.repository.load_model) or model_names(root)
        if models and models[0].name in names:
            raise ValueError(f"the repository has a model named '{models[0].name}' too; give --served-model-name "
                             "another name")
        models.extend(discover(config, name) for name in names)
    return models


def create_cluster_app(config: ServerConfig, cluster: Cluster) -> Starlette:
    """Batch jobs run where the front end deploys the models itself (`ladle serve --ray`); a front end that is one
    Serve replica among possibly several (serve_app.py) has no store of its own to run them from."""
    metrics = Metrics()
    front = FrontEnd(config, cluster, metrics)
    jobs = job_service(config, cluster, metrics.registry) if cluster.managed else None

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if cluster.managed:
            await _deploy(config, cluster)
            ready = "ready" if front.is_ready() else "NOT ready (see the errors above)"
            log.info("ladle (on Ray) is %s on http://%s:%d", ready, config.http.host, config.http.port)
        if jobs is not None:
            await jobs.start(dispatcher(app))  # resumes the jobs a previous run left, once the models are up
        yield
        front.draining = True
        if jobs is not None:
            await jobs.close()  # lines running now go back to pending: the next start runs them
        await cluster.close()

    routes = front.routes()
    if jobs is not None:
        limit = min(config.http.max_request_bytes, config.http.max_openai_request_bytes)
        routes += BatchesAPI(jobs, limit).routes()
        routes += JobsAPI(jobs, is_llm(cluster), config.http.max_request_bytes).routes()
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=EXCEPTION_HANDLERS)
    app.state.front = front
    install_edge(app, config, metrics)
    return app


async def _deploy(config: ServerConfig, cluster: Cluster) -> None:
    failures = await cluster.deploy(list(cluster.models))
    for name, reason in failures.items():
        if reason is not None:
            log.error("model %s is not serving: %s", name, reason)
    if not config.repository.strict_readiness:
        cluster.wanted.intersection_update(n for n, r in failures.items() if r is None)


def serve_cluster(config: ServerConfig) -> int:
    from ladle.server import run, uvicorn_config

    try:
        models = describe_models(config)
    except (ValueError, FileNotFoundError) as exc:
        log.error("cannot serve: %s", exc)
        return 1
    cluster = Cluster(config)
    try:
        cluster.connect()
    except Exception as exc:  # no cluster at that address, a version mismatch: say so and stop
        log.error("cannot join the Ray cluster (--ray %s): %s", config.cluster.ray, exc)
        return 1
    for model in models:
        cluster.add(model)
    app = create_cluster_app(config, cluster)
    uv = uvicorn_config(app, config.http)
    uv.loop = "asyncio"  # Ray's handles run their gRPC calls on the caller's loop: plain asyncio, as Ray tests it
    return run(uv, config.http, app.state.front)
