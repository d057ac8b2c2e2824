"""Bulk KServe jobs over the job service: POST /v2/jobs (a JSONL of v2 infer requests for one model, as the body or
as an uploaded file's id), GET /v2/jobs, GET /v2/jobs/{id}, GET /v2/jobs/{id}/results, POST /v2/jobs/{id}/cancel.
The /v2/jobs/{id} views work for OpenAI batches too (one job store), which is what `ladle jobs` reads.

Invariant: the model is checked before anything is stored (404 unknown, 400 an LLM); a JSONL body is spooled to
disk as it arrives and refused with a 400 past --max-batch-file-bytes.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from ladle.api.body import read_body
from ladle.api.openai_batches import bounded_stream, json_object, page, page_limit
from ladle.errors import InvalidInput
from ladle.jobs.records import JobRecord
from ladle.jobs.service import JobService
from ladle.repository.layout import parse_version
from ladle.serving.host import ModelHost

DEFAULT_WINDOW = "24h"

#: (model, version or None) -> whether it is an LLM; raises NotFound (unknown model or version) or Unavailable
IsLLM = Callable[[str, int | None], bool]


def host_is_llm(host: ModelHost) -> IsLLM:
    return lambda model, version: host.get(model, version).batcher is None


def _json(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


class JobsAPI:
    def __init__(self, jobs: JobService, is_llm: IsLLM, max_request_bytes: int) -> None:
        """`is_llm`: the model check (`host_is_llm(host)` on a single server; the cluster's view under --ray)."""
        self.jobs = jobs
        self.is_llm = is_llm
        self.max_request_bytes = max_request_bytes

    def routes(self) -> list[Route]:
        return [
            Route("/v2/jobs", self.create, methods=["POST"]),
            Route("/v2/jobs", self.list_jobs, methods=["GET"]),
            Route("/v2/jobs/{job_id}", self.get, methods=["GET"]),
            Route("/v2/jobs/{job_id}/results", self.results, methods=["GET"]),
            Route("/v2/jobs/{job_id}/cancel", self.cancel, methods=["POST"]),
        ]

    async def create(self, request: Request) -> Response:
        if request.headers.get("content-type", "").split(";")[0].strip() == "application/json":
            options = json_object(await read_body(request, self.max_request_bytes))
            file_id = options.get("input_file_id")
            if not isinstance(file_id, str):
                raise InvalidInput("a JSON body names an uploaded file: {\"model\": ..., \"input_file_id\": ...}; "
                                   "or send the JSONL itself as the body with ?model=NAME")
        else:
            options = dict(request.query_params)
            file_id = None
        model, version = options.get("model"), options.get("version")
        endpoint = self._endpoint(model, version)
        if file_id is None:
            file_id = (await self._upload(request)).id
        job = await self.jobs.create_job(model, endpoint, file_id, options.get("completion_window", DEFAULT_WINDOW),
                                         options.get("metadata"))
        return _json(job_object(job))

    def _endpoint(self, model: Any, version: Any) -> str:
        if not isinstance(model, str) or not model:
            raise InvalidInput("name the model: ?model=NAME (or \"model\" in a JSON body)")
        number = None if version in (None, "") else parse_version(str(version))
        if self.is_llm(model, number):  # 404 for an unknown model or version, 503 when not ready
            raise InvalidInput(f"model '{model}' is an LLM: submit its lines as an OpenAI batch (POST /v1/files, "
                               "then POST /v1/batches)")
        return f"/v2/models/{model}/versions/{number}/infer" if number is not None else f"/v2/models/{model}/infer"

    async def _upload(self, request: Request) -> Any:
        spool = await asyncio.to_thread(tempfile.TemporaryFile)
        try:
            limit = self.jobs.config.max_batch_file_bytes
            async for chunk in bounded_stream(request.stream(), limit + 64 * 1024):
                await asyncio.to_thread(spool.write, chunk)
            return await self.jobs.add_file(request.query_params.get("filename", "job.jsonl"), "batch", spool)
        finally:
            await asyncio.to_thread(spool.close)

    async def list_jobs(self, request: Request) -> Response:
        q = request.query_params
        jobs, more = await self.jobs.list_jobs(q.get("after"), page_limit(q.get("limit"), 20), q.get("kind"))
        return _json(page([job_object(j) for j in jobs], more))

    async def get(self, request: Request) -> Response:
        return _json(job_object(await self.jobs.get_job(request.path_params["job_id"])))

    async def results(self, request: Request) -> Response:
        chunks = await self.jobs.results(request.path_params["job_id"])
        return StreamingResponse(chunks, media_type="application/jsonl")

    async def cancel(self, request: Request) -> Response:
        return _json(job_object(await self.jobs.cancel(request.path_params["job_id"])))


def job_object(job: JobRecord) -> dict[str, Any]:
    return {
        "id": job.id, "object": "job", "kind": job.kind, "endpoint": job.endpoint, "model": job.model,
        "status": job.status, "created_at": job.created_at, "expires_at": job.expires_at,
        "completion_window": job.completion_window, "in_progress_at": job.in_progress_at,
        "finalizing_at": job.finalizing_at, "completed_at": job.completed_at, "failed_at": job.failed_at,
        "expired_at": job.expired_at, "cancelling_at": job.cancelling_at, "cancelled_at": job.cancelled_at,
        "request_counts": {"total": job.total, "completed": job.completed, "failed": job.failed},
        "input_file_id": job.input_file_id, "output_file_id": job.output_file_id,
        "error_file_id": job.error_file_id, "errors": job.errors, "metadata": job.metadata,
        "results_url": f"/v2/jobs/{job.id}/results",
    }
