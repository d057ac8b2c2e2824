"""Batch jobs under `ladle serve --ray`: the front end runs the job store and runner as a single ladle does, and its
lines go through the front end's own routes — so each line is routed to a replica like any request, carrying the
batch flag that queues it at batch priority there.

Invariant: a model's window of lines in flight grows with its running replicas (three quarters of what each replica
holds at once), so a batch neither starves a model of replicas nor floods one.
"""

from __future__ import annotations

import socket

from prometheus_client import CollectorRegistry

from ladle.api.jobs import IsLLM
from ladle.cluster.cluster import Cluster
from ladle.cluster.plans import plan
from ladle.config import ServerConfig
from ladle.errors import NotFound, Unavailable
from ladle.jobs import targets
from ladle.jobs.metrics import JobMetrics
from ladle.jobs.service import JobService


def job_service(config: ServerConfig, cluster: Cluster, registry: CollectorRegistry) -> JobService:
    owner = f"{socket.gethostname()}:{config.http.port}"  # as a single ladle: stable across restarts

    def check_models() -> targets.CheckModel:
        kinds = {n: m.config.backend for n, m in tuple(cluster.models.items()) if m.config is not None}
        return targets.backend_checker(kinds)

    return JobService(config.jobs, owner, lambda model: window(config, cluster, model), check_models,
                      JobMetrics(registry))


def window(config: ServerConfig, cluster: Cluster, model: str | None) -> int:
    if config.jobs.batch_lines_in_flight:
        return config.jobs.batch_lines_in_flight
    served = cluster.models.get(model) if model else None
    running = cluster.running(model) if model else 0
    if served is None or served.config is None or running == 0:
        return 1  # not servable now: one line at a time finds out when it is again (503s back off)
    p = plan(served.name, served.config, config.cluster, config.llm, config.http.drain_timeout, served.pinned)
    return max(1, p.options["max_ongoing_requests"] * 3 // 4 * running)


def is_llm(cluster: Cluster) -> IsLLM:
    def check(model: str, version: int | None) -> bool:
        served = cluster.models.get(model)
        if served is None:
            raise NotFound(f"unknown model '{model}'; POST /v2/repository/index lists the models")
        if served.config is None or model not in cluster.wanted:
            raise Unavailable(f"model '{model}' is not loaded")
        return served.config.is_llm

    return check
