"""The console's live data (issue 15): figures derived on the server from its own metrics — histogram quantiles as
Prometheus computes them, rates over each interval, gauges — per model version, classic and LLM, and the endpoint."""

from __future__ import annotations

import asyncio
import math
import time

import pytest
from starlette.testclient import TestClient

from ladle.api.app import create_app
from ladle.api.console_live import LiveSampler, figures, quantile, snapshot
from ladle.config import RepositoryConfig, ServerConfig
from ladle.metrics import LLMMetrics, Metrics
from tests.repos import write_probe


@pytest.mark.parametrize(("q", "buckets", "expected"), [
    (0.5, [(0.1, 0.0), (0.2, 10.0), (math.inf, 10.0)], 0.15),  # linear inside the (0.1, 0.2] bucket
    (0.99, [(0.1, 5.0), (0.2, 10.0), (math.inf, 10.0)], 0.198),
    (0.5, [(0.1, 10.0), (math.inf, 10.0)], 0.05),  # the first bucket starts at 0
    (0.99, [(0.1, 1.0), (math.inf, 10.0)], 0.1),  # in the +Inf bucket: the highest finite bound
    (0.5, [(0.1, 0.0), (math.inf, 0.0)], None),  # no observations
    (0.5, [], None),
])
def test_quantile_is_prometheus_histogram_quantile(q, buckets, expected) -> None:
    got = quantile(q, buckets)
    assert got == expected if expected is None else got == pytest.approx(expected)


def test_classic_figures_over_one_interval() -> None:
    metrics = Metrics()
    vm = metrics.for_version("iris", 2)
    before = snapshot(metrics.registry)
    for latency in (0.001, 0.002, 0.003, 0.2):
        vm.outcome("success")
        vm.request_duration.observe(latency)
    vm.outcome("error")
    vm.on_batch(4, 4, 0.001)
    vm.on_batch(2, 2, 0.001)
    vm.queue_depth.set(3)
    got = figures(before, snapshot(metrics.registry), 2.0)[("iris", "2")]
    assert got["kind"] == "classic" and got["requests_per_s"] == 2.5 and got["errors_per_s"] == 0.5
    assert got["queue_depth"] == 3 and got["batch_size"] == 3.0
    assert 1.0 <= got["p50_ms"] <= 2.5 and 100 < got["p99_ms"] <= 250  # within their buckets


def test_llm_figures_carry_their_version() -> None:
    metrics = Metrics()
    llm = LLMMetrics(metrics.llm, "chat", "2")
    before = snapshot(metrics.registry)
    llm.ttft.observe(0.03)
    llm.itl.observe(0.012)
    llm.generation_tokens.inc(40)
    llm.prefix_hits.inc(30)
    llm.prefix_queries.inc(120)
    llm.running.set(2)
    llm.kv_usage.set(0.25)
    got = figures(before, snapshot(metrics.registry), 4.0)[("chat", "2")]
    assert got["kind"] == "llm" and got["tokens_per_s"] == 10.0 and got["prefix_hit_rate"] == 0.25
    assert got["running"] == 2 and got["kv_usage"] == 0.25 and got["waiting"] == 0
    assert 20 < got["ttft_p50_ms"] <= 40 and 10 < got["itl_p50_ms"] <= 20


def test_the_sampler_keeps_aligned_bounded_series() -> None:
    async def run() -> dict:
        metrics = Metrics()
        vm = metrics.for_version("iris", 1)
        sampler = LiveSampler(metrics.registry, interval_s=0.02, keep=4)
        assert sampler.view()["points"] == 0  # the first read starts sampling
        for _ in range(10):
            vm.outcome("success")
            await asyncio.sleep(0.02)
        view = sampler.view()
        await sampler.close()
        return view

    view = asyncio.run(run())
    assert view["points"] == 3  # keep=4 snapshots: at most 3 intervals
    series = view["models"]["iris"]["1"]
    assert series["kind"] == "classic"
    assert all(len(values) == 3 for name, values in series.items() if name != "kind")
    assert sum(series["requests_per_s"]) > 0


def test_the_endpoint_answers_json(tmp_path) -> None:
    write_probe(tmp_path)
    config = ServerConfig(repository=RepositoryConfig(repository=tmp_path))
    with TestClient(create_app(config, with_jobs=False)) as client:
        first = client.get("/console/api/live")
        assert first.status_code == 200 and first.json()["points"] == 0
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [1.0]}]}
        assert client.post("/v2/models/probe/infer", json=body).status_code == 200
        time.sleep(2.3)  # one sampling interval
        second = client.get("/console/api/live").json()
    assert second["interval_s"] == 2.0 and second["points"] >= 1
    probe = second["models"]["probe"]["1"]
    assert probe["kind"] == "classic" and max(probe["requests_per_s"]) > 0
