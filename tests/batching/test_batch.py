"""Batch assembly and splitting: every request gets exactly its own rows back."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ladle.batching.batch import concat_inputs, shape_key, split_outputs
from ladle.errors import ModelError


@given(st.lists(st.integers(1, 5), min_size=1, max_size=8))
def test_concat_then_split_returns_each_requests_rows(rows) -> None:
    requests = [{"x": np.full((n, 3), i, dtype=np.float32)} for i, n in enumerate(rows)]
    batch = concat_inputs(requests)
    assert batch["x"].shape == (sum(rows), 3)
    pieces = split_outputs({"y": batch["x"] * 2}, rows)
    for i, (piece, n) in enumerate(zip(pieces, rows, strict=True)):
        np.testing.assert_array_equal(piece["y"], np.full((n, 3), 2 * i, dtype=np.float32))


def test_pad_mode_pads_variable_dims() -> None:
    a = {"ids": np.array([[1, 2, 3]], dtype=np.int64)}
    b = {"ids": np.array([[4]], dtype=np.int64)}
    batch = concat_inputs([a, b], pad=True, padding_value=0)
    np.testing.assert_array_equal(batch["ids"], [[1, 2, 3], [4, 0, 0]])


def test_pad_mode_pads_bytes_with_empty_strings() -> None:
    a = {"t": np.array([[b"x", b"y"]], dtype=object)}
    b = {"t": np.array([[b"z"]], dtype=object)}
    batch = concat_inputs([a, b], pad=True)
    assert batch["t"].tolist() == [[b"x", b"y"], [b"z", b""]]


def test_wrong_output_rows_is_a_model_error() -> None:
    with pytest.raises(ModelError, match="one row per input row"):
        split_outputs({"y": np.zeros((3, 1))}, [1, 1])


def test_shape_key_ignores_batch_dim() -> None:
    assert shape_key({"x": np.zeros((2, 4))}) == shape_key({"x": np.zeros((7, 4))})
    assert shape_key({"x": np.zeros((2, 4))}) != shape_key({"x": np.zeros((2, 5))})
