"""A single worker thread that runs calls and hands results back to an asyncio loop.

Lighter than run_in_executor on a ThreadPoolExecutor (no concurrent.futures.Future, no future
chaining): a sub-millisecond model pays for one queue hand-off and one loop wake-up, nothing more.
Invariant: calls run one at a time, in submission order.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any

_STOP = object()


class WorkerThread:
    def __init__(self, name: str) -> None:
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        """Run fn(*args) on the thread; the returned future resolves on `loop`."""
        future = loop.create_future()
        self._inbox.put((loop, future, fn, args))
        return future

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn(*args) on the thread and wait for it (model loading: kernels' per-thread state is then
        created on the thread that will run the batches)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put((None, future, fn, args))
        return future.result()

    def _run(self) -> None:
        while True:
            item = self._inbox.get()
            if item is _STOP:
                return
            loop, future, fn, args = item
            try:
                result, error = fn(*args), None
            except BaseException as exc:  # delivered to the awaiting side, which decides
                result, error = None, exc
            if loop is None:
                _settle_sync(future, result, error)
                continue
            with contextlib.suppress(RuntimeError):  # the loop closed while we worked: nobody is waiting
                loop.call_soon_threadsafe(_settle, future, result, error)

    def shutdown(self) -> None:
        self._inbox.put(_STOP)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _settle_sync(future: concurrent.futures.Future, result: Any, error: BaseException | None) -> None:
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
