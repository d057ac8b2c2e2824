"""The composition root: logging, the model host (with the --model LLM pinned in it), the app, and uvicorn
with the fastest event loop and HTTP parser available.

Invariant: an LLM named by --model that cannot load stops start-up with a clear message (exit 1),
before the port is bound, so an orchestrator never routes to a half-working server. SIGTERM drains: no new
connections, readiness false, in-flight requests (streams too) finish up to --drain-timeout, models stop, exit 0.
"""

from __future__ import annotations

import importlib.util
import logging
import signal
from collections.abc import Callable
from types import FrameType
from typing import Protocol

import uvicorn

from ladle.api import tracing
from ladle.api.app import create_app
from ladle.api.health_server import HealthServer
from ladle.config import HTTPConfig, ServerConfig
from ladle.logs import setup_logging
from ladle.metrics import Metrics
from ladle.process import configure_process
from ladle.serving.host import ModelHost

log = logging.getLogger("ladle")


def serve(config: ServerConfig) -> int:
    setup_logging(config.http.log_level, config.http.log_format)
    if config.cluster.ray is not None:
        return _serve_on_ray(config)
    configure_process(config.llm.model)  # process-wide settings (ladle/process.py), before any model loads
    host = ModelHost(config.repository.repository, Metrics(), config.llm)
    if config.llm.model:
        try:
            host.pin_llm(config.llm)  # built now, before the port is bound
        except Exception as exc:  # a bad checkpoint or option: say so plainly and exit
            log.error("cannot serve --model %s: %s", config.llm.model, exc)
            return 1
    app = create_app(config, host)
    # tracing is on only with --otlp-traces-endpoint: without it no OpenTelemetry module is even imported
    try:
        provider = tracing.setup(config.http.otlp_traces_endpoint) if config.http.otlp_traces_endpoint else None
    except ImportError as exc:
        log.error("--otlp-traces-endpoint needs OpenTelemetry: pip install 'ladle[tracing]' (%s)", exc)
        return 1
    try:
        return run(uvicorn_config(app, config.http), config.http, app.state.host)
    finally:
        if provider is not None:
            provider.shutdown()  # exports the spans still batched


def run(uv: uvicorn.Config, http: HTTPConfig, served: Drainable) -> int:
    """Serve until stopped (SIGTERM drains), with the --health-port thread if asked for; the exit status."""
    server = DrainingServer(uv, served)
    health = health_server(http, served.is_ready)
    try:
        server.run()
    finally:
        if health is not None:
            health.stop()
    return 0 if server.started else 1


def _serve_on_ray(config: ServerConfig) -> int:
    try:
        from ladle.cluster.server import serve_cluster
    except ImportError as exc:
        log.error("--ray needs Ray Serve: pip install 'ladle[ray]' (%s)", exc)
        return 1
    return serve_cluster(config)


def health_server(http: HTTPConfig, is_ready: Callable[[], bool]) -> HealthServer | None:
    if http.health_port is None:
        return None
    health = HealthServer(http.host, http.health_port, is_ready)
    health.start()  # answers 503 on readiness until the models have loaded, then follows the main port's rule
    return health


def uvicorn_config(app, http: HTTPConfig) -> uvicorn.Config:
    has = importlib.util.find_spec
    limit = http.max_concurrent_requests
    # open connections (idle keep-alive ones too) may well outnumber requests in flight: generous headroom
    connections = max(4 * limit, 4096) if limit > 0 else None
    return uvicorn.Config(
        app,
        host=http.host,
        port=http.port,
        loop="uvloop" if has("uvloop") else "asyncio",
        http=_http_protocol(connections) if has("httptools") else "h11",
        log_config=None,
        access_log=False,
        lifespan="on",
        # httptools: open connections are capped in the protocol (api/http_protocol.py), so health probes are never
        # refused by uvicorn's limit_concurrency; h11 (no httptools installed) falls back to that limit
        limit_concurrency=None if has("httptools") else connections,
        backlog=2048,
        h11_max_incomplete_event_size=64 * 1024,  # request line + headers (h11; httptools has its own bound)
        timeout_graceful_shutdown=http.drain_timeout,
    )


def _http_protocol(max_connections: int | None) -> type:
    from ladle.api.http_protocol import bounded_protocol  # imports httptools

    return bounded_protocol(max_connections)


class Drainable(Protocol):
    draining: bool

    def is_ready(self) -> bool: ...


class DrainingServer(uvicorn.Server):
    """uvicorn, except that SIGTERM is a graceful stop that exits 0: readiness turns false at once, then uvicorn
    closes the listening socket, waits for in-flight requests up to the drain timeout, and runs the lifespan
    shutdown (batchers drain, engines stop)."""

    def __init__(self, config: uvicorn.Config, host: Drainable) -> None:
        super().__init__(config)
        self.host = host

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.host.draining = True
        if sig == signal.SIGTERM and not self.should_exit:
            log.info("SIGTERM: draining in-flight requests (up to %ss), then stopping",
                     self.config.timeout_graceful_shutdown)
        super().handle_exit(sig, frame)
        if sig == signal.SIGTERM:
            # uvicorn re-raises a captured signal after shutting down (the process would die of SIGTERM, exit
            # status 143); a drained SIGTERM is a clean stop, so it is not re-raised
            self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]

