"""Backends, looked up by the `backend` name of a model config.

Each backend module is imported only when a model uses it, so serving only ONNX models never
pays for importing torch.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from ladle.repository.model_config import ModelConfig
from ladle.runtimes.base import Runtime, RuntimeLoadError

_MODULES = {
    "onnx": "ladle.runtimes.onnx",
    "sklearn": "ladle.runtimes.sklearn",
    "torchscript": "ladle.runtimes.torch",
    "torch_export": "ladle.runtimes.torch",
    "python": "ladle.runtimes.python",
    "sentence_transformers": "ladle.runtimes.embeddings",
}


def load_runtime(version_dir: Path, config: ModelConfig) -> Runtime:
    """Load one model version with the backend its config names."""
    module = importlib.import_module(_MODULES[config.backend])
    return module.load(version_dir, config)


__all__ = ["Runtime", "RuntimeLoadError", "load_runtime"]
