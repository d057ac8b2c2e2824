"""A real PostgreSQL server for the tests, from Debian's package (/usr/lib/postgresql/<v>/bin): started once per
session (`postgres_server`), a fresh empty database per test (`postgres_dsn`), stopped at the end of the session.
Without the binaries, psycopg or a way to start the server, the tests that need it skip and say why.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server import free_port

NO_BINARIES = "PostgreSQL server binaries not found (apt-get install postgresql)"
NO_PSYCOPG = "psycopg not installed (pip install 'ladle[postgres]')"


def find_bindir() -> Path | None:
    """The newest installed server's bin directory."""
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    newest = max(found, key=lambda p: [int(x) for x in Path(p).parts[-3].split(".") if x.isdigit()], default=None)
    return Path(newest).parent if newest else None


class PostgresServer:
    """One throw-away cluster in a temp dir: trust auth, 127.0.0.1 only, fsync off (tests, not durability)."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="ladle-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = 0
        self._names = itertools.count()
        self._user: str | None = None
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root: run them as Debian's postgres user
            account = pwd.getpwnam("postgres")
            os.chown(self.root, account.pw_uid, account.pw_gid)
            self._user = "postgres"

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bindir / tool), *args]
        if self._user:
            command = ["runuser", "-u", self._user, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise RuntimeError(f"{tool} failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-2000:]}")

    def start(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C",
                  "--no-sync")
        for attempt in range(3):  # the free port may be taken between free_port() and the server's bind
            self.port = free_port()
            options = (f"-F -c fsync=off -c full_page_writes=off -c synchronous_commit=off "
                       f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root}")
            try:
                self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60",
                          "start")
                return
            except RuntimeError as exc:
                if attempt == 2:
                    log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
                    raise RuntimeError(f"{exc}\n{log}") from None

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; its DSN."""
        import psycopg

        name = f"test_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.dsn(), autocommit=True) as admin:
            # FILE_COPY (15+): copying the small template beats WAL-logging it, several times over
            strategy = " STRATEGY FILE_COPY" if admin.info.server_version >= 150000 else ""
            admin.execute(f"CREATE DATABASE {name}{strategy}")
        return self.dsn(name)

    def drop_database(self, dsn: str) -> None:
        import psycopg

        with psycopg.connect(self.dsn(), autocommit=True) as admin:
            # FORCE: a store a test left open must not keep the database alive
            admin.execute(f"DROP DATABASE IF EXISTS {dsn.rsplit('/', 1)[1]} WITH (FORCE)")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(RuntimeError):  # already gone: nothing to stop
                self._run("pg_ctl", "-D", str(self.data), "stop", "-m", "immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A running PostgreSQL server for the session, or a skip that says why there is none."""
    bindir = find_bindir()
    if bindir is None:
        pytest.skip(NO_BINARIES)
    pytest.importorskip("psycopg", reason=NO_PSYCOPG)
    try:
        server = PostgresServer(bindir)
    except KeyError:
        pytest.skip("running as root and there is no postgres user to run initdb as")
    try:
        server.start()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        server.stop()
        pytest.skip(f"PostgreSQL server did not start: {exc}")
    yield server
    server.stop()


@pytest.fixture
def postgres_dsn(postgres_server: PostgresServer) -> Iterator[str]:
    """The DSN of a fresh, empty database on the session's server (dropped after the test)."""
    dsn = postgres_server.create_database()
    yield dsn
    postgres_server.drop_database(dsn)
