"""Load a Hugging Face checkpoint directory (config.json + model.safetensors, or shards with an index) into a model.

Invariant: every checkpoint tensor lands in exactly one parameter slice (or is a known derived buffer) and every
parameter is filled; anything else is a ModelLoadError naming the tensor and file.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from ladle.errors import LadleError
from ladle.llm.models.layers import CausalLM, WeightTarget
from ladle.llm.models.registry import resolve_architecture

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


def load_model(model_dir: Path, dtype: torch.dtype, device: torch.device | str) -> tuple[CausalLM, dict[str, Any], str]:
    """Build the model for config.json's architecture and fill it: (model, config, architecture name)."""
    config = read_json(Path(model_dir) / "config.json")
    arch, cls = resolve_architecture(config)
    with torch.device("meta"):
        model = cls(config)
    # Parameters are created on "meta" (no memory, no random init), cast there, then materialised once on device.
    model = model.to(dtype).to_empty(device=device)
    load_weights(model, Path(model_dir))
    model.prepare()
    return model.eval(), config, arch


def load_weights(model: CausalLM, model_dir: Path) -> None:
    started = time.perf_counter()
    layout = model.checkpoint_layout()
    _check_layout_covers_parameters(model, layout)
    files = find_weight_files(model_dir)
    names = {f: _tensor_names(f) for f in files}
    loaded: set[str] = set()
    num_bytes = 0
    with tqdm(total=sum(map(len, names.values())), desc="loading weights", unit="tensor", disable=None) as bar:
        for file in files:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for name in names[file]:
                    num_bytes += _load_tensor(model, layout, handle, file, name, loaded)
                    bar.update()
    missing = sorted(set(layout) - loaded)
    if missing:
        shown = ", ".join(missing[:8]) + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else "")
        raise ModelLoadError(f"checkpoint in {model_dir} is missing {len(missing)} tensor(s): {shown}")
    logger.info(
        "loaded %d tensors (%.1f MB) from %d file(s) in %s in %.2f s",
        len(loaded), num_bytes / 1e6, len(files), model_dir, time.perf_counter() - started,
    )


def _tensor_names(file: Path) -> list[str]:
    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            return list(handle.keys())
    except Exception as e:  # safetensors raises its own error types for truncated or garbled headers
        raise ModelLoadError(f"cannot read {file}: {e} (the file is corrupt or not safetensors; re-download it)") from e


def _load_tensor(
    model: CausalLM, layout: dict[str, WeightTarget], handle: Any, file: Path, name: str, loaded: set[str]
) -> int:
    key = model.canonical_name(name)
    target = layout.get(key)
    if target is None:
        if key.endswith(model.ignored_checkpoint_suffixes()):
            return 0
        raise ModelLoadError(
            f"unexpected tensor {name!r} in {file.name}: {type(model).__name__} has no such weight "
            "(is config.json's `architectures` right for these weights?)"
        )
    if key in loaded:
        raise ModelLoadError(f"tensor {name!r} appears twice (again in {file.name})")
    try:
        tensor = handle.get_tensor(name)
    except Exception as e:
        raise ModelLoadError(f"cannot read tensor {name!r} from {file}: {e} (the file is corrupt; re-download)") from e
    if tuple(tensor.shape) != target.expected_shape:
        raise ModelLoadError(
            f"tensor {name!r} in {file.name} has shape {tuple(tensor.shape)}, expected {target.expected_shape} "
            "from config.json (does the config belong to these weights?)"
        )
    if not tensor.is_floating_point():
        raise ModelLoadError(
            f"tensor {name!r} in {file.name} has dtype {tensor.dtype}; quantized checkpoints are not supported"
        )
    dest = target.param.data if target.rows is None else target.param.data[target.rows]
    dest.copy_(tensor.t() if target.transpose else tensor)
    loaded.add(key)
    return tensor.numel() * tensor.element_size()


def _check_layout_covers_parameters(model: CausalLM, layout: dict[str, WeightTarget]) -> None:
    """A model bug, not a user error: a parameter no checkpoint tensor fills would stay uninitialised."""
    covered = {id(t.param) for t in layout.values()}
    uncovered = [name for name, p in model.named_parameters() if id(p) not in covered]
    if uncovered:
        raise AssertionError(f"{type(model).__name__}.checkpoint_layout() does not fill {uncovered}")
