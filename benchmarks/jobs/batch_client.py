"""What batch_path.py asks of the server besides `ladle bench serve`: the Files and Batches API (upload, create,
follow with a progress bar, cancel, read the output file) and a closed-loop `/v1/embeddings` load.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import numpy as np
import orjson
from tqdm import tqdm

TERMINAL = ("completed", "failed", "expired", "cancelled")


@dataclass
class Followed:
    """A batch followed from its creation: the last object seen and when (perf_counter) each status was first seen."""

    batch: dict[str, Any]
    created: float  # perf_counter just before POST /v1/batches
    seen: dict[str, float] = field(default_factory=dict)


class BatchClient:
    def __init__(self, base_url: str) -> None:
        self.http = httpx.Client(base_url=base_url, timeout=120.0)

    def close(self) -> None:
        self.http.close()

    def _ok(self, response: httpx.Response) -> dict[str, Any]:
        if response.status_code != 200:
            raise RuntimeError(f"{response.request.method} {response.request.url.path}: HTTP {response.status_code} "
                               f"{response.text[:400]}")
        return response.json()

    def upload(self, path: Path) -> str:
        with path.open("rb") as f:
            return self._ok(self.http.post("/v1/files", data={"purpose": "batch"},
                                           files={"file": (path.name, f, "application/jsonl")}))["id"]

    def create(self, file_id: str, endpoint: str) -> Followed:
        started = time.perf_counter()
        batch = self._ok(self.http.post("/v1/batches", json={"input_file_id": file_id, "endpoint": endpoint,
                                                             "completion_window": "24h"}))
        return Followed(batch, started, {batch["status"]: time.perf_counter()})

    def get(self, batch_id: str) -> dict[str, Any]:
        return self._ok(self.http.get(f"/v1/batches/{batch_id}"))

    def cancel(self, batch_id: str) -> dict[str, Any]:
        return self._ok(self.http.post(f"/v1/batches/{batch_id}/cancel"))

    def follow(self, f: Followed, until: Callable[[dict[str, Any]], bool] | None = None, poll_s: float = 0.5,
               timeout_s: float = 7200.0, desc: str = "batch", bar: bool = True) -> Followed:
        """Poll until the batch is terminal (or `until(batch)`), with a bar of request_counts.completed + failed."""
        deadline = time.perf_counter() + timeout_s
        with tqdm(total=0, desc=desc, unit="line", file=sys.stderr, disable=not bar, leave=False,
                  dynamic_ncols=True) as progress:
            while True:
                counts = f.batch["request_counts"]
                if counts["total"] and progress.total != counts["total"]:
                    progress.total = counts["total"]
                    progress.refresh()
                progress.update(counts["completed"] + counts["failed"] - progress.n)
                progress.set_postfix_str(f.batch["status"])
                if f.batch["status"] in TERMINAL or (until is not None and until(f.batch)):
                    return f
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"batch {f.batch['id']} still {f.batch['status']} after {timeout_s:.0f} s")
                time.sleep(min(poll_s, 0.1 + 0.01 * (time.perf_counter() - f.created)))  # fine at first
                f.batch = self.get(f.batch["id"])
                f.seen.setdefault(f.batch["status"], time.perf_counter())

    def output_stats(self, file_id: str | None) -> dict[str, Any]:
        """Lines of an output file by status code, and the usage they report (completion tokens: what was
        generated)."""
        stats: dict[str, Any] = {"lines": 0, "ok": 0, "prompt_tokens": 0, "completion_tokens": 0, "statuses": {}}
        if file_id is None:
            return stats
        with self.http.stream("GET", f"/v1/files/{file_id}/content") as response:
            if response.status_code != 200:
                raise RuntimeError(f"GET the output file {file_id}: HTTP {response.status_code}")
            for line in response.iter_lines():
                if not line.strip():
                    continue
                record = orjson.loads(line)
                stats["lines"] += 1
                resp = record.get("response") or {}
                code = str(resp.get("status_code"))
                stats["statuses"][code] = stats["statuses"].get(code, 0) + 1
                if code == "200":
                    stats["ok"] += 1
                    usage = (resp.get("body") or {}).get("usage") or {}
                    stats["prompt_tokens"] += usage.get("prompt_tokens") or 0
                    stats["completion_tokens"] += usage.get("completion_tokens") or 0
        return stats


# -- the LLM engine's counters -----------------------------------------------------------------------------------------
ENGINE_SERIES = {  # name in the result: the Prometheus sample (labels other than model= are summed)
    "steps": "ladle_llm_step_tokens_count", "step_tokens": "ladle_llm_step_tokens_sum",
    "prompt_tokens": "ladle_llm_prompt_tokens_total", "generation_tokens": "ladle_llm_generation_tokens_total",
    "prefix_hit_tokens": "ladle_llm_prefix_cache_hit_tokens_total", "preemptions": "ladle_llm_preemptions_total",
    "steps_le_256": 'ladle_llm_step_tokens_bucket{le="256.0"}',  # steps of at most 256 tokens
}
_SAMPLE = re.compile(r"^(\w+)\{([^}]*)\}\s+(\S+)$", re.MULTILINE)


def engine_counters(client: BatchClient, model: str) -> dict[str, float]:
    """The model's engine counters from GET /metrics (0 for a series with no sample yet)."""
    response = client.http.get("/metrics")
    out = dict.fromkeys(ENGINE_SERIES, 0.0)
    wanted = {v: k for k, v in ENGINE_SERIES.items()}
    for name, labels, value in _SAMPLE.findall(response.text if response.status_code == 200 else ""):
        if f'model="{model}"' not in labels:
            continue
        key = wanted.get(name) or next((wanted[w] for w in wanted if w.startswith(name + "{")
                                        and w[len(name) + 1:-1] in labels), None)
        if key is not None:
            out[key] += float(value)
    return out


def engine_delta(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float | None]:
    """What the engine did over a phase: steps, ms of wall time per step, tokens per step, preemptions."""
    d = {k: after[k] - before[k] for k in before}
    steps = d["steps"]
    d["steps_over_256"] = steps - d.pop("steps_le_256")
    return {**d, "ms_per_step": seconds / steps * 1e3 if steps else None,
            "tokens_per_step": d["step_tokens"] / steps if steps else None}


# -- the real-time embeddings load ------------------------------------------------------------------------------------
async def _closed_loop(url: str, bodies: list[bytes], concurrency: int, seconds: float,
                       latencies: list[float] | None) -> tuple[int, int, float]:
    """`concurrency` workers, each sending its next request as soon as the last is answered, until `seconds` have
    passed; (ok, failed, seconds from the start to the last answer)."""
    ok = failed = 0
    feed = itertools.cycle(bodies)
    started = time.perf_counter()
    deadline = started + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers={"Content-Type": "application/json"}) as session:
        async def worker() -> None:
            nonlocal ok, failed
            while time.perf_counter() < deadline:
                sent = time.perf_counter()
                try:
                    async with session.post(url, data=next(feed)) as response:
                        await response.read()
                        good = response.status == 200
                except aiohttp.ClientError:
                    good = False
                if good:
                    ok += 1
                    if latencies is not None:
                        latencies.append(time.perf_counter() - sent)
                else:
                    failed += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ok, failed, time.perf_counter() - started


def embeddings_load(base_url: str, bodies: list[dict], concurrency: int, seconds: float,
                    warmup_s: float = 2.0) -> dict[str, Any]:
    """A closed loop of one-text `/v1/embeddings` requests at `concurrency`, after an unmeasured warm-up at the same
    concurrency: requests/s and latency percentiles."""
    url = f"{base_url}/v1/embeddings"
    encoded = [orjson.dumps(b) for b in bodies]
    asyncio.run(_closed_loop(url, encoded, concurrency, warmup_s, None))
    latencies: list[float] = []
    ok, failed, elapsed = asyncio.run(_closed_loop(url, encoded, concurrency, seconds, latencies))
    ms = np.array(latencies) * 1e3 if latencies else np.array([float("nan")])
    return {"concurrency": concurrency, "requests": ok, "failed": failed, "seconds": elapsed,
            "req_s": ok / elapsed, "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}
