"""Assembling requests into one batch along dimension 0, and splitting the outputs back.

Invariant: request i of a batch gets exactly rows [offset_i, offset_i + rows_i) of every output.
"""

from __future__ import annotations

import math
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


#: padding may make a batch at most this many times larger than its requests' own elements (plus a floor for
#: small batches): one request's odd shape must not make its batch-mates allocate terabytes (a [1, 0, 2**40]
#: request padded beside a [1, 3, 5] one would be [2, 3, 2**40])
MAX_PADDING_FACTOR = 4
PADDING_FLOOR_ELEMENTS = 1 << 20


def padding_groups(requests: Sequence[dict[str, np.ndarray]]) -> list[list[int]]:
    """Which requests run together in `ragged: pad` mode: all of them while padding stays bounded, else one
    group per exact shape (no padding at all), so a hostile shape costs its own request, not the batch."""
    if len(requests) == 1 or _padding_bounded(requests):
        return [list(range(len(requests)))]
    groups: dict[tuple, list[int]] = {}
    for index, inputs in enumerate(requests):
        groups.setdefault(shape_key(inputs), []).append(index)
    return list(groups.values())


def _padding_bounded(requests: Sequence[dict[str, np.ndarray]]) -> bool:
    for name in requests[0]:
        parts = [inputs[name] for inputs in requests]
        target = [max(sizes) for sizes in zip(*(p.shape[1:] for p in parts), strict=True)]
        padded = sum(p.shape[0] for p in parts) * math.prod(target)  # Python ints: no overflow
        if padded > MAX_PADDING_FACTOR * sum(p.size for p in parts) + PADDING_FLOOR_ELEMENTS:
            return False
    return True


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
