"""The contract every backend implements: load an artifact, predict on a batch of named arrays.

A Runtime is used by one instance at a time (the batcher never calls `predict` concurrently on
the same object), so backends need no locking. BYTES tensors are numpy object arrays of `bytes`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from ladle.repository.model_config import ModelConfig
from ladle.tensors import TensorSpec


class Runtime(Protocol):
    """A loaded model version."""

    #: the model's inputs and outputs as served: from the config, or inferred from the artifact
    #: (without the batch dimension when the model batches).
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch. Arrays carry the batch dimension when `config.max_batch_size > 0`.
        Returns every output named in `outputs`."""
        ...

    def close(self) -> None:
        """Release what the model holds (sessions, worker state)."""
        ...


class Loader(Protocol):
    def __call__(self, version_dir: Path, config: ModelConfig) -> Runtime: ...


class RuntimeLoadError(RuntimeError):
    """An artifact could not be loaded; the message says which file and why."""
