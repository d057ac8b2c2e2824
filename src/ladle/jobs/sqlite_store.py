"""The default job store: one server per data dir — records in data_dir/jobs.sqlite3 (WAL), file contents in
data_dir/files/<file_id>. Invariants: a file's content is on disk (fsynced, renamed into place) before its record
exists; every change of several rows is one BEGIN IMMEDIATE transaction; leases are time.time() seconds.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ladle.jobs import store_rows as rows
from ladle.jobs.records import DONE, IN_PROGRESS, PENDING, RUNNING, FileRecord, JobRecord, LineRecord, LineResult
from ladle.jobs.store import JobStore

SCHEMA_VERSION = 1
_TYPES = {"int": "INTEGER", "text": "TEXT"}
_FILE_COLS = ", ".join(rows.FILE_NAMES)
_JOB_COLS = ", ".join(rows.JOB_NAMES)
_SAFE_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")  # a file id names a file on disk: no separators, no dotfiles
_PAGE = 1000  # rows per query when iterating results: memory stays bounded and no read stays open between pages


def _schema_v1() -> list[str]:
    return [
        f"CREATE TABLE files ({rows.column_defs(rows.FILE_COLUMNS, _TYPES)})",
        "CREATE INDEX files_by_time ON files (created_at, id)",
        f"CREATE TABLE jobs ({rows.column_defs(rows.JOB_COLUMNS, _TYPES)}, owner TEXT, lease_until REAL)",
        "CREATE INDEX jobs_by_time ON jobs (created_at, id)",
        "CREATE INDEX jobs_by_status ON jobs (status, created_at, id)",
        "CREATE TABLE lines (job_id TEXT NOT NULL, line_no INTEGER NOT NULL, custom_id TEXT, url TEXT NOT NULL,"
        " body BLOB NOT NULL, state TEXT NOT NULL, owner TEXT, lease_until REAL, ok INTEGER, record BLOB,"
        " PRIMARY KEY (job_id, line_no))",
        # a claim reads the first pending lines and the expired running ones: partial indexes on each keep it from
        # walking past a big job's done (or live running) lines every time
        "CREATE INDEX lines_pending ON lines (job_id, line_no) WHERE state = 'pending'",
        "CREATE INDEX lines_running ON lines (job_id, lease_until) WHERE state = 'running'",
        "CREATE INDEX lines_by_owner ON lines (owner) WHERE owner IS NOT NULL",  # renew_leases, every tick
    ]


#: MIGRATIONS[v] brings a database at user_version v to v + 1
MIGRATIONS = [_schema_v1]
assert len(MIGRATIONS) == SCHEMA_VERSION


class SQLiteStore(JobStore):
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.files_dir = self.data_dir / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        for leftover in self.files_dir.glob(".*.tmp"):  # content a crash left half-written: no record has it
            leftover.unlink(missing_ok=True)
        # isolation_level=None: no implicit transactions, each write says BEGIN IMMEDIATE itself;
        # check_same_thread=False: AsyncStore's thread is not the one that opens the store
        self._conn = sqlite3.connect(self.data_dir / "jobs.sqlite3", timeout=30.0, isolation_level=None,
                                     check_same_thread=False)
        self._lock = threading.RLock()  # iterators may be drained elsewhere: one statement at a time, always
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")  # WAL: a power cut may lose last commits, not corrupt
            self._conn.execute("PRAGMA busy_timeout=30000")
            self._migrate()
        except BaseException:
            self._conn.close()
            raise

    def _migrate(self) -> None:
        with self._write():
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"{self.data_dir}: job store schema {version} is newer than this ladle's "
                                   f"({SCHEMA_VERSION})")
            for migration in MIGRATIONS[version:]:
                for statement in migration():
                    self._conn.execute(statement)
            self._conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; IMMEDIATE takes the write lock up front, so a read-then-write never fails
        half-way on a lock upgrade."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                if self._conn.in_transaction:  # SQLite may have rolled back already (disk full, I/O error)
                    self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _read(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        with self._lock:
            return self._conn.execute(sql, tuple(params)).fetchall()

    # -- files ------------------------------------------------------------------------------------
    def _path(self, file_id: str) -> Path:
        if not _SAFE_ID.fullmatch(file_id):
            raise ValueError(f"not a file id: {file_id!r}")
        return self.files_dir / file_id

    def add_file(self, record: FileRecord, chunks: Iterable[bytes]) -> None:
        final = self._path(record.id)
        if self.get_file(record.id) is not None:  # before the disk: a new content must not replace a stored one
            raise ValueError(f"file {record.id} already exists")
        temp = self.files_dir / f".{record.id}.{uuid.uuid4().hex}.tmp"
        try:
            with open(temp, "wb") as out:
                for chunk in chunks:
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp, final)
            _fsync_dir(self.files_dir)  # the rename itself survives a power cut before the record points at it
            with self._write() as conn:
                conn.execute(f"INSERT INTO files ({_FILE_COLS}) VALUES (?, ?, ?, ?, ?, ?)", rows.file_to_row(record))
        except BaseException:
            temp.unlink(missing_ok=True)
            if final.exists() and self.get_file(record.id) is None:
                final.unlink(missing_ok=True)
            raise

    def get_file(self, file_id: str) -> FileRecord | None:
        found = self._read(f"SELECT {_FILE_COLS} FROM files WHERE id = ?", (file_id,))
        return rows.file_from_row(found[0]) if found else None

    def read_file(self, file_id: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        if self.get_file(file_id) is None:  # checked now, not at the first next(): KeyError where it is asked
            raise KeyError(file_id)
        return _read_chunks(self._path(file_id), chunk_size)

    def list_files(self, purpose: str | None, after: str | None, limit: int,
                   order: str) -> tuple[list[FileRecord], bool]:
        filters = [] if purpose is None else [("purpose = ?", (purpose,))]
        found = self._page("files", _FILE_COLS, filters, after, limit, rows.descending(order))
        return rows.page([rows.file_from_row(r) for r in found], limit)

    def delete_file(self, file_id: str) -> bool:
        with self._write() as conn:
            deleted = conn.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount
        if deleted:  # the record goes first: no record ever points at missing content
            self._path(file_id).unlink(missing_ok=True)
        return bool(deleted)

    def _page(self, table: str, cols: str, filters: list[tuple[str, tuple[Any, ...]]], after: str | None,
              limit: int, desc: bool) -> list[Any]:
        """Up to limit + 1 rows of `table` in (created_at, id) order, after the row `after` (none if it is gone)."""
        with self._lock:
            if after is not None:
                cursor = self._read(f"SELECT created_at, id FROM {table} WHERE id = ?", (after,))
                if not cursor:
                    return []
                filters = [*filters, (f"(created_at, id) {'<' if desc else '>'} (?, ?)", tuple(cursor[0]))]
            where = " AND ".join(sql for sql, _ in filters) or "1"
            params = [p for _, values in filters for p in values]
            way = "DESC" if desc else "ASC"
            return self._read(f"SELECT {cols} FROM {table} WHERE {where} ORDER BY created_at {way}, id {way} "
                              "LIMIT ?", [*params, max(limit, 0) + 1])

    # -- jobs ------------------------------------------------------------------------------------
    def add_job(self, record: JobRecord) -> None:
        marks = ", ".join("?" * len(rows.JOB_NAMES))
        with self._write() as conn:
            conn.execute(f"INSERT INTO jobs ({_JOB_COLS}) VALUES ({marks})", rows.job_to_row(record))

    def get_job(self, job_id: str) -> JobRecord | None:
        found = self._read(f"SELECT {_JOB_COLS} FROM jobs WHERE id = ?", (job_id,))
        return rows.job_from_row(found[0]) if found else None

    def list_jobs(self, after: str | None, limit: int, kind: str | None = None) -> tuple[list[JobRecord], bool]:
        filters = [] if kind is None else [("kind = ?", (kind,))]
        found = self._page("jobs", _JOB_COLS, filters, after, limit, desc=True)
        return rows.page([rows.job_from_row(r) for r in found], limit)

    def update_job(self, job_id: str, expect: Iterable[str] | None = None, **fields: Any) -> bool:
        sets = rows.update_fields(fields)
        where, params = "id = ?", [job_id]
        if expect is not None:
            statuses = list(expect)
            where += f" AND status IN ({_marks(statuses)})"
            params += statuses
        if not sets:  # nothing to set: say whether it would have matched
            return bool(self._read(f"SELECT 1 FROM jobs WHERE {where}", params))
        assignments = ", ".join(f"{name} = ?" for name, _ in sets)
        with self._write() as conn:
            return conn.execute(f"UPDATE jobs SET {assignments} WHERE {where}",
                                [*(value for _, value in sets), *params]).rowcount == 1

    def jobs_with_status(self, statuses: Iterable[str]) -> list[JobRecord]:
        wanted = list(statuses)
        found = self._read(f"SELECT {_JOB_COLS} FROM jobs WHERE status IN ({_marks(wanted)}) "
                           "ORDER BY created_at, id", wanted)
        return [rows.job_from_row(r) for r in found]

    def status_counts(self) -> dict[str, int]:
        return dict(self._read("SELECT status, count(*) FROM jobs GROUP BY status"))

    def claim_job(self, job_id: str, owner: str, lease_s: float) -> bool:
        now = time.time()
        with self._write() as conn:
            return conn.execute("UPDATE jobs SET owner = ?, lease_until = ? WHERE id = ? AND "
                                "(owner IS NULL OR lease_until < ?)", (owner, now + lease_s, job_id, now)).rowcount == 1

    def release_job(self, job_id: str, owner: str) -> None:
        with self._write() as conn:
            conn.execute("UPDATE jobs SET owner = NULL, lease_until = NULL WHERE id = ? AND owner = ?",
                         (job_id, owner))

    # -- lines -----------------------------------------------------------------------------------
    def add_lines(self, job_id: str, lines: Iterable[LineRecord], done: Iterable[LineResult] = ()) -> None:
        counts = {"total": 0, "completed": 0, "failed": 0}

        def pending() -> Iterator[tuple[Any, ...]]:
            for line in lines:
                counts["total"] += 1
                yield job_id, line.line_no, line.custom_id, line.url, line.body, PENDING

        def finished() -> Iterator[tuple[Any, ...]]:
            for result in done:
                counts["total"] += 1
                counts["completed" if result.ok else "failed"] += 1
                yield job_id, result.line_no, None, "", b"", DONE, int(result.ok), result.record

        with self._write() as conn:
            conn.execute("DELETE FROM lines WHERE job_id = ?", (job_id,))
            conn.executemany("INSERT INTO lines (job_id, line_no, custom_id, url, body, state) "
                             "VALUES (?, ?, ?, ?, ?, ?)", pending())
            conn.executemany("INSERT INTO lines (job_id, line_no, custom_id, url, body, state, ok, record) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", finished())
            conn.execute("UPDATE jobs SET total = :total, completed = :completed, failed = :failed WHERE id = :id",
                         {**counts, "id": job_id})

    def claim_lines(self, job_id: str, owner: str, limit: int, lease_s: float) -> list[LineRecord]:
        now, limit = time.time(), max(limit, 0)
        with self._write() as conn:
            # pending or expired, in line order: two index walks merged here, as one OR query cannot use either
            found = sorted([
                *conn.execute("SELECT line_no, custom_id, url, body FROM lines WHERE job_id = ? AND state = 'pending' "
                              "ORDER BY line_no LIMIT ?", (job_id, limit)),
                *conn.execute("SELECT line_no, custom_id, url, body FROM lines WHERE job_id = ? AND state = 'running' "
                              "AND lease_until < ? ORDER BY line_no LIMIT ?", (job_id, now, limit)),
            ])[:limit]
            conn.executemany("UPDATE lines SET state = ?, owner = ?, lease_until = ? "
                             "WHERE job_id = ? AND line_no = ?",
                             [(RUNNING, owner, now + lease_s, job_id, row[0]) for row in found])
        return [LineRecord(job_id, *row) for row in found]

    def finish_lines(self, owner: str, results: Iterable[LineResult]) -> int:
        per_job: dict[str, list[int]] = {}  # job -> [completed, failed]
        with self._write() as conn:
            for r in results:
                stored = conn.execute(
                    "UPDATE lines SET state = 'done', ok = ?, record = ?, owner = NULL, lease_until = NULL "
                    "WHERE job_id = ? AND line_no = ? AND state = 'running' AND owner = ?",
                    (int(r.ok), r.record, r.job_id, r.line_no, owner)).rowcount
                if stored:
                    per_job.setdefault(r.job_id, [0, 0])[0 if r.ok else 1] += 1
            conn.executemany("UPDATE jobs SET completed = completed + ?, failed = failed + ? WHERE id = ?",
                             [(c, f, job_id) for job_id, (c, f) in per_job.items()])
        return sum(c + f for c, f in per_job.values())

    def release_lines(self, owner: str, keys: Iterable[tuple[str, int]]) -> None:
        with self._write() as conn:
            conn.executemany("UPDATE lines SET state = 'pending', owner = NULL, lease_until = NULL "
                             "WHERE job_id = ? AND line_no = ? AND state = 'running' AND owner = ?",
                             [(job_id, line_no, owner) for job_id, line_no in keys])

    def renew_leases(self, owner: str, lease_s: float) -> None:
        until = time.time() + lease_s
        with self._write() as conn:
            conn.execute("UPDATE lines SET lease_until = ? WHERE owner = ? AND state = 'running'", (until, owner))
            conn.execute("UPDATE jobs SET lease_until = ? WHERE owner = ?", (until, owner))

    def recover(self, owner: str) -> None:
        # one server per data dir: whatever is held was held by an earlier run of this one, whatever its name
        with self._write() as conn:
            conn.execute("UPDATE lines SET state = 'pending', owner = NULL, lease_until = NULL WHERE state = 'running'")
            conn.execute("UPDATE jobs SET owner = NULL, lease_until = NULL WHERE owner IS NOT NULL")

    def line_counts(self, job_id: str) -> dict[str, int]:
        found = dict(self._read("SELECT state, count(*) FROM lines WHERE job_id = ? GROUP BY state", (job_id,)))
        return {state: found.get(state, 0) for state in (PENDING, RUNNING, DONE)}

    def pending_lines(self) -> int:
        # one state per query, spelled out: each is then counted off its partial index, not the whole job
        return sum(self._read("SELECT count(*) FROM jobs JOIN lines ON lines.job_id = jobs.id "
                              f"WHERE jobs.status = ? AND lines.state = '{state}'", (IN_PROGRESS,))[0][0]
                   for state in (PENDING, RUNNING))

    def results(self, job_id: str) -> Iterator[tuple[int, bool, bytes]]:
        for line_no, ok, record in self._pages(
                "SELECT line_no, ok, record FROM lines WHERE job_id = ? AND state = 'done' AND line_no > ? "
                "ORDER BY line_no LIMIT ?", job_id):
            yield line_no, bool(ok), record

    def unfinished(self, job_id: str) -> Iterator[tuple[int, str | None]]:
        yield from self._pages("SELECT line_no, custom_id FROM lines WHERE job_id = ? AND state <> 'done' "
                               "AND line_no > ? ORDER BY line_no LIMIT ?", job_id)

    def _pages(self, sql: str, job_id: str) -> Iterator[Any]:
        """Rows of `sql` (job_id, after line_no, limit), one short query per page: the caller may write to the
        store between two rows (finalization stores the output it reads)."""
        last = -1
        while True:
            found = self._read(sql, (job_id, last, _PAGE))
            yield from found
            if len(found) < _PAGE:
                return
            last = found[-1][0]

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _marks(values: list[Any]) -> str:
    return ", ".join("?" * len(values))


def _read_chunks(path: Path, chunk_size: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            yield chunk


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
