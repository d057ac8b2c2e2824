"""Checking a request's tensors against a model version's served signature.

Whatever passes here has exactly the model's input names, datatypes and shapes (plus a batch
dimension within max_batch_size when the model batches), so runtimes never see malformed input.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from ladle.errors import InvalidInput
from ladle.repository.model_config import ModelConfig
from ladle.tensors import TensorSpec


def check_inputs(
    label: str, config: ModelConfig, specs: tuple[TensorSpec, ...], inputs: Mapping[str, tuple[str, np.ndarray]]
) -> int:
    """Validate `inputs` (name -> (datatype, array)); return the batch rows (1 for unbatched models)."""
    expected = {s.name for s in specs}
    missing = expected - set(inputs)
    if missing:
        raise InvalidInput(f"model {label}: missing input(s) {sorted(missing)}; expected {_signature(specs)}")
    extra = set(inputs) - expected
    if extra:
        raise InvalidInput(f"model {label}: unexpected input(s) {sorted(extra)}; expected {_signature(specs)}")
    rows = None
    for spec in specs:
        datatype, array = inputs[spec.name]
        if datatype != spec.datatype:
            raise InvalidInput(f"model {label}: input '{spec.name}' has datatype {datatype}; expected {spec.datatype}")
        batch = _check_shape(label, config, spec, array.shape)
        if rows is not None and batch != rows:
            raise InvalidInput(f"model {label}: inputs disagree on the batch size ({rows} vs {batch} rows)")
        rows = batch
    return rows or 1


def _check_shape(label: str, config: ModelConfig, spec: TensorSpec, shape: tuple[int, ...]) -> int:
    if not config.batched:
        if not spec.shape_matches(shape):
            raise InvalidInput(
                f"model {label}: input '{spec.name}' has shape {list(shape)}; expected {list(spec.shape)}"
            )
        return 1
    wanted = [-1, *spec.shape]
    if len(shape) != len(wanted) or not spec.shape_matches(shape[1:]):
        raise InvalidInput(
            f"model {label}: input '{spec.name}' has shape {list(shape)}; expected {wanted} "
            f"(batch dimension first, at most {config.max_batch_size})"
        )
    if not 1 <= shape[0] <= config.max_batch_size:
        raise InvalidInput(
            f"model {label}: input '{spec.name}' has batch size {shape[0]}; "
            f"expected 1 to max_batch_size={config.max_batch_size}"
        )
    return shape[0]


def check_outputs(label: str, specs: tuple[TensorSpec, ...], requested: Iterable[str]) -> None:
    known = {s.name for s in specs}
    for name in requested:
        if name not in known:
            raise InvalidInput(f"model {label}: unknown output '{name}'; outputs are {sorted(known)}")


def served_shape(config: ModelConfig, spec: TensorSpec) -> list[int]:
    """The shape reported in metadata: with a leading -1 batch dimension when the model batches."""
    return [-1, *spec.shape] if config.batched else list(spec.shape)


def _signature(specs: tuple[TensorSpec, ...]) -> str:
    return ", ".join(f"{s.name} {s.datatype} {list(s.shape)}" for s in specs)
