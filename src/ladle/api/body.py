"""Reading request bodies under a size limit, and watching for the client to go away.

Invariant: no more than `limit` bytes of a body are ever buffered; an oversized request is a 413
before the server reads it (Content-Length) or as soon as it crosses the limit (chunked).
"""

from __future__ import annotations

import asyncio
from typing import TypeVar

from starlette.requests import Request

from ladle.errors import InvalidInput, PayloadTooLarge
from ladle.jobs.dispatch import BATCH_SCOPE_KEY

T = TypeVar("T")


def is_batch(request: Request) -> bool:
    """A batch-job line: its work is queued at the lowest priority, under the batch share of the engine."""
    return request.scope.get(BATCH_SCOPE_KEY, False)


class ClientDisconnected(Exception):
    """The client closed the connection before its response was ready."""


def header_values(request: Request, *names: bytes) -> dict[bytes, str]:
    """The named headers (lower-case bytes) in one pass over the raw ASGI headers: cheaper on the hot path
    than building Starlette's Headers and scanning it once per lookup."""
    wanted = set(names)
    return {key: value.decode("latin-1") for key, value in request.scope["headers"] if key in wanted}


async def read_body(request: Request, limit: int, declared: str | None = None) -> bytes:
    """The body, at most `limit` bytes; `declared` is the Content-Length header when the caller has it."""
    if declared is None:
        declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InvalidInput(f"invalid Content-Length header {declared!r}")
        if int(declared) > limit:
            raise PayloadTooLarge(_too_large(int(declared), limit))
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(_too_large(size, limit))
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _too_large(size: int, limit: int) -> str:
    return (f"request body of {size} bytes is over the server's limit of {limit} bytes (--max-request-bytes; "
            "--max-openai-request-bytes on the OpenAI API)")


#: requests answered faster than this never pay for a disconnect watcher (most small-model inferences)
WATCH_AFTER_S = 0.02


async def until_disconnect(request: Request, work: asyncio.Future[T]) -> T:
    """Await `work`; raise ClientDisconnected if the client goes away first (the caller then
    cancels what it queued). Call after the body has been read: the next ASGI message can then
    only be `http.disconnect`. The watcher starts only once the work has taken WATCH_AFTER_S."""
    gone: list[bool] = []
    watcher: list[asyncio.Future] = []

    def watch() -> None:
        task = asyncio.ensure_future(request.receive())
        task.add_done_callback(lambda t: _on_message(t, work, gone))
        watcher.append(task)

    timer = asyncio.get_running_loop().call_later(WATCH_AFTER_S, watch)
    try:
        return await work
    except asyncio.CancelledError:
        if gone:
            raise ClientDisconnected from None
        raise
    finally:
        timer.cancel()
        for task in watcher:
            task.cancel()


def _on_message(task: asyncio.Future, work: asyncio.Future, gone: list[bool]) -> None:
    if task.cancelled() or task.exception() is not None or work.done():
        return
    if task.result().get("type") == "http.disconnect":
        gone.append(True)
        work.cancel()
