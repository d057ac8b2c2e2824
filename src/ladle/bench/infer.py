"""The engine of `ladle bench infer`: KServe v2 load from one asyncio process over a pooled keep-alive client.

Invariant: every measured request leaves exactly one record (start, latency, status; status 0 when no
response came), and every reported figure is computed from those records alone, so a saved run re-checks.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import struct
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# aiohttp, not httpx: measured against `ladle serve` on this 2-core box, aiohttp spends ~0.1-0.25 ms of
# client CPU per request, httpx.AsyncClient ~0.8 ms (~2-3 ms at 64 in flight); the client must not be
# the bottleneck when it shares the cores with the server.
import aiohttp
import numpy as np
import orjson
from tqdm import tqdm

from ladle.bench import InferBenchConfig
from ladle.bench.aio import run_blocking, run_interruptible
from ladle.bench.stats import DEFAULT_PERCENTILES, format_ms, percentile_key, rate, summarize
from ladle.tensors import numpy_dtype

GENERATED_REQUESTS = 16  # distinct generated bodies, encoded up front and sent in turn
WORDS = (
    "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "model", "servers", "batch",
    "small", "requests", "into", "larger", "ones", "so", "each", "core", "stays", "busy", "and", "every", "answer",
)
Record = tuple[float, float, int]  # start (s since the measured phase began), latency (s), HTTP status


class BenchError(Exception):
    """The run cannot start: bad input file, unreachable server, unknown model metadata."""


def grpc_address(config: InferBenchConfig) -> str:
    """--grpc-address, else --url's host on Triton's gRPC port 8001."""
    if config.grpc_address:
        return config.grpc_address
    host = urlsplit(config.url).hostname or "127.0.0.1"
    return f"[{host}]:8001" if ":" in host else f"{host}:8001"


@dataclass(frozen=True)
class Payload:
    body: bytes
    headers: dict[str, str]


# -- request bodies ---------------------------------------------------------------------------------
def load_requests(path: Path) -> list[dict]:
    """A v2 inference request (or a list of them) from a JSON file."""
    try:
        document = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise BenchError(f"--input {path}: cannot read a JSON inference request ({exc})") from None
    requests = document if isinstance(document, list) else [document]
    for index, request in enumerate(requests):
        if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
            raise BenchError(f"--input {path}: request {index} is not an object with an 'inputs' list")
    return requests


def generate_requests(metadata: dict, rng: np.random.Generator, count: int = GENERATED_REQUESTS) -> list[dict]:
    """Random batch-1 requests matching the model's metadata (`-1` dims become 1; BYTES are sentences)."""
    return [{"inputs": [_random_input(spec, rng) for spec in metadata["inputs"]]} for _ in range(count)]


def _random_input(spec: dict, rng: np.random.Generator) -> dict:
    shape = [1 if dim < 0 else dim for dim in spec["shape"]]
    size = math.prod(shape)
    datatype = spec["datatype"]
    if datatype == "BYTES":
        data: list = [" ".join(rng.choice(WORDS, size=rng.integers(4, 13))) for _ in range(size)]
    elif datatype == "BOOL":
        data = (rng.random(size) < 0.5).tolist()
    elif datatype.startswith("FP"):
        data = rng.random(size).astype(numpy_dtype(datatype)).tolist()
    else:
        data = rng.integers(0, 100, size).astype(numpy_dtype(datatype)).tolist()
    return {"name": spec["name"], "datatype": datatype, "shape": shape, "data": data}


def encode_payload(request: dict, binary: bool) -> Payload:
    """The request as JSON, or in Triton's binary tensor extension (outputs asked back as binary too)."""
    if not binary:
        return Payload(orjson.dumps(request), {"Content-Type": "application/json", "Accept-Encoding": "identity"})
    body, header_length = binary_body(request)
    headers = {"Content-Type": "application/octet-stream", "Accept-Encoding": "identity",
               "Inference-Header-Content-Length": str(header_length)}
    return Payload(body, headers)


def binary_body(request: dict) -> tuple[bytes, int]:
    """(body, JSON header length): each input's `data` moves behind the header as raw little-endian bytes."""
    entries, chunks = [], []
    for entry in request["inputs"]:
        raw = tensor_bytes(entry["datatype"], entry["data"])
        meta = {k: v for k, v in entry.items() if k != "data"}
        meta["parameters"] = {**entry.get("parameters", {}), "binary_data_size": len(raw)}
        entries.append(meta)
        chunks.append(raw)
    header = {**request, "inputs": entries, "parameters": {**request.get("parameters", {}), "binary_data_output": True}}
    head = orjson.dumps(header)
    return head + b"".join(chunks), len(head)


def tensor_bytes(datatype: str, data: Any) -> bytes:
    """One tensor's binary form: BYTES items are 4-byte little-endian length + bytes; numbers are packed."""
    if datatype == "BYTES":
        items = [x.encode("utf-8") if isinstance(x, str) else bytes(x) for x in _flatten(data)]
        return b"".join(struct.pack("<I", len(item)) + item for item in items)
    return np.asarray(list(_flatten(data)), dtype=numpy_dtype(datatype).newbyteorder("<")).tobytes()


def _flatten(data: Any) -> Iterator[Any]:
    if isinstance(data, list):
        for item in data:
            yield from _flatten(item)
    else:
        yield data


# -- results ----------------------------------------------------------------------------------------
def summarize_records(records: list[Record]) -> dict:
    """Counts, errors by status, throughput of successful requests and their latency (ms)."""
    ok = [latency for _, latency, status in records if status == 200]
    errors = Counter(str(status) for _, _, status in records if status != 200)
    duration = max(s + lat for s, lat, _ in records) - min(s for s, _, _ in records) if records else 0.0
    return {
        "requests": len(records), "successes": len(ok), "errors": dict(sorted(errors.items())),
        "duration_s": duration, "throughput_rps": rate(len(ok), duration),
        "latency_ms": summarize(ok, DEFAULT_PERCENTILES).to_dict(scale=1e3),
    }


@dataclass
class BenchResult:
    config: InferBenchConfig
    records: list[Record] = field(default_factory=list)
    error_samples: dict[int, str] = field(default_factory=dict)  # first error body (or exception) per status
    interrupted: bool = False

    def summary(self) -> dict:
        return {**summarize_records(self.records), "interrupted": self.interrupted}

    def to_json(self) -> bytes:
        config = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.config).items()}
        requests = [{"start_s": s, "latency_s": lat, "status": status} for s, lat, status in self.records]
        samples = {str(status): text for status, text in sorted(self.error_samples.items())}
        document = {"config": config, "summary": self.summary(), "error_samples": samples, "requests": requests}
        return orjson.dumps(document, option=orjson.OPT_INDENT_2)


def format_report(result: BenchResult) -> str:
    summary, config = result.summary(), result.config
    version = f"version {config.model_version}" if config.model_version else "default version"
    target = f"grpc {grpc_address(config)}" if config.protocol == "grpc" else config.url
    load = (f"concurrency {config.concurrency}" if config.concurrency else f"Poisson {config.request_rate:g} req/s")
    latency = summarize([lat for _, lat, status in result.records if status == 200])
    parts = [f"mean {format_ms(latency.mean)}", *(f"{percentile_key(q)} {format_ms(v)}"
                                                   for q, v in latency.percentiles.items()),
             f"max {format_ms(latency.max)}"]
    lines = [
        f"model         {config.model} ({version}) at {target}",
        f"load          {load}, {'raw' if config.protocol == 'grpc' else 'binary' if config.binary else 'JSON'} tensors"
        + (" (interrupted)" if result.interrupted else ""),
        f"requests      {summary['requests']} ({summary['successes']} ok, "
        f"{summary['requests'] - summary['successes']} errors)",
    ]
    for status, count in summary["errors"].items():
        sample = result.error_samples.get(int(status), "")
        lines.append(f"  status {status if status != '0' else 'none'}: {count}  {sample[:160]}")
    lines += [f"duration      {summary['duration_s']:.3f} s",
              f"throughput    {summary['throughput_rps']:.1f} req/s",
              f"latency (ms)  {'  '.join(parts)}"]
    return "\n".join(lines)


# -- load -------------------------------------------------------------------------------------------
class _Budget:
    """How many more requests may start: a count, a deadline (perf_counter), or both."""

    def __init__(self, count: int | None, end: float | None = None) -> None:
        self.count, self.end = count, end

    def take(self, at: float) -> bool:
        if (self.end is not None and at >= self.end) or (self.count is not None and self.count <= 0):
            return False
        if self.count is not None:
            self.count -= 1
        return True


class LoadGenerator:
    def __init__(self, config: InferBenchConfig, session: aiohttp.ClientSession, url: str,
                 payloads: list[Payload], result: BenchResult) -> None:
        self.config, self.session, self.url, self.result = config, session, url, result
        self._payloads = itertools.cycle(payloads)
        self._t0 = 0.0
        self._bar: tqdm | None = None

    async def send(self, payload: Payload) -> Record:
        started = time.perf_counter()
        try:
            async with self.session.post(self.url, data=payload.body, headers=payload.headers) as response:
                body = await response.read()
                status = response.status
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            body, status = f"{type(exc).__name__}: {exc}".encode(), 0
        latency = time.perf_counter() - started
        if status != 200 and status not in self.result.error_samples:
            self.result.error_samples[status] = body[:400].decode("utf-8", "replace")
        return started - self._t0, latency, status

    async def _worker(self, budget: _Budget, measure: bool) -> None:
        while budget.take(time.perf_counter()):
            record = await self.send(next(self._payloads))
            if measure:
                self._keep(record)

    def _keep(self, record: Record) -> None:
        self.result.records.append(record)
        if self._bar is not None:
            self._bar.update()

    async def _open_loop(self, budget: _Budget, rate_rps: float) -> None:
        arrivals = random.Random(self.config.seed)
        tasks: set[asyncio.Task] = set()
        next_at = time.perf_counter()
        try:
            while budget.take(next_at):
                await asyncio.sleep(max(next_at - time.perf_counter(), 0.0))
                task = asyncio.create_task(self.send(next(self._payloads)))
                task.add_done_callback(lambda t: self._keep(t.result()) if not t.cancelled() else None)
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                next_at += arrivals.expovariate(rate_rps)
            if tasks:
                await asyncio.wait(tasks)
        finally:
            for task in tasks:
                task.cancel()

    async def run(self) -> None:
        """Warm up (unmeasured), then the measured phase; interruptible by cancelling this coroutine."""
        config = self.config
        if config.warmup:
            workers = min(config.warmup, config.concurrency or 8)
            warm = _Budget(config.warmup)
            await asyncio.gather(*(self._worker(warm, measure=False) for _ in range(workers)))
        self._t0 = time.perf_counter()
        end = None if config.duration is None else self._t0 + config.duration
        budget = _Budget(config.num_requests, end)
        with tqdm(total=config.num_requests, unit="req", disable=not config.progress, leave=False,
                  file=sys.stderr, desc=f"bench {config.model}") as self._bar:
            if config.concurrency is not None:
                await asyncio.gather(*(self._worker(budget, measure=True) for _ in range(config.concurrency)))
            else:
                await self._open_loop(budget, config.request_rate)


def _model_path(config: InferBenchConfig) -> str:
    version = f"/versions/{config.model_version}" if config.model_version is not None else ""
    return f"{config.url.rstrip('/')}/v2/models/{config.model}{version}"


async def _fetch_metadata(session: aiohttp.ClientSession, config: InferBenchConfig) -> dict:
    url = _model_path(config)
    try:
        async with session.get(url) as response:
            body = await response.read()
            if response.status != 200:
                raise BenchError(f"GET {url} answered {response.status}: {body[:300].decode('utf-8', 'replace')}")
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise BenchError(f"GET {url} failed: {type(exc).__name__}: {exc}") from None
    return orjson.loads(body)


async def _payloads(session: aiohttp.ClientSession, config: InferBenchConfig) -> list[Payload]:
    if config.input is not None:
        requests = load_requests(config.input)
    else:
        requests = generate_requests(await _fetch_metadata(session, config), np.random.default_rng(config.seed))
    try:
        return [encode_payload(request, config.binary) for request in requests]
    except (KeyError, TypeError, ValueError) as exc:
        raise BenchError(f"cannot encode the request: {type(exc).__name__}: {exc}") from None


async def run_async(config: InferBenchConfig) -> BenchResult:
    """One bench run; the first Ctrl-C stops it and returns what was measured so far."""
    result = BenchResult(config)
    # Open loop: no connection limit, arrivals never wait for one. Idle connections are dropped after 3 s, before
    # uvicorn's 5 s keep-alive timeout closes them under us (a POST on a just-closed connection fails, unretried).
    connector = aiohttp.TCPConnector(limit=config.concurrency or 0, keepalive_timeout=3.0)
    timeout = aiohttp.ClientTimeout(total=config.timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:
        payloads = await _payloads(session, config)
        generator = LoadGenerator(config, session, _model_path(config) + "/infer", payloads, result)
        await run_interruptible(generator.run(), result)
    return result



def run(config: InferBenchConfig) -> BenchResult:
    """Blocking entry point for scripts (benchmarks/classic/run.py): runs on uvloop when installed."""
    if config.protocol == "grpc":
        from ladle.bench.infer_grpc import run_grpc

        return run_blocking(run_grpc(config))
    return run_blocking(run_async(config))


def main(config: InferBenchConfig) -> int:
    from ladle.bench import grpc_client_missing

    if config.protocol == "grpc" and grpc_client_missing():
        return 2
    try:
        result = run(config)
    except BenchError as exc:
        print(f"ladle bench infer: {exc}", file=sys.stderr)
        return 1
    print(format_report(result))
    if config.result_json is not None:
        config.result_json.write_bytes(result.to_json())
        print(f"results       {config.result_json}")
    return 130 if result.interrupted else 0
