"""A job's input file turned into lines to run, and each line's outcome turned into its output record: OpenAI's
batch format (`custom_id`, `response.status_code`, `response.body`, `error`) or the KServe job format
(`line`, `id`, `status_code`, `response` | `error`).

Invariant: a malformed line fails only itself (a LineResult at validation, in the error file); what fails the
whole job is only what makes every line meaningless — a line for another endpoint, a model that is not served,
a duplicated custom_id — reported as validation errors with the line number.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import orjson

from ladle.jobs.records import KSERVE, OPENAI, JobRecord, LineRecord, LineResult

#: the endpoints an OpenAI batch may target
OPENAI_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
#: the longest line parsed at validation, by job kind: the routes' default body limits (--max-openai-request-bytes,
#: --max-request-bytes). A longer line fails alone, unparsed: parsing holds the GIL on the store's thread
MAX_LINE_BYTES = {OPENAI: 4 * 1024 * 1024, KSERVE: 64 * 1024 * 1024}
#: validation errors kept on a failed job (the first ones; the count of the others is in the last message)
MAX_ERRORS = 100

#: says why `model` cannot serve `endpoint` (None: it can)
CheckModel = Callable[[str, str], "str | None"]


@dataclass
class Parsed:
    lines: list[LineRecord] = field(default_factory=list)
    failed: list[LineResult] = field(default_factory=list)  # malformed lines: done at validation
    errors: list[dict] = field(default_factory=list)  # job-level validation errors (the job fails)
    models: set[str] = field(default_factory=set)

    def error(self, code: str, message: str, line: int | None = None, param: str | None = None) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append({"code": code, "message": message, "line": line, "param": param})


def split_lines(chunks: Iterable[bytes]) -> Iterator[tuple[int, bytes]]:
    """Non-blank lines of a JSONL stream with their 0-based index among non-blank lines (1-based in messages)."""
    rest = b""
    index = 0
    for chunk in chunks:
        rest += chunk
        *complete, rest = rest.split(b"\n")
        for raw in complete:
            if raw.strip():
                yield index, raw.strip()
                index += 1
    if rest.strip():
        yield index, rest.strip()


def parse_job(job: JobRecord, chunks: Iterable[bytes], check_model: CheckModel) -> Parsed:
    parsed = Parsed()
    if job.kind == OPENAI:
        _parse_openai(job, chunks, check_model, parsed)
    else:
        _parse_kserve(job, chunks, parsed)
    if not parsed.lines and not parsed.failed and not parsed.errors:
        parsed.error("empty_file", "the input file has no lines")
    return parsed


def _parse_openai(job: JobRecord, chunks: Iterable[bytes], check_model: CheckModel, parsed: Parsed) -> None:
    seen: set[str] = set()
    checked: dict[str, str | None] = {}
    for index, raw in split_lines(chunks):
        number = index + 1
        obj, problem = _object(raw, MAX_LINE_BYTES[OPENAI])
        if problem is None:
            problem = _openai_shape(obj)
        if problem is not None:
            cid = obj.get("custom_id") if isinstance(obj, dict) and isinstance(obj.get("custom_id"), str) else None
            parsed.failed.append(openai_failure(job.id, index, cid, "invalid_request", f"line {number}: {problem}"))
            continue
        cid, url, body = obj["custom_id"], obj["url"], obj["body"]
        if url != job.endpoint:
            parsed.error("invalid_url", f"line {number}: url {url!r} differs from the batch's endpoint "
                         f"{job.endpoint!r}; a batch's lines all go to its endpoint", number, "url")
            continue
        if cid in seen:
            parsed.error("duplicate_custom_id", f"line {number}: custom_id {cid!r} is used more than once; "
                         "custom_ids must be unique within a batch", number, "custom_id")
            continue
        seen.add(cid)
        model = body.get("model")
        if not isinstance(model, str):
            parsed.failed.append(openai_failure(job.id, index, cid, "invalid_request",
                                                f"line {number}: body.model must be a string"))
            continue
        if model not in checked:
            checked[model] = check_model(url, model)
        if checked[model] is not None:
            parsed.error("model_not_found", f"line {number}: {checked[model]}", number, "body.model")
            continue
        parsed.models.add(model)
        body.pop("stream", None)  # a line's answer is one JSON body, never a stream
        body.pop("stream_options", None)
        parsed.lines.append(LineRecord(job.id, index, cid, url, orjson.dumps(body)))


def _object(raw: bytes, limit: int) -> tuple[dict, str | None]:
    if len(raw) > limit:
        return {}, f"the line has {len(raw)} bytes, over the {limit} a request may have"
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return {}, f"not valid JSON ({exc})"
    if not isinstance(obj, dict):
        return {}, "a line must be a JSON object"
    return obj, None


def _openai_shape(obj: dict) -> str | None:
    if not isinstance(obj.get("custom_id"), str) or not obj["custom_id"]:
        return "custom_id must be a non-empty string"
    if obj.get("method", "POST") != "POST":
        return f"method must be POST, got {obj.get('method')!r}"
    if not isinstance(obj.get("url"), str):
        return "url must be a string, e.g. /v1/chat/completions"
    if not isinstance(obj.get("body"), dict):
        return "body must be a JSON object (the request to send)"
    return None


def _parse_kserve(job: JobRecord, chunks: Iterable[bytes], parsed: Parsed) -> None:
    for index, raw in split_lines(chunks):
        obj, problem = _object(raw, MAX_LINE_BYTES[KSERVE])
        if problem is not None:
            parsed.failed.append(LineResult(job.id, index, False, kserve_record(index, None, 400, None,
                                                                                  f"line {index + 1}: {problem}")))
            continue
        rid = obj.get("id")
        cid = rid if isinstance(rid, str) else None
        parsed.lines.append(LineRecord(job.id, index, cid, job.endpoint, raw))


# -- output records ----------------------------------------------------------------------------------------
def line_result(job: JobRecord, line: LineRecord, status: int, body: bytes) -> LineResult:
    """The outcome of a line that ran: 2xx goes to the output file, anything else to the error file."""
    ok = 200 <= status < 300
    if job.kind == KSERVE:
        if ok:
            record = kserve_record(line.line_no, line.custom_id, status, _fragment(body), None)
        else:
            record = kserve_record(line.line_no, line.custom_id, status, None, _kserve_message(body))
        return LineResult(job.id, line.line_no, ok, record)
    response = {"status_code": status, "request_id": uuid.uuid4().hex, "body": _fragment(body)}
    record = orjson.dumps({"id": _request_id(), "custom_id": line.custom_id, "response": response, "error": None})
    return LineResult(job.id, line.line_no, ok, record)


def openai_failure(job_id: str, line_no: int, custom_id: str | None, code: str, message: str) -> LineResult:
    record = orjson.dumps({"id": _request_id(), "custom_id": custom_id, "response": None,
                           "error": {"code": code, "message": message}})
    return LineResult(job_id, line_no, False, record)


def expired_record(job: JobRecord, line_no: int, custom_id: str | None) -> bytes:
    message = "this line did not run before the batch's completion window expired"
    if job.kind == KSERVE:
        return kserve_record(line_no, custom_id, 408, None, message)
    return openai_failure(job.id, line_no, custom_id, "batch_expired", message).record


def kserve_record(line_no: int, rid: str | None, status: int, response: object, error: str | None) -> bytes:
    record: dict = {"line": line_no + 1, "id": rid, "status_code": status}  # 1-based, as in error messages
    if error is None:
        record["response"] = response
    else:
        record["error"] = error
    return orjson.dumps(record)


def _fragment(body: bytes) -> object:
    """A JSON response body embedded as is (no re-parse); a body that is not JSON is embedded as a string."""
    stripped = body.strip()
    if stripped[:1] in (b"{", b"["):
        return orjson.Fragment(stripped)
    return body.decode("utf-8", "replace")


def _kserve_message(body: bytes) -> str:
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "replace")[:1000]
    if isinstance(value, dict) and isinstance(value.get("error"), str):
        return value["error"]
    return str(value)[:1000]


def _request_id() -> str:
    return f"batch_req_{uuid.uuid4().hex}"
