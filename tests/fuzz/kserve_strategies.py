"""Hypothesis strategies for KServe v2 inference requests: well-formed and hostile bodies alike.

A `Body` is what a client puts on the wire (bytes plus the Inference-Header-Content-Length header, if any);
documents are serialized with `json` so dimensions and sizes may exceed 64 bits, as an attacker's may.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from hypothesis import strategies as st

from ladle.tensors import DATATYPE_TO_NUMPY, DATATYPES

HUGE = (2**31, 2**32, 2**62, 2**63 - 1, 2**64 - 1, 2**70)
dims = st.one_of(st.integers(0, 4), st.integers(-3, 8), st.sampled_from(HUGE))
shapes = st.one_of(
    st.lists(dims, max_size=5),
    st.lists(st.integers(0, 2), min_size=30, max_size=80),  # more dimensions than numpy allows
    st.lists(st.sampled_from([2**31, 2**63 - 1]), min_size=2, max_size=4),  # huge counts, no data to match
    st.sampled_from([None, "1,4", {"0": 1}, [1.5], [True], ["2"], [None]]),  # not a shape at all
)
datatypes = st.one_of(st.sampled_from(DATATYPES), st.sampled_from(["", "FP8", "fp32", "STRING", 3, None]))
scalars = st.one_of(
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, -1, 2**63 - 1, 2**64 - 1, -(2**63), 65504, 70000]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.none(),
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner, max_size=2),
    max_leaves=12,
)
parameters = st.one_of(st.none(), st.dictionaries(st.sampled_from(["binary_data_size", "x", "shared_memory_region",
                                                                    "binary_data_output", "classification"]),
                                                  json_values, max_size=2), json_values)


@dataclass(frozen=True)
class Body:
    content: bytes
    header_length: int | None

    def headers(self) -> dict[str, str]:
        return {} if self.header_length is None else {"Inference-Header-Content-Length": str(self.header_length)}


def dumps(document: Any) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


def _fitting_data(draw: st.DrawFn, datatype: str, count: int) -> list:
    """`count` valid JSON elements for `datatype`."""
    if datatype == "BYTES":
        return draw(st.lists(st.text(max_size=6), min_size=count, max_size=count))
    if datatype == "BOOL":
        return draw(st.lists(st.booleans(), min_size=count, max_size=count))
    dtype = DATATYPE_TO_NUMPY[datatype]
    if dtype.kind == "f":
        return draw(st.lists(st.floats(-1000, 1000, width=16), min_size=count, max_size=count))
    info = np.iinfo(dtype)
    return draw(st.lists(st.integers(int(info.min), int(info.max)), min_size=count, max_size=count))


def _nest(data: list, shape: list[int]) -> list:
    """Row-major `data` nested by `shape` (the protocol allows flat or nested)."""
    for dim in reversed(shape[1:]):
        if dim == 0:
            return data
        data = [data[i : i + dim] for i in range(0, len(data), dim)]
    return data


@st.composite
def json_tensors(draw: st.DrawFn) -> dict:
    """One input tensor with JSON data: often well-formed, otherwise broken in one or more ways."""
    datatype = draw(st.sampled_from(DATATYPES))
    shape = draw(st.lists(st.integers(0, 3), min_size=1, max_size=3))
    count = int(np.prod(shape))
    data: Any = _fitting_data(draw, datatype, count)
    if draw(st.booleans()):
        data = _nest(data, shape)
    tensor: dict[str, Any] = {"name": draw(st.sampled_from(["x", "y", "input"])), "shape": shape,
                              "datatype": datatype, "data": data}
    for field, values in (("shape", shapes), ("datatype", datatypes), ("data", json_values),
                          ("parameters", parameters), ("name", json_values)):
        if draw(st.integers(0, 9)) == 0:  # each field broken in about a tenth of the tensors
            tensor[field] = draw(values)
    if draw(st.integers(0, 19)) == 0:
        del tensor[draw(st.sampled_from(sorted(tensor)))]
    return tensor


@st.composite
def json_documents(draw: st.DrawFn) -> Any:
    document: dict[str, Any] = {"inputs": draw(st.lists(json_tensors(), max_size=3))}
    if draw(st.booleans()):
        document["id"] = draw(st.one_of(st.text(max_size=5), json_values))
    if draw(st.integers(0, 3)) == 0:
        document["outputs"] = draw(st.one_of(json_values, st.lists(
            st.fixed_dictionaries({"name": st.sampled_from(["label", "y", ""])}, optional={"parameters": parameters}),
            max_size=3)))
    if draw(st.integers(0, 3)) == 0:
        document["parameters"] = draw(parameters)
    if draw(st.integers(0, 19)) == 0:
        return draw(json_values)  # not even an object
    return document


def _bytes_blob(draw: st.DrawFn, count: int) -> bytes:
    """BYTES binary data: length-prefixed elements, sometimes with lying prefixes or a truncated tail."""
    items = draw(st.lists(st.binary(max_size=6), min_size=count, max_size=count))
    parts = []
    for item in items:
        length = len(item) if draw(st.integers(0, 7)) else draw(st.sampled_from([2**32 - 1, 2**31, len(item) + 1]))
        parts.append(struct.pack("<I", length) + item)
    blob = b"".join(parts)
    return blob[: draw(st.integers(0, len(blob)))] if draw(st.integers(0, 7)) == 0 else blob


@st.composite
def binary_bodies(draw: st.DrawFn) -> Body:
    """Triton's binary tensor extension: a JSON header, then each input's raw bytes, with lies about sizes."""
    inputs, blobs = [], []
    for index in range(draw(st.integers(0, 3))):
        datatype = draw(st.sampled_from(DATATYPES))
        shape = draw(st.one_of(st.lists(st.integers(0, 3), min_size=1, max_size=3), shapes))
        honest = isinstance(shape, list) and all(type(d) is int and 0 <= d <= 3 for d in shape)
        count = int(np.prod(shape)) if honest else draw(st.integers(0, 3))
        if datatype == "BYTES":
            blob = _bytes_blob(draw, count)
        else:
            blob = draw(st.binary(min_size=count * DATATYPE_TO_NUMPY[datatype].itemsize,
                                  max_size=count * DATATYPE_TO_NUMPY[datatype].itemsize + draw(st.integers(0, 2))))
        size: Any = len(blob) if draw(st.integers(0, 4)) else draw(st.one_of(st.integers(-2, 2**66), json_values))
        tensor = {"name": f"in{index}", "shape": shape, "datatype": datatype,
                  "parameters": {"binary_data_size": size}}
        if draw(st.integers(0, 9)) == 0:
            tensor["data"] = [0]
        inputs.append(tensor)
        blobs.append(blob)
    header = dumps({"inputs": inputs, "parameters": {"binary_data_output": draw(st.booleans())}})
    content = header + b"".join(blobs) + draw(st.one_of(st.just(b""), st.binary(max_size=4)))
    if draw(st.integers(0, 5)) == 0:
        content = content[: draw(st.integers(0, len(content)))]  # truncated in flight
    header_length = draw(st.one_of(st.just(len(header)), st.just(len(header)), st.integers(-5, len(content) + 5),
                                   st.sampled_from([2**31, 2**63 - 1, None])))
    return Body(content, header_length)


bodies = st.one_of(json_documents().map(lambda doc: Body(dumps(doc), None)), binary_bodies())


# ------------------------------------------------------------------------------------ the demo models' inputs

#: the demo repository's models: input name, datatype and per-row shape (the batch dimension comes first)
DEMO_INPUTS = {"iris": ("input", "FP32", [4]), "minilm": ("text", "BYTES", [1]), "textstats": ("text", "BYTES", [1])}
_FLOATS = st.one_of(st.floats(width=32), st.sampled_from([0.0, -0.0, 3.4e38, -3.4e38, 1e-45]))


@st.composite
def demo_requests(draw: st.DrawFn) -> tuple[str, Body]:
    """A request that reaches a demo model: its input's name and datatype, with hostile values and batch sizes,
    sometimes a wrong row shape; JSON or binary, with some outputs requested as binary."""
    model = draw(st.sampled_from(sorted(DEMO_INPUTS)))
    name, datatype, row = DEMO_INPUTS[model]
    rows = draw(st.sampled_from([0, 1, 1, 2, 3, 65]))  # 65: over the models' max_batch_size
    shape = [rows, *row] if draw(st.integers(0, 5)) else [rows, draw(st.integers(0, 5))]
    count = int(np.prod(shape))
    binary = draw(st.booleans())
    if datatype == "BYTES":
        values = draw(st.lists(st.binary(max_size=40) if binary else st.text(max_size=40), min_size=count,
                               max_size=count))
    else:
        # Binary data can carry NaN and infinities, which JSON cannot.
        values = draw(st.lists(_FLOATS if binary else st.floats(-3e38, 3e38, width=64), min_size=count,
                               max_size=count))
    tensor: dict[str, Any] = {"name": name, "shape": shape, "datatype": datatype}
    document: dict[str, Any] = {"inputs": [tensor]}
    if draw(st.booleans()):
        document["outputs"] = [{"name": output, "parameters": {"binary_data": draw(st.booleans())}}
                               for output in draw(st.sampled_from([["label"], ["probabilities"], ["upper", "length"],
                                                                   ["embedding"], ["nope"]]))]
    if not binary:
        tensor["data"] = values
        return model, Body(dumps(document), None)
    if datatype == "BYTES":
        blob = b"".join(struct.pack("<I", len(v)) + v for v in values)
    else:
        blob = np.array(values, dtype="<f4").tobytes()
    tensor["parameters"] = {"binary_data_size": len(blob)}
    header = dumps(document)
    return model, Body(header + blob, len(header))
