"""A job's two one-off phases, run on the store's thread under the job's phase lease: validation (the input file
becomes lines, or the job fails with its errors) and finalization (the done lines become the output and error
files, and the job its final status).

Invariant: both are idempotent — run again after a crash, validation replaces the job's lines and finalization
rewrites the same file ids — and each ends in one compare-and-set of the job's status, so exactly one run wins.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from ladle.jobs.lines import CheckModel, expired_record, parse_job
from ladle.jobs.records import (
    BATCH_OUTPUT,
    CANCELLED,
    COMPLETED,
    EXPIRED,
    FAILED,
    FINAL_STATUS,
    IN_PROGRESS,
    VALIDATING,
    FileRecord,
    JobRecord,
)
from ladle.jobs.store import JobStore


def validate(store: JobStore, job: JobRecord, check_model: CheckModel) -> str:
    """Parse the job's input file into lines; the job moves to in_progress, or to failed with its errors.
    Returns the job's new status."""
    now = int(time.time())
    if store.get_file(job.input_file_id) is None:
        errors = [{"code": "file_not_found", "message": f"input file {job.input_file_id} no longer exists",
                   "line": None, "param": "input_file_id"}]
        store.update_job(job.id, expect=[VALIDATING], status=FAILED, errors=errors, failed_at=now)
        return FAILED
    parsed = parse_job(job, store.read_file(job.input_file_id), check_model)
    if parsed.errors:
        store.update_job(job.id, expect=[VALIDATING], status=FAILED, errors=parsed.errors, failed_at=now)
        return FAILED
    store.add_lines(job.id, parsed.lines, parsed.failed)
    model = job.model or (min(parsed.models) if parsed.models else None)
    store.update_job(job.id, expect=[VALIDATING], status=IN_PROGRESS, in_progress_at=now, model=model)
    return IN_PROGRESS


def finalize(store: JobStore, job: JobRecord) -> str:
    """Write the output file (2xx lines) and the error file (the others; for an expired job also every line that
    did not run), then set the final status. Returns it."""
    final = FINAL_STATUS[job.status]

    def outputs() -> Iterator[bytes]:
        return (record for _, ok, record in store.results(job.id) if ok)

    def errors() -> Iterator[bytes]:
        yield from (record for _, ok, record in store.results(job.id) if not ok)
        if final == EXPIRED:
            yield from (expired_record(job, n, cid) for n, cid in store.unfinished(job.id))

    output_id = _write(store, f"file-{_hex(job.id)}-output", f"{job.id}_output.jsonl", outputs)
    error_id = _write(store, f"file-{_hex(job.id)}-errors", f"{job.id}_errors.jsonl", errors)
    stamp = {COMPLETED: "completed_at", CANCELLED: "cancelled_at", EXPIRED: "expired_at"}[final]
    store.update_job(job.id, expect=[job.status], status=final, output_file_id=output_id, error_file_id=error_id,
                     **{stamp: int(time.time())})
    return final


def _write(store: JobStore, file_id: str, filename: str, records: Callable[[], Iterator[bytes]]) -> str | None:
    """Store the records as a JSONL file under a fixed id (replacing what an interrupted run left); None when there
    are none. Two passes (size, then content): the record goes in with its size, the content is never all in memory."""
    size = count = 0
    for record in records():
        size += len(record) + 1
        count += 1
    store.delete_file(file_id)
    if not count:
        return None
    store.add_file(FileRecord(file_id, filename, BATCH_OUTPUT, size, int(time.time()), count), _chunks(records()))
    return file_id


def _chunks(records: Iterator[bytes], size: int = 1 << 20) -> Iterator[bytes]:
    buffer: list[bytes] = []
    held = 0
    for record in records:
        buffer.append(record + b"\n")
        held += len(record) + 1
        if held >= size:
            yield b"".join(buffer)
            buffer.clear()
            held = 0
    if buffer:
        yield b"".join(buffer)


def _hex(job_id: str) -> str:
    return job_id.split("_", 1)[-1].split("-", 1)[-1]
