"""Running client-influenced Python (chat-template rendering) under a deadline that really stops it.

Invariant: `call_with_deadline` runs on a worker thread, never the event loop; past the deadline an exception is
raised *inside* that thread at its next bytecode, so a runaway template stops burning CPU instead of running on
in the background after its request has been answered.
"""

from __future__ import annotations

import ctypes
import heapq
import itertools
import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# Why an asynchronous exception rather than the alternatives (measured on a normal 4-message ChatML render of
# ~30 us): a per-thread sys.settrace line tracer checking a deadline made it ~10x slower (~330 us), and a killable
# worker subprocess costs a pickle round-trip per request plus a transformers import per worker. Arming this
# watchdog costs a few microseconds and nothing more until the deadline fires. Like the tracer, it cannot cut one
# long C call short (a huge string repeat); jinja's sandbox caps range() at 100000 items, and client templates are
# off by default.
_set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc  # (thread id, exception class or NULL: clear)
_set_async_exc.restype = ctypes.c_int


class DeadlineExpired(BaseException):
    """Raised inside the worker thread when its deadline passes (a BaseException, so that an `except Exception`
    in jinja or transformers cannot swallow it)."""


class _Watchdog:
    """One daemon thread that raises DeadlineExpired into threads whose deadline passed (a thread per call would
    cost ~100 us to start, more than rendering a normal template). `disarm` guarantees nothing is raised later."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._armed: dict[int, tuple[float, int]] = {}  # token -> (deadline, thread id)
        self._heap: list[tuple[float, int]] = []  # (deadline, token); tokens no longer armed are skipped
        self._tokens = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, timeout_s: float) -> int:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ladle-template-watchdog", daemon=True)
                self._thread.start()
            token = next(self._tokens)
            deadline = time.monotonic() + timeout_s
            self._armed[token] = (deadline, threading.get_ident())
            heapq.heappush(self._heap, (deadline, token))
            self._cond.notify()
            return token

    def disarm(self, token: int) -> None:
        with self._cond:
            if self._armed.pop(token, None) is None:  # it fired: the exception may still be pending, clear it
                _set_async_exc(ctypes.c_ulong(threading.get_ident()), None)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._cond.wait(None if not self._heap else self._heap[0][0] - time.monotonic())
                _, token = heapq.heappop(self._heap)
                armed = self._armed.pop(token, None)
                if armed is not None:
                    _set_async_exc(ctypes.c_ulong(armed[1]), ctypes.py_object(DeadlineExpired))


_WATCHDOG = _Watchdog()


def call_with_deadline(fn: Callable[[], T], timeout_s: float) -> T:
    """fn() on this thread, stopped with DeadlineExpired if it runs past `timeout_s` seconds."""
    token = _WATCHDOG.arm(timeout_s)
    try:
        return fn()
    finally:
        # DeadlineExpired may arrive in fn or during disarm(); after disarm() none is pending, none can come
        _WATCHDOG.disarm(token)
