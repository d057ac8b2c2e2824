"""The job store's contract: files (metadata + content), jobs and their lines, with claiming under leases so
several servers sharing one store never run a line twice. Backends: sqlite_store (the default, one machine,
under --data-dir) and pg_store (--jobs-db postgresql://..., several servers).

Invariants: every method is synchronous and called from one thread at a time (AsyncStore runs them on its own
thread, off the event loop); a line's result is stored in the same transaction that marks it done and counts it
on its job, and only by the server that holds its claim — so a result is never lost once stored, and never
stored twice.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import functools
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from ladle.jobs.records import FileRecord, JobRecord, LineRecord, LineResult

T = TypeVar("T")


class JobStore(abc.ABC):
    # -- files ------------------------------------------------------------------------------------
    @abc.abstractmethod
    def add_file(self, record: FileRecord, chunks: Iterable[bytes]) -> None:
        """Store a file's content (streamed in chunks) and then its record; a failure leaves neither."""

    @abc.abstractmethod
    def get_file(self, file_id: str) -> FileRecord | None: ...

    @abc.abstractmethod
    def read_file(self, file_id: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """The file's content in chunks (KeyError when there is no such file)."""

    @abc.abstractmethod
    def list_files(
        self, purpose: str | None, after: str | None, limit: int, order: str
    ) -> tuple[list[FileRecord], bool]:
        """Files by created_at (then id), `order` "desc" (newest first) or "asc", starting after the file `after`;
        returns (page, has_more)."""

    @abc.abstractmethod
    def delete_file(self, file_id: str) -> bool:
        """Remove the record and content; False when there was no such file."""

    # -- jobs ------------------------------------------------------------------------------------
    @abc.abstractmethod
    def add_job(self, record: JobRecord) -> None: ...

    @abc.abstractmethod
    def get_job(self, job_id: str) -> JobRecord | None: ...

    @abc.abstractmethod
    def list_jobs(self, after: str | None, limit: int, kind: str | None = None) -> tuple[list[JobRecord], bool]:
        """Jobs newest first (created_at desc, then id desc), starting after the job `after`; (page, has_more)."""

    @abc.abstractmethod
    def update_job(self, job_id: str, expect: Iterable[str] | None = None, **fields: Any) -> bool:
        """Set fields of a job (any JobRecord field but id/kind/created_at; `errors`/`metadata` as JSON) — only if
        its status is one of `expect` when given (compare-and-set: one server wins a transition). True if set."""

    @abc.abstractmethod
    def jobs_with_status(self, statuses: Iterable[str]) -> list[JobRecord]:
        """Jobs in these statuses, oldest first (created_at, id)."""

    @abc.abstractmethod
    def status_counts(self) -> dict[str, int]:
        """Jobs per status (statuses with none are left out)."""

    # -- phase work: validating and finalizing a job happen on one server at a time ----------------------------
    @abc.abstractmethod
    def claim_job(self, job_id: str, owner: str, lease_s: float) -> bool:
        """Take the job's phase lease (validation, finalization) if nobody holds a live one; True if taken."""

    @abc.abstractmethod
    def release_job(self, job_id: str, owner: str) -> None: ...

    # -- lines -----------------------------------------------------------------------------------
    @abc.abstractmethod
    def add_lines(self, job_id: str, lines: Iterable[LineRecord], done: Iterable[LineResult] = ()) -> None:
        """Replace the job's lines (re-validation after a crash starts over) with `lines` (pending) and `done` (lines
        that failed already at validation, e.g. not JSON: stored done, counted failed), and set the job's `total`
        to their number and `completed`/`failed` to what `done` holds — in one transaction."""

    @abc.abstractmethod
    def claim_lines(self, job_id: str, owner: str, limit: int, lease_s: float) -> list[LineRecord]:
        """Up to `limit` lines of the job in line order that are pending or running under an expired lease; they
        become running, held by `owner` until now + lease_s (PostgreSQL: FOR UPDATE SKIP LOCKED)."""

    @abc.abstractmethod
    def finish_lines(self, owner: str, results: Iterable[LineResult]) -> int:
        """Store results of lines `owner` holds (others are ignored: their lease was lost and the line is someone
        else's now): mark them done and count them on their jobs (completed if ok, else failed), in one
        transaction. Returns how many were stored."""

    @abc.abstractmethod
    def release_lines(self, owner: str, keys: Iterable[tuple[str, int]]) -> None:
        """Give claimed lines (job_id, line_no) back: pending again, with no owner."""

    @abc.abstractmethod
    def renew_leases(self, owner: str, lease_s: float) -> None:
        """Extend every lease `owner` holds (lines and jobs) to now + lease_s."""

    @abc.abstractmethod
    def recover(self, owner: str) -> None:
        """At start-up: lines and jobs held by `owner` (a previous run of this server, same data dir) are free
        again. SQLite (one server per store) frees every lease."""

    @abc.abstractmethod
    def line_counts(self, job_id: str) -> dict[str, int]:
        """{"pending": n, "running": n, "done": n} for the job."""

    @abc.abstractmethod
    def pending_lines(self) -> int:
        """Lines pending or running over all jobs that are in_progress (the batch queue depth)."""

    @abc.abstractmethod
    def results(self, job_id: str) -> Iterator[tuple[int, bool, bytes]]:
        """The job's done lines in line order: (line_no, ok, record)."""

    @abc.abstractmethod
    def unfinished(self, job_id: str) -> Iterator[tuple[int, str | None]]:
        """The job's lines not done, in line order: (line_no, custom_id) — an expired job's error file lists them."""

    @abc.abstractmethod
    def close(self) -> None: ...


def open_store(data_dir: Path, jobs_db: str | None) -> JobStore:
    """--jobs-db postgresql://... (several servers), else SQLite under --data-dir."""
    if jobs_db:
        from ladle.jobs.pg_store import PostgresStore  # psycopg: only when asked for

        return PostgresStore(jobs_db)
    from ladle.jobs.sqlite_store import SQLiteStore

    return SQLiteStore(Path(data_dir))


class AsyncStore:
    """Runs a JobStore's methods on one thread of its own: the event loop never waits on the disk or the network,
    and the store sees one caller at a time. `await astore.call(store.get_job, job_id)`; `astore.store` is the
    store itself (for reading attributes)."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ladle-jobs-store")

    async def call(self, method: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(method, *args, **kwargs))

    def close(self) -> None:
        self._pool.submit(self.store.close).result()
        self._pool.shutdown(wait=True)
