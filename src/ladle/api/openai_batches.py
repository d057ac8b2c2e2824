"""OpenAI's Files and Batches API over the job service: /v1/files (multipart upload, list, get, content, delete)
and /v1/batches (create, get, list, cancel), in OpenAI's object shapes, so the official client works unmodified.

Invariant: an upload is never held in memory whole (spooled to disk as it arrives) and never exceeds
--max-batch-file-bytes by more than one chunk before it is refused with a 400.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from ladle.api.body import read_body
from ladle.errors import InvalidInput
from ladle.jobs.records import FileRecord, JobRecord
from ladle.jobs.service import JobService

MAX_PAGE = 10000
MULTIPART_SLACK = 64 * 1024  # form fields and part headers around the file


def _json(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


class BatchesAPI:
    def __init__(self, jobs: JobService, max_request_bytes: int) -> None:
        self.jobs = jobs
        self.max_request_bytes = max_request_bytes

    def routes(self) -> list[Route]:
        return [
            Route("/v1/files", self.upload, methods=["POST"]),
            Route("/v1/files", self.list_files, methods=["GET"]),
            Route("/v1/files/{file_id}", self.get_file, methods=["GET"]),
            Route("/v1/files/{file_id}", self.delete_file, methods=["DELETE"]),
            Route("/v1/files/{file_id}/content", self.content, methods=["GET"]),
            Route("/v1/batches", self.create, methods=["POST"]),
            Route("/v1/batches", self.list_batches, methods=["GET"]),
            Route("/v1/batches/{batch_id}", self.get_batch, methods=["GET"]),
            Route("/v1/batches/{batch_id}/cancel", self.cancel, methods=["POST"]),
        ]

    # -- files ------------------------------------------------------------------------------------
    async def upload(self, request: Request) -> Response:
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise InvalidInput("upload the file as multipart/form-data with fields `file` and `purpose`")
        limit = self.jobs.config.max_batch_file_bytes + MULTIPART_SLACK
        parser = MultiPartParser(request.headers, bounded_stream(request.stream(), limit), max_files=1, max_fields=16)
        try:
            form = await parser.parse()
        except MultiPartException as exc:
            raise InvalidInput(f"cannot read the multipart upload: {exc.message}") from None
        try:
            upload = form.get("file")
            purpose = form.get("purpose")
            if upload is None or isinstance(upload, str):
                raise InvalidInput("the upload has no `file` part", param="file")
            if not isinstance(purpose, str):
                raise InvalidInput("the upload has no `purpose` field (use purpose=batch)", param="purpose")
            record = await self.jobs.add_file(upload.filename or "", purpose, upload.file)
        finally:
            await form.close()
        return _json(file_object(record))

    async def list_files(self, request: Request) -> Response:
        q = request.query_params
        order = q.get("order", "desc")
        if order not in ("asc", "desc"):
            raise InvalidInput(f"order must be asc or desc, got {order!r}", param="order")
        limit = page_limit(q.get("limit"), 10000)
        files, more = await self.jobs.list_files(q.get("purpose"), q.get("after"), limit, order)
        return _json(page([file_object(f) for f in files], more))

    async def get_file(self, request: Request) -> Response:
        return _json(file_object(await self.jobs.get_file(request.path_params["file_id"])))

    async def delete_file(self, request: Request) -> Response:
        file_id = request.path_params["file_id"]
        await self.jobs.delete_file(file_id)
        return _json({"id": file_id, "object": "file", "deleted": True})

    async def content(self, request: Request) -> Response:
        chunks = await self.jobs.file_content(request.path_params["file_id"])
        return StreamingResponse(chunks, media_type="application/octet-stream")

    # -- batches ----------------------------------------------------------------------------------
    async def create(self, request: Request) -> Response:
        body = json_object(await read_body(request, self.max_request_bytes))
        for name in ("input_file_id", "endpoint", "completion_window"):
            if not isinstance(body.get(name), str):
                raise InvalidInput(f"`{name}` is required (a string)", param=name)
        job = await self.jobs.create_batch(body["input_file_id"], body["endpoint"], body["completion_window"],
                                           body.get("metadata"))
        return _json(batch_object(job))

    async def get_batch(self, request: Request) -> Response:
        return _json(batch_object(await self.jobs.get_job(request.path_params["batch_id"])))

    async def list_batches(self, request: Request) -> Response:
        q = request.query_params
        jobs, more = await self.jobs.list_jobs(q.get("after"), page_limit(q.get("limit"), 20), "openai")
        return _json(page([batch_object(j) for j in jobs], more))

    async def cancel(self, request: Request) -> Response:
        return _json(batch_object(await self.jobs.cancel(request.path_params["batch_id"])))


def file_object(f: FileRecord) -> dict[str, Any]:
    return {"id": f.id, "object": "file", "bytes": f.bytes, "created_at": f.created_at, "filename": f.filename,
            "purpose": f.purpose, "status": "processed", "status_details": None, "expires_at": None}


def batch_object(job: JobRecord) -> dict[str, Any]:
    errors = None if not job.errors else {"object": "list", "data": job.errors}
    return {
        "id": job.id, "object": "batch", "endpoint": job.endpoint, "errors": errors,
        "input_file_id": job.input_file_id, "completion_window": job.completion_window, "status": job.status,
        "output_file_id": job.output_file_id, "error_file_id": job.error_file_id, "created_at": job.created_at,
        "in_progress_at": job.in_progress_at, "expires_at": job.expires_at, "finalizing_at": job.finalizing_at,
        "completed_at": job.completed_at, "failed_at": job.failed_at, "expired_at": job.expired_at,
        "cancelling_at": job.cancelling_at, "cancelled_at": job.cancelled_at,
        "request_counts": {"total": job.total, "completed": job.completed, "failed": job.failed},
        "metadata": job.metadata, "model": job.model,
    }


def page(data: list[dict], has_more: bool) -> dict[str, Any]:
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}


def page_limit(raw: str | None, default: int) -> int:
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_PAGE:
        raise InvalidInput(f"limit must be an integer in [1, {MAX_PAGE}], got {raw!r}", param="limit")
    return int(raw)


def json_object(body: bytes) -> dict:
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"the body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidInput("the body must be a JSON object")
    return value


async def bounded_stream(stream: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    """The request body, refused (400, as the issue's clients expect of an oversized batch file) past `limit`."""
    size = 0
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            raise InvalidInput(f"the upload is over the server's limit of {limit - MULTIPART_SLACK} bytes per batch "
                               "file (--max-batch-file-bytes)", param="file")
        yield chunk
