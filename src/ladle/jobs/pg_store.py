"""The shared job store (--jobs-db postgresql://...): several servers see the same jobs, lines and file contents
(file_chunks, 1 MiB rows). Invariants: lines are claimed with FOR UPDATE SKIP LOCKED, so two servers never hold
one line; every lease is in the database's clock (statement_timestamp()), so servers with skewed clocks agree.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from ladle.extras import raise_missing_extra
from ladle.jobs import store_rows as rows
from ladle.jobs.records import DONE, IN_PROGRESS, PENDING, RUNNING, FileRecord, JobRecord, LineRecord, LineResult
from ladle.jobs.store import JobStore

try:
    import psycopg
except ModuleNotFoundError as exc:  # pragma: no cover - depends on the install
    raise_missing_extra("postgres", "the PostgreSQL job store (--jobs-db)", exc)
    raise

SCHEMA_VERSION = 1
CHUNK = 1 << 20  # bytes per file_chunks row
_NOW = "extract(epoch from statement_timestamp())::float8"  # the database clock, unix s (stable: indexable)
_TYPES = {"int": "BIGINT", "text": "TEXT"}
_FILE_COLS = ", ".join(rows.FILE_NAMES)
_JOB_COLS = ", ".join(rows.JOB_NAMES)
_PAGE = 1000  # rows per query when iterating results
_SCHEMA_LOCK = 0x6C61646C65  # pg_advisory_xact_lock key: servers starting together create the tables one at a time
_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS ladle_schema (version INTEGER NOT NULL)",
    f"CREATE TABLE IF NOT EXISTS files ({rows.column_defs(rows.FILE_COLUMNS, _TYPES)})",
    "CREATE INDEX IF NOT EXISTS files_by_time ON files (created_at, id)",
    "CREATE TABLE IF NOT EXISTS file_chunks (file_id TEXT NOT NULL, seq INTEGER NOT NULL, data BYTEA NOT NULL,"
    " PRIMARY KEY (file_id, seq))",
    f"CREATE TABLE IF NOT EXISTS jobs ({rows.column_defs(rows.JOB_COLUMNS, _TYPES)}, owner TEXT,"
    " lease_until DOUBLE PRECISION)",
    "CREATE INDEX IF NOT EXISTS jobs_by_time ON jobs (created_at, id)",
    "CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, created_at, id)",
    "CREATE TABLE IF NOT EXISTS lines (job_id TEXT NOT NULL, line_no INTEGER NOT NULL, custom_id TEXT,"
    " url TEXT NOT NULL, body BYTEA NOT NULL, state TEXT NOT NULL, owner TEXT, lease_until DOUBLE PRECISION,"
    " ok BOOLEAN, record BYTEA, PRIMARY KEY (job_id, line_no))",
    # a claim reads the first pending lines and the expired running ones: partial indexes on each keep it from
    # walking past a big job's done (or live running) lines every time
    "CREATE INDEX IF NOT EXISTS lines_pending ON lines (job_id, line_no) WHERE state = 'pending'",
    "CREATE INDEX IF NOT EXISTS lines_running ON lines (job_id, lease_until) WHERE state = 'running'",
    "CREATE INDEX IF NOT EXISTS lines_by_owner ON lines (owner) WHERE owner IS NOT NULL",
]


class PostgresStore(JobStore):
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._lock = threading.RLock()  # iterators may be drained elsewhere: one statement at a time, always
        self._conn = psycopg.connect(dsn, autocommit=False)
        try:
            self._migrate()
        except BaseException:
            self._conn.close()
            raise

    def _migrate(self) -> None:
        with self._tx() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            for statement in _SCHEMA:
                cur.execute(statement)
            cur.execute("SELECT max(version) FROM ladle_schema")
            version = cur.fetchone()[0]
            if version is None:
                cur.execute("INSERT INTO ladle_schema (version) VALUES (%s)", (SCHEMA_VERSION,))
            elif version > SCHEMA_VERSION:
                raise RuntimeError(f"job store schema {version} is newer than this ladle's ({SCHEMA_VERSION})")

    @contextlib.contextmanager
    def _tx(self) -> Iterator[psycopg.Cursor]:
        """One transaction (a savepoint when nested: finalization reads results while it stores a file)."""
        with self._lock:
            if self._conn.broken:  # the server restarted or the network dropped: the next call starts afresh
                self._conn = psycopg.connect(self.dsn, autocommit=False)
            with self._conn.transaction(), self._conn.cursor() as cur:
                yield cur

    def _rows(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        with self._tx() as cur:
            cur.execute(sql, tuple(params))
            return cur.fetchall()

    # -- files ------------------------------------------------------------------------------------
    def add_file(self, record: FileRecord, chunks: Iterable[bytes]) -> None:
        with self._tx() as cur:
            cur.execute("SELECT 1 FROM files WHERE id = %s", (record.id,))
            if cur.fetchone():
                raise ValueError(f"file {record.id} already exists")
            for seq, data in enumerate(rows.rechunk(chunks, CHUNK)):
                cur.execute("INSERT INTO file_chunks (file_id, seq, data) VALUES (%s, %s, %s)", (record.id, seq, data))
            cur.execute(f"INSERT INTO files ({_FILE_COLS}) VALUES (%s, %s, %s, %s, %s, %s)", rows.file_to_row(record))

    def get_file(self, file_id: str) -> FileRecord | None:
        found = self._rows(f"SELECT {_FILE_COLS} FROM files WHERE id = %s", (file_id,))
        return rows.file_from_row(found[0]) if found else None

    def read_file(self, file_id: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        found = self._rows("SELECT count(c.seq) FROM files f LEFT JOIN file_chunks c ON c.file_id = f.id "
                           "WHERE f.id = %s GROUP BY f.id", (file_id,))
        if not found:  # checked now, not at the first next(): KeyError where it is asked
            raise KeyError(file_id)
        return rows.rechunk(self._chunks(file_id, found[0][0]), chunk_size)

    def _chunks(self, file_id: str, count: int) -> Iterator[bytes]:
        for seq in range(count):  # one row per query: a big file is never all in memory
            found = self._rows("SELECT data FROM file_chunks WHERE file_id = %s AND seq = %s", (file_id, seq))
            if not found:
                raise KeyError(f"{file_id} was deleted while being read")
            yield found[0][0]

    def list_files(self, purpose: str | None, after: str | None, limit: int,
                   order: str) -> tuple[list[FileRecord], bool]:
        filters = [] if purpose is None else [("purpose = %s", (purpose,))]
        found = self._page("files", _FILE_COLS, filters, after, limit, rows.descending(order))
        return rows.page([rows.file_from_row(r) for r in found], limit)

    def delete_file(self, file_id: str) -> bool:
        with self._tx() as cur:
            cur.execute("DELETE FROM files WHERE id = %s", (file_id,))
            deleted = cur.rowcount
            cur.execute("DELETE FROM file_chunks WHERE file_id = %s", (file_id,))
        return bool(deleted)

    def _page(self, table: str, cols: str, filters: list[tuple[str, tuple[Any, ...]]], after: str | None,
              limit: int, desc: bool) -> list[Any]:
        """Up to limit + 1 rows of `table` in (created_at, id) order, after the row `after` (none if it is gone)."""
        with self._tx() as cur:
            if after is not None:
                cur.execute(f"SELECT created_at, id FROM {table} WHERE id = %s", (after,))
                cursor = cur.fetchone()
                if cursor is None:
                    return []
                filters = [*filters, (f"(created_at, id) {'<' if desc else '>'} (%s, %s)", tuple(cursor))]
            where = " AND ".join(sql for sql, _ in filters) or "TRUE"
            params = [p for _, values in filters for p in values]
            way = "DESC" if desc else "ASC"
            cur.execute(f"SELECT {cols} FROM {table} WHERE {where} ORDER BY created_at {way}, id {way} LIMIT %s",
                        [*params, max(limit, 0) + 1])
            return cur.fetchall()

    # -- jobs ------------------------------------------------------------------------------------
    def add_job(self, record: JobRecord) -> None:
        marks = ", ".join(["%s"] * len(rows.JOB_NAMES))
        with self._tx() as cur:
            cur.execute(f"INSERT INTO jobs ({_JOB_COLS}) VALUES ({marks})", rows.job_to_row(record))

    def get_job(self, job_id: str) -> JobRecord | None:
        found = self._rows(f"SELECT {_JOB_COLS} FROM jobs WHERE id = %s", (job_id,))
        return rows.job_from_row(found[0]) if found else None

    def list_jobs(self, after: str | None, limit: int, kind: str | None = None) -> tuple[list[JobRecord], bool]:
        filters = [] if kind is None else [("kind = %s", (kind,))]
        found = self._page("jobs", _JOB_COLS, filters, after, limit, desc=True)
        return rows.page([rows.job_from_row(r) for r in found], limit)

    def update_job(self, job_id: str, expect: Iterable[str] | None = None, **fields: Any) -> bool:
        sets = rows.update_fields(fields)
        where, params = "id = %s", [job_id]
        if expect is not None:
            where += " AND status = ANY(%s)"
            params.append(list(expect))
        if not sets:  # nothing to set: say whether it would have matched
            return bool(self._rows(f"SELECT 1 FROM jobs WHERE {where}", params))
        assignments = ", ".join(f"{name} = %s" for name, _ in sets)
        with self._tx() as cur:
            cur.execute(f"UPDATE jobs SET {assignments} WHERE {where}", [*(value for _, value in sets), *params])
            return cur.rowcount == 1

    def jobs_with_status(self, statuses: Iterable[str]) -> list[JobRecord]:
        found = self._rows(f"SELECT {_JOB_COLS} FROM jobs WHERE status = ANY(%s) ORDER BY created_at, id",
                           (list(statuses),))
        return [rows.job_from_row(r) for r in found]

    def status_counts(self) -> dict[str, int]:
        return dict(self._rows("SELECT status, count(*) FROM jobs GROUP BY status"))

    def claim_job(self, job_id: str, owner: str, lease_s: float) -> bool:
        # a concurrent claim waits on the row lock, then re-reads the row and finds it taken
        with self._tx() as cur:
            cur.execute(f"UPDATE jobs SET owner = %s, lease_until = {_NOW} + %s WHERE id = %s AND "
                        f"(owner IS NULL OR lease_until < {_NOW})", (owner, float(lease_s), job_id))
            return cur.rowcount == 1

    def release_job(self, job_id: str, owner: str) -> None:
        with self._tx() as cur:
            cur.execute("UPDATE jobs SET owner = NULL, lease_until = NULL WHERE id = %s AND owner = %s",
                        (job_id, owner))

    # -- lines -----------------------------------------------------------------------------------
    def add_lines(self, job_id: str, lines: Iterable[LineRecord], done: Iterable[LineResult] = ()) -> None:
        counts = {"total": 0, "completed": 0, "failed": 0}
        with self._tx() as cur:
            cur.execute("DELETE FROM lines WHERE job_id = %s", (job_id,))
            # COPY: 50,000 lines in one round trip, not 50,000 INSERTs
            with cur.copy("COPY lines (job_id, line_no, custom_id, url, body, state, ok, record) FROM STDIN") as copy:
                for line in lines:
                    counts["total"] += 1
                    copy.write_row((job_id, line.line_no, line.custom_id, line.url, line.body, PENDING, None, None))
                for result in done:
                    counts["total"] += 1
                    counts["completed" if result.ok else "failed"] += 1
                    copy.write_row((job_id, result.line_no, None, "", b"", DONE, result.ok, result.record))
            cur.execute("UPDATE jobs SET total = %(total)s, completed = %(completed)s, failed = %(failed)s "
                        "WHERE id = %(id)s", {**counts, "id": job_id})

    def claim_lines(self, job_id: str, owner: str, limit: int, lease_s: float) -> list[LineRecord]:
        # SKIP LOCKED: a line another server is claiming right now is passed over, not waited for; one it claimed
        # and committed meanwhile is re-checked against the WHERE (READ COMMITTED) and dropped. Pending and expired
        # lines come from one index walk each (an OR would walk every live running line): up to 2 x limit rows are
        # locked for the moment of the statement, `limit` of them taken.
        with self._tx() as cur:
            cur.execute(
                "WITH pending AS (SELECT line_no FROM lines WHERE job_id = %(job)s AND state = 'pending' "
                "ORDER BY line_no LIMIT %(limit)s FOR UPDATE SKIP LOCKED), "
                "expired AS (SELECT line_no FROM lines WHERE job_id = %(job)s AND state = 'running' AND "
                f"lease_until < {_NOW} ORDER BY line_no LIMIT %(limit)s FOR UPDATE SKIP LOCKED), "
                "picked AS (SELECT line_no FROM pending UNION ALL SELECT line_no FROM expired "
                "ORDER BY line_no LIMIT %(limit)s) "
                f"UPDATE lines SET state = '{RUNNING}', owner = %(owner)s, lease_until = {_NOW} + %(lease)s "
                "FROM picked WHERE lines.job_id = %(job)s AND lines.line_no = picked.line_no "
                "RETURNING lines.line_no, lines.custom_id, lines.url, lines.body",
                {"job": job_id, "limit": max(limit, 0), "owner": owner, "lease": float(lease_s)})
            found = sorted(cur.fetchall())  # RETURNING has no order
        return [LineRecord(job_id, *row) for row in found]

    def finish_lines(self, owner: str, results: Iterable[LineResult]) -> int:
        batch = list(results)
        per_job: dict[str, list[int]] = {}  # job -> [completed, failed]
        with self._tx() as cur:
            # one statement for the whole batch; a line listed twice matches (and is counted) once
            cur.execute(
                "UPDATE lines SET state = 'done', ok = r.ok, record = r.record, owner = NULL, lease_until = NULL "
                "FROM unnest(%s::text[], %s::integer[], %s::boolean[], %s::bytea[]) AS r(job_id, line_no, ok, record) "
                "WHERE lines.job_id = r.job_id AND lines.line_no = r.line_no AND lines.state = 'running' "
                "AND lines.owner = %s RETURNING lines.job_id, lines.ok",
                ([r.job_id for r in batch], [r.line_no for r in batch], [r.ok for r in batch],
                 [r.record for r in batch], owner))
            for job_id, ok in cur.fetchall():
                per_job.setdefault(job_id, [0, 0])[0 if ok else 1] += 1
            for job_id, (completed, failed) in sorted(per_job.items()):  # a fixed order: no deadlock between servers
                cur.execute("UPDATE jobs SET completed = completed + %s, failed = failed + %s WHERE id = %s",
                            (completed, failed, job_id))
        return sum(c + f for c, f in per_job.values())

    def release_lines(self, owner: str, keys: Iterable[tuple[str, int]]) -> None:
        with self._tx() as cur:
            cur.executemany("UPDATE lines SET state = 'pending', owner = NULL, lease_until = NULL "
                            "WHERE job_id = %s AND line_no = %s AND state = 'running' AND owner = %s",
                            [(job_id, line_no, owner) for job_id, line_no in keys])

    def renew_leases(self, owner: str, lease_s: float) -> None:
        with self._tx() as cur:
            cur.execute(f"UPDATE lines SET lease_until = {_NOW} + %s WHERE owner = %s AND state = 'running'",
                        (float(lease_s), owner))
            cur.execute(f"UPDATE jobs SET lease_until = {_NOW} + %s WHERE owner = %s", (float(lease_s), owner))

    def recover(self, owner: str) -> None:
        # other servers may be live: only what this one held before its restart is freed
        with self._tx() as cur:
            cur.execute("UPDATE lines SET state = 'pending', owner = NULL, lease_until = NULL "
                        "WHERE owner = %s AND state = 'running'", (owner,))
            cur.execute("UPDATE jobs SET owner = NULL, lease_until = NULL WHERE owner = %s", (owner,))

    def line_counts(self, job_id: str) -> dict[str, int]:
        found = dict(self._rows("SELECT state, count(*) FROM lines WHERE job_id = %s GROUP BY state", (job_id,)))
        return {state: found.get(state, 0) for state in (PENDING, RUNNING, DONE)}

    def pending_lines(self) -> int:
        # one state per subquery, spelled out: each is then counted off its partial index, not the whole job
        counts = " + ".join(f"(SELECT count(*) FROM jobs JOIN lines ON lines.job_id = jobs.id "
                            f"WHERE jobs.status = %s AND lines.state = '{state}')" for state in (PENDING, RUNNING))
        return self._rows(f"SELECT {counts}", (IN_PROGRESS, IN_PROGRESS))[0][0]

    def results(self, job_id: str) -> Iterator[tuple[int, bool, bytes]]:
        yield from self._pages("SELECT line_no, ok, record FROM lines WHERE job_id = %s AND state = 'done' "
                               "AND line_no > %s ORDER BY line_no LIMIT %s", job_id)

    def unfinished(self, job_id: str) -> Iterator[tuple[int, str | None]]:
        yield from self._pages("SELECT line_no, custom_id FROM lines WHERE job_id = %s AND state <> 'done' "
                               "AND line_no > %s ORDER BY line_no LIMIT %s", job_id)

    def _pages(self, sql: str, job_id: str) -> Iterator[Any]:
        """Rows of `sql` (job_id, after line_no, limit), a page per query: memory stays bounded, and the caller
        may use the store between two rows."""
        last = -1
        while True:
            found = self._rows(sql, (job_id, last, _PAGE))
            yield from found
            if len(found) < _PAGE:
                return
            last = found[-1][0]

    def close(self) -> None:
        with self._lock:
            self._conn.close()
