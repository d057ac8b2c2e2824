"""One replica of a model's Ray Serve deployment: a model host serving that one model (a repository model with all
its versions, or the --model LLM), reached through ladle's own ASGI app in process.

Invariant: a replica is only constructed (and so only RUNNING in Serve) once its model loaded; a model that cannot
load fails the constructor with the reason, which Serve reports as DEPLOY_FAILED. A replica whose host stops being
ready (an engine died) fails its health check, and Serve replaces it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from ray import serve

from ladle.api.app import create_app
from ladle.cluster.forwarding import Forwarded, InProcessApp, Reply
from ladle.cluster.hints import RouteHint
from ladle.cluster.routing import replica_label
from ladle.config import ServerConfig
from ladle.logs import setup_logging
from ladle.metrics import Metrics
from ladle.process import configure_process
from ladle.serving.host import ModelHost

log = logging.getLogger(__name__)


class LadleReplica:
    async def __init__(self, config: ServerConfig, model: str, generation: int = 0) -> None:
        """`generation` changes on every (re)load of the model, so Serve starts fresh replicas that read the
        repository again."""
        setup_logging(config.http.log_level, config.http.log_format)
        configure_process(config.llm.model)
        self.model = model
        self.label = replica_label(serve.get_replica_context().replica_id)
        self.host = ModelHost(config.repository.repository, Metrics(), config.llm)
        if config.llm.model:
            self.host.pin_llm(config.llm)
        self.app = create_app(config, self.host, with_jobs=False)
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        if not self.host.is_ready():
            rows = self.host.index()
            reasons = "; ".join(f"{r.get('version', '')} {r['reason']}".strip() for r in rows if r["reason"])
            await self._close()
            raise RuntimeError(f"model {model} did not load: {reasons or 'not ready'}")
        self.runner = InProcessApp(self.app)
        log.info("replica %s serves model %s", self.label, model)

    async def forward(self, request: Forwarded, hint: RouteHint) -> Reply:
        return await self.runner.call(request)

    async def forward_stream(self, request: Forwarded, hint: RouteHint) -> AsyncIterator[Reply | bytes]:
        async for item in self.runner.stream(request):
            yield item

    async def metrics(self, hint: RouteHint) -> tuple[str, bytes]:
        """(this replica's label, its Prometheus exposition)."""
        return self.label, self.host.metrics.render()

    def check_health(self) -> None:
        if not self.host.is_ready():
            raise RuntimeError(f"replica {self.label}: model {self.model} is not ready (an engine stopped?)")

    async def _close(self) -> None:
        lifespan, self._lifespan = self._lifespan, None
        if lifespan is not None:
            await lifespan.__aexit__(None, None, None)  # queued requests finish, engines stop

    async def __del__(self) -> None:  # Serve awaits this when it stops the replica
        await self._close()
