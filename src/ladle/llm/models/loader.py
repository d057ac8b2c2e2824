"""Load a checkpoint into a model: a Hugging Face directory (config.json + model.safetensors, or shards with an
index) or a GGUF file (gguf.py), streaming tensor by tensor into full-width parameters or quantized layers (quant.py).

Invariant: every checkpoint tensor lands in exactly one parameter slice (or is a known derived buffer) and every
parameter is filled; anything else is a ModelLoadError naming the tensor and file.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from safetensors import safe_open
from tqdm import tqdm

from ladle.errors import LadleError
from ladle.llm.models.layers import CausalLM, WeightTarget
from ladle.llm.models.qtensor import GGMLBlocks
from ladle.llm.models.registry import resolve_architecture

if TYPE_CHECKING:
    from ladle.llm.models.quant import QuantScheme

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"


class ModelLoadError(LadleError):
    """The checkpoint directory is incomplete, corrupt or does not match its config."""

    status = 500


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path} not found") from None
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from e


def find_weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files to read: those named by the shard index, else model.safetensors, else all *.safetensors."""
    index = model_dir / INDEX_FILE
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index} has no `weight_map`")
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.exists()]
        if absent:
            raise ModelLoadError(f"{index} names shards that are missing from {model_dir}: {absent}")
        return files
    single = model_dir / "model.safetensors"
    files = [single] if single.exists() else sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"no safetensors weights in {model_dir} (expected model.safetensors or shards with {INDEX_FILE}); "
            "convert .bin checkpoints with transformers' save_pretrained(safe_serialization=True)"
        )
    return files


class SafetensorsCheckpoint:
    """A Hugging Face checkpoint directory: config.json and safetensors weights, read one tensor at a time."""

    quantized = False

    def __init__(self, model_dir: Path) -> None:
        self.path = Path(model_dir)
        self.config = read_json(self.path / "config.json")
        self.files = find_weight_files(self.path)
        self.names = {f: _tensor_names(f) for f in self.files}
        self.file_of = {name: f.name for f, names in self.names.items() for name in names}

    @property
    def tensor_count(self) -> int:
        return sum(map(len, self.names.values()))

    def where(self, name: str) -> str:
        return self.file_of.get(name, self.path.name)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for file in self.files:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for name in self.names[file]:
                    try:
                        tensor = handle.get_tensor(name)
                    except Exception as e:
                        raise ModelLoadError(
                            f"cannot read tensor {name!r} from {file}: {e} (the file is corrupt; re-download)"
                        ) from e
                    if not tensor.is_floating_point():
                        raise ModelLoadError(
                            f"tensor {name!r} in {file.name} has dtype {tensor.dtype}; quantized safetensors "
                            "checkpoints are not supported (serve a GGUF, or a float checkpoint with --quantization)"
                        )
                    yield name, tensor


class Checkpoint(Protocol):
    """What the loader reads: an HF-style config dict and named tensors, floats or GGML blocks, one at a time."""

    path: Path
    config: dict[str, Any]
    quantized: bool

    @property
    def tensor_count(self) -> int: ...

    def where(self, name: str) -> str:
        """Which file (and, for GGUF, which tensor name there) `name` came from, for error messages."""
        ...

    def tensors(self) -> Iterator[tuple[str, torch.Tensor | GGMLBlocks]]: ...


def open_checkpoint(path: Path) -> Checkpoint:
    """A GGUF file, a directory holding one GGUF, or a Hugging Face safetensors directory."""
    from ladle.llm.models.gguf import GGUFCheckpoint, find_gguf, is_gguf

    path = Path(path)
    if path.is_file():
        if not is_gguf(path):
            raise ModelLoadError(f"{path.name} is neither a GGUF file nor a checkpoint directory")
        return GGUFCheckpoint.open(path)
    gguf = find_gguf(path) if not (path / "config.json").exists() else None
    return GGUFCheckpoint.open(gguf) if gguf is not None else SafetensorsCheckpoint(path)


@dataclass
class LoadedModel:
    model: CausalLM
    config: dict[str, Any]
    architecture: str
    checkpoint: Checkpoint
    quantization: QuantScheme | None


def load_model(
    path: Path, dtype: torch.dtype, device: torch.device | str, quantization: QuantScheme | None = None,
    checkpoint: Checkpoint | None = None,
) -> LoadedModel:
    """Build the model for the checkpoint's architecture and fill it, its linear layers quantized with
    `quantization` (weights are quantized as they stream in: no full-width copy of them ever exists)."""
    checkpoint = checkpoint or open_checkpoint(path)
    arch, cls = resolve_architecture(checkpoint.config)
    with torch.device("meta"):
        model = cls(checkpoint.config)
    if quantization is not None:
        from ladle.llm.models.quant import swap_linears

        swap_linears(model, quantization)
    # Parameters are created on "meta" (no memory, no random init), cast there, then materialised once on device.
    model = model.to(dtype).to_empty(device=device)
    load_weights(model, checkpoint)
    if quantization is not None:
        from ladle.llm.models.quant import finalize_quantized

        finalize_quantized(model)
    model.prepare()
    return LoadedModel(model.eval(), checkpoint.config, arch, checkpoint, quantization)


def load_weights(model: CausalLM, checkpoint: Checkpoint) -> None:
    started = time.perf_counter()
    layout = model.checkpoint_layout()
    _check_layout_covers_parameters(model, layout)
    loaded: set[str] = set()
    num_bytes = 0
    with tqdm(total=checkpoint.tensor_count, desc="loading weights", unit="tensor", disable=None) as bar:
        for name, value in checkpoint.tensors():
            num_bytes += _load_tensor(model, layout, checkpoint, name, value, loaded)
            bar.update()
    missing = sorted(set(layout) - loaded)
    if missing:
        shown = ", ".join(missing[:8]) + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else "")
        raise ModelLoadError(f"checkpoint {checkpoint.path} is missing {len(missing)} tensor(s): {shown}")
    logger.info(
        "loaded %d tensors (%.1f MB) from %s in %.2f s",
        len(loaded), num_bytes / 1e6, checkpoint.path, time.perf_counter() - started,
    )


def _tensor_names(file: Path) -> list[str]:
    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            return list(handle.keys())
    except Exception as e:  # safetensors raises its own error types for truncated or garbled headers
        raise ModelLoadError(f"cannot read {file}: {e} (the file is corrupt or not safetensors; re-download it)") from e


def _load_tensor(
    model: CausalLM, layout: dict[str, WeightTarget], checkpoint: Checkpoint, name: str,
    value: torch.Tensor | GGMLBlocks, loaded: set[str],
) -> int:
    key = model.canonical_name(name)
    target = layout.get(key)
    if target is None:
        if key.endswith(model.ignored_checkpoint_suffixes()):
            return 0
        raise ModelLoadError(
            f"unexpected tensor {name!r} in {checkpoint.where(name)}: {type(model).__name__} has no such weight "
            "(is the config's architecture right for these weights?)"
        )
    if key in loaded:
        raise ModelLoadError(f"tensor {name!r} appears twice (again in {checkpoint.where(name)})")
    if tuple(value.shape) != target.expected_shape:
        raise ModelLoadError(
            f"tensor {name!r} in {checkpoint.where(name)} has shape {tuple(value.shape)}, expected "
            f"{target.expected_shape} from the config (does the config belong to these weights?)"
        )
    if hasattr(target.param, "write"):  # a quantized layer's staging sink takes floats or blocks as they come
        target.param.write(target.rows, value.t() if target.transpose and isinstance(value, torch.Tensor) else value)
    else:
        tensor = value.dequantize(torch.float32) if isinstance(value, GGMLBlocks) else value
        dest = target.param.data if target.rows is None else target.param.data[target.rows]
        dest.copy_(tensor.t() if target.transpose else tensor)
    loaded.add(key)
    return value.data.numel() if isinstance(value, GGMLBlocks) else value.numel() * value.element_size()


def _check_layout_covers_parameters(model: CausalLM, layout: dict[str, WeightTarget]) -> None:
    """A model bug, not a user error: a parameter no checkpoint tensor fills would stay uninitialised."""
    covered = {id(t.param) for t in layout.values()}
    uncovered = [name for name, p in model.named_parameters() if id(p) not in covered]
    if uncovered:
        raise AssertionError(f"{type(model).__name__}.checkpoint_layout() does not fill {uncovered}")
