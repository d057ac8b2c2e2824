"""KServe v2 tensor datatypes and their numpy equivalents.

Owns the one mapping between protocol datatype names and numpy dtypes; BYTES tensors are numpy
object arrays whose elements are `bytes`. Everything that converts tensors goes through here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DATATYPE_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}
NUMPY_TO_DATATYPE: dict[np.dtype, str] = {v: k for k, v in DATATYPE_TO_NUMPY.items()}
DATATYPES: tuple[str, ...] = tuple(DATATYPE_TO_NUMPY)


def numpy_dtype(datatype: str) -> np.dtype:
    """The numpy dtype of a v2 datatype name; KeyError for an unknown name."""
    return DATATYPE_TO_NUMPY[datatype]


def datatype_of(array: np.ndarray) -> str:
    """The v2 datatype name of an array; unicode and bytes arrays count as BYTES."""
    kind = array.dtype.kind
    if kind in ("U", "S", "O"):
        return "BYTES"
    try:
        return NUMPY_TO_DATATYPE[array.dtype]
    except KeyError:
        raise TypeError(f"numpy dtype {array.dtype} has no KServe v2 datatype") from None


def as_bytes_array(array: np.ndarray) -> np.ndarray:
    """A BYTES tensor as an object array of `bytes` (str elements encoded as UTF-8)."""
    if array.dtype == np.object_ and all(isinstance(x, bytes) for x in array.flat):
        return array
    out = np.empty(array.shape, dtype=np.object_)
    for index, item in np.ndenumerate(array):
        out[index] = item.encode("utf-8") if isinstance(item, str) else bytes(item)
    return out


@dataclass(frozen=True)
class TensorSpec:
    """Name, datatype and shape of one model input or output.

    `shape` excludes the batch dimension when the model batches (Triton's convention); -1 marks a
    dimension of any size.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]

    def shape_matches(self, shape: Sequence[int]) -> bool:
        """Whether a concrete shape (without batch dimension) fits this spec."""
        if len(shape) != len(self.shape):
            return False
        return all(want in (-1, got) for want, got in zip(self.shape, shape, strict=True))
