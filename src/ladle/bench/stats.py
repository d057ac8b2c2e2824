"""Summary statistics shared by the `ladle bench` tools: percentiles and mean/median/p90/p99 summaries.

Pure Python over plain lists of floats. Percentiles interpolate linearly between the two nearest
ranks (numpy's default), so a saved run can be re-checked with `numpy.percentile`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

DEFAULT_PERCENTILES: tuple[float, ...] = (50.0, 90.0, 99.0)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of an ascending sequence; NaN when it is empty."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be between 0 and 100, got {q}")
    if not sorted_values:
        return math.nan
    rank = (len(sorted_values) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(sorted_values) - 1)
    fraction = rank - low
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * fraction


def percentile_key(q: float) -> str:
    """50 -> 'p50', 99.9 -> 'p99.9': the name a percentile goes by in summaries and JSON."""
    return f"p{q:g}"


@dataclass(frozen=True)
class Summary:
    """count, mean, std, min, max and chosen percentiles of one series (NaN everywhere when empty)."""

    count: int
    mean: float
    std: float
    min: float
    max: float
    percentiles: dict[float, float]

    @property
    def median(self) -> float:
        return self.percentiles.get(50.0, math.nan)

    def p(self, q: float) -> float:
        return self.percentiles[q]

    def to_dict(self, scale: float = 1.0, digits: int | None = None) -> dict[str, float | int | None]:
        """Flat JSON-ready dict (`mean`, `p50`, ...); values times `scale` (1e3: seconds to ms); NaN -> None."""
        values = {"mean": self.mean, "std": self.std, "min": self.min, "max": self.max}
        values.update({percentile_key(q): v for q, v in self.percentiles.items()})
        out: dict[str, float | int | None] = {"count": self.count}
        for key, value in values.items():
            scaled = value * scale
            out[key] = None if math.isnan(scaled) else (round(scaled, digits) if digits is not None else scaled)
        return out


def summarize(values: Iterable[float], qs: Sequence[float] = DEFAULT_PERCENTILES) -> Summary:
    """Summary of a series; the median is always included among the percentiles."""
    ordered = sorted(values)
    wanted = sorted({50.0, *(float(q) for q in qs)})
    if not ordered:
        return Summary(0, math.nan, math.nan, math.nan, math.nan, dict.fromkeys(wanted, math.nan))
    count = len(ordered)
    mean = math.fsum(ordered) / count
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in ordered) / count)
    return Summary(count, mean, std, ordered[0], ordered[-1], {q: percentile(ordered, q) for q in wanted})


def rate(count: int, seconds: float) -> float:
    """Events per second; 0 when no time has passed (nothing measured yet)."""
    return count / seconds if seconds > 0 else 0.0


def format_ms(value: float) -> str:
    """A duration in seconds as milliseconds for a report line ('-' when undefined)."""
    return "-" if math.isnan(value) else f"{value * 1e3:.2f}"
