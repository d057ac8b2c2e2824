"""One Prometheus text exposition from many: every replica's metrics, each sample labelled with its source.

Invariant: the output parses back with prometheus_client's parser to exactly the input samples (each once, values
exact, plus the source's extra labels), one HELP/TYPE per family; a source that does not parse is skipped, alone.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Iterator, Mapping

from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

log = logging.getLogger(__name__)

_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
# the sample names each text-format type allows, as suffixes of the family name (the parser's own rules); `_created`
# is absent on purpose: the parser gives it its own gauge family, and generate_latest would split it out again
_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "unknown": ("",),
}


class _Family:
    """One output family: the first source's name, HELP and type; samples from every source, each series once."""

    def __init__(self, first: Metric) -> None:
        self.metric = Metric(first.name, first.documentation, first.type)
        self._allowed = {first.name + suffix for suffix in _SUFFIXES[first.type]}
        self._seen: set[tuple[str, frozenset[tuple[str, str]]]] = set()

    def add(self, sample: Sample, extra: Mapping[str, str]) -> bool:
        """Adds sample with the extra labels under it; False if it does not fit this family or repeats a series."""
        labels = {**extra, **sample.labels}  # a label the sample already has wins
        series = (sample.name, frozenset(labels.items()))
        if sample.name not in self._allowed or series in self._seen:
            return False
        self._seen.add(series)
        self.metric.samples.append(Sample(sample.name, labels, sample.value, _exact_ms(sample.timestamp)))
        return True


class _Families(Collector):
    def __init__(self, families: Iterable[_Family]) -> None:
        self._families = list(families)

    def collect(self) -> Iterator[Metric]:
        return (family.metric for family in self._families)


def merge_expositions(sources: Iterable[tuple[Mapping[str, str], str]]) -> str:
    """sources: (extra labels, Prometheus text exposition) per source, e.g. ({"replica": "ladle-iris#a1b2"}, text)
    and ({}, the front end's own text). Returns one valid text exposition (format 0.0.4): each metric family's HELP
    and TYPE once, all samples of a family together, every sample carrying the source's extra labels (a label the
    sample already has is kept, not overwritten). A source whose text cannot be parsed is skipped (logged at
    warning), never breaking the rest."""
    families: dict[str, _Family] = {}  # by exposition name: a counter `x` and a gauge `x_total` are one family
    for extra, text in sources:
        _check_labels(extra)
        parsed = _parse(text, extra)
        if parsed is None:
            continue
        dropped = 0
        for metric in parsed:
            name = _exposition_name(metric)
            family = families.get(name) or families.setdefault(name, _Family(metric))
            dropped += sum(not family.add(sample, extra) for sample in metric.samples)
        if dropped:
            log.warning("metrics of %s: %d samples dropped: their family has another type in an earlier source, "
                        "or their series repeats one already merged", dict(extra), dropped)
    return generate_latest(_Families(families.values())).decode("utf-8")


def _parse(text: str, extra: Mapping[str, str]) -> list[Metric] | None:
    """The source's families with types narrowed to the text format's, or None (logged) when it does not parse."""
    try:
        # the parser is lazy: materialise it here, so a bad line half way down drops the whole source, not half of it
        parsed = list(text_string_to_metric_families(text))
    except Exception as exc:  # the parser raises ValueError, IndexError, KeyError… on malformed input
        log.warning("metrics of %s skipped: not a Prometheus text exposition (%s: %s)", dict(extra),
                    type(exc).__name__, exc)
        return None
    for metric in parsed:
        if metric.type not in _SUFFIXES:  # `# TYPE x info` and the like are not text-format types: untyped
            metric.type = "unknown"
    return parsed


def _exposition_name(metric: Metric) -> str:
    """The name on the family's TYPE line as generate_latest writes it (the parser strips a counter's `_total`)."""
    return metric.name + "_total" if metric.type == "counter" else metric.name


def _exact_ms(timestamp: float | None) -> float | None:
    """A timestamp that generate_latest's int(t * 1000) turns back into the very millisecond it was parsed from."""
    if timestamp is None:
        return None
    ms = round(float(timestamp) * 1000)
    return (ms + math.copysign(0.5, ms)) / 1000


def _check_labels(extra: Mapping[str, str]) -> None:
    for name, value in extra.items():
        if not _LABEL_NAME.match(name) or name.startswith("__") or not isinstance(value, str):
            raise ValueError(f"merge_expositions: extra label {name!r}={value!r} is not a Prometheus label "
                             "(a name matching [a-zA-Z_][a-zA-Z0-9_]*, not starting with __, and a str value)")
