"""The async batch path as the HTTP adapters see it: upload and read files, create, list, cancel and read jobs —
over one store (opened on first use, or at start when one exists) and one runner.

Invariant: every limit on what a client sends (file bytes, lines, window, metadata) is checked here, before
anything is stored; no method blocks the event loop (the store runs on its own thread, uploads spool to disk).
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import IO, Any

from ladle.config import JobsConfig
from ladle.errors import InvalidInput, NotFound, TooManyRequests
from ladle.jobs.dispatch import Dispatcher
from ladle.jobs.lines import OPENAI_ENDPOINTS, CheckModel
from ladle.jobs.metrics import JobMetrics
from ladle.jobs.records import (
    BATCH,
    CANCELLING,
    IN_PROGRESS,
    KSERVE,
    OPENAI,
    TERMINAL,
    VALIDATING,
    FileRecord,
    JobRecord,
)
from ladle.jobs.runner import JobRunner, WindowSize
from ladle.jobs.store import AsyncStore, open_store

_WINDOW = re.compile(r"^([1-9][0-9]{0,6})([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_WINDOW_S = 30 * 86400
MAX_METADATA = 16
MAX_FILENAME = 255


class JobService:
    def __init__(self, config: JobsConfig, owner: str, window: WindowSize, check_model: Callable[[], CheckModel],
                 metrics: JobMetrics) -> None:
        self.config = config
        self.owner = owner
        self.window, self.check_model, self.metrics = window, check_model, metrics
        self.store: AsyncStore | None = None
        self.runner: JobRunner | None = None
        self.dispatcher: Dispatcher | None = None
        self._opening = asyncio.Lock()

    async def start(self, dispatcher: Dispatcher) -> None:
        """Resume what a previous run left: open the store now when one exists, else on first use."""
        self.dispatcher = dispatcher
        if self.config.jobs_db or (Path(self.config.data_dir) / "jobs.sqlite3").exists():
            await self._store()

    async def _store(self) -> AsyncStore:
        async with self._opening:
            if self.store is None:
                store = await asyncio.to_thread(open_store, Path(self.config.data_dir), self.config.jobs_db)
                self.store = AsyncStore(store)
                assert self.dispatcher is not None, "start() first"
                self.runner = JobRunner(self.store, self.dispatcher, self.owner, self.window, self.check_model,
                                        self.metrics)
                self.runner.start()
        return self.store

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.close()
        if self.store is not None:
            await asyncio.to_thread(self.store.close)

    # -- files ------------------------------------------------------------------------------------
    async def add_file(self, filename: str, purpose: str, spool: IO[bytes]) -> FileRecord:
        """Store an uploaded file (spooled by the adapter, at most max_batch_file_bytes) after checking it."""
        if purpose != BATCH:
            raise InvalidInput(f"purpose must be 'batch' (the only purpose ladle serves), got {purpose!r}",
                               param="purpose")
        if len(filename) > MAX_FILENAME:
            raise InvalidInput(f"the file name has {len(filename)} characters; at most {MAX_FILENAME}", param="file")
        size, lines = await asyncio.to_thread(_measure, spool)
        self._check_size(size, lines)
        record = FileRecord(f"file-{ordered_hex()}", filename or "upload.jsonl", BATCH, size, int(time.time()),
                            lines)
        store = await self._store()
        await store.call(store.store.add_file, record, _read_chunks(spool))
        return record

    def _check_size(self, size: int, lines: int) -> None:
        if size > self.config.max_batch_file_bytes:
            raise InvalidInput(f"the file has {size} bytes, over the server's limit of "
                               f"{self.config.max_batch_file_bytes} (--max-batch-file-bytes)", param="file")
        if lines > self.config.max_batch_lines:
            raise InvalidInput(f"the file has {lines} lines, over the server's limit of {self.config.max_batch_lines}"
                               " (--max-batch-lines); split it into several batches", param="file")
        if lines == 0:
            raise InvalidInput("the file is empty: a batch input file holds one JSON request per line", param="file")

    async def get_file(self, file_id: str) -> FileRecord:
        store = await self._store()
        record = await store.call(store.store.get_file, file_id)
        if record is None:
            raise NotFound(f"no file with id {file_id!r}", param="file_id")
        return record

    async def list_files(self, purpose: str | None, after: str | None, limit: int, order: str
                         ) -> tuple[list[FileRecord], bool]:
        store = await self._store()
        return await store.call(store.store.list_files, purpose, after, limit, order)

    async def delete_file(self, file_id: str) -> None:
        store = await self._store()
        if not await store.call(store.store.delete_file, file_id):
            raise NotFound(f"no file with id {file_id!r}", param="file_id")

    async def file_content(self, file_id: str) -> AsyncIterator[bytes]:
        await self.get_file(file_id)
        store = await self._store()
        return _async_chunks(store, lambda: store.store.read_file(file_id))

    # -- jobs -------------------------------------------------------------------------------------
    async def create_batch(self, input_file_id: str, endpoint: str, window: str, metadata: Any) -> JobRecord:
        if endpoint not in OPENAI_ENDPOINTS:
            raise InvalidInput(f"endpoint must be one of {', '.join(OPENAI_ENDPOINTS)}, got {endpoint!r}",
                               param="endpoint")
        return await self._create(OPENAI, "batch_", endpoint, input_file_id, window, metadata, None)

    async def create_job(self, model: str, endpoint: str, input_file_id: str, window: str, metadata: Any
                         ) -> JobRecord:
        return await self._create(KSERVE, "job-", endpoint, input_file_id, window, metadata, model)

    async def _create(self, kind: str, prefix: str, endpoint: str, input_file_id: str, window: str, metadata: Any,
                      model: str | None) -> JobRecord:
        seconds = parse_window(window)
        meta = check_metadata(metadata)
        file = await self.get_file(input_file_id)
        if file.purpose != BATCH:
            raise InvalidInput(f"file {input_file_id} has purpose {file.purpose!r}; a batch reads a file uploaded "
                               "with purpose 'batch'", param="input_file_id")
        await self._check_active()
        now = int(time.time())
        job = JobRecord(f"{prefix}{ordered_hex()}", kind, endpoint, input_file_id, window, VALIDATING, now,
                        now + seconds, model=model, metadata=meta)
        store = await self._store()
        await store.call(store.store.add_job, job)
        self._wake()
        return job

    async def _check_active(self) -> None:
        store = await self._store()
        counts = await store.call(store.store.status_counts)
        active = sum(n for status, n in counts.items() if status not in TERMINAL)
        if active >= self.config.max_active_jobs:
            raise TooManyRequests(f"{active} batch jobs are unfinished, the server's limit (--max-active-jobs); "
                                  "retry when some have finished")

    async def get_job(self, job_id: str) -> JobRecord:
        store = await self._store()
        job = await store.call(store.store.get_job, job_id)
        if job is None:
            raise NotFound(f"no batch or job with id {job_id!r}", param="batch_id")
        return job

    async def list_jobs(self, after: str | None, limit: int, kind: str | None) -> tuple[list[JobRecord], bool]:
        store = await self._store()
        return await store.call(store.store.list_jobs, after, limit, kind)

    async def cancel(self, job_id: str) -> JobRecord:
        job = await self.get_job(job_id)
        if job.status not in TERMINAL and job.status != CANCELLING:
            store = await self._store()
            await store.call(store.store.update_job, job_id, expect=[VALIDATING, IN_PROGRESS], status=CANCELLING,
                             cancelling_at=int(time.time()))
            self._wake()
        return await self.get_job(job_id)

    async def results(self, job_id: str) -> AsyncIterator[bytes]:
        """The job's finished lines so far, in line order (all of them once it is final)."""
        await self.get_job(job_id)
        store = await self._store()
        return _async_chunks(store, lambda: _records(store.store.results(job_id)))

    def _wake(self) -> None:
        if self.runner is not None:
            self.runner.wake()


def ordered_hex() -> str:
    """32 hex digits that sort by creation time (microseconds first, then randomness): lists order by
    (created_at, id), and created_at has whole seconds only."""
    return f"{time.time_ns() // 1000:014x}{secrets.token_hex(9)}"


def parse_window(window: str) -> int:
    match = _WINDOW.match(window or "")
    seconds = int(match.group(1)) * _UNIT_S[match.group(2)] if match else 0
    if not 0 < seconds <= MAX_WINDOW_S:
        raise InvalidInput(f"completion_window must be a duration like 24h (a number and s, m, h or d, at most 30d), "
                           f"got {window!r}", param="completion_window")
    return seconds


def check_metadata(metadata: Any) -> dict[str, str] | None:
    """OpenAI's rule: at most 16 pairs, keys up to 64 characters, string values up to 512."""
    if metadata is None:
        return None
    if not isinstance(metadata, dict) or len(metadata) > MAX_METADATA or not all(
        isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512 for k, v in metadata.items()
    ):
        raise InvalidInput("metadata must be an object of at most 16 string pairs (keys up to 64 characters, values "
                           "up to 512)", param="metadata")
    return metadata


def _measure(spool: IO[bytes]) -> tuple[int, int]:
    """Bytes and non-empty lines of the spooled upload (then rewound)."""
    spool.seek(0)
    size = lines = 0
    last = b"\n"
    for chunk in iter(lambda: spool.read(1 << 20), b""):
        size += len(chunk)
        lines += chunk.count(b"\n")
        last = chunk[-1:]
    spool.seek(0)
    return size, lines + (last != b"\n")


def _read_chunks(spool: IO[bytes]) -> Iterator[bytes]:
    spool.seek(0)
    yield from iter(lambda: spool.read(1 << 20), b"")


def _records(results: Iterator[tuple[int, bool, bytes]]) -> Iterator[bytes]:
    buffer: list[bytes] = []
    for _, _, record in results:
        buffer.append(record + b"\n")
        if len(buffer) >= 256:
            yield b"".join(buffer)
            buffer.clear()
    if buffer:
        yield b"".join(buffer)


async def _async_chunks(store: AsyncStore, make: Callable[[], Iterator[bytes]]) -> AsyncIterator[bytes]:
    """Drive a store iterator on the store's thread, one chunk per hop, so a large file never sits in memory."""
    iterator = await store.call(make)
    while True:
        chunk = await store.call(next, iterator, None)
        if chunk is None:
            return
        yield chunk
