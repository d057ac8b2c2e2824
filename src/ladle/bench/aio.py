"""Event-loop plumbing shared by the load generators: run on uvloop when installed, Ctrl-C keeps results.

Invariant: an interrupted run returns what it measured (its `interrupted` flag set) instead of raising.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import signal
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


async def run_interruptible(load: Coroutine[Any, Any, Any], result: Any) -> None:
    """Await `load`; Ctrl-C cancels it and marks `result` interrupted instead of raising."""
    task = asyncio.ensure_future(load)
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):  # no signal handlers off the main thread
        loop.add_signal_handler(signal.SIGINT, interrupt, result, task)
    try:
        await task
    except asyncio.CancelledError:
        if not result.interrupted:
            raise
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGINT)
