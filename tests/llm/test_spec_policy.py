"""spec/policy.py: SpecConfig validation, the StepCost curve, Acceptance estimates, SpecPolicy's draft allocation
(hand-worked cases and a property: never worse than speculation off by its own model) and SpecStats."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ladle.llm.spec.policy import Acceptance, SpecConfig, SpecPolicy, SpecStats, StepCost

FLAT = StepCost([(1, 1.0), (64, 1.0)])
STEEP = StepCost([(1, 0.001), (64, 0.064)])  # linear in tokens, zero intercept: every token costs the same


def with_rates(policy: SpecPolicy, **rates: tuple[float, float]) -> SpecPolicy:
    """Give each request an Acceptance with (accepted, trials) already observed."""
    for rid, (accepted, trials) in rates.items():
        acceptance = policy.acceptance[rid] = Acceptance()
        acceptance.accepted, acceptance.trials = accepted, trials
    return policy


def given_drafts(chosen: dict[str, int]) -> dict[str, int]:
    return {rid: k for rid, k in chosen.items() if k}


# ------------------------------------------------------------------------------------------------- SpecConfig


def test_spec_config_defaults_and_both_methods():
    c = SpecConfig("ngram")
    assert (c.method, c.num_speculative_tokens, c.ngram_min, c.ngram_max, c.model) == ("ngram", 4, 2, 4, None)
    assert SpecConfig("draft_model", model="tiny").model == "tiny"
    assert SpecConfig("ngram", num_speculative_tokens=1).num_speculative_tokens == 1
    assert SpecConfig("ngram", num_speculative_tokens=16).num_speculative_tokens == 16
    assert SpecConfig("ngram", ngram_min=1, ngram_max=1).ngram_max == 1
    with pytest.raises(AttributeError):
        c.method = "draft_model"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(method="eagle"), "speculative_method must be one of"),
        (dict(method="none"), "speculative_method must be one of"),
        (dict(method="ngram", num_speculative_tokens=0), r"num_speculative_tokens must be in \[1, 16\], got 0"),
        (dict(method="ngram", num_speculative_tokens=17), r"num_speculative_tokens must be in \[1, 16\], got 17"),
        (dict(method="ngram", ngram_min=0), "need 1 <= ngram_min <= ngram_max, got 0 and 4"),
        (dict(method="ngram", ngram_min=3, ngram_max=2), "need 1 <= ngram_min <= ngram_max, got 3 and 2"),
        (dict(method="draft_model"), "speculative_model"),
        (dict(method="ngram", model="tiny"), "speculative_model"),
    ],
)
def test_spec_config_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SpecConfig(**kwargs)


# --------------------------------------------------------------------------------------------------- StepCost


def test_step_cost_needs_points_of_at_least_one_token():
    with pytest.raises(ValueError, match="measured"):
        StepCost([])
    with pytest.raises(ValueError, match="measured"):
        StepCost([(0, 1.0), (4, 2.0)])


def test_step_cost_interpolates_extrapolates_and_is_flat_below_the_first_point():
    c = StepCost([(9, 4.0), (1, 1.0), (5, 3.0)])  # unsorted on purpose
    assert (c.tokens, c.seconds) == ([1, 5, 9], [1.0, 3.0, 4.0])
    assert [c(n) for n in (0, 1, 3, 5, 7, 9)] == [1.0, 1.0, 2.0, 3.0, 3.5, 4.0]
    assert c(13) == 5.0 and c(17) == 6.0  # along the last segment (0.25 s per token)


def test_step_cost_keeps_a_noisy_curve_non_decreasing():
    # noise only adds time: a point above a later (larger) one is lowered to the cheapest at or after it
    c = StepCost([(1, 2.0), (4, 1.0), (8, 3.0), (16, 2.5)])
    assert c.seconds == [1.0, 1.0, 2.5, 2.5]
    assert [c(n) for n in (1, 2, 4, 6, 8, 12, 16, 32)] == [1.0, 1.0, 1.0, 1.75, 2.5, 2.5, 2.5, 2.5]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 128), st.floats(1e-4, 1.0)), min_size=2, max_size=6, unique_by=lambda p: p[0]),
    st.lists(st.integers(0, 300), min_size=2, max_size=10),
)
def test_step_cost_is_monotone_and_passes_through_its_clamped_points(points, queries):
    c = StepCost(points)
    assert c.seconds == sorted(c.seconds)
    assert all(t <= dict(points)[n] for n, t in zip(c.tokens, c.seconds, strict=True))  # never above a measurement
    for n, t in zip(c.tokens, c.seconds, strict=True):
        assert c(n) == pytest.approx(t)
    qs = sorted(queries)
    values = [c(n) for n in qs]
    assert all(a <= b + 1e-12 for a, b in itertools.pairwise(values))
    assert min(values) >= c.seconds[0]


def test_step_cost_describe():
    assert StepCost([(1, 0.0123), (8, 0.02)]).describe() == "1: 12.3 ms, 8: 20.0 ms"
    assert StepCost([(2, 0.5)]).describe() == "2: 500.0 ms"


def test_step_cost_with_a_single_point_answers_above_it():
    # measure_cost builds a one-point curve when max_num_seqs == 1 (or only batch 1 could be timed, or the
    # [(1, 1.0)] fallback), then calls cost(8); SpecPolicy.choose calls target_cost(tokens + 1) every step
    c = StepCost([(2, 0.5)])
    assert c(1) == c(2) == 0.5
    values = [c(n) for n in range(2, 12)]
    assert values == sorted(values) and all(v >= 0.5 for v in values)
    assert SpecPolicy(4, c).choose(1, {"a": 4})["a"] in range(5)


# ------------------------------------------------------------------------------------------------- Acceptance


def test_acceptance_prior_is_one_half():
    assert Acceptance().rate == 0.5
    a = Acceptance()
    a.observe(0, 0)
    a.observe(-1, 0)
    assert (a.accepted, a.trials, a.rate) == (0.0, 0.0, 0.5)


def test_acceptance_counts_successes_then_one_failure_unless_all_matched():
    a = Acceptance()
    a.observe(4, 2)  # 2 successes + 1 failure
    assert (a.accepted, a.trials) == (2.0, 3.0) and a.rate == pytest.approx(3 / 5)
    b = Acceptance()
    b.observe(4, 4)  # all matched: no failure
    assert (b.accepted, b.trials) == (4.0, 4.0) and b.rate == pytest.approx(5 / 6)
    c = Acceptance()
    c.observe(3, 0)
    assert (c.accepted, c.trials) == (0.0, 1.0) and c.rate == pytest.approx(1 / 3)


def test_acceptance_decays_older_outcomes_per_trial():
    a = Acceptance()
    a.observe(2, 0)  # trials 1
    a.observe(2, 2)  # the old trial decays by 0.8**2
    assert a.accepted == pytest.approx(2.0) and a.trials == pytest.approx(0.64 + 2.0)
    assert a.rate == pytest.approx(3.0 / 4.64)
    a.observe(5, 1)  # 2 trials: everything so far decays by 0.64
    assert a.accepted == pytest.approx(2.0 * 0.64 + 1) and a.trials == pytest.approx(2.64 * 0.64 + 2)


def test_acceptance_of_a_request_that_stops_copying_falls_within_a_few_steps():
    a = Acceptance()
    for _ in range(20):
        a.observe(4, 4)
    q = 0.8**4
    copied = 4 * (1 - q**20) / (1 - q)  # the decayed count saturates near 6.78: the rate near 0.886
    assert a.accepted == pytest.approx(copied) and a.trials == pytest.approx(copied)
    assert a.rate == pytest.approx((copied + 1) / (copied + 2)) and a.rate > 0.88
    for _ in range(3):
        a.observe(4, 0)  # one failed trial each
    assert a.accepted == pytest.approx(copied * 0.8**3)
    assert a.trials == pytest.approx(copied * 0.8**3 + 0.8**2 + 0.8 + 1)
    assert a.rate < 0.57  # without decay it would still be (80 + 1) / (83 + 2) ~ 0.95


# ------------------------------------------------------------------------------------------------- SpecPolicy


def test_policy_rate_observe_remove():
    p = SpecPolicy(4, FLAT)
    assert p.rate("a") == 0.5 and "a" not in p.acceptance
    p.observe("a", 4, 4)
    assert p.rate("a") == pytest.approx(5 / 6)
    p.observe("a", 0, 0)  # nothing verified: no change
    assert p.rate("a") == pytest.approx(5 / 6)
    p.remove("a")
    p.remove("zzz")
    assert p.rate("a") == 0.5 and p.acceptance == {}


def test_flat_cost_at_batch_one_gives_the_most_drafts():
    p = with_rates(SpecPolicy(4, FLAT), a=(18.0, 18.0))
    assert p.choose(1, {"a": 8}) == {"a": 4}  # max_tokens caps
    assert p.choose(1, {"a": 3}) == {"a": 3}  # available caps
    assert p.choose(1, {"a": 0}) == {"a": 0}
    assert SpecPolicy(4, FLAT).choose(1, {"a": 8}) == {"a": 4}  # the prior rate too: extra tokens are free


def test_flat_cost_gives_everyone_their_most_drafts_at_any_batch():
    p = with_rates(SpecPolicy(3, FLAT), a=(0.0, 10.0), b=(5.0, 5.0))
    assert p.choose(8, {"a": 5, "b": 2, "c": 9, "d": 0}) == {"a": 3, "b": 2, "c": 3, "d": 0}


@pytest.mark.parametrize("batch", [1, 2, 8, 32])
def test_steep_linear_cost_gives_no_drafts(batch):
    p = with_rates(SpecPolicy(4, STEEP), a=(18.0, 18.0))  # rate 0.95: still < 1 token per token of cost
    available = {"a": 4} | {f"r{i}": 4 for i in range(batch - 1)}
    assert given_drafts(p.choose(batch, available)) == {}


def test_a_low_acceptance_request_loses_its_drafts_before_a_high_acceptance_one():
    seen = set()
    previous = None
    for slope in [0.0, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0]:
        cost = StepCost([(1, 1.0), (2, 1.0 + slope)])
        p = with_rates(SpecPolicy(4, cost), hi=(8.0, 8.0), lo=(1.0, 4.0))  # rates 0.9 and 1/3
        chosen = p.choose(2, {"hi": 4, "lo": 4})
        hi, lo = chosen["hi"], chosen["lo"]
        assert lo <= hi and (lo == 0 or hi == 4)  # lo's first draft gains less than hi's 4th
        if previous is not None:
            assert hi <= previous[0] and lo <= previous[1]  # steeper: never more drafts
        previous = (hi, lo)
        seen.add((hi > 0, lo > 0))
    assert seen == {(True, True), (True, False), (False, False)}


def test_extra_prefill_tokens_move_the_step_onto_the_steep_part_of_the_curve():
    cost = StepCost([(1, 1.0), (4, 1.0), (5, 2.0)])  # free up to 4 tokens, then 1 s per token
    p = SpecPolicy(4, cost)
    assert p.choose(1, {"a": 4}) == {"a": 3}  # the 4th draft would cost a second for 1/16 token
    assert p.choose(1, {"a": 4}, extra_tokens=1) == {"a": 2}
    assert p.choose(1, {"a": 4}, extra_tokens=3) == {"a": 0}


def test_span_cost_is_paid_once_per_speculating_request():
    # flat target, rate 0.5, batch 1: the span is paid once for the whole run, so 4 drafts pay iff
    # (1 + 0.5 + 0.25 + 0.125 + 0.0625) / (1 + span) > 1, i.e. span < 0.9375 (a single draft alone: span < 0.5)
    assert SpecPolicy(4, FLAT, span_cost=0.0).choose(1, {"a": 4}) == {"a": 4}
    assert SpecPolicy(4, FLAT, span_cost=0.5).choose(1, {"a": 4}) == {"a": 4}
    assert SpecPolicy(4, FLAT, span_cost=0.93).choose(1, {"a": 4}) == {"a": 4}
    assert SpecPolicy(4, FLAT, span_cost=0.94).choose(1, {"a": 4}) == {"a": 0}
    assert SpecPolicy(4, FLAT, span_cost=2.0).choose(1, {"a": 4}) == {"a": 0}


def test_draft_cost_reduces_drafts_and_is_shared_by_requests_at_the_same_depth():
    # flat target, rate 0.5, batch 1: the j-th draft adds 0.5**j tokens and one draft forward of d seconds
    def drafts(d: float) -> int:
        return SpecPolicy(4, FLAT, StepCost([(1, d), (64, d)])).choose(1, {"a": 4})["a"]

    assert [drafts(d) for d in (0.01, 0.1, 0.3, 0.6)] == [4, 2, 1, 0]
    # rates 0.9 and 0.85, d = 0.43: a's first draft pays (2.9 / 1.43 > 2); b's alone would not (3.75 / 1.86 < 2.9 /
    # 1.43), but the depth-1 draft forward runs anyway and a flat curve batches b's for free
    two = with_rates(SpecPolicy(4, FLAT, StepCost([(1, 0.43), (64, 0.43)])), a=(8.0, 8.0), b=(16.0, 18.0))
    assert two.choose(2, {"a": 4, "b": 4}) == {"a": 1, "b": 1}


def test_span_cost_does_not_stop_free_continuation_drafts():
    # flat target, no draft model: once a request speculates its 2nd..4th drafts cost nothing and gain 0.9**j
    p = with_rates(SpecPolicy(4, FLAT, span_cost=0.43), a=(8.0, 8.0), b=(16.0, 18.0))  # rates 0.9, 0.85
    chosen = p.choose(2, {"a": 4, "b": 4})
    # a's 2nd..4th drafts are free once a speculates; b's span pays for its whole run of four too
    assert throughput(p, 2, 0, {"a": 4, "b": 0}) > throughput(p, 2, 0, {"a": 1, "b": 0})
    assert throughput(p, 2, 0, {"a": 4, "b": 4}) > throughput(p, 2, 0, {"a": 4, "b": 0})
    assert chosen == {"a": 4, "b": 4}


class FlatRunner:
    """time_step of a memory-bound model: every shape the runner accepts costs the same."""

    def __init__(self, max_num_seqs: int) -> None:
        self.max_num_seqs = max_num_seqs

    def time_step(self, num_seqs: int, tokens_per_seq: int, repeat: int = 2) -> float | None:
        return 0.01 if num_seqs <= self.max_num_seqs else None


def test_measured_flat_cost_turns_speculation_on():
    from ladle.llm.spec.setup import measure_cost

    cost, span_cost = measure_cost(FlatRunner(8))
    assert cost.tokens == [1, 2, 4, 8] and span_cost == 0.0
    assert SpecPolicy(4, cost, span_cost=span_cost).choose(1, {"a": 4}) == {"a": 4}


def test_measured_flat_cost_turns_speculation_on_with_one_seq():
    from ladle.llm.spec.setup import measure_cost

    cost, span_cost = measure_cost(FlatRunner(1))
    assert SpecPolicy(4, cost, span_cost=span_cost).choose(1, {"a": 4}) == {"a": 4}


def test_choose_respects_available_and_max_tokens_and_returns_only_candidates():
    p = SpecPolicy(2, FLAT)
    chosen = p.choose(5, {"a": 1, "b": 0, "c": 7})
    assert chosen == {"a": 1, "b": 0, "c": 2}
    assert p.choose(3, {}) == {}


def throughput(policy: SpecPolicy, num_decoding: int, extra: int, chosen: dict[str, int]) -> float:
    """Expected tokens out per second of an allocation, computed from scratch by the policy's own model."""
    gain = num_decoding + sum(policy.rate(rid) ** j for rid, k in chosen.items() for j in range(1, k + 1))
    drafts = [k for k in chosen.values() if k]
    cost = policy.target_cost(num_decoding + extra + sum(drafts)) + policy.span_cost * len(drafts)
    if policy.draft_cost is not None:
        for depth in range(1, max(drafts, default=0) + 1):
            cost += policy.draft_cost(sum(k >= depth for k in drafts))
    return gain / cost


curves = st.lists(
    st.tuples(st.integers(1, 96), st.floats(1e-3, 1.0)), min_size=2, max_size=5, unique_by=lambda p: p[0]
).map(StepCost)


@st.composite
def policies(draw):
    policy = SpecPolicy(
        draw(st.integers(1, 8)), draw(curves), draw(st.none() | curves), draw(st.sampled_from([0.0, 0.0, 1e-3, 0.05]))
    )
    available = {}
    for i in range(draw(st.integers(0, 6))):
        rid = f"r{i}"
        available[rid] = draw(st.integers(0, 10))
        if draw(st.booleans()):
            trials = draw(st.integers(0, 30))
            with_rates(policy, **{rid: (float(draw(st.integers(0, trials))), float(trials))})
    num_decoding = max(1, len(available) + draw(st.integers(0, 4)))
    return policy, num_decoding, available, draw(st.integers(0, 64))


@settings(max_examples=500, deadline=None)
@given(policies())
def test_choose_is_never_worse_than_speculation_off_by_its_own_model(case):
    policy, num_decoding, available, extra = case
    chosen = policy.choose(num_decoding, available, extra)
    assert set(chosen) == set(available)
    for rid, k in chosen.items():
        assert 0 <= k <= min(available[rid], policy.max_tokens)
    off = dict.fromkeys(available, 0)
    assert throughput(policy, num_decoding, extra, chosen) >= throughput(policy, num_decoding, extra, off) * (1 - 1e-9)
    # best gain first: a request with the higher rate is cut back no sooner than one with a lower rate
    for a in available:
        for b in available:
            if policy.rate(a) > policy.rate(b) and available[a] >= available[b]:
                assert chosen[a] >= min(chosen[b], available[a], policy.max_tokens)


# -------------------------------------------------------------------------------------------------- SpecStats


def test_spec_stats_records_per_position():
    s = SpecStats(4)
    assert (s.drafted, s.accepted, s.num_drafted, s.num_accepted) == ([0] * 4, [0] * 4, 0, 0)
    s.record(3, 1)
    s.record(4, 4)
    s.record(2, 0)
    s.record(0, 0)
    assert s.drafted == [3, 3, 2, 1] and s.accepted == [2, 1, 1, 1]
    assert (s.num_drafted, s.num_accepted) == (9, 5)
