"""Comparing primary and shadow answers: every figure and every way two answers can differ."""

from __future__ import annotations

import numpy as np
import pytest

from ladle.serving.shadow_compare import compare_tensors, compare_tokens


def one(a, b, atol=1e-5, rtol=1e-4):
    [diff] = compare_tensors({"y": np.asarray(a)}, {"y": np.asarray(b)}, atol, rtol)
    return diff


def test_identical_tensors_match_with_zero_difference() -> None:
    a = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
    d = one(a, a.copy())
    assert not d.mismatch and d.max_abs == 0.0 and d.max_rel == 0.0 and d.argmax_agreement == 1.0


def test_small_differences_within_tolerance_match_but_are_measured() -> None:
    a = np.array([[1.0, 2.0], [3.0, 4.0]])
    d = one(a, a + 1e-7)
    assert not d.mismatch and 0 < d.max_abs < 2e-7 and d.max_rel == pytest.approx(1e-7, rel=1e-3)


def test_a_difference_beyond_tolerance_is_a_mismatch_with_figures() -> None:
    d = one([[1.0, 2.0]], [[1.0, 2.5]])
    assert d.mismatch and d.max_abs == pytest.approx(0.5) and d.max_rel == pytest.approx(0.25)
    assert d.argmax_agreement == 1.0  # same top class, still a mismatch by value


def test_argmax_disagreement_is_a_mismatch_even_within_tolerance() -> None:
    d = one([[0.5, 0.5000001], [0.9, 0.1]], [[0.5000001, 0.5], [0.9, 0.1]], atol=1e-3)
    assert d.mismatch and d.argmax_agreement == 0.5


def test_shape_dtype_missing_and_bytes_outputs() -> None:
    assert one([1.0, 2.0], [1.0, 2.0, 3.0]).reason.startswith("shape")
    [missing] = compare_tensors({"y": np.zeros(2)}, {}, 0, 0)
    assert missing.mismatch and "no such output" in missing.reason
    text = np.array([b"a", b"b"], dtype=np.object_)
    assert not one(text, text.copy()).mismatch
    assert one(text, np.array([b"a", b"c"], dtype=np.object_)).mismatch
    assert one([1, 2], [1, 3]).mismatch and one([1, 2], [1, 3]).max_abs == 1.0  # integer labels
    assert one([1, 2], [1, 3]).argmax_agreement is None


def test_nans_compare_equal_only_to_nans() -> None:
    assert not one([np.nan, 1.0], [np.nan, 1.0]).mismatch
    d = one([np.nan, 1.0], [0.0, 1.0])
    assert d.mismatch and d.reason == "NaN in one answer only"


def test_outputs_only_the_shadow_has_are_ignored() -> None:
    diffs = compare_tensors({"y": np.zeros(1)}, {"y": np.zeros(1), "extra": np.ones(1)}, 0, 0)
    assert [d.name for d in diffs] == ["y"] and not diffs[0].mismatch


@pytest.mark.parametrize(("primary", "shadow", "exact", "first", "length"), [
    ([1, 2, 3], [1, 2, 3], True, None, 0),
    ([1, 2, 3], [1, 9, 3], False, 1, 0),
    ([1, 2, 3], [1, 2], False, 2, -1),
    ([1, 2], [1, 2, 3, 4], False, 2, 2),
    ([], [5], False, 0, 1),
])
def test_tokens(primary, shadow, exact, first, length) -> None:
    d = compare_tokens(primary, shadow)
    assert (d.exact_match, d.first_difference, d.length_difference, d.mismatch) == (exact, first, length, not exact)
