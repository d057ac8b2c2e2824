"""Triton's statistics extension: the `model_stats` JSON of GET /v2/models[/{m}[/versions/{v}]]/stats, built from the
plain counters each version keeps (metrics.VersionStats). The gRPC ModelStatistics converts exactly this dict.

Invariant: only READY versions are listed; an unknown model or version is a 404 (NotFound), never an empty answer.
"""

from __future__ import annotations

from typing import Any

from ladle.errors import NotFound
from ladle.metrics import VersionStats
from ladle.serving.host import ModelHost
from ladle.serving.versions import ModelVersion

#: the per-request durations Triton reports; ladle keeps no response cache, so cache_hit/cache_miss stay zero
_ZERO = {"count": 0, "ns": 0}


def statistics(host: ModelHost, name: str | None, version: int | None) -> dict[str, Any]:
    """{"model_stats": [...]} for every READY version of every model (`name` None), of one model (`version` None),
    or of one version."""
    return {"model_stats": [version_statistics(mv) for mv in _versions(host, name, version)]}


def _versions(host: ModelHost, name: str | None, version: int | None) -> list[ModelVersion]:
    if name is None:
        return [record.ready[v] for _, record in sorted(host.models.items()) for v in sorted(record.ready)]
    record = host.models.get(name)
    if record is None:
        host.get(name)  # raises: NotFound for an unknown model, InvalidInput for a name that can never exist
        raise NotFound(f"unknown model '{name}'")
    if version is None:
        return [record.ready[v] for v in sorted(record.ready)]
    mv = record.ready.get(version)
    if mv is None:
        ready = ", ".join(str(v) for v in sorted(record.ready)) or "none"
        raise NotFound(f"model '{name}' has no READY version {version} (READY versions: {ready})")
    return [mv]


def version_statistics(mv: ModelVersion) -> dict[str, Any]:
    """One entry of `model_stats` (Triton's ModelStatistics as REST JSON; durations in ns, counts as ints)."""
    s: VersionStats = mv.metrics.stats
    rows = sorted(s.rows.items())
    # per request: each batch's own phases once, plus once more for every further request it carried
    requests, gather, infer, split = (sum(row[i] + row[i + 4] for _, row in rows) for i in range(4))
    return {
        "name": mv.name,
        "version": str(mv.version),
        "last_inference": s.last_inference_ms,
        "inference_count": sum(size * row[0] for size, row in rows),
        "execution_count": sum(row[0] for _, row in rows),
        "inference_stats": {
            "success": {"count": s.success_count, "ns": s.success_ns},
            "fail": {"count": s.fail_count, "ns": s.fail_ns},
            "queue": {"count": s.queue_count, "ns": s.queue_ns},
            "compute_input": {"count": requests, "ns": gather},
            "compute_infer": {"count": requests, "ns": infer},
            "compute_output": {"count": requests, "ns": split},
            "cache_hit": dict(_ZERO),
            "cache_miss": dict(_ZERO),
        },
        "batch_stats": [
            {"batch_size": size, "compute_input": {"count": row[0], "ns": row[1]},
             "compute_infer": {"count": row[0], "ns": row[2]}, "compute_output": {"count": row[0], "ns": row[3]}}
            for size, row in rows
        ],
    }
