"""Fixtures for the job tests: the session's PostgreSQL server and a fresh database per test
(tests/jobs/postgres.py)."""

from __future__ import annotations

from tests.jobs.postgres import postgres_dsn, postgres_server

__all__ = ["postgres_dsn", "postgres_server"]  # re-exported as fixtures for every test under tests/jobs
