"""An HTTP request carried from the front end to a replica and run there through ladle's own ASGI app, in process:
the replica answers exactly as a single `ladle serve` would (routes, limits, errors, streaming).

Invariant: a forwarded request always ends — in a Reply, or a stream that ends — and a caller that stops listening
(its client went away, the front end cancelled) is a client disconnect to the app, which frees what it held.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.types import ASGIApp, Message

from ladle.jobs.dispatch import BATCH_SCOPE_KEY

log = logging.getLogger(__name__)

Headers = tuple[tuple[bytes, bytes], ...]

#: request headers the front end never passes on: hop-by-hop ones, and the credentials it already checked
DROPPED_REQUEST_HEADERS = frozenset({b"authorization", b"connection", b"keep-alive", b"transfer-encoding",
                                     b"upgrade", b"host", b"content-length", b"expect", b"te"})
#: response headers the front end recomputes
DROPPED_RESPONSE_HEADERS = frozenset({b"content-length", b"transfer-encoding", b"connection", b"date", b"server"})
#: seconds an app that was told its client left may take to finish before it is cancelled
ABORT_GRACE_S = 5.0


@dataclass(frozen=True, slots=True)
class Forwarded:
    method: str
    path: str
    query: bytes
    headers: Headers
    body: bytes
    batch: bool = False  # a batch-job line: the replica queues it at batch priority


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: Headers
    body: bytes = b""


def outgoing_headers(raw: list[tuple[bytes, bytes]]) -> Headers:
    return tuple((k, v) for k, v in raw if k not in DROPPED_REQUEST_HEADERS)


def returned_headers(raw: Headers) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw if k not in DROPPED_RESPONSE_HEADERS]


class InProcessApp:
    """Runs forwarded requests through an ASGI app (the replica's ladle app) without a socket."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def call(self, request: Forwarded) -> Reply:
        head: Reply | None = None
        chunks: list[bytes] = []
        async for item in self.stream(request):
            if head is None:
                head = item  # type: ignore[assignment]
            else:
                chunks.append(item)  # type: ignore[arg-type]
        assert head is not None
        return Reply(head.status, head.headers, b"".join(chunks))

    async def stream(self, request: Forwarded) -> AsyncIterator[Reply | bytes]:
        """Yields the head (a Reply without body) first, then the body's chunks as the app sends them."""
        gone = asyncio.Event()
        messages: asyncio.Queue[Message | None] = asyncio.Queue()
        task = asyncio.ensure_future(self._run(request, gone, messages))
        try:
            while (message := await messages.get()) is not None:
                if message["type"] == "http.response.start":
                    yield Reply(message["status"], tuple(message.get("headers", ())))
                elif message["type"] == "http.response.body":
                    if body := message.get("body", b""):
                        yield body
                    if not message.get("more_body", False):
                        break
        finally:
            await _finish(task, gone)

    async def _run(self, request: Forwarded, gone: asyncio.Event, out: asyncio.Queue[Message | None]) -> None:
        sent = False

        async def receive() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": request.body, "more_body": False}
            await gone.wait()  # the handlers watch for this to stop their work
            return {"type": "http.disconnect"}

        started = False

        async def send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            out.put_nowait(message)

        try:
            await self.app(_scope(request), receive, send)
        except Exception:  # the app's error handlers answer everything; this is a bug, answered as a 500
            log.exception("forwarded %s %s failed", request.method, request.path)
            if not started:  # else the response is cut short where it failed, as a socket would cut it
                out.put_nowait({"type": "http.response.start", "status": 500,
                                "headers": [(b"content-type", b"application/json")]})
                out.put_nowait({"type": "http.response.body", "body": b'{"error": "internal error in a replica"}'})
        finally:
            out.put_nowait(None)


async def _finish(task: asyncio.Future, gone: asyncio.Event) -> None:
    if task.done():
        return
    gone.set()  # the caller left before the response ended: a client disconnect to the app
    try:
        await asyncio.wait_for(asyncio.shield(task), ABORT_GRACE_S)
    except (asyncio.TimeoutError, asyncio.CancelledError):
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


def _scope(request: Forwarded) -> dict:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": request.method,
        "scheme": "http", "path": request.path, "raw_path": request.path.encode(), "root_path": "",
        "query_string": request.query, "headers": list(request.headers), "client": ("ladle-front-end", 0),
        "server": ("ladle-replica", 0), "state": {}, BATCH_SCOPE_KEY: request.batch,
    }
