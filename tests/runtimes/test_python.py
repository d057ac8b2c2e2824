"""Custom Python backend: class discovery, ModelContext, output checks, isolation of model.py imports."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ladle.errors import InvalidInput, ModelError
from ladle.repository.model_config import ModelConfig
from ladle.runtimes import RuntimeLoadError, load_runtime
from ladle.tensors import TensorSpec

SCALER = """
import numpy as np

FACTOR = {factor}

class Scaler:
    def load(self, context):
        self.context = context
        self.offset = context.parameters.get("offset", 0)

    def predict(self, batch):
        x = batch["x"]
        words = [t.decode("utf-8").split() for t in batch["text"][:, 0]]
        return {{
            "y": (x * FACTOR + self.offset).tolist(),   # a list: the runtime converts it
            "words": [len(w) for w in words],           # flat list of N fills per-item shape [1]
            "first": [[w[0].encode() if w else b""] for w in words],
        }}
"""

INPUTS = (TensorSpec("x", "FP32", (2,)), TensorSpec("text", "BYTES", (1,)))
OUTPUTS = (TensorSpec("y", "FP32", (2,)), TensorSpec("words", "INT32", (1,)), TensorSpec("first", "BYTES", (1,)))


def _write(version_dir: Path, source: str) -> Path:
    version_dir.mkdir(parents=True, exist_ok=True)
    (version_dir / "model.py").write_text(textwrap.dedent(source), encoding="utf-8")
    return version_dir


def _config(**kwargs: Any) -> ModelConfig:
    kwargs.setdefault("inputs", INPUTS)
    kwargs.setdefault("outputs", OUTPUTS)
    return ModelConfig(name=kwargs.pop("name", "scaler"), backend="python", max_batch_size=8, **kwargs)


def _batch() -> dict[str, np.ndarray]:
    x = np.array([[1.0, 2.0], [3.0, -1.5]], dtype=np.float32)
    text = np.array([["héllo wörld".encode()], [b""]], dtype=np.object_)
    return {"x": x, "text": text}


def test_predict_converts_and_checks_outputs(tmp_path: Path) -> None:
    version_dir = _write(tmp_path / "3", SCALER.format(factor=2))
    runtime = load_runtime(version_dir, _config(parameters={"offset": 1}))
    out = runtime.predict(_batch())
    np.testing.assert_array_equal(out["y"], _batch()["x"] * 2 + 1)
    assert out["y"].dtype == np.float32
    np.testing.assert_array_equal(out["words"], np.array([[2], [0]], dtype=np.int32))
    assert out["first"].tolist() == [["héllo".encode()], [b""]]
    context = runtime.instance.context
    assert (context.name, context.version, context.model_dir) == ("scaler", 3, version_dir)
    assert context.parameters == {"offset": 1}


def test_versions_load_side_by_side_without_a_generic_module_name(tmp_path: Path) -> None:
    before = set(sys.modules)
    one = load_runtime(_write(tmp_path / "1", SCALER.format(factor=1)), _config())
    two = load_runtime(_write(tmp_path / "2", SCALER.format(factor=10)), _config())
    assert one.predict(_batch())["y"][1, 0] == 3.0 and two.predict(_batch())["y"][1, 0] == 30.0
    added = set(sys.modules) - before
    assert "model" not in added and len(added) == 2
    assert all(name.startswith("ladle_python_model_scaler_") for name in added)
    one.close()
    two.close()
    assert set(sys.modules) - before == set()


def test_class_name_chooses_and_no_arg_load_is_called(tmp_path: Path) -> None:
    source = """
        class Helper:
            pass

        class A:
            def predict(self, batch):
                return {"y": batch["x"]}

        class B:
            def load(self):
                self.loaded = True

            def predict(self, batch):
                return {"y": batch["x"] * 0 + float(self.loaded)}
    """
    version_dir = _write(tmp_path / "1", source)
    config = _config(inputs=INPUTS[:1], outputs=OUTPUTS[:1])
    with pytest.raises(RuntimeLoadError, match=r"several classes define predict: \['A', 'B'\].*class_name"):
        load_runtime(version_dir, config)
    runtime = load_runtime(version_dir, _config(inputs=INPUTS[:1], outputs=OUTPUTS[:1], parameters={"class_name": "B"}))
    np.testing.assert_array_equal(runtime.predict(_batch())["y"], np.ones((2, 2), dtype=np.float32))
    with pytest.raises(RuntimeLoadError, match=r"class 'Helper' has no predict\(batch\) method"):
        load_runtime(version_dir, _config(parameters={"class_name": "Helper"}))


def test_load_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(RuntimeLoadError, match=r"looked for 'model\.py'"):
        load_runtime(tmp_path, _config())
    _write(tmp_path, "class NoPredict:\n    def load(self):\n        pass\n")
    with pytest.raises(RuntimeLoadError, match=r"no class defines predict\(batch\); classes found: \['NoPredict'\]"):
        load_runtime(tmp_path, _config())
    _write(tmp_path, "import no_such_module_anywhere\n")
    with pytest.raises(RuntimeLoadError, match="importing it raised ModuleNotFoundError"):
        load_runtime(tmp_path, _config())
    _write(tmp_path, """
        class M:
            def load(self):
                raise OSError("weights gone")

            def predict(self, batch):
                pass
    """)
    with pytest.raises(RuntimeLoadError, match=r"M\.load\(\) raised OSError: weights gone"):
        load_runtime(tmp_path, _config())
    with pytest.raises(RuntimeLoadError, match="list 'inputs' and 'outputs'"):
        load_runtime(tmp_path, _config(inputs=()))


FIRST = '"first": [[b"a"], [b"b"]]'


@pytest.mark.parametrize(
    ("body", "error", "match"),
    [
        ('return {"y": batch["x"]}', ModelError, r"returned no output 'words'"),
        (f'return {{"y": batch["x"][:1], "words": [1, 2], {FIRST}}}', ModelError, "1 rows for a batch of 2"),
        (f'return {{"y": batch["x"], "words": [[1, 2]] * 2, {FIRST}}}', ModelError, r"per-item shape \[2\]"),
        ('return [1, 2]', ModelError, "returned list"),
        ('raise ValueError("bad x")', ModelError, "raised ValueError: bad x"),
        ('raise InvalidInput("x must be positive")', InvalidInput, "x must be positive"),
    ],
)
def test_bad_results_raise_protocol_errors(tmp_path: Path, body: str, error: type, match: str) -> None:
    source = f"from ladle.errors import InvalidInput\n\nclass M:\n    def predict(self, batch):\n        {body}\n"
    runtime = load_runtime(_write(tmp_path, source), _config())
    with pytest.raises(error, match=match):
        runtime.predict(_batch())
