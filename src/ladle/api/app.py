"""The application factory: one Starlette app over one model host, with the protocol adapters (KServe v2,
OpenAI, embeddings), metrics and the health probes.

Startup starts the engines built before it (--model) and loads the repository (model work off the event loop);
shutdown drains every batcher and engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ladle.api.admission import AdmissionMiddleware
from ladle.api.auth import install_access_control
from ladle.api.console import ConsoleAPI
from ladle.api.console_live import LiveSampler
from ladle.api.errors import EXCEPTION_HANDLERS
from ladle.api.grpc.server import GrpcServer
from ladle.api.jobs import JobsAPI, host_is_llm
from ladle.api.kserve import KServeAPI
from ladle.api.offload import ProcessOffload
from ladle.api.openai import OpenAIAPI
from ladle.api.openai_batches import BatchesAPI
from ladle.api.openai_embeddings import EmbeddingsAPI
from ladle.api.rollouts import RolloutsAPI
from ladle.api.shadows import ShadowAPI
from ladle.config import ServerConfig
from ladle.jobs import targets
from ladle.jobs.dispatch import Dispatcher
from ladle.jobs.metrics import JobMetrics
from ladle.jobs.service import JobService
from ladle.metrics import Metrics
from ladle.process import freeze_loaded_objects
from ladle.serving.host import ModelHost
from ladle.serving.rollout import RolloutManager

log = logging.getLogger(__name__)


def create_app(config: ServerConfig, host: ModelHost | None = None, with_jobs: bool = True) -> Starlette:
    """`host` may hold models built before start-up (server.py pins the --model LLM); its repository loads here.
    `with_jobs=False`: no batch-job store, runner or routes, and no rollouts (a cluster replica: the front end runs the
    jobs, and a rollout on one replica's host would move only that replica's share of the traffic)."""
    host = host or ModelHost(config.repository.repository, Metrics(), config.llm)
    metrics = host.metrics
    offload = ProcessOffload()  # parses large KServe bodies in a helper process (api/offload.py)
    kserve = KServeAPI(host, config.http.max_request_bytes, offload)
    openai_limit = min(config.http.max_request_bytes, config.http.max_openai_request_bytes)
    openai = OpenAIAPI(host, openai_limit)
    embeddings = EmbeddingsAPI(host, openai_limit)
    jobs = job_service(config, host) if with_jobs else None
    rollouts = RolloutManager(host, config.jobs.data_dir) if with_jobs else None
    # KServe v2 over gRPC (--grpc-port); not on a cluster replica (with_jobs=False): --ray serves no gRPC
    grpc_server = GrpcServer(config, host, metrics.refused) if with_jobs and config.http.grpc_port else None

    live = LiveSampler(metrics.registry)  # sampling only while the console reads it
    console = ConsoleAPI(host, rollouts, live, config.security) if config.http.console else None

    async def metrics_endpoint(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def health(request: Request) -> Response:
        return Response(status_code=200 if host.is_ready() else 503)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        host.start(asyncio.get_running_loop())
        if rollouts is not None:
            rollouts.restore()  # the splits saved rollouts reached, in force before the first request
        if config.repository.repository is not None:
            await host.load_all(list(config.repository.load_model) or None)
            if not config.repository.strict_readiness:
                host.relax_readiness()
        if grpc_server is not None:
            await grpc_server.start()
        if jobs is not None:
            await jobs.start(dispatcher(app))  # resumes the jobs a previous run left, once the models are up
        if rollouts is not None:
            rollouts.resume(asyncio.get_running_loop())  # once the models are up: a step's window starts now
        freeze_loaded_objects()  # GC pauses off the request path (ladle/process.py)
        ready = "ready" if host.is_ready() else "NOT ready (see the errors above)"
        log.info("ladle is %s on http://%s:%d", ready, config.http.host, config.http.port)
        yield
        if grpc_server is not None:
            await grpc_server.stop()
        if jobs is not None:
            await jobs.close()  # lines running now go back to pending: the next start runs them
        if rollouts is not None:
            await rollouts.close()  # running rollouts stay running on disk: the next start resumes them
        await live.close()
        await host.close()
        offload.close()

    routes = [
        *kserve.routes(),
        *openai.routes(),
        *embeddings.routes(),
        *ShadowAPI(host).routes(),
        *(BatchesAPI(jobs, openai_limit).routes() if jobs is not None else ()),
        *(JobsAPI(jobs, host_is_llm(host), config.http.max_request_bytes).routes() if jobs is not None else ()),
        *(RolloutsAPI(rollouts, config.http.max_request_bytes).routes() if rollouts is not None else ()),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        *(console.routes() if console is not None else ()),  # the web console (api/console.py)
        Route("/health", health, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=EXCEPTION_HANDLERS)
    app.state.host = host
    app.state.metrics = metrics
    app.state.jobs = jobs
    install_edge(app, config, metrics)
    return app


def install_edge(app: Starlette, config: ServerConfig, metrics: Metrics) -> None:
    """The middleware every ladle front door has: admission (--max-concurrent-requests), then keys and rate limits."""
    if config.http.max_concurrent_requests > 0:
        app.add_middleware(AdmissionMiddleware, max_concurrent_requests=config.http.max_concurrent_requests,
                           refused=metrics.refused.labels("over_concurrency"))
    # added last: outermost, so a refused request never takes an admission slot
    install_access_control(app, config.security, config.http.host, metrics.refused)


def dispatcher(app: Starlette) -> Dispatcher:
    """Batch lines go through the same routes and error handlers as HTTP requests (not the auth, rate-limit and
    admission middleware: the job was authorized when it was created, and its window bounds what it runs)."""
    handlers = {k: v for k, v in EXCEPTION_HANDLERS.items() if k is not Exception}  # Exception: the dispatcher's 500
    return Dispatcher(ExceptionMiddleware(app.router, handlers=handlers))


def job_service(config: ServerConfig, host: ModelHost) -> JobService:
    c = config.jobs
    # stable across restarts (a restarted server frees its own claims at once), distinct between servers
    owner = f"{socket.gethostname()}:{config.http.port}"
    return JobService(c, owner, lambda model: targets.window(host, model, c.batch_lines_in_flight),
                      lambda: targets.model_checker(host), JobMetrics(host.metrics.registry))
