"""Model instances: where batches actually run, a thread or a worker process per instance.

Invariant: an instance runs one batch at a time (it has one worker thread), so a Runtime is
never called concurrently. Process instances hold the model in a spawned worker, so GIL-bound
Python models scale across cores; a crashed worker fails its batch and is restarted on the next.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import threading
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from ladle.batching.worker_thread import WorkerThread
from ladle.errors import LadleError, ModelError
from ladle.repository.model_config import ModelConfig
from ladle.runtimes import load_runtime
from ladle.tensors import TensorSpec

log = logging.getLogger(__name__)


class Instance:
    """Common shape: specs of the loaded model, its worker thread, predict and close."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def __init__(self, name: str) -> None:
        self.name = name
        self.worker = WorkerThread(name)

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

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
        self._lock = threading.Lock()
        self._conn, self._process = self._spawn()

    def _spawn(self) -> tuple[Connection, Any]:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        process = ctx.Process(target=_worker_main, args=(child, *self._args), name=self.name, daemon=True)
        process.start()
        child.close()
        reply = _receive(parent, process)
        if reply[0] != "ready":
            process.join(timeout=5)
            raise ModelError(reply[2])
        self.inputs, self.outputs = reply[1], reply[2]
        log.info("instance %s: worker process %d ready", self.name, process.pid)
        return parent, process

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            if not self._process.is_alive():
                log.warning("instance %s: worker died (exit %s); restarting", self.name, self._process.exitcode)
                self._conn, self._process = self._spawn()
            self._conn.send(inputs)
            reply = _receive(self._conn, self._process)
        if reply[0] == "ok":
            return reply[1]
        raise _rebuild_error(reply[1], reply[2])

    def close(self) -> None:
        super().close()
        with contextlib.suppress(OSError):
            self._conn.send(None)
        self._process.join(timeout=5)
        if self._process.is_alive():
            self._process.kill()


def _receive(conn: Connection, process: Any) -> tuple:
    try:
        return conn.recv()
    except (EOFError, OSError):
        process.join(timeout=5)
        return ("error", "ModelError", f"model worker process exited unexpectedly (exit code {process.exitcode})")


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
