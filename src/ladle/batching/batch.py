"""Assembling requests into one batch along dimension 0, and splitting the outputs back.

Invariant: request i of a batch gets exactly rows [offset_i, offset_i + rows_i) of every output.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ladle.errors import ModelError


def shape_key(inputs: dict[str, np.ndarray]) -> tuple:
    """What must match for two requests to share a batch: each input's non-batch shape."""
    return tuple((name, array.shape[1:]) for name, array in inputs.items())


def concat_inputs(
    requests: Sequence[dict[str, np.ndarray]], pad: bool = False, padding_value: float = 0.0
) -> dict[str, np.ndarray]:
    """Concatenate each input along the batch dimension; with `pad`, variable dims are padded
    to the longest request first (the rows then carry `padding_value` beyond their length)."""
    if len(requests) == 1:
        return requests[0]
    batch: dict[str, np.ndarray] = {}
    for name in requests[0]:
        parts = [inputs[name] for inputs in requests]
        if pad:
            parts = _pad_to_common_shape(parts, padding_value)
        batch[name] = np.concatenate(parts, axis=0)
    return batch


def _pad_to_common_shape(parts: list[np.ndarray], padding_value: float) -> list[np.ndarray]:
    target = tuple(max(sizes) for sizes in zip(*(p.shape[1:] for p in parts), strict=True))
    padded = []
    for part in parts:
        widths = [(0, 0)] + [(0, t - s) for s, t in zip(part.shape[1:], target, strict=True)]
        if any(after for _, after in widths):
            fill = b"" if part.dtype == np.object_ else padding_value
            part = np.pad(part, widths, mode="constant", constant_values=fill)
        padded.append(part)
    return padded


def split_outputs(outputs: dict[str, np.ndarray], rows: Sequence[int]) -> list[dict[str, np.ndarray]]:
    """Cut every output back into per-request pieces by row counts."""
    if len(rows) == 1:
        return [outputs]
    total = sum(rows)
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != total:
            raise ModelError(
                f"output '{name}' has shape {list(array.shape)} but the batch had {total} rows; "
                "a batched model must return one row per input row"
            )
    offsets = np.cumsum([0, *rows])
    return [
        {name: array[offsets[i] : offsets[i + 1]] for name, array in outputs.items()} for i in range(len(rows))
    ]
