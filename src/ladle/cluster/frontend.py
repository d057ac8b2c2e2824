"""The front end of `ladle serve --ray`: ladle's HTTP (the same KServe v2 and OpenAI routes, limits, keys and error
shapes) in front of the models' Ray Serve deployments. It reads just enough of each request to route it — the model,
a session key, an LLM prompt's head — and forwards it whole to a replica, which answers as a single ladle would.

Invariants: bodies are bounded before they are read (413); a body over PARSE_ON_LOOP_BYTES is parsed on a thread; a
client that leaves cancels its call (the replica aborts the request); health, readiness and /metrics never wait on a
replica that does not answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
from prometheus_client import Gauge
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from ladle import __version__
from ladle.api.body import is_batch, read_body, until_disconnect
from ladle.api.errors import openai_error_body
from ladle.api.kserve import EXTENSIONS
from ladle.api.sse import sse
from ladle.cluster.cluster import Cluster
from ladle.cluster.forwarding import DROPPED_RESPONSE_HEADERS, Forwarded, Reply, outgoing_headers
from ladle.cluster.hints import RouteHint, prompt_head, session_key
from ladle.cluster.metrics_merge import merge_expositions
from ladle.cluster.repository import RepositoryControl
from ladle.cluster.shared_answer import SharedAnswer
from ladle.config import ServerConfig
from ladle.errors import InvalidInput, LadleError, NotSupported
from ladle.metrics import Metrics

PARSE_ON_LOOP_BYTES = 64 * 1024
#: /metrics, GET /v1/models and the repository index answer from a fan-out to the replicas at most this old
#: (Prometheus scrapes every 10-60 s; a load or unload refreshes them at once)
FANOUT_TTL_S = 1.0


class FrontEnd:
    def __init__(self, config: ServerConfig, cluster: Cluster, metrics: Metrics) -> None:
        self.cluster = cluster
        self.metrics = metrics
        self.limit = config.http.max_request_bytes
        self.openai_limit = min(config.http.max_request_bytes, config.http.max_openai_request_bytes)
        self.draining = False
        self._scrape_answer = SharedAnswer(FANOUT_TTL_S, self._scrape)
        self._models_answer = SharedAnswer(FANOUT_TTL_S, self._served_models)
        self.repository = RepositoryControl(config, cluster, self.limit, FANOUT_TTL_S, self._models_answer.invalidate)
        self.replicas = Gauge("ladle_cluster_replicas", "Running Ray Serve replicas of each model", ["model"],
                              registry=metrics.registry)

    def routes(self) -> list[Route]:
        model = "/v2/models/{model}"
        return [
            Route(model + "/infer", self.kserve, methods=["POST"]),  # the hot route first
            Route(model + "/versions/{version}/infer", self.kserve, methods=["POST"]),
            Route("/v1/chat/completions", self.openai, methods=["POST"]),
            Route("/v1/completions", self.openai, methods=["POST"]),
            Route("/v1/embeddings", self.openai, methods=["POST"]),
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route(model, self.kserve, methods=["GET"]),
            Route(model + "/rollout", self.no_rollouts, methods=["GET", "POST", "DELETE"]),
            Route(model + "/{rest:path}", self.kserve, methods=["GET", "POST"]),
            Route("/v2", self.server_metadata, methods=["GET"]),
            Route("/v2/health/live", self.live, methods=["GET"]),
            Route("/v2/health/ready", self.ready, methods=["GET"]),
            Route("/health", self.ready, methods=["GET"]),
            *self.repository.routes(),
            Route("/metrics", self.metrics_endpoint, methods=["GET"]),
        ]

    def is_ready(self) -> bool:
        return not self.draining and self.cluster.is_ready()

    # -- forwarding ----------------------------------------------------------------------------------
    async def kserve(self, request: Request) -> Response:
        name = request.path_params["model"]
        body = await read_body(request, self.limit) if request.method == "POST" else b""
        hint = RouteHint(name, session=session_key(request.scope["headers"], None))
        return await self._unary(request, name, _forwarded(request, body), hint)

    async def openai(self, request: Request) -> Response:
        raw = await read_body(request, self.openai_limit)
        body = await _parse(raw)
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise InvalidInput("`model` is required: the name of a served model (GET /v1/models lists them)",
                               param="model")
        llm = request.url.path != "/v1/embeddings"
        hint = RouteHint(name, session=session_key(request.scope["headers"], body),
                         prefix=prompt_head(body) if llm else None)
        forwarded = _forwarded(request, raw)
        if llm and body.get("stream") is True:
            return await self._streamed(name, forwarded, hint)
        return await self._unary(request, name, forwarded, hint)

    async def _unary(self, request: Request, name: str, forwarded: Forwarded, hint: RouteHint) -> Response:
        reply = await until_disconnect(request, asyncio.ensure_future(self.cluster.call(name, forwarded, hint)))
        return _response(reply)

    async def _streamed(self, name: str, forwarded: Forwarded, hint: RouteHint) -> Response:
        chunks = self.cluster.stream(name, forwarded, hint)
        head = await anext(chunks)  # errors before the first byte are ordinary error responses
        assert isinstance(head, Reply)
        response = StreamingResponse(_rest(chunks), status_code=head.status)
        response.raw_headers = [(k, v) for k, v in head.headers if k not in DROPPED_RESPONSE_HEADERS]
        return response

    # -- answered here ---------------------------------------------------------------------------------
    async def no_rollouts(self, request: Request) -> Response:
        raise NotSupported(
            "gated rollouts run in a single `ladle serve` (its model host moves the traffic and reads the gates); "
            "under --ray every replica has its own host, so a rollout in one would move only its share of the "
            "traffic. Move traffic by editing the model's traffic_split and POST /v2/repository/models/{model}/load")
    async def list_models(self, request: Request) -> Response:
        return _json({"object": "list", "data": await self._models_answer.get()})

    async def _served_models(self) -> list[Any]:
        """The LLMs and encoders with a running replica, as their replicas describe themselves."""
        names = [n for n, m in self.cluster.models.items() if m.kind in ("llm", "embeddings") and
                 self.cluster.running(n) > 0]
        asks = [self.cluster.call(n, Forwarded("GET", "/v1/models", b"", (), b""), RouteHint(n)) for n in names]
        data: list[Any] = []
        for reply in await asyncio.gather(*asks, return_exceptions=True):
            if isinstance(reply, Reply) and reply.status == 200:
                data.extend(orjson.loads(reply.body).get("data", []))
        return sorted(data, key=lambda m: m.get("id", ""))

    async def server_metadata(self, request: Request) -> Response:
        return _json({"name": "ladle", "version": __version__, "extensions": EXTENSIONS})

    async def live(self, request: Request) -> Response:
        return Response(status_code=200)

    async def ready(self, request: Request) -> Response:
        return Response(status_code=200 if self.is_ready() else 503)

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(await self._scrape_answer.get(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def _scrape(self) -> str:
        for name in self.cluster.models:
            self.replicas.labels(name).set(self.cluster.running(name))
        sources = [({}, self.metrics.render()), *await self.cluster.scrape()]
        return await asyncio.to_thread(merge_expositions, [(labels, t.decode()) for labels, t in sources])


async def _parse(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw) if len(raw) <= PARSE_ON_LOOP_BYTES else await asyncio.to_thread(orjson.loads, raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidInput("the request body must be a JSON object")
    return body


def _forwarded(request: Request, body: bytes) -> Forwarded:
    return Forwarded(request.method, request.url.path, request.scope.get("query_string", b""),
                     outgoing_headers(request.scope["headers"]), body, batch=is_batch(request))


def _response(reply: Reply) -> Response:
    response = Response(reply.body, status_code=reply.status)  # no media type: its only header is content-length
    response.raw_headers += [(k, v) for k, v in reply.headers if k not in DROPPED_RESPONSE_HEADERS]
    return response


async def _rest(chunks: AsyncIterator[Reply | bytes]) -> AsyncIterator[bytes]:
    try:
        async for chunk in chunks:
            yield chunk  # type: ignore[misc]
    except LadleError as exc:  # the replica died mid-stream: the client learns it in the stream's own format
        yield sse(openai_error_body(exc.message, exc.status))
        yield b"data: [DONE]\n\n"


def _json(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")

