"""merge_expositions: real prometheus_client registries and ladle's own Metrics merged, parsed back, and compared
sample by sample (names, labels, exact values, timestamps); HELP/TYPE once per family; bad sources skipped alone."""

from __future__ import annotations

import logging
import math
from collections import Counter as Tally

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, Summary, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from ladle.cluster.metrics_merge import merge_expositions
from ladle.metrics import LLMMetrics, Metrics

NASTY = 'say "hi" \\ back\nslash'  # a quote, a backslash and a newline: all three need escaping


def app_text(scale: int) -> str:
    """A registry with one of each kind prometheus_client has, all observed, some labels needing escapes."""
    r = CollectorRegistry()
    Counter("app_jobs", "Jobs done", ["kind"], registry=r).labels(NASTY).inc(scale)
    Counter("app_plain_total", "A counter declared with its suffix", registry=r).inc(0.25 * scale)
    latency = Histogram("app_latency_seconds", "Latency", ["route"], buckets=(0.1, 1.0), registry=r)
    latency.labels("/x").observe(0.06 * scale)
    latency.labels("/y").observe(7)
    Gauge("app_temperature", "Degrees \\ with a backslash\nand a newline", registry=r).set(-1.5 * scale)
    Info("app_build", "Build", registry=r).info({"version": "1.2", "note": NASTY})
    Summary("app_size_bytes", "Size", registry=r).observe(3 * scale)
    return generate_latest(r).decode()


def ladle_text(scale: int) -> str:
    """ladle's real metric families, with samples in most of them."""
    m = Metrics()
    for model, version in (("iris", 1), ("iris", 2), ("resnet", "3")):
        vm = m.for_version(model, version)
        for _ in range(scale):
            vm.outcome("ok")
        vm.outcome("error")
        vm.request_duration.observe(0.004 * scale)
        vm.queue_duration.observe(0.0001)
        vm.on_batch(4 * scale, 2, 0.003)
        vm.queue_depth.set(scale)
        vm.load_duration.set(1.25)
        m.set_state(model, version, "READY")
    m.refused.labels("rate_limited").inc(scale)
    llm = LLMMetrics(m.llm, "smol")
    llm.ttft.observe(0.1 * scale)
    llm.itl.observe(0.02)
    llm.prompt_tokens.inc(123 * scale)
    llm.kv_usage.set(0.375)
    llm.finished("stop")
    llm.speculation([3, 2], [2, 1])
    return m.render().decode()


def samples(text: str, extra: dict[str, str] | None = None) -> list[tuple[str, frozenset, float, float | None]]:
    """(name, labels with extra under them, value, timestamp) of every sample the parser reads from text."""
    return [
        (s.name, frozenset({**(extra or {}), **s.labels}.items()), s.value, s.timestamp)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def assert_exactly(merged: str, sources: list[tuple[dict[str, str], str]]) -> None:
    """Every source's every sample is in merged once, with its value and timestamp, and nothing else is."""
    got = samples(merged)
    expected = [s for extra, text in sources for s in samples(text, extra)]
    assert Tally((name, labels) for name, labels, _, _ in got).most_common(1)[0][1] == 1
    assert {(n, labels): (v, t) for n, labels, v, t in got} == {(n, labels): (v, t) for n, labels, v, t in expected}
    assert len(got) == len(expected)


def type_lines(text: str) -> Tally:
    return Tally(line.split()[2] for line in text.splitlines() if line.startswith("# TYPE "))


def help_lines(text: str) -> Tally:
    return Tally(line.split()[2] for line in text.splitlines() if line.startswith("# HELP "))


def cluster_sources() -> list[tuple[dict[str, str], str]]:
    return [
        ({"replica": "ladle-iris#a1b2"}, ladle_text(1) + app_text(1)),
        ({"replica": "ladle-iris#c3d4"}, ladle_text(2) + app_text(2)),
        ({}, ladle_text(3)),  # the front end's own
    ]


def test_every_sample_of_every_source_is_there_exactly_once():
    sources = cluster_sources()
    merged = merge_expositions(sources)
    assert_exactly(merged, sources)
    labelled = [dict(labels) for _, labels, _, _ in samples(merged)]
    assert sum(d.get("replica") == "ladle-iris#a1b2" for d in labelled) == len(samples(sources[0][1]))
    assert sum("replica" not in d for d in labelled) == len(samples(sources[2][1]))


def test_each_family_has_one_help_and_type_line_and_its_samples_together():
    sources = cluster_sources()
    merged = merge_expositions(sources)
    assert set(type_lines(merged).values()) == {1} and set(help_lines(merged).values()) == {1}
    assert type_lines(merged).keys() == {name for _, text in sources for name in type_lines(text)}
    # a family split in two would parse as two families of one name (or as untyped strays)
    names = [(f.name, f.type) for f in text_string_to_metric_families(merged)]
    assert len(names) == len(set(names))
    assert "unknown" not in {t for _, t in names}


def test_types_and_help_are_the_sources():
    sources = cluster_sources()
    merged = {f.name: (f.type, f.documentation) for f in text_string_to_metric_families(merge_expositions(sources))}
    for _, text in sources:
        for family in text_string_to_metric_families(text):
            assert merged[family.name] == (family.type, family.documentation)
    assert merged["app_temperature"] == ("gauge", "Degrees \\ with a backslash\nand a newline")
    assert merged["ladle_model_requests"][0] == "counter"
    assert merged["ladle_model_requests_created"][0] == "gauge"
    assert merged["ladle_llm_time_to_first_token_seconds"][0] == "histogram"
    assert merged["app_build_info"][0] == "gauge"
    assert merged["app_size_bytes"][0] == "summary"


def test_label_values_are_escaped():
    merged = merge_expositions([({"replica": NASTY}, app_text(1))])
    assert 'replica="say \\"hi\\" \\\\ back\\nslash"' in merged
    jobs = [s for s in samples(merged) if s[0] == "app_jobs_total"]
    assert jobs == [("app_jobs_total", frozenset({"kind": NASTY, "replica": NASTY}.items()), 1.0, None)]


def test_a_label_the_sample_already_has_is_kept():
    r = CollectorRegistry()
    Gauge("app_owner", "Has its own replica label", ["replica", "k"], registry=r).labels("inner", "v").set(2)
    merged = merge_expositions([({"replica": "outer", "zone": "z1"}, generate_latest(r).decode())])
    assert samples(merged) == [("app_owner", frozenset({"replica": "inner", "k": "v", "zone": "z1"}.items()), 2, None)]


def test_histogram_series_keep_their_buckets():
    sources = [({"replica": "a"}, app_text(1)), ({"replica": "b"}, app_text(2))]
    merged = merge_expositions(sources)
    buckets = {(dict(labels)["replica"], dict(labels)["route"], dict(labels)["le"]): v
               for name, labels, v, _ in samples(merged) if name == "app_latency_seconds_bucket"}
    assert buckets[("a", "/x", "0.1")] == 1.0 and buckets[("b", "/x", "0.1")] == 0.0
    assert buckets[("b", "/x", "1.0")] == 1.0 and buckets[("b", "/y", "+Inf")] == 1.0
    assert len(buckets) == 2 * 2 * 3


GARBAGE = [
    "this is not an exposition {{{",
    "# TYPE x bogus_type\nx 1\n",
    "# HELP fine A fine family\n# TYPE fine gauge\nfine 1\nbroken{le=\"0.1\" 2\n",  # good head, bad tail
    'x{a="unterminated} 1\n',
]


@pytest.mark.parametrize("garbage", GARBAGE)
def test_a_source_that_does_not_parse_is_skipped_whole(garbage, caplog):
    good = [({"replica": "a"}, ladle_text(1)), ({}, app_text(1))]
    with caplog.at_level(logging.WARNING, logger="ladle.cluster.metrics_merge"):
        merged = merge_expositions([good[0], ({"replica": "bad"}, garbage), good[1]])
    assert_exactly(merged, good)
    assert not any(dict(labels).get("replica") == "bad" for _, labels, _, _ in samples(merged))
    assert any("'replica': 'bad'" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)


def test_same_family_in_two_sources_keeps_the_first_help_and_type():
    first = "# HELP x The first\n# TYPE x gauge\nx{k=\"1\"} 1\n"
    second = "# HELP x The second\n# TYPE x untyped\nx{k=\"1\"} 2\nx{k=\"2\"} 3\n"
    merged = merge_expositions([({"replica": "a"}, first), ({"replica": "b"}, second)])
    assert "# HELP x The first\n# TYPE x gauge\n" in merged
    assert type_lines(merged) == Tally({"x": 1})
    assert {(dict(labels)["replica"], v) for _, labels, v, _ in samples(merged)} == {("a", 1), ("b", 2), ("b", 3)}


def test_samples_that_do_not_fit_the_first_type_are_dropped_and_logged(caplog):
    gauge = "# TYPE x gauge\nx 1\n"
    histogram = '# TYPE x histogram\nx_bucket{le="+Inf"} 2\nx_sum 3\nx_count 2\n# TYPE y gauge\ny 4\n'
    with caplog.at_level(logging.WARNING, logger="ladle.cluster.metrics_merge"):
        merged = merge_expositions([({"replica": "a"}, gauge), ({"replica": "b"}, histogram)])
    assert {(n, dict(labels)["replica"], v) for n, labels, v, _ in samples(merged)} == {("x", "a", 1), ("y", "b", 4)}
    assert type_lines(merged) == Tally({"x": 1, "y": 1})
    assert any("3 samples dropped" in r.getMessage() for r in caplog.records)


def test_a_counter_and_an_untyped_family_of_its_sample_name_are_one_family():
    counter = "# TYPE jobs_total counter\njobs_total 1\n"
    untyped = "jobs_total 2\n"  # no TYPE line: untyped, named after the sample
    merged = merge_expositions([({"replica": "a"}, counter), ({"replica": "b"}, untyped)])
    assert type_lines(merged) == Tally({"jobs_total": 1})
    assert "# TYPE jobs_total counter\n" in merged
    assert {(dict(labels)["replica"], v) for _, labels, v, _ in samples(merged)} == {("a", 1), ("b", 2)}


def test_a_counter_without_its_suffix_comes_out_with_it():
    merged = merge_expositions([({"replica": "a"}, "# TYPE old counter\nold 5\n")])
    assert samples(merged) == [("old_total", frozenset({"replica": "a"}.items()), 5.0, None)]


def test_untyped_families_stay_untyped():
    text = "# HELP u An untyped one\n# TYPE u untyped\nu{a=\"1\"} 1\nstray 2\n"
    merged = merge_expositions([({"replica": "a"}, text), ({"replica": "b"}, text)])
    assert "# TYPE u untyped\n" in merged and "# TYPE stray untyped\n" in merged
    assert_exactly(merged, [({"replica": "a"}, text), ({"replica": "b"}, text)])


def test_a_repeated_series_is_kept_once():
    text = "# TYPE g gauge\ng 1\n"
    merged = merge_expositions([({}, text), ({}, "# TYPE g gauge\ng 2\n")])
    assert samples(merged) == [("g", frozenset(), 1.0, None)]


def test_special_values_and_timestamps_are_exact():
    text = ("# TYPE g gauge\ng{v=\"nan\"} NaN\ng{v=\"inf\"} +Inf\ng{v=\"-inf\"} -Inf\ng{v=\"tiny\"} 5e-324\n"
            "g{v=\"big\"} 1.7976931348623157e+308\ng{v=\"ts\"} 0.1 1712345678901\ng{v=\"neg\"} 3 -1234567\n"
            # ms whose ms / 1000 * 1000 falls just short: generate_latest's int() alone would lose one
            "g{v=\"short\"} 4 1001\ng{v=\"short-big\"} 5 542717995657\ng{v=\"short-neg\"} 6 -2185017393226\n")
    got = {dict(labels)["v"]: (v, t) for _, labels, v, t in samples(merge_expositions([({"r": "a"}, text)]))}
    assert math.isnan(got.pop("nan")[0])
    assert got == {"inf": (math.inf, None), "-inf": (-math.inf, None), "tiny": (5e-324, None),
                   "big": (1.7976931348623157e308, None), "ts": (0.1, 1712345678901 / 1000),
                   "neg": (3, -1234567 / 1000), "short": (4, 1001 / 1000), "short-big": (5, 542717995657 / 1000),
                   "short-neg": (6, -2185017393226 / 1000)}


def test_nothing_in_nothing_out():
    assert merge_expositions([]) == ""
    assert merge_expositions([({"replica": "a"}, "")]) == ""
    assert merge_expositions(iter([({"replica": "a"}, "# TYPE g gauge\ng 1\n")])).endswith("g{replica=\"a\"} 1.0\n")


@pytest.mark.parametrize("labels", [{"bad-name": "x"}, {"__reserved": "x"}, {"0lead": "x"}, {"ok": 1}])
def test_extra_labels_must_be_prometheus_labels(labels):
    with pytest.raises(ValueError, match="extra label"):
        merge_expositions([(labels, "g 1\n")])


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self):
        return iter(self.families)


LABEL_VALUES = st.text(max_size=12)
VALUES = st.one_of(st.floats(allow_nan=False), st.integers(-(2**53), 2**53))
TIMESTAMPS = st.one_of(st.none(), st.integers(-(10**13), 10**13).map(lambda ms: ms / 1000))


@settings(max_examples=150, deadline=None)
@given(
    rows=st.lists(st.tuples(LABEL_VALUES, VALUES, TIMESTAMPS), min_size=1, max_size=6, unique_by=lambda r: r[0]),
    replicas=st.lists(LABEL_VALUES, min_size=1, max_size=3, unique=True),
    help_text=st.text(max_size=20),
)
def test_any_label_value_sample_value_and_timestamp_round_trips(rows, replicas, help_text):
    family = Metric("g", help_text, "gauge")
    for label, value, ts in rows:
        family.add_sample("g", {"k": label}, value, timestamp=ts)
    text = generate_latest(_Families([family])).decode()
    sources = [({"replica": r}, text) for r in replicas]
    merged = merge_expositions(sources)
    assert_exactly(merged, sources)
    [parsed], [source] = text_string_to_metric_families(merged), text_string_to_metric_families(text)
    assert (parsed.name, parsed.type, parsed.documentation) == (source.name, source.type, source.documentation)
