"""Runs one batch line through the server's own HTTP routes, in process: the same validation, defaults,
engines and response bodies as a real-time request, without a socket. The scope carries `ladle.batch`, which the
handlers read to queue the work at the lowest priority (api/body.py `is_batch`).

Invariant: a dispatched line always ends in (status, body) — a route's error in its protocol's shape, an
unexpected failure as a 500 — and `abort` makes a line still running end at once as 499 (nothing stays queued).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message

log = logging.getLogger(__name__)

#: set in the scope of a request the batch path runs in process; never by a client (the server builds scopes)
BATCH_SCOPE_KEY = "ladle.batch"

#: the status of a line whose caller went away (the job was cancelled or the server is stopping)
ABORTED = 499


@dataclass
class Call:
    """One in-process request; `abort()` ends it as if its client had disconnected."""

    url: str
    body: bytes
    _gone: asyncio.Event = field(default_factory=asyncio.Event)

    def abort(self) -> None:
        self._gone.set()


class Dispatcher:
    def __init__(self, app: ASGIApp) -> None:
        """`app`: the routes, wrapped so that errors become responses in each protocol's shape (api/app.py)."""
        self.app = app

    async def run(self, call: Call) -> tuple[int, bytes]:
        """POST call.body to call.url; (status, response body)."""
        sent = [False]

        async def receive() -> Message:
            if not sent[0]:
                sent[0] = True
                return {"type": "http.request", "body": call.body, "more_body": False}
            await call._gone.wait()  # the handlers watch for this to stop their work
            return {"type": "http.disconnect"}

        status = [500]
        chunks: list[bytes] = []

        async def send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        try:
            await self.app(_scope(call.url), receive, send)
        except Exception:
            log.exception("batch line to %s failed", call.url)
            return 500, b'{"error": "internal error while running the line"}'
        return status[0], b"".join(chunks)


def _scope(url: str) -> dict:
    path, _, query = url.partition("?")
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "root_path": "", "query_string": query.encode(),
        "headers": [(b"content-type", b"application/json")], "client": ("batch", 0), "server": ("ladle", 0),
        "state": {}, BATCH_SCOPE_KEY: True,
    }
