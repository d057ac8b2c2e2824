"""Response compression: Starlette's GZipMiddleware vs ladle's own `encode_content` (what KServe responses use),
driven in-process as ASGI calls (no sockets), so the figures are the per-response CPU cost of each path alone.

Three apps return the same body: `bare` (no compression at all: the floor), `ladle` (the route compresses with
encode_content, min_size 1024, level 6, on a worker thread past 256 KiB as the KServe handler does), `gzip-mw`
(the route returns the body; GZipMiddleware(minimum_size=1024, compresslevel=6) wraps the app). Median of 5
interleaved runs.

    .venv/bin/python benchmarks/micro/compression.py
"""

from __future__ import annotations

import asyncio
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import orjson
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
from ladle.api.kserve_codec import encode_content

OFFLOAD = 256 * 1024  # kserve.OFFLOAD_BYTES: the handler encodes (and compresses) on a worker thread past it


def json_body(size: int) -> bytes:
    rng = random.Random(0)
    data = [round(rng.random(), 6) for _ in range(max(1, size // 10))]
    body = orjson.dumps({"model_name": "m", "outputs": [{"name": "y", "datatype": "FP32", "shape": [len(data)],
                                                         "data": data}]})
    return body[:size] if len(body) > size else body


def make_apps(body: bytes) -> dict[str, Starlette]:
    """Each route does what the KServe handler does: its work on a worker thread past OFFLOAD bytes (serializing
    a large output is offloaded whether or not it is compressed), on the event loop otherwise."""

    def route(work: Callable[[bytes, str | None], tuple[bytes, str | None]]) -> Route:
        async def endpoint(request: Request) -> Response:
            accept = request.headers.get("accept-encoding")
            if len(body) > OFFLOAD:
                out, coding = await asyncio.to_thread(work, body, accept)
            else:
                out, coding = work(body, accept)
            headers = {"Content-Encoding": coding} if coding else {}
            return Response(out, media_type="application/json", headers=headers)

        return Route("/", endpoint)

    def identity(data: bytes, accept: str | None) -> tuple[bytes, str | None]:
        return data, None

    def ladle(data: bytes, accept: str | None) -> tuple[bytes, str | None]:
        return encode_content(data, accept, 1024)

    gzip_mw = [Middleware(GZipMiddleware, minimum_size=1024, compresslevel=6)]
    return {"bare": Starlette(routes=[route(identity)]), "ladle": Starlette(routes=[route(ladle)]),
            "gzip-mw": Starlette(routes=[route(identity)], middleware=gzip_mw)}


async def per_request_us(app: Starlette, accept: str | None, n: int) -> float:
    headers = [(b"host", b"x")] + ([(b"accept-encoding", accept.encode())] if accept else [])
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": "/", "raw_path": b"/", "query_string": b"", "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000)}

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    started = time.perf_counter()
    for _ in range(n):
        sent.clear()
        await app(dict(scope), receive, send)
    elapsed = time.perf_counter() - started
    assert sent[0]["status"] == 200
    return elapsed / n * 1e6


async def main() -> None:
    cases = [("300 B, Accept-Encoding: gzip", 300, "gzip", 20000),
             ("300 B, no Accept-Encoding (the iris hot path)", 300, None, 20000),
             ("1 MB, Accept-Encoding: gzip", 1 << 20, "gzip", 40),
             ("1 MB, no Accept-Encoding", 1 << 20, None, 2000)]
    print("| response | bare (no compression) | ladle encode_content | GZipMiddleware |")
    print("|---|---|---|---|")
    for title, size, accept, n in cases:
        apps = make_apps(json_body(size))
        runs: dict[str, list[float]] = {name: [] for name in apps}
        for _ in range(5):  # interleaved, so a noisy moment on the shared box hits every app alike
            for name, app in apps.items():
                runs[name].append(await per_request_us(app, accept, n))
        row = {name: statistics.median(values) for name, values in runs.items()}
        print(f"| {title} | {row['bare']:.1f} µs | {row['ladle']:.1f} µs | {row['gzip-mw']:.1f} µs |", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
