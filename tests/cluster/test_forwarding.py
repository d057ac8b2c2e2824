"""Forwarded requests run in process (cluster/forwarding.py) over a small real Starlette app: unary replies, streams
delivered chunk by chunk, an app that fails, the batch flag, header filtering both ways, and aborts — a caller that
stops listening is a client disconnect to the app, which must finish (or be cancelled after ABORT_GRACE_S)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ladle.cluster import forwarding
from ladle.cluster.forwarding import (
    ABORT_GRACE_S,
    Forwarded,
    InProcessApp,
    Reply,
    outgoing_headers,
    returned_headers,
)
from ladle.jobs.dispatch import BATCH_SCOPE_KEY


@dataclass
class Seen:
    """What the test app observed; events are made inside the running loop."""

    go_on: asyncio.Event = field(default_factory=asyncio.Event)
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: bool = False
    produced: int = 0


def make_app(seen: Seen) -> Starlette:
    async def unary(request: Request) -> Response:
        body = await request.body()
        return Response(body[::-1], status_code=201, headers={"x-ladle": "yes"}, media_type="text/plain")

    async def scope(request: Request) -> Response:
        return JSONResponse({"batch": request.scope[BATCH_SCOPE_KEY], "method": request.method,
                             "path": request.url.path, "query": request.url.query,
                             "headers": [[k.decode(), v.decode()] for k, v in request.scope["headers"]]})

    async def stream(request: Request) -> Response:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"one"
            await seen.go_on.wait()  # the caller must get "one" before "two" exists
            yield b"two"
            yield b"three"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    async def watch(request: Request) -> Response:
        async def chunks() -> AsyncIterator[bytes]:
            try:
                yield b"first"
                while not await request.is_disconnected():
                    seen.produced += 1
                    yield b"."
                    await asyncio.sleep(0.005)
                seen.disconnected.set()
            except asyncio.CancelledError:
                seen.cancelled = True  # Starlette's own disconnect listener may stop the stream first
                raise
            finally:
                seen.finished.set()

        return StreamingResponse(chunks())

    async def mid_stream_failure(request: Request) -> Response:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"first"
            raise RuntimeError("the model broke mid-stream")

        return StreamingResponse(chunks())

    return Starlette(routes=[Route("/unary", unary, methods=["POST"]), Route("/scope", scope, methods=["GET", "POST"]),
                             Route("/stream", stream), Route("/watch", watch),
                             Route("/mid-stream-failure", mid_stream_failure)])


def fwd(path: str, method: str = "GET", headers: tuple[tuple[bytes, bytes], ...] = (), body: bytes = b"",
        batch: bool = False, query: bytes = b"") -> Forwarded:
    return Forwarded(method, path, query, headers, body, batch)


def json_of(reply: Reply) -> dict[str, Any]:
    assert reply.status == 200, reply
    return json.loads(reply.body)


async def only_this_task_left() -> bool:
    await asyncio.sleep(0)
    return asyncio.all_tasks() == {asyncio.current_task()}


# -- unary ---------------------------------------------------------------------------------------------------------


def test_unary_call_status_headers_body() -> None:
    async def main() -> tuple[Reply, bool]:
        reply = await InProcessApp(make_app(Seen())).call(fwd("/unary", "POST", body=b"abc"))
        return reply, await only_this_task_left()

    reply, clean = asyncio.run(main())
    assert reply.status == 201 and reply.body == b"cba"
    headers = dict(reply.headers)
    assert headers[b"x-ladle"] == b"yes"
    assert headers[b"content-type"].startswith(b"text/plain")
    assert headers[b"content-length"] == b"3"
    assert clean  # the app's task ended with the call


def test_unknown_route_is_the_apps_own_404() -> None:
    reply = asyncio.run(InProcessApp(make_app(Seen())).call(fwd("/nowhere")))
    assert reply.status == 404


def test_call_collects_a_whole_stream() -> None:
    async def main() -> Reply:
        seen = Seen()
        seen.go_on.set()
        return await InProcessApp(make_app(seen)).call(fwd("/stream"))

    reply = asyncio.run(main())
    assert (reply.status, reply.body) == (200, b"onetwothree")


def test_scope_carries_method_path_query_headers_and_the_batch_flag() -> None:
    async def main() -> tuple[dict[str, Any], dict[str, Any]]:
        runner = InProcessApp(make_app(Seen()))
        plain = await runner.call(fwd("/scope", "POST", ((b"x-a", b"1"),), b"{}", query=b"q=2"))
        batch = await runner.call(fwd("/scope", batch=True))
        return json_of(plain), json_of(batch)

    plain, batch = asyncio.run(main())
    assert plain == {"batch": False, "method": "POST", "path": "/scope", "query": "q=2", "headers": [["x-a", "1"]]}
    assert batch["batch"] is True


# -- failures ------------------------------------------------------------------------------------------------------


async def raising_app(scope: Scope, receive: Receive, send: Send) -> None:
    raise RuntimeError("a bug in the app")


def test_an_app_that_raises_is_a_500_json_reply(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger=forwarding.__name__):
        reply = asyncio.run(InProcessApp(raising_app).call(fwd("/x", "POST")))
    assert reply.status == 500
    assert reply.headers == ((b"content-type", b"application/json"),)
    assert reply.body == b'{"error": "internal error in a replica"}'
    assert "forwarded POST /x failed" in caplog.text


def test_a_failure_mid_stream_still_ends_in_a_reply() -> None:
    reply = asyncio.run(InProcessApp(make_app(Seen())).call(fwd("/mid-stream-failure")))
    assert isinstance(reply, Reply) and reply.body.startswith(b"first")


def test_a_failure_mid_stream_yields_one_head_then_only_bytes() -> None:
    async def main() -> list[Reply | bytes]:
        return [item async for item in InProcessApp(make_app(Seen())).stream(fwd("/mid-stream-failure"))]

    items = asyncio.run(main())
    assert isinstance(items[0], Reply) and items[0].status == 200
    assert all(isinstance(item, bytes) for item in items[1:]), items
    assert items[1] == b"first"


# -- streaming -----------------------------------------------------------------------------------------------------


def test_stream_yields_the_head_first_then_chunks_as_sent() -> None:
    async def main() -> list[Any]:
        seen = Seen()
        chunks = InProcessApp(make_app(seen)).stream(fwd("/stream"))
        head = await asyncio.wait_for(anext(chunks), 2)
        first = await asyncio.wait_for(anext(chunks), 2)  # before the app may produce more
        assert not seen.go_on.is_set()
        seen.go_on.set()
        rest = [chunk async for chunk in chunks]
        return [head, first, rest, await only_this_task_left()]

    head, first, rest, clean = asyncio.run(main())
    assert isinstance(head, Reply) and head.status == 200 and head.body == b""
    assert dict(head.headers)[b"content-type"].startswith(b"text/event-stream")
    assert first == b"one"
    assert rest == [b"two", b"three"]
    assert clean


# -- aborts --------------------------------------------------------------------------------------------------------


def test_closing_the_stream_is_a_disconnect_the_app_sees() -> None:
    async def main() -> tuple[Seen, float, bool]:
        seen = Seen()
        chunks = InProcessApp(make_app(seen)).stream(fwd("/watch"))
        assert isinstance(await anext(chunks), Reply)
        assert await anext(chunks) == b"first"
        await anext(chunks)  # the app is in its polling loop
        started = asyncio.get_running_loop().time()
        await chunks.aclose()
        took = asyncio.get_running_loop().time() - started
        return seen, took, await only_this_task_left()

    seen, took, clean = asyncio.run(main())
    assert seen.finished.is_set()  # aclose() returned only once the app had finished
    assert seen.disconnected.is_set() or seen.cancelled  # it stopped because of the disconnect
    assert took < ABORT_GRACE_S
    assert clean


class ReceiveWatcher:
    """A raw ASGI streaming endpoint that waits on receive() for http.disconnect between chunks."""

    def __init__(self, seen: Seen) -> None:
        self.seen = seen

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert (await receive())["type"] == "http.request"  # the body comes first
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        try:
            message = await receive()  # parks until the caller goes away
            if message["type"] == "http.disconnect":
                self.seen.disconnected.set()
        finally:
            self.seen.finished.set()


def test_receive_returns_http_disconnect_when_the_caller_leaves() -> None:
    async def main() -> tuple[Seen, float]:
        seen = Seen()
        app = Starlette(routes=[Route("/raw", ReceiveWatcher(seen))])
        chunks = InProcessApp(app).stream(fwd("/raw"))
        assert isinstance(await anext(chunks), Reply)
        assert await anext(chunks) == b"first"
        assert not seen.finished.is_set()
        started = asyncio.get_running_loop().time()
        await chunks.aclose()
        return seen, asyncio.get_running_loop().time() - started

    seen, took = asyncio.run(main())
    assert seen.disconnected.is_set() and seen.finished.is_set()
    assert took < 1.0


def test_breaking_out_of_the_loop_aborts_too() -> None:
    async def main() -> Seen:
        seen = Seen()
        runner = InProcessApp(make_app(seen))

        async def consume() -> None:
            chunks = runner.stream(fwd("/watch"))
            try:
                async for chunk in chunks:
                    if chunk == b".":
                        break
            finally:
                await chunks.aclose()

        await consume()
        return seen

    seen = asyncio.run(main())
    assert seen.finished.is_set()


def test_cancelling_the_consumer_aborts_the_app() -> None:
    async def main() -> tuple[Seen, bool]:
        seen = Seen()
        runner = InProcessApp(make_app(seen))

        async def consume() -> None:
            async for _ in runner.stream(fwd("/watch")):
                pass

        task = asyncio.ensure_future(consume())
        while seen.produced < 3:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return seen, await only_this_task_left()

    seen, clean = asyncio.run(main())
    assert seen.finished.is_set()
    assert clean


def test_an_app_ignoring_the_disconnect_is_cancelled_after_the_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forwarding, "ABORT_GRACE_S", 0.2)

    async def main() -> tuple[Seen, float, bool]:
        seen = Seen()

        async def stubborn(scope: Scope, receive: Receive, send: Send) -> None:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"first", "more_body": True})
            try:
                await asyncio.sleep(60)  # never looks at receive()
            except asyncio.CancelledError:
                seen.cancelled = True
                raise
            finally:
                seen.finished.set()

        chunks = InProcessApp(stubborn).stream(fwd("/x"))
        await anext(chunks)
        await anext(chunks)
        started = asyncio.get_running_loop().time()
        await chunks.aclose()
        return seen, asyncio.get_running_loop().time() - started, await only_this_task_left()

    seen, took, clean = asyncio.run(main())
    assert seen.cancelled and seen.finished.is_set()
    assert 0.15 <= took < 2.0
    assert clean


# -- headers -------------------------------------------------------------------------------------------------------


def test_outgoing_headers_drop_credentials_and_hop_by_hop() -> None:
    raw = [(b"authorization", b"Bearer sk"), (b"connection", b"keep-alive"), (b"keep-alive", b"5"),
           (b"transfer-encoding", b"chunked"), (b"upgrade", b"h2c"), (b"host", b"x"), (b"content-length", b"2"),
           (b"expect", b"100-continue"), (b"te", b"trailers"), (b"content-type", b"application/json"),
           (b"x-session-id", b"s"), (b"x-request-timeout", b"3"), (b"accept", b"*/*")]
    assert outgoing_headers(raw) == ((b"content-type", b"application/json"), (b"x-session-id", b"s"),
                                     (b"x-request-timeout", b"3"), (b"accept", b"*/*"))


def test_outgoing_headers_keep_order_and_repeats() -> None:
    raw = [(b"x-a", b"1"), (b"authorization", b"k"), (b"x-a", b"2")]
    assert outgoing_headers(raw) == ((b"x-a", b"1"), (b"x-a", b"2"))


def test_returned_headers_drop_what_the_front_end_recomputes() -> None:
    raw = ((b"content-length", b"9"), (b"transfer-encoding", b"chunked"), (b"connection", b"close"),
           (b"date", b"today"), (b"server", b"uvicorn"), (b"content-type", b"application/json"),
           (b"retry-after", b"1"), (b"x-caf\xe9", b"\xe9"))
    assert returned_headers(raw) == [("content-type", "application/json"), ("retry-after", "1"),
                                     ("x-caf\u00e9", "\u00e9")]
