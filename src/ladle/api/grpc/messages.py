"""The host's answers as Triton's messages: model metadata, model config, repository index and statistics.

Pure conversions (no grpc calls); each carries the same data as its REST counterpart in api/kserve.py, and the
statistics converter reads the Triton-shaped dict `ladle.api.stats.statistics` returns.
"""

from __future__ import annotations

from typing import Any

from ladle.api.grpc.generated import grpc_service_pb2 as pb
from ladle.api.grpc.generated import model_config_pb2 as mc
from ladle.repository.signature import served_shape
from ladle.serving.host import ModelHost
from ladle.serving.versions import ModelVersion

_INFER_STATS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit",
                "cache_miss")
_BATCH_STATS = ("compute_input", "compute_infer", "compute_output")


def model_metadata(host: ModelHost, mv: ModelVersion) -> Any:
    def tensor(spec: Any) -> Any:
        return pb.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=spec.datatype,
                                                       shape=served_shape(mv.config, spec))
    return pb.ModelMetadataResponse(
        name=mv.name, versions=[str(v) for v in host.ready_versions(mv.name)], platform=mv.config.platform or "",
        inputs=[tensor(s) for s in mv.inputs], outputs=[tensor(s) for s in mv.outputs])


def _data_type(datatype: str) -> int:
    # model_config.proto spells BYTES as TYPE_STRING
    return mc.DataType.Value("TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}")


def model_config(mv: ModelVersion) -> Any:
    c = mv.config
    config = mc.ModelConfig(
        name=c.name, platform=c.platform or "", backend=c.backend or "", max_batch_size=c.max_batch_size,
        input=[mc.ModelInput(name=s.name, data_type=_data_type(s.datatype), dims=list(s.shape)) for s in mv.inputs],
        output=[mc.ModelOutput(name=s.name, data_type=_data_type(s.datatype), dims=list(s.shape))
                for s in mv.outputs],
        instance_group=[mc.ModelInstanceGroup(count=c.instance_count, kind=mc.ModelInstanceGroup.KIND_CPU)],
        parameters={k: mc.ModelParameter(string_value=str(v)) for k, v in dict(c.parameters).items()},
    )
    if c.dynamic_batching is not None:
        b = c.dynamic_batching
        config.dynamic_batching.CopyFrom(mc.ModelDynamicBatching(
            preferred_batch_size=list(b.preferred_batch_sizes),
            max_queue_delay_microseconds=int(b.max_queue_delay_ms * 1000), priority_levels=b.priority_levels,
            default_priority_level=b.default_priority_level,
            default_queue_policy=mc.ModelQueuePolicy(
                max_queue_size=b.max_queue_size, default_timeout_microseconds=int(b.default_queue_timeout_ms * 1000))))
    policy = c.version_policy
    if policy.kind == "all":
        config.version_policy.all.SetInParent()
    elif policy.kind == "specific":
        config.version_policy.specific.versions.extend(policy.specific)
    else:
        config.version_policy.latest.num_versions = policy.latest
    return pb.ModelConfigResponse(config=config)


def repository_index(rows: list[dict]) -> Any:
    index = pb.RepositoryIndexResponse()
    for row in rows:
        index.models.add(name=row["name"], version=row.get("version", ""), state=row.get("state", ""),
                         reason=row.get("reason", "") or "")
    return index


def _duration(raw: dict | None) -> Any:
    raw = raw or {}
    return pb.StatisticDuration(count=int(raw.get("count", 0)), ns=int(raw.get("ns", 0)))


def statistics(raw: dict) -> Any:
    """Triton's REST statistics JSON ({"model_stats": [...]}) -> ModelStatisticsResponse."""
    response = pb.ModelStatisticsResponse()
    for row in raw.get("model_stats", []):
        stats = response.model_stats.add(
            name=row["name"], version=str(row.get("version", "")), last_inference=int(row.get("last_inference", 0)),
            inference_count=int(row.get("inference_count", 0)), execution_count=int(row.get("execution_count", 0)))
        infer = row.get("inference_stats", {})
        for key in _INFER_STATS:
            getattr(stats.inference_stats, key).CopyFrom(_duration(infer.get(key)))
        for batch in row.get("batch_stats", []):
            entry = stats.batch_stats.add(batch_size=int(batch["batch_size"]))
            for key in _BATCH_STATS:
                getattr(entry, key).CopyFrom(_duration(batch.get(key)))
    return response
