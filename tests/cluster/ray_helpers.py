"""Shared by the cluster tests: reading the front end's /metrics and waiting for the cluster to change."""

from __future__ import annotations

import os
import subprocess
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

#: this test run's Serve application prefix: its replicas (and the processes the tests kill) are its own alone
PREFIX = f"t{os.getpid()}-"
IRIS = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]}


def samples(url: str, name: str) -> dict[tuple, float]:
    """{(sorted labels): value} of one metric in the front end's /metrics."""
    text = httpx.get(url + "/metrics", timeout=30).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def per_replica(url: str, name: str, **match: str) -> dict[str, float]:
    totals: dict[str, float] = {}
    for labels, value in samples(url, name).items():
        d = dict(labels)
        if all(d.get(k) == v for k, v in match.items()) and "replica" in d:
            totals[d["replica"]] = totals.get(d["replica"], 0.0) + value
    return totals


def running(url: str, model: str) -> int:
    return int(samples(url, "ladle_cluster_replicas").get((("model", model),), 0))


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"not within {timeout}s: {what}")




def replica_pids(app: str) -> list[int]:
    """The processes of an application's replicas (Ray titles them `ray::ServeReplica:<app>:<deployment>`)."""
    out = subprocess.run(["pgrep", "-f", f"ServeReplica:{app}:"], capture_output=True, text=True).stdout
    pids = [int(p) for p in out.split()]
    assert pids, f"no replica process of {app}"
    return pids


def settle_metrics() -> None:
    """Wait out the front end's /metrics cache, so that the next read is a fresh scrape of the replicas."""
    from ladle.cluster.frontend import FANOUT_TTL_S  # imports ray: only once a test runs (the extra is optional)

    time.sleep(FANOUT_TTL_S)
