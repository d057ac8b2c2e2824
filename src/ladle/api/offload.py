"""Running GIL-bound work a client controls (parsing a huge JSON body) in a helper process.

Invariant: the event loop only waits for the result. A thread would not do: orjson and numpy hold the GIL while
they parse, so a 16 MB JSON body decoded on a worker thread still stalled the event loop for ~170 ms (measured);
a process has a GIL of its own. One spawned worker, started on first use and shut down with the app.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

from ladle.errors import Unavailable

T = TypeVar("T")


class ProcessOffload:
    def __init__(self, workers: int = 1) -> None:
        self._workers = workers
        self._pool: ProcessPoolExecutor | None = None

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """fn(*args) in the helper process (fn and args must pickle; a LadleError raised there is re-raised here)."""
        if self._pool is None:
            # spawn, not fork: the server has threads (engines, instances), and a forked child would inherit their
            # locks in whatever state they were
            self._pool = ProcessPoolExecutor(self._workers, mp_context=multiprocessing.get_context("spawn"))
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        except BrokenProcessPool:  # the worker died (e.g. out of memory on a hostile body): a fresh one next time
            self.close()
            raise Unavailable("the request's body could not be decoded: the decoding process died; retry") from None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
