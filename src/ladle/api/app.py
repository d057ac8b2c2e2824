"""The application factory: one Starlette app holding the registry, metrics and protocol adapters.

Startup loads the repository (model work off the event loop); shutdown drains every batcher.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ladle.api.errors import EXCEPTION_HANDLERS
from ladle.api.kserve import KServeAPI
from ladle.config import ServerConfig
from ladle.metrics import Metrics
from ladle.repository.registry import ModelRegistry

log = logging.getLogger(__name__)


def create_app(config: ServerConfig) -> Starlette:
    metrics = Metrics()
    registry = ModelRegistry(config.repository.repository, metrics)
    kserve = KServeAPI(registry, metrics, config.http.max_request_bytes)

    async def metrics_endpoint(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if config.repository.repository is not None:
            await registry.load_all(list(config.repository.load_model) or None)
            if not config.repository.strict_readiness:
                registry.wanted.clear()
        ready = "ready" if registry.is_ready() else "NOT ready (see the errors above)"
        log.info("ladle is %s on http://%s:%d", ready, config.http.host, config.http.port)
        yield
        await registry.close()

    routes = [*kserve.routes(), Route("/metrics", metrics_endpoint, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=EXCEPTION_HANDLERS)
    app.state.registry = registry
    app.state.metrics = metrics
    return app
