"""The job store contract (ladle.jobs.store.JobStore), checked on both backends: SQLite under a temp dir, and
PostgreSQL on a real server (tests/jobs/postgres.py; skipped, with its reason, where there is none)."""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ladle.jobs.records import (
    BATCH,
    BATCH_OUTPUT,
    COMPLETED,
    FINALIZING,
    IN_PROGRESS,
    KSERVE,
    OPENAI,
    VALIDATING,
    FileRecord,
    JobRecord,
    LineRecord,
    LineResult,
)
from ladle.jobs.sqlite_store import SQLiteStore
from ladle.jobs.store import JobStore, open_store

MIB = 1 << 20


@dataclasses.dataclass
class Backend:
    """How to open (another) store on the test's backing storage."""

    name: str
    opener: Callable[[], JobStore]
    data_dir: Path | None = None  # SQLite
    dsn: str | None = None  # PostgreSQL
    opened: list[JobStore] = dataclasses.field(default_factory=list)

    def open(self) -> JobStore:
        store = self.opener()
        self.opened.append(store)
        return store

    def sql(self, query: str) -> list[tuple[Any, ...]]:
        """Look under the store (a connection of its own)."""
        if self.dsn:
            import psycopg

            with psycopg.connect(self.dsn) as conn:
                return conn.execute(query).fetchall()
        with contextlib.closing(sqlite3.connect(self.data_dir / "jobs.sqlite3")) as conn:
            return conn.execute(query).fetchall()


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        data = tmp_path / "data"
        found = Backend("sqlite", lambda: SQLiteStore(data), data_dir=data)
    else:
        dsn = request.getfixturevalue("postgres_dsn")  # skips, with its reason, when there is no server
        from ladle.jobs.pg_store import PostgresStore

        found = Backend("postgres", lambda: PostgresStore(dsn), dsn=dsn)
    yield found
    for store in found.opened:
        store.close()


@pytest.fixture
def store(backend: Backend) -> JobStore:
    return backend.open()


def job(job_id: str, created_at: int = 100, status: str = IN_PROGRESS, kind: str = OPENAI, **fields: Any) -> JobRecord:
    return JobRecord(job_id, kind, "/v1/chat/completions", "file-in", "24h", status, created_at, created_at + 86400,
                     **fields)


def line(job_id: str, n: int) -> LineRecord:
    return LineRecord(job_id, n, f"c{n}", "/v1/chat/completions", b'{"n": %d}' % n)


def result(job_id: str, n: int, ok: bool = True) -> LineResult:
    return LineResult(job_id, n, ok, b'{"line": %d, "ok": %s}' % (n, b"true" if ok else b"false"))


def job_with_lines(store: JobStore, job_id: str, n: int, status: str = IN_PROGRESS, created_at: int = 100) -> None:
    store.add_job(job(job_id, created_at, status))
    store.add_lines(job_id, [line(job_id, i) for i in range(n)])


def numbers(lines: list[LineRecord]) -> list[int]:
    return [x.line_no for x in lines]


def walk(fetch: Callable[[str | None, int], tuple[list[Any], bool]], limit: int) -> list[tuple[list[str], bool]]:
    """Every page, following the cursor: [(ids, has_more), ...]."""
    pages, after = [], None
    while True:
        page, more = fetch(after, limit)
        pages.append(([r.id for r in page], more))
        if not more:
            return pages
        after = page[-1].id


# -- files ------------------------------------------------------------------------------------------
def test_file_round_trip(store: JobStore) -> None:
    record = FileRecord("file-1", "in.jsonl", BATCH, 6, 100, 2)
    store.add_file(record, iter([b"ab", b"", b"cd\nef"]))
    assert store.get_file("file-1") == record
    assert list(store.read_file("file-1", chunk_size=4)) == [b"abcd", b"\nef"]
    assert b"".join(store.read_file("file-1")) == b"abcd\nef"
    assert store.get_file("file-2") is None
    with pytest.raises(KeyError):
        store.read_file("file-2")  # at the call, not at the first next()


def test_empty_file(store: JobStore) -> None:
    store.add_file(FileRecord("file-e", "e.jsonl", BATCH, 0, 1), [])
    assert list(store.read_file("file-e")) == []


def test_big_file_is_chunked(store: JobStore, backend: Backend) -> None:
    content = bytes(range(256)) * (3 * MIB // 256) + b"tail!"
    pieces = [content[i:i + 700_000] for i in range(0, len(content), 700_000)]
    store.add_file(FileRecord("file-big", "big.jsonl", BATCH, len(content), 5), iter(pieces))
    chunks = list(store.read_file("file-big"))
    assert [len(c) for c in chunks] == [MIB, MIB, MIB, 5]
    assert b"".join(chunks) == content
    if backend.dsn:
        assert backend.sql("SELECT seq, length(data) FROM file_chunks WHERE file_id = 'file-big' ORDER BY seq") == [
            (0, MIB), (1, MIB), (2, MIB), (3, 5)]
    else:
        assert (backend.data_dir / "files" / "file-big").read_bytes() == content


def test_failed_upload_leaves_nothing(store: JobStore, backend: Backend) -> None:
    def broken() -> Iterator[bytes]:
        yield b"x" * (2 * MIB)
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        store.add_file(FileRecord("file-x", "x.jsonl", BATCH, 3 * MIB, 1), broken())
    assert store.get_file("file-x") is None
    assert store.list_files(None, None, 10, "asc") == ([], False)
    if backend.dsn:
        assert backend.sql("SELECT count(*) FROM file_chunks") == [(0,)]
    else:
        assert list((backend.data_dir / "files").iterdir()) == []


def test_a_stored_file_is_never_overwritten(store: JobStore) -> None:
    store.add_file(FileRecord("file-1", "a.jsonl", BATCH, 1, 1), [b"a"])
    with pytest.raises(ValueError, match="already exists"):
        store.add_file(FileRecord("file-1", "b.jsonl", BATCH, 1, 2), [b"b"])
    assert store.get_file("file-1") == FileRecord("file-1", "a.jsonl", BATCH, 1, 1)
    assert b"".join(store.read_file("file-1")) == b"a"


def test_list_files_pages_both_ways_through_ties(store: JobStore) -> None:
    for file_id, created, purpose in [("f-b", 200, BATCH_OUTPUT), ("f-a", 100, BATCH), ("f-d", 200, BATCH_OUTPUT),
                                      ("f-e", 300, BATCH), ("f-c", 200, BATCH)]:
        store.add_file(FileRecord(file_id, file_id, purpose, 1, created), [b"x"])

    def files(purpose: str | None, order: str) -> Callable[[str | None, int], tuple[list[FileRecord], bool]]:
        return lambda after, limit: store.list_files(purpose, after, limit, order)

    assert walk(files(None, "desc"), 2) == [(["f-e", "f-d"], True), (["f-c", "f-b"], True), (["f-a"], False)]
    assert walk(files(None, "asc"), 2) == [(["f-a", "f-b"], True), (["f-c", "f-d"], True), (["f-e"], False)]
    assert walk(files(None, "desc"), 1) == [([i], i != "f-a") for i in ["f-e", "f-d", "f-c", "f-b", "f-a"]]
    assert walk(files(None, "asc"), 5) == [(["f-a", "f-b", "f-c", "f-d", "f-e"], False)]
    assert walk(files(None, "asc"), 4) == [(["f-a", "f-b", "f-c", "f-d"], True), (["f-e"], False)]
    assert walk(files(BATCH, "desc"), 10) == [(["f-e", "f-c", "f-a"], False)]
    assert walk(files(BATCH_OUTPUT, "asc"), 1) == [(["f-b"], True), (["f-d"], False)]
    # the cursor may be a file of another purpose: the page starts at its place in the order
    assert [f.id for f in store.list_files(BATCH, "f-d", 10, "desc")[0]] == ["f-c", "f-a"]
    assert store.list_files(None, "f-gone", 10, "desc") == ([], False)
    assert store.list_files(None, "f-a", 10, "desc") == ([], False)
    with pytest.raises(ValueError):
        store.list_files(None, None, 10, "sideways")


def test_delete_file(store: JobStore, backend: Backend) -> None:
    store.add_file(FileRecord("file-1", "a.jsonl", BATCH, 2 * MIB, 1), [b"a" * (2 * MIB)])
    store.add_file(FileRecord("file-2", "b.jsonl", BATCH, 1, 2), [b"b"])
    assert store.delete_file("file-1") is True
    assert store.get_file("file-1") is None
    with pytest.raises(KeyError):
        store.read_file("file-1")
    assert store.delete_file("file-1") is False
    assert [f.id for f in store.list_files(None, None, 10, "asc")[0]] == ["file-2"]
    if backend.dsn:
        assert backend.sql("SELECT file_id, count(*) FROM file_chunks GROUP BY file_id") == [("file-2", 1)]
    else:
        assert sorted(p.name for p in (backend.data_dir / "files").iterdir()) == ["file-2"]
    store.add_file(FileRecord("file-1", "again.jsonl", BATCH, 1, 3), [b"c"])  # finalization reuses its ids
    assert b"".join(store.read_file("file-1")) == b"c"


# -- jobs -------------------------------------------------------------------------------------------
def test_job_round_trip(store: JobStore) -> None:
    full = job("batch_1", 100, VALIDATING, model="m", metadata={"k": "v", "ü": "ß"},
               errors=[{"code": "c", "message": "m", "line": 3, "param": None}], total=5, completed=3, failed=1,
               output_file_id="file-o", error_file_id="file-e", in_progress_at=101, finalizing_at=102,
               completed_at=103, failed_at=104, expired_at=105, cancelling_at=106, cancelled_at=107)
    bare = job("job-2", 200, kind=KSERVE)
    store.add_job(full)
    store.add_job(bare)
    assert store.get_job("batch_1") == full
    assert store.get_job("job-2") == bare
    assert store.get_job("batch_3") is None


def test_update_job_and_compare_and_set(store: JobStore) -> None:
    original = job("batch_1", status=VALIDATING, metadata={"a": "b"})
    store.add_job(original)
    errors = [{"code": "x", "message": "y", "line": None, "param": "input_file_id"}]
    assert store.update_job("batch_1", expect=[VALIDATING], status=IN_PROGRESS, in_progress_at=5, model="m",
                            errors=errors, metadata=None) is True
    moved = dataclasses.replace(original, status=IN_PROGRESS, in_progress_at=5, model="m", errors=errors,
                                metadata=None)
    assert store.get_job("batch_1") == moved
    assert store.update_job("batch_1", expect=[VALIDATING], status=COMPLETED) is False  # lost the race
    assert store.update_job("batch_1", expect=[], status=COMPLETED) is False
    assert store.get_job("batch_1") == moved
    assert store.update_job("batch_1", expect=(FINALIZING, IN_PROGRESS), status=FINALIZING, finalizing_at=9)
    assert store.update_job("batch_1", total=7) is True
    assert store.get_job("batch_1") == dataclasses.replace(moved, status=FINALIZING, finalizing_at=9, total=7)
    assert store.update_job("batch_1", expect=[FINALIZING]) is True  # nothing to set: does it match?
    assert store.update_job("batch_1", expect=[VALIDATING]) is False
    assert store.update_job("batch_9", status=COMPLETED) is False
    for bad in ({"id": "x"}, {"kind": KSERVE}, {"created_at": 1}, {"owner": "me"}, {"nonsense": 1}):
        with pytest.raises(ValueError):
            store.update_job("batch_1", **bad)


def test_list_jobs_newest_first_through_ties(store: JobStore) -> None:
    for job_id, created, kind in [("j-a", 100, OPENAI), ("j-c", 200, OPENAI), ("j-b", 200, KSERVE),
                                  ("j-d", 300, KSERVE)]:
        store.add_job(job(job_id, created, kind=kind))
    assert walk(lambda after, limit: store.list_jobs(after, limit), 3) == [(["j-d", "j-c", "j-b"], True),
                                                                          (["j-a"], False)]
    assert walk(lambda after, limit: store.list_jobs(after, limit), 1) == [
        (["j-d"], True), (["j-c"], True), (["j-b"], True), (["j-a"], False)]
    assert walk(lambda after, limit: store.list_jobs(after, limit, KSERVE), 1) == [(["j-d"], True), (["j-b"], False)]
    assert [j.id for j in store.list_jobs("j-d", 10, OPENAI)[0]] == ["j-c", "j-a"]
    assert store.list_jobs(None, 4) == (store.list_jobs(None, 10)[0], False)
    assert store.list_jobs("j-gone", 10) == ([], False)


def test_jobs_with_status_and_counts(store: JobStore) -> None:
    assert store.status_counts() == {}
    for job_id, created, status in [("j-3", 300, IN_PROGRESS), ("j-2b", 200, VALIDATING), ("j-2a", 200, IN_PROGRESS),
                                    ("j-1", 100, COMPLETED), ("j-4", 400, FINALIZING)]:
        store.add_job(job(job_id, created, status))
    assert [j.id for j in store.jobs_with_status((VALIDATING, IN_PROGRESS, FINALIZING))] == [
        "j-2a", "j-2b", "j-3", "j-4"]
    assert [j.id for j in store.jobs_with_status([COMPLETED])] == ["j-1"]
    assert store.jobs_with_status([]) == []
    assert store.status_counts() == {IN_PROGRESS: 2, VALIDATING: 1, COMPLETED: 1, FINALIZING: 1}


def test_phase_lease(store: JobStore) -> None:
    store.add_job(job("j"))
    assert store.claim_job("j", "a", 60) is True
    assert store.claim_job("j", "b", 60) is False
    assert store.claim_job("j", "a", 60) is False  # a live lease is a live lease, whoever asks
    store.release_job("j", "b")  # not b's: nothing happens
    assert store.claim_job("j", "b", 60) is False
    store.release_job("j", "a")
    assert store.claim_job("j", "b", -1) is True  # taken, but its lease has already run out
    assert store.claim_job("j", "a", 60) is True
    assert store.claim_job("nope", "a", 60) is False


# -- lines ------------------------------------------------------------------------------------------
def test_add_lines_counts_and_replaces(store: JobStore) -> None:
    store.add_job(job("j", status=VALIDATING))
    store.add_job(job("k"))
    store.add_lines("k", [line("k", 0)])
    store.add_lines("j", [line("j", n) for n in (0, 2, 4)], [result("j", 1, ok=True), result("j", 3, ok=False)])
    assert (store.get_job("j").total, store.get_job("j").completed, store.get_job("j").failed) == (5, 1, 1)
    assert store.line_counts("j") == {"pending": 3, "running": 0, "done": 2}
    assert list(store.results("j")) == [(1, True, result("j", 1).record), (3, False, result("j", 3, False).record)]
    store.claim_lines("j", "a", 1, 60)
    store.add_lines("j", iter([line("j", 0), line("j", 1)]))  # validation again, after a crash: starts over
    assert (store.get_job("j").total, store.get_job("j").completed, store.get_job("j").failed) == (2, 0, 0)
    assert store.line_counts("j") == {"pending": 2, "running": 0, "done": 0}
    assert list(store.results("j")) == []
    assert store.claim_lines("j", "a", 10, 60) == [line("j", 0), line("j", 1)]
    assert store.line_counts("k") == {"pending": 1, "running": 0, "done": 0}  # other jobs untouched
    assert store.line_counts("none") == {"pending": 0, "running": 0, "done": 0}


def test_claim_lines_in_order_up_to_limit(store: JobStore) -> None:
    job_with_lines(store, "j", 5)
    job_with_lines(store, "k", 3)
    assert store.claim_lines("j", "a", 0, 60) == []
    assert store.claim_lines("j", "a", 2, 60) == [line("j", 0), line("j", 1)]
    assert store.claim_lines("j", "b", 10, 60) == [line("j", 2), line("j", 3), line("j", 4)]
    assert store.claim_lines("j", "a", 10, 60) == []
    assert store.line_counts("j") == {"pending": 0, "running": 5, "done": 0}
    assert store.claim_lines("k", "a", 10, 60) == [line("k", 0), line("k", 1), line("k", 2)]
    assert store.claim_lines("nope", "a", 10, 60) == []


def test_expired_leases_are_claimed_again(store: JobStore) -> None:
    job_with_lines(store, "j", 4)
    assert numbers(store.claim_lines("j", "a", 2, -1)) == [0, 1]  # a lease already past
    assert numbers(store.claim_lines("j", "b", 3, 60)) == [0, 1, 2]
    assert numbers(store.claim_lines("j", "c", 1, 0)) == [3]  # lease_s=0: expired as soon as time moves on
    time.sleep(0.05)
    assert numbers(store.claim_lines("j", "d", 10, 60)) == [3]
    assert store.finish_lines("a", [result("j", 0)]) == 0  # a lost its lease: the line is b's now
    assert store.finish_lines("c", [result("j", 3)]) == 0
    assert store.finish_lines("b", [result("j", 0), result("j", 1)]) == 2
    assert store.line_counts("j") == {"pending": 0, "running": 2, "done": 2}


def test_two_owners_claiming_at_once_never_share_a_line(backend: Backend) -> None:
    first, second = backend.open(), backend.open()
    job_with_lines(first, "j", 2000)
    start = threading.Barrier(2)
    claimed: dict[str, list[int]] = {"a": [], "b": []}
    failures: list[BaseException] = []

    def claim_all(store: JobStore, owner: str) -> None:
        try:
            start.wait()
            while got := store.claim_lines("j", owner, 7, 60):
                claimed[owner] += numbers(got)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=claim_all, args=(s, o)) for s, o in ((first, "a"), (second, "b"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert failures == []
    assert set(claimed["a"]) & set(claimed["b"]) == set()
    assert sorted(claimed["a"] + claimed["b"]) == list(range(2000))
    assert first.line_counts("j") == {"pending": 0, "running": 2000, "done": 0}


def test_postgres_claims_skip_locked_lines(backend: Backend) -> None:
    if not backend.dsn:
        pytest.skip("SKIP LOCKED is PostgreSQL's")
    import psycopg

    store = backend.open()
    job_with_lines(store, "j", 10)
    with psycopg.connect(backend.dsn) as other:  # another server, mid-claim: lines 0-2 locked, not yet running
        other.execute("SELECT line_no FROM lines WHERE job_id = 'j' AND line_no < 3 FOR UPDATE").fetchall()
        assert numbers(store.claim_lines("j", "a", 5, 60)) == [3, 4, 5, 6, 7]  # passed over, not waited for
        other.rollback()
    assert numbers(store.claim_lines("j", "b", 10, 60)) == [0, 1, 2, 8, 9]


def test_finish_lines_stores_only_what_the_owner_holds(store: JobStore) -> None:
    job_with_lines(store, "j", 6)
    job_with_lines(store, "k", 2)
    store.claim_lines("j", "a", 4, 60)
    store.claim_lines("k", "b", 1, 60)
    store.claim_lines("k", "a", 1, 60)
    done = [result("j", 0), result("j", 1, ok=False), result("j", 2), result("j", 2),  # 2 twice: stored once
            result("j", 4),  # pending, nobody's
            result("k", 0),  # b's
            result("k", 1, ok=False)]
    assert store.finish_lines("a", done) == 4
    assert (store.get_job("j").completed, store.get_job("j").failed) == (2, 1)
    assert (store.get_job("k").completed, store.get_job("k").failed) == (0, 1)
    assert store.line_counts("j") == {"pending": 2, "running": 1, "done": 3}
    assert store.line_counts("k") == {"pending": 0, "running": 1, "done": 1}
    assert list(store.results("j")) == [(0, True, result("j", 0).record), (1, False, result("j", 1, False).record),
                                        (2, True, result("j", 2).record)]
    assert store.finish_lines("a", [result("j", 0, ok=False)]) == 0  # done is done
    assert (store.get_job("j").completed, store.get_job("j").failed) == (2, 1)
    assert store.finish_lines("a", []) == 0


def test_release_lines(store: JobStore) -> None:
    job_with_lines(store, "j", 4)
    store.claim_lines("j", "a", 3, 60)
    store.release_lines("b", [("j", 0), ("j", 1)])  # not b's
    assert store.line_counts("j") == {"pending": 1, "running": 3, "done": 0}
    store.release_lines("a", iter([("j", 0), ("j", 1), ("j", 3)]))  # 3 is pending already
    assert store.line_counts("j") == {"pending": 3, "running": 1, "done": 0}
    assert numbers(store.claim_lines("j", "b", 10, 60)) == [0, 1, 3]
    assert store.finish_lines("a", [result("j", 0)]) == 0


def test_renew_leases(store: JobStore) -> None:
    job_with_lines(store, "j", 3)
    store.add_job(job("p"))
    assert numbers(store.claim_lines("j", "a", 2, -1)) == [0, 1]
    assert store.claim_job("p", "a", -1) is True
    store.renew_leases("a", 60)
    assert numbers(store.claim_lines("j", "b", 10, -1)) == [2]  # a's leases are live again
    assert numbers(store.claim_lines("j", "c", 10, 60)) == [2]  # b's is not: renewing is per owner
    assert store.claim_job("p", "c", 60) is False
    assert store.finish_lines("a", [result("j", 0), result("j", 1)]) == 2


def test_recover(store: JobStore, backend: Backend) -> None:
    job_with_lines(store, "j", 4)
    store.add_job(job("p"))
    store.add_job(job("q"))
    store.claim_lines("j", "a", 2, 60)
    store.claim_lines("j", "b", 1, 60)
    store.claim_job("p", "a", 60)
    store.claim_job("q", "b", 60)
    store.recover("a")
    assert numbers(store.claim_lines("j", "c", 1, 60)) == [0]
    if backend.dsn:  # several servers: b may be live, its claims stay
        assert store.line_counts("j") == {"pending": 2, "running": 2, "done": 0}
        assert store.claim_job("q", "c", 60) is False
    else:  # one server per data dir: every lease was an earlier run's
        assert store.line_counts("j") == {"pending": 3, "running": 1, "done": 0}
        assert store.claim_job("q", "c", 60) is True
    assert store.claim_job("p", "c", 60) is True
    assert store.finish_lines("a", [result("j", 1)]) == 0


def test_pending_lines_counts_in_progress_jobs_only(store: JobStore) -> None:
    assert store.pending_lines() == 0
    job_with_lines(store, "j", 5)
    job_with_lines(store, "v", 3, status=VALIDATING)
    job_with_lines(store, "f", 2, status=FINALIZING)
    store.claim_lines("j", "a", 2, 60)
    assert store.pending_lines() == 5  # running lines are still in the queue
    store.finish_lines("a", [result("j", 0)])
    assert store.pending_lines() == 4
    store.update_job("v", status=IN_PROGRESS)
    assert store.pending_lines() == 7


def test_results_and_unfinished_in_line_order(store: JobStore) -> None:
    store.add_job(job("j"))
    store.add_lines("j", [line("j", n) for n in reversed(range(2500))], [result("j", 2500, ok=False)])
    claimed = store.claim_lines("j", "a", 2000, 60)
    store.finish_lines("a", [result("j", x.line_no, ok=x.line_no % 3 != 0) for x in reversed(claimed[:1500])])
    expected = [(n, n % 3 != 0, result("j", n, n % 3 != 0).record) for n in range(1500)]
    assert list(store.results("j")) == [*expected, (2500, False, result("j", 2500, False).record)]
    assert list(store.unfinished("j")) == [(n, f"c{n}") for n in range(1500, 2500)]
    assert list(store.unfinished("nope")) == []


def test_iterating_results_while_storing_a_file(store: JobStore) -> None:
    """Finalization streams results() into add_file() on the same store."""
    job_with_lines(store, "j", 1200)
    store.finish_lines("a", [result("j", x.line_no) for x in store.claim_lines("j", "a", 1200, 60)])
    records = (record + b"\n" for _, _, record in store.results("j"))
    store.add_file(FileRecord("file-out", "out.jsonl", BATCH_OUTPUT, 0, 1), records)
    expected = b"".join(result("j", n).record + b"\n" for n in range(1200))
    assert b"".join(store.read_file("file-out")) == expected


def test_many_lines(store: JobStore) -> None:
    store.add_job(job("big"))
    store.add_lines("big", (LineRecord("big", n, None, "/v2/models/m/infer", b"{}") for n in range(50_000)))
    assert store.get_job("big").total == 50_000
    seen: list[int] = []
    while got := store.claim_lines("big", "a", 256, 600):
        seen += numbers(got)
    assert seen == list(range(50_000))
    assert store.line_counts("big") == {"pending": 0, "running": 50_000, "done": 0}


# -- persistence and schema -------------------------------------------------------------------------
def test_everything_survives_a_restart(backend: Backend) -> None:
    store = backend.open()
    store.add_file(FileRecord("file-1", "in.jsonl", BATCH, 5, 7, 1), [b"hello"])
    store.add_job(job("j", metadata={"k": "v"}))
    store.add_lines("j", [line("j", n) for n in range(3)], [result("j", 3, ok=False)])
    store.claim_lines("j", "a", 2, 60)
    store.finish_lines("a", [result("j", 0)])
    before = store.get_job("j")
    store.close()
    again = backend.open()
    assert again.get_file("file-1") == FileRecord("file-1", "in.jsonl", BATCH, 5, 7, 1)
    assert b"".join(again.read_file("file-1")) == b"hello"
    assert again.get_job("j") == before
    assert (before.total, before.completed, before.failed) == (4, 1, 1)
    assert again.line_counts("j") == {"pending": 1, "running": 1, "done": 2}
    assert list(again.results("j")) == [(0, True, result("j", 0).record), (3, False, result("j", 3, False).record)]
    assert again.finish_lines("a", [result("j", 1)]) == 1  # the claim outlived the restart
    if not backend.dsn:
        assert backend.sql("PRAGMA journal_mode") == [("wal",)]
        assert backend.sql("PRAGMA user_version") == [(1,)]


def test_a_newer_schema_is_refused(backend: Backend) -> None:
    backend.open().close()
    if backend.dsn:
        import psycopg

        with psycopg.connect(backend.dsn) as conn:
            conn.execute("UPDATE ladle_schema SET version = 99")
    else:
        with contextlib.closing(sqlite3.connect(backend.data_dir / "jobs.sqlite3")) as conn:
            conn.execute("PRAGMA user_version = 99")
    with pytest.raises(RuntimeError, match="schema 99 is newer"):
        backend.open()


def test_open_store_picks_the_backend(backend: Backend, tmp_path: Path) -> None:
    expected = type(backend.open())
    opened = open_store(tmp_path / "data", backend.dsn)
    try:
        assert type(opened) is expected
    finally:
        opened.close()
