"""What the SQL backends share, without any SQL: the column lists of files and jobs (derived from the records),
row <-> record conversion, JSON columns, update checks, paging and re-chunking.

Invariant: a record's columns are stored in its dataclass's field order, so `record_from_row(row)` is exact for
a `SELECT <columns>` built from the same list, and only JobRecord fields named in UPDATABLE reach an UPDATE.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

from ladle.jobs.records import FileRecord, JobRecord

T = TypeVar("T")

#: columns holding JSON text (the rest are plain integers or text)
JSON_FIELDS = ("metadata", "errors")


def columns(cls: type) -> tuple[tuple[str, str], ...]:
    """(name, "int" | "text") per field of a record dataclass, in field order: integer fields are "int",
    everything else (strings, JSON) is "text"."""
    return tuple((f.name, "int" if str(f.type).split("|")[0].strip() == "int" else "text")
                 for f in dataclasses.fields(cls))


FILE_COLUMNS = columns(FileRecord)
JOB_COLUMNS = columns(JobRecord)
FILE_NAMES = tuple(name for name, _ in FILE_COLUMNS)
JOB_NAMES = tuple(name for name, _ in JOB_COLUMNS)
#: what update_job may set (the identity and the creation time never change)
UPDATABLE = frozenset(JOB_NAMES) - {"id", "kind", "created_at"}


def column_defs(cols: Sequence[tuple[str, str]], types: dict[str, str], key: str = "id") -> str:
    """`name TYPE, ...` for a CREATE TABLE, `key` as the primary key."""
    return ", ".join(f"{name} {types[kind]}" + (" PRIMARY KEY" if name == key else "") for name, kind in cols)


def file_from_row(row: Sequence[Any]) -> FileRecord:
    return FileRecord(*row)


def file_to_row(record: FileRecord) -> tuple[Any, ...]:
    return dataclasses.astuple(record)


def job_from_row(row: Sequence[Any]) -> JobRecord:
    values = dict(zip(JOB_NAMES, row, strict=True))
    for name in JSON_FIELDS:
        if values[name] is not None:
            values[name] = json.loads(values[name])
    return JobRecord(**values)


def job_to_row(record: JobRecord) -> tuple[Any, ...]:
    # not dataclasses.astuple: it would deep-copy the JSON values for nothing
    return tuple(encode(name, getattr(record, name)) for name in JOB_NAMES)


def encode(name: str, value: Any) -> Any:
    """A JobRecord field's value as stored: JSON text for metadata/errors, the value itself otherwise."""
    if name in JSON_FIELDS and value is not None:
        return json.dumps(value, separators=(",", ":"))
    return value


def update_fields(fields: dict[str, Any]) -> list[tuple[str, Any]]:
    """(column, stored value) for update_job; column names end up in SQL text, so they are checked here."""
    unknown = set(fields) - UPDATABLE
    if unknown:
        raise ValueError(f"update_job cannot set {', '.join(sorted(unknown))}")
    return [(name, encode(name, value)) for name, value in fields.items()]


def descending(order: str) -> bool:
    if order not in ("asc", "desc"):
        raise ValueError(f"order must be 'asc' or 'desc', not {order!r}")
    return order == "desc"


def page(items: list[T], limit: int) -> tuple[list[T], bool]:
    """A page fetched with LIMIT limit + 1: (the first `limit`, whether there was one more)."""
    return items[:limit], len(items) > limit


def rechunk(chunks: Iterable[bytes], size: int) -> Iterator[bytes]:
    """The same bytes in pieces of exactly `size` (the last one shorter); empty chunks disappear."""
    if size <= 0:
        raise ValueError("chunk size must be positive")
    buffer = bytearray()
    for chunk in chunks:
        buffer += chunk
        whole = len(buffer) - len(buffer) % size
        if not whole:
            continue
        # slice through a view, then drop the sent part once: a big chunk costs one copy, not one per piece
        with memoryview(buffer) as view:
            pieces = [bytes(view[start:start + size]) for start in range(0, whole, size)]
        del buffer[:whole]
        yield from pieces
    if buffer:
        yield bytes(buffer)
