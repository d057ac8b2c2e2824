"""ray_scaling.py's shared-prefix workload and what it reads back from a server: `groups` groups of /v1/completions
prompts, each group sharing a long head of its own (an assistant profile and a few-shot block, ~1.5k characters, its
first line naming the group so that no two heads share even their first KV block) with a short tail per request
(a question); requests interleave the groups (request i is group i % groups), so consecutive requests of one group
are `groups` requests apart. Greedy, max_tokens small: the prompt's prefill is the work.

The hit rate is read two ways: from each response's usage (prompt_tokens_details.cached_tokens / prompt_tokens,
summed over the requests), and from the servers' counters (ladle_llm_prefix_cache_hit_tokens_total /
ladle_llm_prefix_cache_query_tokens_total, deltas summed over every replica's series in the front end's /metrics).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import defaultdict
from typing import Any

import aiohttp
import httpx
import orjson
from prometheus_client.parser import text_string_to_metric_families

PERSONAS = ("a patient physics teacher", "a ship's navigator", "a museum guide", "a pastry chef", "a park ranger",
            "a librarian", "an old clockmaker", "a mountain guide", "a radio host", "a gardener", "a night-train "
            "conductor", "a lighthouse keeper", "a beekeeper", "a cartographer", "a violin maker", "a glassblower")
RULES = ("Answer in plain words.", "Keep every answer under three sentences.", "Prefer concrete examples.",
         "Never invent numbers you are not sure of.", "Use metric units.", "Say so when a question is ambiguous.",
         "Mention one thing a curious reader could try at home.", "Do not use lists.")


def head(group: int, questions: tuple[str, ...], chars: int = 1500) -> str:
    """The shared head of one group: a profile line naming the group, house rules, then worked examples until the head
    is about `chars` characters long (each group its own persona, rule order and examples)."""
    persona = PERSONAS[group % len(PERSONAS)]
    rules = [RULES[(group + 3 * i) % len(RULES)] for i in range(len(RULES))]
    parts = [f"Profile {group:03d}. You are {persona}, answering visitors' questions (group {group}).",
             "House rules: " + " ".join(rules), "Examples:"]
    for k in itertools.count():
        q = questions[(7 * group + 5 * k) % len(questions)]
        parts.append(f"Q{k + 1}: {q}\nA{k + 1}: As {persona} I would start from what we can see: {q.lower()} "
                     f"The short answer is in the everyday things around us, example {group}-{k}.")
        if sum(map(len, parts)) >= chars:
            break
    return "\n".join(parts) + "\n"


def prompts(groups: int, per_group: int, questions: tuple[str, ...], head_chars: int = 1500) -> list[tuple[int, str]]:
    """(group, prompt) for groups x per_group requests, interleaved: round r sends every group's r-th question."""
    heads = [head(g, questions, head_chars) for g in range(groups)]
    out = []
    for r in range(per_group):
        for g in range(groups):
            q = questions[(11 * g + 3 * r + 1) % len(questions)]
            out.append((g, f"{heads[g]}Visitor {r + 1}: {q}\nAnswer:"))
    return out


async def _run(url: str, model: str, items: list[tuple[int, str]], concurrency: int,
               max_tokens: int) -> list[dict[str, Any]]:
    feed = iter(enumerate(items))
    out: list[dict[str, Any]] = []
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, headers={"Content-Type": "application/json"}) as session:
        async def worker() -> None:
            for index, (group, prompt) in feed:
                body = orjson.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                                     "ignore_eos": True})
                sent = time.perf_counter()
                async with session.post(f"{url}/v1/completions", data=body) as response:
                    raw = await response.read()
                    status = response.status
                usage = orjson.loads(raw).get("usage", {}) if status == 200 else {}
                out.append({"index": index, "group": group, "status": status, "seconds": time.perf_counter() - sent,
                            "prompt_tokens": usage.get("prompt_tokens", 0),
                            "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
                            "error": None if status == 200 else raw[:300].decode("utf-8", "replace")})

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return sorted(out, key=lambda r: r["index"])


def run(url: str, model: str, items: list[tuple[int, str]], concurrency: int, max_tokens: int) -> dict[str, Any]:
    """Send the workload; usage-based hit rate, the counters' hit rate (deltas over every replica), and how the
    groups spread over the replicas (prompt tokens per replica)."""
    before = scrape(url)
    started = time.perf_counter()
    records = asyncio.run(_run(url, model, items, concurrency, max_tokens))
    seconds = time.perf_counter() - started
    after = scrape(url)
    failed = [r for r in records if r["status"] != 200]
    if failed:
        raise RuntimeError(f"{len(failed)} prefix-workload requests failed: {failed[0]['status']} {failed[0]['error']}")
    prompt = sum(r["prompt_tokens"] for r in records)
    cached = sum(r["cached_tokens"] for r in records)
    hits = delta(before, after, "ladle_llm_prefix_cache_hit_tokens_total", model)
    queries = delta(before, after, "ladle_llm_prefix_cache_query_tokens_total", model)
    per_replica = delta_by_replica(before, after, "ladle_llm_prompt_tokens_total", model)
    return {"requests": len(records), "seconds": seconds, "req_s": len(records) / seconds,
            "prompt_tokens": prompt, "cached_tokens": cached, "hit_rate_usage": cached / prompt if prompt else 0.0,
            "metrics_hit_tokens": hits, "metrics_query_tokens": queries,
            "hit_rate_metrics": hits / queries if queries else 0.0,
            "prompt_tokens_per_replica": per_replica,
            "mean_prompt_tokens": prompt / len(records), "p50_s": _median([r["seconds"] for r in records])}


# -- /metrics ----------------------------------------------------------------------------------------------------------
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: Samples, name: str, model: str | None = None) -> float:
    return sum(v for (n, labels), v in samples.items()
               if n == name and (model is None or ("model", model) in labels))


def delta(before: Samples, after: Samples, name: str, model: str | None = None) -> float:
    return total(after, name, model) - total(before, name, model)


def by_replica(samples: Samples, name: str, model: str | None = None) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for (n, labels), v in samples.items():
        if n == name and (model is None or ("model", model) in labels):
            out[dict(labels).get("replica", "(front end)")] += v
    return dict(out)


def delta_by_replica(before: Samples, after: Samples, name: str, model: str | None = None) -> dict[str, float]:
    b, a = by_replica(before, name, model), by_replica(after, name, model)
    return {k: a[k] - b.get(k, 0.0) for k in sorted(a)}


def replicas(samples: Samples, model: str) -> int:
    """Running replicas of `model` as the front end's ladle_cluster_replicas gauge says."""
    return int(total(samples, "ladle_cluster_replicas", model))


def _median(values: list[float]) -> float:
    s = sorted(values)
    return s[len(s) // 2] if s else float("nan")
