"""Event-loop plumbing shared by the load generators: run on uvloop when installed, Ctrl-C keeps results.

Invariant: an interrupted run returns what it measured (its `interrupted` flag set) instead of raising.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run_blocking(coro: Coroutine[Any, Any, T]) -> T:
    """Blocking entry point for scripts (benchmarks/*/run.py): on uvloop when installed."""
    if importlib.util.find_spec("uvloop") is not None:
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


def interrupt(result: Any, load: asyncio.Future) -> None:
    """SIGINT handler: stop the load, keep the records (the report says the run was cut short)."""
    result.interrupted = True
    load.cancel()
