"""Comparing a primary's answer with its shadow's: tensors (max absolute and relative difference, argmax agreement,
per output) and token sequences (exact match, first differing position, length difference).

Pure functions of the two answers (numpy only): the shadow machinery (serving/shadow.py) decides what to compare and
records the verdicts. Invariant: a comparison never raises on whatever two models return — a missing output, another
shape or dtype is itself a mismatch with the reason in the verdict.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TensorDiff:
    """One output of one request: how far the shadow's tensor is from the primary's."""

    name: str
    mismatch: bool
    max_abs: float | None = None  # numeric outputs of the same shape
    max_rel: float | None = None
    argmax_agreement: float | None = None  # float outputs of rank >= 2: share of rows with the same argmax
    reason: str = ""  # why it is a mismatch when no figure says it (shape, dtype, missing output)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None and v != ""}


@dataclass(frozen=True)
class TokenDiff:
    """One choice of one LLM request."""

    exact_match: bool
    first_difference: int | None  # the position of the first differing token (None when equal)
    length_difference: int  # shadow tokens - primary tokens

    @property
    def mismatch(self) -> bool:
        return not self.exact_match

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def compare_tensors(primary: Mapping[str, np.ndarray], shadow: Mapping[str, np.ndarray], atol: float,
                    rtol: float) -> list[TensorDiff]:
    """A verdict per primary output (an output only the shadow has is ignored: the caller never saw it)."""
    return [_compare_one(name, np.asarray(a), shadow.get(name), atol, rtol) for name, a in primary.items()]


def _compare_one(name: str, a: np.ndarray, b: np.ndarray | None, atol: float, rtol: float) -> TensorDiff:
    if b is None:
        return TensorDiff(name, True, reason="the shadow returned no such output")
    b = np.asarray(b)
    if a.shape != b.shape:
        return TensorDiff(name, True, reason=f"shape {list(b.shape)} instead of {list(a.shape)}")
    if not (_numeric(a) and _numeric(b)):
        equal = a.dtype == b.dtype and bool(np.array_equal(a, b))
        return TensorDiff(name, not equal, reason="" if equal else "values differ")
    a64, b64 = a.astype(np.float64, copy=False), b.astype(np.float64, copy=False)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        diff = np.abs(a64 - b64)
        rel = diff / np.maximum(np.abs(a64), np.finfo(np.float64).tiny)
    nan_mismatch = bool(np.any(np.isnan(a64) != np.isnan(b64)))
    max_abs = _max(diff)
    max_rel = _max(rel)
    close = not nan_mismatch and bool(np.all(np.isclose(b64, a64, rtol=rtol, atol=atol, equal_nan=True)))
    agreement = _argmax_agreement(a64, b64) if a.dtype.kind == "f" else None
    mismatch = not close or (agreement is not None and agreement < 1.0)
    return TensorDiff(name, mismatch, max_abs, max_rel, agreement, "NaN in one answer only" if nan_mismatch else "")


def _numeric(array: np.ndarray) -> bool:
    return array.dtype.kind in "biuf"


def _max(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)] if values.size else values
    return float(finite.max()) if finite.size else 0.0


def _argmax_agreement(a: np.ndarray, b: np.ndarray) -> float | None:
    """Classifier-style outputs (rank >= 2, more than one class): share of rows whose top class agrees."""
    if a.ndim < 2 or a.shape[-1] < 2 or a.size == 0:
        return None
    top_a = np.argmax(np.nan_to_num(a, nan=-np.inf), axis=-1)
    top_b = np.argmax(np.nan_to_num(b, nan=-np.inf), axis=-1)
    return float(np.mean(top_a == top_b))


def compare_tokens(primary: Sequence[int], shadow: Sequence[int]) -> TokenDiff:
    first = next((i for i, (x, y) in enumerate(zip(primary, shadow, strict=False)) if x != y), None)
    if first is None and len(primary) != len(shadow):
        first = min(len(primary), len(shadow))
    return TokenDiff(first is None, first, len(shadow) - len(primary))
