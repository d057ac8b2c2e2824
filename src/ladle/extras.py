"""The optional extras (`pip install 'ladle[...]'`): which packages each brings and which backends need which.

Invariant: a missing optional package is reported as a MissingExtra whose message is the exact pip line that
installs it, never as a bare ModuleNotFoundError; the core install (the server, the repository, ONNX Runtime,
the KServe codec) imports none of these packages.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass


@dataclass(frozen=True)
class Extra:
    name: str
    packages: tuple[str, ...]  # pip names, as the message lists them
    modules: tuple[str, ...]  # the top-level modules those packages install (what an import fails on)


EXTRAS: dict[str, Extra] = {
    "torch": Extra("torch", ("torch",), ("torch",)),
    "sklearn": Extra("sklearn", ("scikit-learn", "skops"), ("sklearn", "skops", "joblib")),
    "llm": Extra(
        "llm",
        ("torch", "transformers", "tokenizers", "safetensors", "llguidance", "jinja2", "gguf"),
        ("torch", "transformers", "tokenizers", "safetensors", "llguidance", "jinja2", "gguf", "huggingface_hub",
         "tqdm"),
    ),
    "embeddings": Extra(
        "embeddings", ("sentence-transformers", "torch"),
        ("sentence_transformers", "torch", "transformers", "tokenizers", "safetensors", "huggingface_hub"),
    ),
    "bench": Extra("bench", ("aiohttp", "tqdm"), ("aiohttp", "tqdm")),
    "client": Extra("client", ("httpx", "tqdm"), ("httpx", "tqdm")),
    "postgres": Extra("postgres", ("psycopg",), ("psycopg",)),
    "grpc": Extra("grpc", ("grpcio", "protobuf"), ("grpc", "google.protobuf")),  # --grpc-port
    "tracing": Extra("tracing", ("opentelemetry-sdk", "opentelemetry-exporter-otlp"), ("opentelemetry",)),
}

#: model config `backend` -> the extra it needs (onnx and python are core)
BACKEND_EXTRAS = {
    "sklearn": "sklearn",
    "torchscript": "torch",
    "torch_export": "torch",
    "sentence_transformers": "embeddings",
    "llm": "llm",
}


class MissingExtra(ImportError):
    """An optional package is not installed; the message says which extra installs it."""

    def __init__(self, extra: str, who: str) -> None:
        spec = EXTRAS[extra]
        packages = spec.packages[0] if len(spec.packages) == 1 else (
            ", ".join(spec.packages[:-1]) + " and " + spec.packages[-1])
        super().__init__(f"{who} needs {packages}: pip install 'ladle[{extra}]'")
        self.extra = extra


def raise_missing_extra(extra: str, who: str, exc: ModuleNotFoundError) -> None:
    """Raise MissingExtra (from `exc`) when `exc` is about one of the extra's own modules; otherwise return, and
    the caller re-raises `exc` as it is (a user's model importing something else, a broken install)."""
    name = exc.name or ""
    top = name.partition(".")[0]
    # `No module named 'torch._C'` with torch installed is a broken install, not a missing extra
    if top in EXTRAS[extra].modules and (name == top or not _importable(top)):
        raise MissingExtra(extra, who) from exc


def require_extra(extra: str, who: str) -> None:
    """Raise MissingExtra unless every module of the extra is importable (checked without importing them)."""
    if not all(_importable(module) for module in EXTRAS[extra].modules):
        raise MissingExtra(extra, who)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules, or a half-imported one
        return False
