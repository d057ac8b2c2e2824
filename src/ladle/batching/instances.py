"""Model instances: where batches actually run, a thread or a worker process per instance.

Invariant: an instance runs one batch at a time (it has one worker thread), so a Runtime is
never called concurrently. Process instances hold the model in a spawned worker, so GIL-bound
Python models scale across cores; a worker that dies (or is killed for overrunning) fails only its
own batch with WorkerDied (503) and is replaced on the instance's thread, with exponential back-off.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import threading
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from ladle.batching.worker_thread import WorkerThread
from ladle.errors import LadleError, ModelError, Unavailable
from ladle.repository.model_config import ModelConfig
from ladle.runtimes import load_runtime
from ladle.tensors import TensorSpec

log = logging.getLogger(__name__)


class WorkerDied(Unavailable):
    """A process instance's worker exited while it held the batch; it is being restarted (retry)."""


class Backoff:
    """Restart delays: `first` doubling up to `cap`; back to `first` once a worker stayed up `healthy_s`."""

    def __init__(self, first_s: float = 0.1, cap_s: float = 10.0, healthy_s: float = 30.0) -> None:
        self.first_s, self.cap_s, self.healthy_s = first_s, cap_s, healthy_s
        self._next_s = first_s

    def next_delay(self, uptime_s: float) -> float:
        """The delay before the next start, given how long the last worker stayed up (0: it never started)."""
        if uptime_s >= self.healthy_s:
            self._next_s = self.first_s
        delay = self._next_s
        self._next_s = min(self._next_s * 2, self.cap_s)
        return delay


class Instance:
    """Common shape: specs of the loaded model, its worker thread, predict and close."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def __init__(self, name: str) -> None:
        self.name = name
        self.worker = WorkerThread(name)

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def abort(self) -> bool:
        """Stop the running batch from another thread, if this kind of instance can; True if it was stopped."""
        return False  # a thread cannot be stopped: the batcher keeps it out of rotation until it returns

    def restart(self) -> None:
        """Bring a dead worker back (on the instance's thread); nothing to do for a thread instance."""

    def close(self) -> None:
        self.worker.shutdown()


class ThreadInstance(Instance):
    """The model lives in this process; batches run on the instance's own thread."""

    def __init__(self, name: str, version_dir: Path, config: ModelConfig) -> None:
        super().__init__(name)
        # loaded on the thread that will run it: torch/oneDNN keep per-thread state (see llm/async_engine.py)
        try:
            self.runtime = self.worker.call(load_runtime, version_dir, config)
        except BaseException:
            self.worker.shutdown()
            raise
        self.inputs, self.outputs = self.runtime.inputs, self.runtime.outputs

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.runtime.predict(inputs)

    def close(self) -> None:
        super().close()
        self.runtime.close()


class ProcessInstance(Instance):
    """The model lives in a spawned worker process; the instance thread ships batches over a pipe."""

    def __init__(self, name: str, version_dir: Path, config: ModelConfig) -> None:
        super().__init__(name)
        self._args = (version_dir, config)
        self._lock = threading.RLock()  # the instance thread (predict, restart) against close()
        self._closed = threading.Event()
        self._backoff = Backoff()
        self._up_since: float | None = None  # when the current worker became ready; None: it is down
        self._last_uptime_s = 0.0  # how long the last worker stayed up: a long life resets the back-off
        self._conn, self._process = self._spawn()

    def _spawn(self) -> tuple[Connection, Any]:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        process = ctx.Process(target=_worker_main, args=(child, *self._args), name=self.name, daemon=True)
        process.start()
        child.close()
        reply = _receive(parent, process)
        if reply[0] != "ready":
            parent.close()
            process.join(timeout=5)
            raise ModelError(reply[2] if reply[0] == "error" else f"the worker process died while loading ({reply[1]})")
        self.inputs, self.outputs = reply[1], reply[2]
        self._up_since = time.monotonic()
        log.info("instance %s: worker process %d ready", self.name, process.pid)
        return parent, process

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            if not self._process.is_alive():  # died between batches: nothing was lost yet, bring it back first
                self._went_down()
                try:
                    self.restart()
                except ModelError as exc:
                    raise WorkerDied(f"the model's worker process died and could not be restarted ({exc.message}); "
                                     "retrying with back-off") from None
            with contextlib.suppress(OSError):  # a broken pipe means the worker is gone: _receive says so
                self._conn.send(inputs)
            reply = _receive(self._conn, self._process)
        if reply[0] == "died":
            self._went_down()
            raise WorkerDied(f"worker process {self._process.pid} of instance {self.name} died ({reply[1]}) while "
                             "running this batch; it is being restarted, retry the request")
        if reply[0] == "ok":
            return reply[1]
        raise _rebuild_error(reply[1], reply[2])

    def _went_down(self) -> None:
        if self._up_since is not None:
            self._last_uptime_s = time.monotonic() - self._up_since
            self._up_since = None

    def abort(self) -> bool:
        """Kill the worker (from the event loop, when a batch overran); predict then sees it die."""
        with contextlib.suppress(OSError, ValueError, AttributeError):
            self._process.kill()  # a signal, never a wait: safe on the loop thread
        return True

    def restart(self) -> None:
        """Replace the dead worker after the back-off delay (on the instance thread); raises ModelError
        if the new one fails to load, Unavailable if the instance closes meanwhile."""
        delay = self._backoff.next_delay(self._last_uptime_s)
        self._last_uptime_s = 0.0  # a worker that fails to start stays up for no time at all
        log.warning("instance %s: worker process %d is gone (exit code %s); restarting in %.1f s",
                    self.name, self._process.pid, self._process.exitcode, delay)
        if self._closed.wait(delay):
            raise Unavailable(f"instance {self.name} is closing")
        with self._lock:
            if self._closed.is_set():
                raise Unavailable(f"instance {self.name} is closing")
            self._stop_worker()
            self._conn, self._process = self._spawn()
            if self._closed.is_set():  # close() ran meanwhile and stopped the old worker, not this one
                self._stop_worker()
                raise Unavailable(f"instance {self.name} is closing")

    def _stop_worker(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.send(None)
        self._process.join(timeout=5)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(timeout=5)
        self._conn.close()

    def close(self) -> None:
        self._closed.set()
        super().close()
        self._stop_worker()  # without the lock: a hung batch holds it, and stopping the worker is what ends it


def _receive(conn: Connection, process: Any) -> tuple:
    try:
        return conn.recv()
    except (EOFError, OSError):
        process.join(timeout=5)
        code = process.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return ("died", how)


def _rebuild_error(kind: str, message: str) -> LadleError:
    from ladle import errors

    cls = getattr(errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, LadleError):
        return cls(message)
    return ModelError(message)


def _worker_main(conn: Connection, version_dir: Path, config: ModelConfig) -> None:
    """Body of a worker process: load once, then answer batches until told to stop."""
    try:
        runtime = load_runtime(version_dir, config)
    except Exception as exc:  # report any load failure to the parent, then exit
        conn.send(("error", "ModelError", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", runtime.inputs, runtime.outputs))
    while True:
        inputs = conn.recv()
        if inputs is None:
            break
        try:
            conn.send(("ok", runtime.predict(inputs)))
        except LadleError as exc:
            conn.send(("error", type(exc).__name__, exc.message))
        except Exception as exc:  # the model's own bug: keep the worker alive for the next batch
            log.debug("worker %d: %s", os.getpid(), traceback.format_exc())
            conn.send(("error", "ModelError", f"{type(exc).__name__}: {exc}"))
    runtime.close()


def create_instances(model_name: str, version: int, version_dir: Path, config: ModelConfig) -> list[Instance]:
    """Load `config.instance_count` instances of one version (blocking; call off the event loop)."""
    cls = ProcessInstance if config.instance_kind == "process" else ThreadInstance
    instances: list[Instance] = []
    try:
        for index in range(config.instance_count):
            instances.append(cls(f"{model_name}-v{version}-{index}", version_dir, config))
    except BaseException:
        for instance in instances:
            instance.close()
        raise
    return instances
