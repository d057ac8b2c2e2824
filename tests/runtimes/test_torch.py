"""Torch backends: TorchScript and torch.export parity, signature inference, output mapping, errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ladle.errors import ModelError
from ladle.repository.model_config import ModelConfig
from ladle.runtimes import RuntimeLoadError, load_runtime
from ladle.tensors import TensorSpec


class TwoHeads(torch.nn.Module):
    """Float features plus integer token ids in; a dict of two tensors out."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)
        self.embed = torch.nn.Embedding(10, 2)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"scores": self.linear(x), "pooled": self.embed(ids).sum(dim=1)}


class Pair(torch.nn.Module):
    """Returns a tuple: mapped onto the configured outputs by position."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.linear(x), x.sum(dim=1)


# torch.jit is deprecated in this torch, but TorchScript archives are still what many teams ship.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


def _config(backend: str, **kwargs: Any) -> ModelConfig:
    return ModelConfig(name="m", backend=backend, **kwargs)


def _inputs(batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch)
    return {"x": rng.normal(size=(batch, 4)).astype(np.float32), "ids": rng.integers(0, 10, (batch, 5))}


@pytest.fixture(scope="module")
def model() -> TwoHeads:
    torch.manual_seed(0)
    return TwoHeads().eval()


@pytest.fixture(scope="module")
def exported_dir(tmp_path_factory: pytest.TempPathFactory, model: TwoHeads) -> Path:
    batch = torch.export.Dim("batch")
    example = (torch.zeros(2, 4), torch.zeros(2, 5, dtype=torch.int64))
    program = torch.export.export(model, example, dynamic_shapes={"x": {0: batch}, "ids": {0: batch}})
    version_dir = tmp_path_factory.mktemp("exported")
    torch.export.save(program, version_dir / "model.pt2")
    return version_dir


def _reference(module: Any, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    with torch.inference_mode():
        out = module(torch.from_numpy(inputs["x"]), torch.from_numpy(inputs["ids"]))
    return {k: v.numpy() for k, v in out.items()}


def test_torch_export_infers_signature_and_is_bit_exact(exported_dir: Path, model: TwoHeads) -> None:
    runtime = load_runtime(exported_dir, _config("torch_export", max_batch_size=8))
    assert runtime.inputs == (TensorSpec("x", "FP32", (4,)), TensorSpec("ids", "INT64", (5,)))
    assert runtime.outputs == (TensorSpec("scores", "FP32", (3,)), TensorSpec("pooled", "FP32", (2,)))
    inputs = _inputs(3)
    out = runtime.predict(inputs)
    expected = _reference(torch.export.load(exported_dir / "model.pt2").module(), inputs)
    for name in ("scores", "pooled"):
        np.testing.assert_array_equal(out[name], expected[name])
        np.testing.assert_allclose(out[name], _reference(model, inputs)[name], rtol=1e-6)


def test_torch_export_static_batch_cannot_be_served_batched(tmp_path: Path) -> None:
    program = torch.export.export(torch.nn.Linear(4, 2), (torch.zeros(1, 4),))
    torch.export.save(program, tmp_path / "model.pt2")
    with pytest.raises(RuntimeLoadError, match=r"no dynamic batch dimension.*max_batch_size: 0"):
        load_runtime(tmp_path, _config("torch_export", max_batch_size=4))
    runtime = load_runtime(tmp_path, _config("torch_export"))
    assert runtime.inputs == (TensorSpec("input", "FP32", (1, 4)),)
    assert runtime.outputs == (TensorSpec("output", "FP32", (1, 2)),)


def test_torchscript_scripted_dict_module_is_bit_exact(tmp_path: Path, model: TwoHeads) -> None:
    torch.jit.script(model).save(str(tmp_path / "model.pt"))
    config = _config(
        "torchscript", max_batch_size=8,
        inputs=(TensorSpec("features", "FP32", (4,)), TensorSpec("tokens", "INT64", (5,))),
        outputs=(TensorSpec("pooled", "FP32", (2,)), TensorSpec("scores", "FP64", (3,))),
    )
    runtime = load_runtime(tmp_path, config)
    inputs = _inputs(4)
    out = runtime.predict({"features": inputs["x"], "tokens": inputs["ids"]})
    expected = _reference(torch.jit.load(str(tmp_path / "model.pt")), inputs)
    np.testing.assert_array_equal(out["pooled"], expected["pooled"])
    np.testing.assert_array_equal(out["scores"], expected["scores"].astype(np.float64))


def test_torchscript_traced_tuple_maps_positionally(tmp_path: Path) -> None:
    torch.manual_seed(1)
    pair = Pair().eval()
    traced = torch.jit.trace(pair, torch.zeros(2, 3))
    traced.save(str(tmp_path / "model.pt"))
    config = _config("torchscript", max_batch_size=4, inputs=(TensorSpec("x", "FP32", (3,)),),
                     outputs=(TensorSpec("y", "FP32", (2,)), TensorSpec("total", "FP32", ())))
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    x.flags.writeable = False  # request buffers are often read-only
    out = load_runtime(tmp_path, config).predict({"x": x})
    with torch.inference_mode():
        np.testing.assert_array_equal(out["y"], pair.linear(torch.from_numpy(x.copy())).numpy())
    np.testing.assert_array_equal(out["total"], x.sum(axis=1))


def test_torchscript_without_specs_says_which_fields(tmp_path: Path, model: TwoHeads) -> None:
    torch.jit.script(model).save(str(tmp_path / "model.pt"))
    with pytest.raises(RuntimeLoadError, match=r"list inputs and outputs .*forward\(\) takes \['x', 'ids'\]"):
        load_runtime(tmp_path, _config("torchscript", max_batch_size=2))
    too_many = tuple(TensorSpec(n, "FP32", (1,)) for n in "abc")
    with pytest.raises(RuntimeLoadError, match="lists 3 inputs"):
        load_runtime(tmp_path, _config("torchscript", max_batch_size=2, inputs=too_many, outputs=too_many[:1]))


def test_output_count_mismatch_is_a_model_error(exported_dir: Path) -> None:
    config = _config("torch_export", max_batch_size=8, outputs=(TensorSpec("other", "FP32", (3,)),))
    runtime = load_runtime(exported_dir, config)
    with pytest.raises(ModelError, match=r"missing outputs \['other'\]"):
        runtime.predict(_inputs(2))


def test_missing_artifacts_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(RuntimeLoadError, match=r"looked for 'model\.pt2'"):
        load_runtime(tmp_path, _config("torch_export"))
    with pytest.raises(RuntimeLoadError, match=r"looked for 'model\.pt'"):
        load_runtime(tmp_path, _config("torchscript"))
