"""Server-level admission: a cap on HTTP requests in flight (readiness is the model host's: serving/host.py).

Invariant: beyond the cap a request is answered at once (503, Retry-After: 1, in its protocol's shape), never
queued in the server; health probes and /metrics are never counted nor refused, so they answer while saturated.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import Counter

from ladle.api.errors import is_openai_path, kserve_error, openai_error

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: never refused: probes must tell an orchestrator the truth under load, and /metrics shows the load
EXEMPT_PATHS = frozenset({"/health", "/v2/health/live", "/v2/health/ready", "/metrics"})


class AdmissionMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware: no extra task or body copy per request); its cost is one counter."""

    def __init__(self, app: ASGIApp, max_concurrent_requests: int, refused: Counter | None = None) -> None:
        self.app = app
        self.refused = refused  # a bound counter child (metrics: ladle_requests_refused_total), or None
        self.limit = max_concurrent_requests
        self.in_flight = 0
        # built once: under overload most requests are refusals, and each should cost as little as possible
        message = (f"the server is at its limit of {max_concurrent_requests} concurrent requests "
                   "(--max-concurrent-requests); retry after 1 s")
        self._refusals = (kserve_error(message, 503, retry_after_s=1), openai_error(message, 503, retry_after_s=1))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in EXEMPT_PATHS:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            if self.refused is not None:
                self.refused.inc()
            await self._refusals[is_openai_path(scope["path"])](scope, receive, send)
            return
        self.in_flight += 1
        try:
            # a streaming response is sent inside this call, so a stream holds its slot until it ends
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

