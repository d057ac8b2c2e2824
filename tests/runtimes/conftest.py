"""Fixtures shared by the runtime tests: the demo build script (for its small model builders) and iris data."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

BUILD_DEMO = Path(__file__).resolve().parents[2] / "examples" / "build_demo.py"


def _import_build_demo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ladle_examples_build_demo", BUILD_DEMO)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def build_demo() -> ModuleType:
    """examples/build_demo.py, whose train/export functions the tests reuse."""
    return _import_build_demo()


@pytest.fixture(scope="session")
def iris(build_demo: ModuleType) -> tuple[np.ndarray, np.ndarray]:
    """Iris features (float32) and labels."""
    return build_demo.iris_data()


@pytest.fixture(scope="session")
def iris_model(build_demo: ModuleType):
    """A LogisticRegression fitted on iris (shared: tests never mutate it)."""
    return build_demo.train_iris()
