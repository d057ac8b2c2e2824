"""The load of `ladle bench serve`: workload, warm-up, Poisson/gamma (or all-at-once) arrivals under an optional
concurrency cap, progress, Ctrl-C and the result document. The clock runs from before the first arrival to the end
of the last request (vLLM's benchmark duration); only finished requests leave records.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
from tqdm import tqdm

from ladle.bench import datasets
from ladle.bench.aio import run_blocking, run_interruptible
from ladle.bench.datasets import BenchTokenizer, DatasetError, SampleRequest
from ladle.bench.serve import ServeBenchConfig
from ladle.bench.serve_client import build_payload, stream_request
from ladle.bench.serve_metrics import RequestRecord, format_report, parse_slo, summarize_run


class BenchError(Exception):
    """The run cannot start: unreachable server, no model, bad dataset or tokenizer."""


@dataclass
class ServeBenchResult:
    config: ServeBenchConfig
    model: str
    records: list[RequestRecord] = field(default_factory=list)
    duration: float = 0.0
    interrupted: bool = False
    warmup_errors: list[str] = field(default_factory=list)

    @property
    def summary(self) -> dict[str, Any]:
        config = self.config
        return summarize_run(self.records, self.duration, parse_slo(config.slo), config.percentiles)

    def report(self) -> str:
        c = self.config
        return format_report(self.summary, max_concurrency=c.max_concurrency, request_rate=c.request_rate,
                             metrics=c.metrics, percentiles=c.percentiles, interrupted=self.interrupted)

    def to_json(self) -> bytes:
        config = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.config).items()}
        config["request_rate"] = "inf" if math.isinf(self.config.request_rate) else self.config.request_rate
        document = {"config": config, "model": self.model, "interrupted": self.interrupted,
                    "summary": self.summary, "requests": [r.to_dict() for r in sorted(self.records,
                                                                                       key=lambda r: r.index)]}
        return orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)


def load_tokenizer(config: ServeBenchConfig) -> BenchTokenizer | None:
    path = config.tokenizer
    if path is None and config.model and Path(config.model).is_dir():
        path = Path(config.model)
    if path is None:
        if config.dataset_name != "custom":
            raise BenchError(f"--dataset-name {config.dataset_name} counts tokens: give --tokenizer DIR")
        return None
    return BenchTokenizer(path)


def load_samples(config: ServeBenchConfig, tok: BenchTokenizer | None) -> list[SampleRequest]:
    """The measured prompts (num_prompts), then the warm-ups' own (num_warmups)."""
    c, n = config, config.num_prompts + config.num_warmups
    if c.dataset_name == "custom":
        return datasets.sample_custom(tok, c.dataset_path, n, c.custom_output_len, c.seed)
    assert tok is not None  # load_tokenizer insists on one for the other datasets
    if c.dataset_name == "random":
        return datasets.sample_random(tok, n, c.random_input_len, c.random_output_len, c.random_range_ratio,
                                      c.random_prefix_len, c.seed)
    if c.dataset_name == "prefix":
        return datasets.sample_prefix(tok, n, c.prefix_repetition_prefix_len, c.prefix_repetition_suffix_len,
                                      c.prefix_repetition_num_prefixes, c.prefix_repetition_output_len, c.seed)
    return datasets.sample_sharegpt(tok, c.dataset_path, n, c.sharegpt_output_len, c.seed)


def arrival_offsets(count: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Send times (s from the start): gamma gaps of mean 1/rate (Poisson when burstiness is 1), rescaled so the last
    lands at count/rate exactly, as vLLM does to steady the throughput across seeds; all zero for rate inf."""
    if math.isinf(rate):
        return [0.0] * count
    gaps = np.random.default_rng(seed).gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=count)
    times = np.cumsum(gaps)
    return (times * (count / rate / times[-1])).tolist()


class LoadRunner:
    def __init__(self, config: ServeBenchConfig, session: aiohttp.ClientSession, url: str,
                 samples: list[SampleRequest], bodies: list[bytes], tok: BenchTokenizer | None,
                 result: ServeBenchResult) -> None:
        self.config, self.session, self.url, self.result = config, session, url, result
        self.samples, self.bodies, self.tok = samples, bodies, tok
        self.headers = {"Content-Type": "application/json"}
        if os.environ.get("OPENAI_API_KEY"):
            self.headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
        self.t0 = time.perf_counter()
        self.bar: tqdm | None = None

    async def _send(self, index: int, limit: asyncio.Semaphore | None) -> RequestRecord:
        sample = self.samples[index % len(self.samples)]
        record = RequestRecord(index, sample.expected_output_len, sample.prompt_len)
        async with limit or contextlib.nullcontext():
            await stream_request(self.session, self.url, self.bodies[index % len(self.bodies)], self.headers,
                                 record, self.config.is_chat, self.t0, self.tok)
        return record

    async def warm_up(self) -> None:
        count = self.config.num_warmups
        if not count:
            return
        limit = asyncio.Semaphore(min(count, self.config.max_concurrency or count))
        # prompts of their own, sampled after the measured ones: a warm-up that replayed a measured prompt would leave
        # its prefix cached on the server, and that request's prefill would be skipped in the measurement
        first = self.config.num_prompts
        records = await asyncio.gather(*(self._send(first + i, limit) for i in range(count)))
        self.result.warmup_errors = [r.error for r in records if not r.success]

    async def measure(self) -> None:
        config = self.config
        limit = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
        offsets = arrival_offsets(config.num_prompts, config.request_rate, config.burstiness, config.seed)
        tasks: list[asyncio.Task] = []
        self.t0 = time.perf_counter()
        try:
            for index, at in enumerate(offsets):
                delay = self.t0 + at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.create_task(self._send(index, limit))
                task.add_done_callback(self._keep)
                tasks.append(task)
            await asyncio.gather(*tasks)
        finally:
            self.result.duration = time.perf_counter() - self.t0
            for task in tasks:
                task.cancel()

    def _keep(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is None:
            self.result.records.append(task.result())
            if self.bar is not None:
                self.bar.update()


async def resolve_model(session: aiohttp.ClientSession, config: ServeBenchConfig) -> str:
    if config.model:
        return config.model
    url = config.base_url.rstrip("/") + "/v1/models"
    try:
        async with session.get(url) as response:
            listing = orjson.loads(await response.read()) if response.status == 200 else {}
        models = listing.get("data") or [] if isinstance(listing, dict) else []
    except (aiohttp.ClientError, OSError, TimeoutError, orjson.JSONDecodeError) as exc:
        raise BenchError(f"GET {url} failed ({type(exc).__name__}: {exc}); is the server up? Or give --model") from None
    if not models:
        raise BenchError(f"GET {url} listed no model; give --model NAME")
    return str(models[0]["id"])


async def run_async(config: ServeBenchConfig) -> ServeBenchResult:
    """One run; the first Ctrl-C stops it and returns what was measured so far."""
    tok = load_tokenizer(config)
    try:
        samples = load_samples(config, tok)
    except DatasetError as exc:
        raise BenchError(str(exc)) from None
    extra = orjson.loads(config.extra_body) if config.extra_body else {}
    connector = aiohttp.TCPConnector(limit=config.max_concurrency or 0)  # no cap: never queue for a connection
    timeout = aiohttp.ClientTimeout(total=config.timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        model = await resolve_model(session, config)
        bodies = [build_payload(s, model, config.is_chat, config.temperature, config.ignore_eos, extra)
                  for s in samples]
        result = ServeBenchResult(config, model)
        runner = LoadRunner(config, session, config.base_url.rstrip("/") + config.endpoint, samples, bodies, tok,
                            result)
        await _interruptible(runner, result)
    return result


async def _interruptible(runner: LoadRunner, result: ServeBenchResult) -> None:
    async def phases() -> None:
        await runner.warm_up()
        with tqdm(total=runner.config.num_prompts, unit="req", disable=runner.config.disable_tqdm, leave=False,
                  file=sys.stderr, desc="bench serve") as runner.bar:
            await runner.measure()

    await run_interruptible(phases(), result)



def run(config: ServeBenchConfig) -> ServeBenchResult:
    """Blocking entry point (scripts, benchmarks/llm/run.py): on uvloop when installed."""
    return run_blocking(run_async(config))


def main(config: ServeBenchConfig) -> int:
    try:
        result = run(config)
    except (BenchError, DatasetError) as exc:
        print(f"ladle bench serve: {exc}", file=sys.stderr)
        return 1
    for error in sorted(set(result.warmup_errors))[:3]:
        print(f"warm-up request failed: {error}", file=sys.stderr)
    print(result.report())
    failures = sorted({r.error for r in result.records if not r.success})
    for error in failures[:3]:
        print(f"failed request: {error}")
    if config.result_json is not None:
        config.result_json.write_bytes(result.to_json())
        print(f"results written to {config.result_json}")
    return 130 if result.interrupted else 0
