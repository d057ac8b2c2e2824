"""Backends, looked up by the `backend` name of a model config.

Each backend module is imported only when a model uses it, so serving only ONNX models never
pays for importing torch; a backend whose optional packages are missing fails to load with a MissingExtra
that names the `pip install 'ladle[...]'` line (the registry shows it as the version's reason).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from ladle.extras import BACKEND_EXTRAS, raise_missing_extra
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
    try:
        module = importlib.import_module(_MODULES[config.backend])
        return module.load(version_dir, config)
    except ModuleNotFoundError as exc:
        if config.backend in BACKEND_EXTRAS:
            raise_missing_extra(BACKEND_EXTRAS[config.backend], f"backend '{config.backend}'", exc)
        raise


__all__ = ["Runtime", "RuntimeLoadError", "load_runtime"]
