"""Building small model repositories for end-to-end tests.

`probe` is a custom Python model whose behaviour the tests steer through its input: y = 2x,
the worker's pid, a log of every value it ran (to prove what never ran), and a sleep for x < 0.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "models"

PROBE_SOURCE = '''
import os
import time

import numpy as np


class Probe:
    def load(self, ctx):
        self.log = ctx.parameters.get("log")

    def predict(self, batch):
        x = batch["x"]
        if self.log:
            with open(self.log, "a") as f:
                f.write(" ".join(str(float(v)) for v in x.reshape(-1)) + "\\n")
        slowest = float(x.min())
        if slowest < 0:
            time.sleep(-slowest / 1000.0)
        if float(x.max()) == 666.0:
            raise RuntimeError("probe was asked to fail")
        pid = np.full((x.shape[0], 1), os.getpid(), dtype=np.int64)
        return {"y": x * 2, "pid": pid}
'''


def write_model(repo: Path, name: str, config: dict, versions: dict[int, dict[str, str]] | None = None) -> Path:
    """Write `<repo>/<name>/config.yaml` and version dirs with the given files (name -> text)."""
    model_dir = repo / name
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.yaml").write_text(yaml.safe_dump(config))
    for version, files in (versions or {1: {}}).items():
        vdir = model_dir / str(version)
        vdir.mkdir(exist_ok=True)
        for filename, text in files.items():
            (vdir / filename).write_text(text)
    return model_dir


def write_probe(repo: Path, name: str = "probe", versions: tuple[int, ...] = (1,), **config) -> Path:
    base = {
        "backend": "python",
        "max_batch_size": 16,
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}],
        "outputs": [
            {"name": "y", "datatype": "FP32", "shape": [1]},
            {"name": "pid", "datatype": "INT64", "shape": [1]},
        ],
        "dynamic_batching": {"max_queue_delay_ms": 5},
    }
    base.update(config)
    return write_model(repo, name, base, {v: {"model.py": PROBE_SOURCE} for v in versions})


def build_demo_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ladle_examples_build_demo_e2e", ROOT / "examples" / "build_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
