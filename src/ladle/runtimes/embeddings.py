"""sentence-transformers backend: one BYTES tensor of texts in, one float embedding per text out.

Invariant: the model is loaded from local files only (HF_HUB_OFFLINE), and each served item holds
exactly one UTF-8 text whose embedding has the model's dimension.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np

from ladle.errors import InvalidInput
from ladle.process import hub_offline, pin_torch_threads
from ladle.repository.model_config import ModelConfig
from ladle.runtimes.base import RuntimeLoadError
from ladle.runtimes.common import cast_output, item_to_served, param_bool, param_int, param_str
from ladle.tensors import TensorSpec

MARKER_FILES = ("modules.json", "config.json")
FLOAT_TYPES = ("FP16", "FP32", "FP64")


class EmbeddingRuntime:
    """A SentenceTransformer that encodes a batch of texts in one call."""

    def __init__(self, model: Any, config: ModelConfig, inputs: tuple[TensorSpec, ...],
                 outputs: tuple[TensorSpec, ...], dim: int) -> None:
        self.model = model
        self.inputs = inputs
        self.outputs = outputs
        self.dim = dim
        self.batched = config.batched
        self.normalize = param_bool(config, "normalize_embeddings", False)
        self.batch_size = param_int(config, "batch_size", 32, minimum=1)

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = self.inputs[0]
        array = inputs[spec.name]
        if self.batched and array.size != array.shape[0]:
            raise InvalidInput(
                f"input '{spec.name}': each item must hold exactly one text, got shape {list(array.shape)}"
            )
        texts = _decode(array.reshape(-1), spec.name)
        if texts:
            vectors = self.model.encode(
                texts, batch_size=self.batch_size, normalize_embeddings=self.normalize,
                convert_to_numpy=True, show_progress_bar=False,
            )
        else:
            vectors = np.zeros((0, self.dim), dtype=np.float32)
        return {self.outputs[0].name: cast_output(vectors, self.outputs[0])}

    def close(self) -> None:
        self.model = None


def _decode(items: np.ndarray, name: str) -> list[str]:
    texts = []
    for index, item in enumerate(items):
        if isinstance(item, str):
            texts.append(item)
            continue
        try:
            texts.append(bytes(item).decode("utf-8"))
        except UnicodeDecodeError as exc:
            reason = f"{exc.reason} at byte {exc.start}"
            raise InvalidInput(f"input '{name}': item {index} is not valid UTF-8 ({reason})") from None
    return texts


def load(version_dir: Path, config: ModelConfig) -> EmbeddingRuntime:
    """Find the model folder, load it offline, and settle the text input and embedding output."""
    hub_offline()  # before sentence_transformers/huggingface_hub are imported: they read it once at import
    model_dir = _model_dir(version_dir, config)
    threads = param_int(config, "num_threads", None, minimum=1)
    model = _open(model_dir, config)
    # load runs on the instance's own thread (or worker process), which also runs its batches
    pin_torch_threads(threads, f"model {config.name}")
    getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    dim = getter()
    if not isinstance(dim, int):
        raise RuntimeLoadError(f"{model_dir}: the model does not report its embedding dimension")
    inputs = config.inputs or (TensorSpec("text", "BYTES", item_to_served((1,), config.batched)),)
    outputs = config.outputs or (TensorSpec("embedding", "FP32", item_to_served((dim,), config.batched)),)
    _check(model_dir, inputs, outputs, dim, config.batched)
    return EmbeddingRuntime(model, config, inputs, outputs, dim)


def _open(model_dir: Path, config: ModelConfig) -> Any:
    from sentence_transformers import SentenceTransformer

    try:
        return SentenceTransformer(str(model_dir), device=param_str(config, "device", None), local_files_only=True)
    except Exception as exc:
        raise RuntimeLoadError(
            f"{model_dir}: sentence-transformers could not load it ({type(exc).__name__}: {exc})"
        ) from exc


def _is_model_dir(path: Path) -> bool:
    return any((path / marker).is_file() for marker in MARKER_FILES)


def _model_dir(version_dir: Path, config: ModelConfig) -> Path:
    """The version dir if it holds a model, else parameters.model_path, else the model inside parameters.package."""
    if _is_model_dir(version_dir):
        return version_dir
    model_path = param_str(config, "model_path", None)
    if model_path is not None:
        path = (version_dir / model_path).resolve()  # relative paths are relative to the version dir
        if not _is_model_dir(path):
            raise RuntimeLoadError(f"{path} (parameters.model_path): no sentence-transformers model; "
                                   f"looked for {list(MARKER_FILES)}")
        return path
    package = param_str(config, "package", None)
    if package is not None:
        return _package_model_dir(package)
    raise RuntimeLoadError(
        f"{version_dir}: no sentence-transformers model (looked for {list(MARKER_FILES)}); put the model "
        f"there, or set parameters.model_path or parameters.package in config.yaml"
    )


def _package_model_dir(package: str) -> Path:
    """Ask the package where its model is (get_model_path() or MODEL_DIR), else search its folder."""
    try:
        module = importlib.import_module(package)
    except ImportError as exc:
        raise RuntimeLoadError(f"parameters.package: cannot import '{package}' ({exc}); is it installed?") from exc
    getter = getattr(module, "get_model_path", None)
    exposed = getter() if callable(getter) else getattr(module, "MODEL_DIR", None)
    if exposed is not None and _is_model_dir(Path(exposed)):
        return Path(exposed)
    roots = [Path(p) for p in getattr(module, "__path__", [])]
    found = sorted((m.parent for root in roots for m in root.rglob("modules.json")), key=lambda p: len(p.parts))
    if not found:
        raise RuntimeLoadError(f"parameters.package: '{package}' ({roots}) contains no modules.json model folder")
    return found[0]


def _check(model_dir: Path, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...], dim: int,
           batched: bool) -> None:
    if len(inputs) != 1 or inputs[0].datatype != "BYTES":
        raise RuntimeLoadError(f"{model_dir}: an embedding model takes exactly one BYTES input (the texts); "
                               f"config.yaml lists {[(s.name, s.datatype) for s in inputs]}")
    if len(outputs) != 1 or outputs[0].datatype not in FLOAT_TYPES:
        raise RuntimeLoadError(f"{model_dir}: an embedding model has exactly one FP16/FP32/FP64 output; "
                               f"config.yaml lists {[(s.name, s.datatype) for s in outputs]}")
    want = item_to_served((dim,), batched)
    shape = outputs[0].shape
    if len(shape) != len(want) or shape[-1] not in (-1, dim):
        raise RuntimeLoadError(f"{model_dir}: output '{outputs[0].name}' must have shape {list(want)} "
                               f"(the model's dimension is {dim}), config.yaml says {list(shape)}")
