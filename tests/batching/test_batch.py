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


def test_padding_groups_keep_a_hostile_shape_from_inflating_its_batch() -> None:
    from ladle.batching.batch import padding_groups

    normal = {"x": np.ones((1, 3, 5), dtype=np.float32)}
    empty_but_huge = {"x": np.zeros((1, 0, 2**40), dtype=np.float32)}  # no data, a padded target of 3 x 2**40
    crossed = {"x": np.ones((1, 5, 3), dtype=np.float32)}
    assert padding_groups([normal, crossed]) == [[0, 1]]  # padding to [5, 5]: bounded, one batch
    assert padding_groups([normal, empty_but_huge, normal]) == [[0, 2], [1]]
    wide, tall = {"x": np.ones((1, 1, 4096), np.float32)}, {"x": np.ones((1, 4096, 1), np.float32)}
    assert padding_groups([wide, tall]) == [[0], [1]]  # 2 x 4096 x 4096 padded vs 8192 real elements
