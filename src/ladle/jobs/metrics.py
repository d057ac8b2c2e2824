"""Prometheus metrics of the async batch path: jobs by status, lines done and failed, and the depth of batch work.

Invariant: the by-status and queue-depth gauges are read from the store (every server sharing it reports the same
totals); the line counters count what this server ran.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from ladle.jobs.records import STATUSES


class JobMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.jobs = Gauge("ladle_jobs", "Batch jobs (OpenAI batches and /v2/jobs) by status", ("status",), registry=r)
        self.lines = Counter("ladle_job_lines", "Batch job lines this server finished, by outcome (completed: 2xx "
                             "answer, failed: an error answer or a malformed line)", ("outcome",), registry=r)
        self.queue_depth = Gauge("ladle_job_queue_depth", "Lines of running batch jobs not finished yet (pending or "
                                 "running, over all servers sharing the store)", registry=r)
        self.in_flight = Gauge("ladle_job_lines_in_flight", "Batch job lines this server is running now", registry=r)
        self._completed = self.lines.labels("completed")
        self._failed = self.lines.labels("failed")

    def set_statuses(self, counts: dict[str, int]) -> None:
        for status in STATUSES:
            self.jobs.labels(status).set(counts.get(status, 0))

    def line_done(self, ok: bool) -> None:
        (self._completed if ok else self._failed).inc()
