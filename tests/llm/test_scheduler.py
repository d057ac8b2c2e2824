"""Scheduler: exact step-by-step schedules, preemption, stop conditions, aborts, prefix hits, and
property tests that random workloads finish with outputs identical to running each request alone."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ladle.llm.outputs import RequestOutput, SamplerOutput, TokenLogprobs
from ladle.llm.request import Request, RequestStatus
from ladle.llm.sampling_params import SamplingParams
from tests.llm.scheduler_harness import EOS, VOCAB, Result, drive, make, reference, req, shape, step

# ------------------------------------------------------------------------------ exact schedules


def test_chunked_prefill_splits_a_long_prompt_then_decodes():
    s = make(max_num_batched_tokens=8)
    s.add_request(req("a", range(20), max_tokens=3))
    o1, outs = step(s)
    assert shape(o1) == [("a", 0, 8, False)] and o1.seqs[0].token_ids == list(range(8))
    assert o1.seqs[0].block_ids == [0, 1] and outs == {} and o1.num_batched_tokens == 8
    o2, _ = step(s)
    assert shape(o2) == [("a", 8, 8, False)] and o2.seqs[0].block_ids == [0, 1, 2, 3]
    o3, outs = step(s, {"a": 5})
    assert shape(o3) == [("a", 16, 4, True)] and o3.seqs[0].block_ids == [0, 1, 2, 3, 4]
    assert outs["a"].new_token_ids == [5] and outs["a"].finish_reason is None
    o4, _ = step(s)
    assert shape(o4) == [("a", 20, 1, True)] and o4.seqs[0].token_ids == [5]


def test_budget_is_shared_and_decodes_go_before_new_prefills():
    s = make(max_num_batched_tokens=8)
    s.add_request(req("a", range(20), max_tokens=5))
    s.add_request(req("b", range(100, 103), max_tokens=5))
    assert shape(step(s)[0]) == [("a", 0, 8, False)]
    assert shape(step(s)[0]) == [("a", 8, 8, False)]
    assert shape(step(s)[0]) == [("a", 16, 4, True), ("b", 0, 3, True)]
    s.add_request(req("c", range(200, 220), max_tokens=5))
    out, _ = step(s)
    assert shape(out) == [("a", 20, 1, True), ("b", 3, 1, True), ("c", 0, 6, False)]
    assert out.num_batched_tokens == 8
    assert shape(step(s)[0]) == [("a", 21, 1, True), ("b", 4, 1, True), ("c", 6, 6, False)]


def test_long_prefill_token_threshold_caps_each_chunk():
    s = make(max_num_batched_tokens=16, long_prefill_token_threshold=5)
    s.add_request(req("a", range(12)))
    s.add_request(req("b", range(100, 112)))
    assert shape(step(s)[0]) == [("a", 0, 5, False), ("b", 0, 5, False)]
    assert shape(step(s)[0]) == [("a", 5, 5, False), ("b", 5, 5, False)]
    assert shape(step(s)[0]) == [("a", 10, 2, True), ("b", 10, 2, True)]


def test_max_num_seqs_holds_back_admissions_until_a_request_finishes():
    s = make(max_num_seqs=2)
    for rid in "abc":
        s.add_request(req(rid, [ord(rid)] * 3, max_tokens=2))
    assert [q.request_id for q in step(s)[0].seqs] == ["a", "b"]
    assert (s.num_running, s.num_waiting) == (2, 1)
    out, outs = step(s)
    assert [q.request_id for q in out.seqs] == ["a", "b"] and outs["a"].finish_reason == "length"
    assert shape(step(s)[0]) == [("c", 0, 3, True)]  # finished ones left at once; c joins next step


def test_without_chunking_a_prompt_waits_for_a_budget_it_fits_and_nobody_overtakes():
    s = make(max_num_batched_tokens=8, enable_chunked_prefill=False)
    with pytest.raises(ValueError, match="chunked prefill is off"):
        s.add_request(req("huge", range(9)))
    s.add_request(req("a", range(6), max_tokens=4))
    s.add_request(req("b", range(100, 107), max_tokens=4))
    s.add_request(req("c", [1]))
    assert shape(step(s)[0]) == [("a", 0, 6, True)]  # b (7) does not fit in 2; c (1) must not overtake
    assert shape(step(s)[0]) == [("a", 6, 1, True), ("b", 0, 7, True)]
    assert shape(step(s)[0]) == [("a", 7, 1, True), ("b", 7, 1, True), ("c", 0, 1, True)]


def test_add_request_validation():
    s = make(max_model_len=16, num_blocks=4)
    with pytest.raises(ValueError, match="max_model_len=16"):
        s.add_request(req("a", range(17)))
    s.add_request(req("a", range(16)))
    with pytest.raises(ValueError, match="already in use"):
        s.add_request(req("a", [1]))


# -------------------------------------------------------------------------------- preemption


def test_preemption_picks_the_newest_frees_its_blocks_and_blocks_admissions():
    s = make(num_blocks=6, block_size=2, max_model_len=12)
    s.add_request(req("a", [1, 2, 3, 4], max_tokens=8, ignore_eos=True))
    s.add_request(req("b", [5, 6, 7, 8], max_tokens=8, ignore_eos=True))
    s.add_request(req("c", [9, 10, 11, 12], max_tokens=8, ignore_eos=True))
    assert [q.block_ids for q in step(s)[0].seqs] == [[0, 1], [2, 3], [4, 5]]
    s.add_request(req("d", [1]))
    out, _ = step(s)  # a needs a 3rd block: c (newest) is preempted, d is not admitted this step
    assert out.preempted_ids == ["c"] and shape(out) == [("a", 4, 1, True), ("b", 4, 1, True)]
    assert out.seqs[0].block_ids == [0, 1, 5]  # c's tail block was freed first and reused first
    c = s.waiting[0]
    assert c.request_id == "c" and c.status == RequestStatus.PREEMPTED and c.num_computed_tokens == 0
    assert c.num_preemptions == 1 and s.num_preemptions_total == 1 and s.kv.block_table("c") == []
    assert [r.request_id for r in s.waiting] == ["c", "d"]


def test_no_admissions_in_a_step_with_a_preemption_even_when_blocks_would_allow():
    s = make(num_blocks=5, block_size=2, max_model_len=10, max_num_batched_tokens=3, caching=False)
    s.add_request(req("a", [1, 2], max_tokens=8, ignore_eos=True))
    s.add_request(req("c", range(10, 18), max_tokens=2))
    assert shape(step(s)[0]) == [("a", 0, 2, True), ("c", 0, 1, False)]
    assert shape(step(s)[0]) == [("a", 2, 1, True), ("c", 1, 2, False)]
    assert shape(step(s)[0]) == [("a", 3, 1, True), ("c", 3, 2, False)]
    out, _ = step(s)  # c (3 blocks) is preempted for a's 3rd block; a 2-token chunk of c would fit now
    assert shape(out) == [("a", 4, 1, True)] and out.preempted_ids == ["c"]
    assert s.kv.num_free_blocks == 2 and [r.request_id for r in s.waiting] == ["c"]
    assert shape(step(s)[0]) == [("a", 5, 1, True), ("c", 0, 2, False)]


def test_a_request_that_is_itself_the_newest_preempts_itself_and_scheduling_stops():
    s = make(num_blocks=4, block_size=2, max_model_len=8)
    s.add_request(req("a", [1, 2, 3], max_tokens=8, ignore_eos=True))
    s.add_request(req("b", [4, 5, 6, 7], max_tokens=8, ignore_eos=True))
    step(s)
    out, _ = step(s)  # a fits its 2 blocks; b needs a 3rd and is the newest
    assert shape(out) == [("a", 3, 1, True)] and out.preempted_ids == ["b"]
    assert s.num_running == 1 and s.waiting[0].request_id == "b" and s.kv.num_free_blocks == 2


def test_preempted_requests_resume_with_the_same_token_stream():
    prompts = [[i % 5, (i * 7) % 9, 3, i] for i in range(6)]

    def run(num_blocks: int) -> tuple[dict[str, Result], int]:
        s = make(num_blocks=num_blocks, block_size=2, max_model_len=24, max_num_batched_tokens=16)
        arrivals = {0: [req(f"r{i}", p, max_tokens=20, ignore_eos=True) for i, p in enumerate(prompts)]}
        return drive(s, arrivals), s.num_preemptions_total

    alone = {}
    for i, p in enumerate(prompts):
        s = make(num_blocks=64, block_size=2, max_model_len=24)
        alone |= drive(s, {0: [req(f"r{i}", p, max_tokens=20, ignore_eos=True)]})
    tight, preemptions = run(12)
    assert preemptions > 5
    assert {k: v.tokens for k, v in tight.items()} == {k: v.tokens for k, v in alone.items()}
    assert all(len(v.tokens) == 20 for v in tight.values())


def test_preempted_request_longer_than_the_budget_resumes_in_chunks_without_chunked_prefill():
    s = make(num_blocks=6, block_size=2, max_model_len=12, max_num_batched_tokens=4, enable_chunked_prefill=False)
    arrivals = {0: [req(rid, p, max_tokens=9, ignore_eos=True) for rid, p in (("a", [1, 2, 3]), ("b", [4, 5, 6]))]}
    results = drive(s, arrivals)
    assert s.num_preemptions_total > 0
    for r in arrivals[0]:
        assert results[r.request_id].tokens == reference(r.prompt_token_ids, r.sampling_params, 12)[0]


# ----------------------------------------------------------------------------- stop conditions


def run_tokens(r: Request, tokens: list[int], max_model_len: int = 64) -> list[RequestOutput]:
    """Feed r the given sampled tokens one step at a time until it finishes; its outputs in order."""
    s = make(max_model_len=max_model_len)
    s.add_request(r)
    outputs = []
    for t in tokens:
        outputs.append(step(s, {r.request_id: t})[1][r.request_id])
        if outputs[-1].finish_reason:
            assert not s.has_unfinished_requests() and s.kv.usage == 0
            break
    return outputs


def finish(outputs: list[RequestOutput]) -> tuple[list[int], str | None, int | str | None]:
    return [t for o in outputs for t in o.new_token_ids], outputs[-1].finish_reason, outputs[-1].stop_reason


def test_eos_stops_unless_ignored():
    assert finish(run_tokens(req("a", [1], max_tokens=5), [4, EOS, 4])) == ([4, EOS], "stop", None)
    ignored = req("a", [1], max_tokens=3, ignore_eos=True)
    assert finish(run_tokens(ignored, [EOS] * 5)) == ([EOS] * 3, "length", None)
    no_eos = req("a", [1], eos=None, max_tokens=3)
    assert finish(run_tokens(no_eos, [EOS] * 5)) == ([EOS] * 3, "length", None)


def test_stop_token_ids_stop_with_the_token_as_stop_reason():
    r = req("a", [1], max_tokens=9, stop_token_ids=(7, 8))
    assert finish(run_tokens(r, [4, 8, 7])) == ([4, 8], "stop", 8)
    at_limit = req("a", [1], max_tokens=2, stop_token_ids=(7,))
    assert finish(run_tokens(at_limit, [4, 7])) == ([4, 7], "stop", 7)  # stop outranks length


def test_min_tokens_suppresses_eos_and_stop_tokens_until_enough_precede_them():
    r = req("a", [1], max_tokens=9, min_tokens=2, stop_token_ids=(7,))
    assert finish(run_tokens(r, [EOS, 7, EOS])) == ([EOS, 7, EOS], "stop", None)
    r = req("a", [1], max_tokens=9, min_tokens=2, stop_token_ids=(7,))
    assert finish(run_tokens(r, [7, 7, 7])) == ([7, 7, 7], "stop", 7)
    r = req("a", [1], max_tokens=2, min_tokens=2)
    assert finish(run_tokens(r, [EOS, EOS])) == ([EOS, EOS], "length", None)


def test_length_from_max_tokens_and_from_max_model_len():
    assert finish(run_tokens(req("a", [1], max_tokens=3), [4] * 9)) == ([4, 4, 4], "length", None)
    assert finish(run_tokens(req("a", range(6), max_tokens=50), [4] * 9, max_model_len=8)) == ([4, 4], "length", None)
    assert finish(run_tokens(req("a", range(8), max_tokens=50), [4] * 9, max_model_len=8)) == ([4], "length", None)


def test_outputs_carry_logprobs_prompt_and_cached_counts():
    s = make()
    s.add_request(req("a", range(10), max_tokens=2))
    out = s.schedule()
    lp = TokenLogprobs(5, -0.5, [(5, -0.5), (6, -1.5)])
    (o,) = s.update(out, SamplerOutput([5], [lp]))
    assert (o.new_token_ids, o.new_logprobs, o.num_prompt_tokens, o.num_cached_tokens) == ([5], [lp], 10, 0)
    (o,) = s.update(s.schedule(), SamplerOutput([6], []))  # a sampler that returns no logprobs
    assert (o.new_token_ids, o.new_logprobs, o.finish_reason) == ([6], [None], "length")


# ------------------------------------------------------------------------------------- aborts


def test_abort_running_and_waiting_frees_blocks_at_once():
    s = make(max_num_batched_tokens=8, max_num_seqs=1)
    s.add_request(req("a", range(20)))
    s.add_request(req("b", range(3)))
    step(s)
    assert s.kv.block_table("a") == [0, 1]
    outs = s.abort_requests(["b", "zzz", "a", "a"])
    assert [(o.request_id, o.finish_reason, o.new_token_ids) for o in outs] == [("b", "abort", []), ("a", "abort", [])]
    assert s.kv.usage == 0 and not s.has_unfinished_requests() and s.schedule().empty


def test_abort_between_schedule_and_update_is_skipped_and_rows_stay_aligned():
    s = make()
    for rid in "abc":
        s.add_request(req(rid, [ord(rid)], max_tokens=9))
    step(s)
    out = s.schedule()
    assert out.sampled_ids == ["a", "b", "c"]
    s.abort_requests(["b"])
    outs = s.update(out, SamplerOutput([4, 5, 6], [None] * 3))
    assert [(o.request_id, o.new_token_ids) for o in outs] == [("a", [4]), ("c", [6])]
    assert [r.request_id for r in s.running] == ["a", "c"] and s.kv.block_table("b") == []


def test_a_request_re_added_under_an_aborted_id_is_not_touched_by_the_stale_update():
    s = make()
    s.add_request(req("a", [1, 2, 3], max_tokens=9))
    out = s.schedule()
    s.abort_requests(["a"])
    fresh = req("a", [7, 8])
    s.add_request(fresh)
    assert s.update(out, SamplerOutput([4], [None])) == []
    assert fresh.output_token_ids == [] and fresh.num_computed_tokens == 0 and s.num_waiting == 1


def test_finish_requests_for_a_stop_string():
    s = make()
    s.add_request(req("a", [1], max_tokens=9))
    s.add_request(req("b", [2], max_tokens=9))
    step(s)
    out = s.schedule()
    s.finish_requests(["a"], RequestStatus.FINISHED_STOPPED, "###")
    assert [o.request_id for o in s.update(out, SamplerOutput([4, 4], [None, None]))] == ["b"]
    assert s.num_running == 1 and len(s.kv.block_table("a")) == 0
    s.abort_requests(["b"])
    assert s.kv.usage == 0


# ------------------------------------------------------------------------------- prefix cache


def check_prompt_logprobs(r: Request, got) -> None:
    """Asked for and a token came out: every prompt position scored exactly once, in order, whatever
    chunking, preemption or prefix caching did; delivered once, with the first token. Else never sent."""
    if r.sampling_params.prompt_logprobs is None or not got.tokens:
        assert got.prompt_logprobs is None
        return
    prompt = r.prompt_token_ids
    expected = [None] + [TokenLogprobs(t, float(p), []) for p, t in enumerate(prompt[1:])]
    assert got.prompt_logprobs == expected


def test_prompt_logprobs_bypass_the_prefix_cache_score_each_chunk_and_come_with_the_first_token():
    s = make(max_num_batched_tokens=6)
    s.add_request(req("a", range(10), max_tokens=1))
    step(s)
    step(s)  # a is done; its two full blocks are cached
    s.add_request(req("b", [*range(10), 50], max_tokens=2, prompt_logprobs=1))
    out = s.schedule()
    assert shape(out) == [("b", 0, 6, False)] and out.seqs[0].prompt_logits == range(0, 6)
    s.update(out, SamplerOutput([], [], {"b": [TokenLogprobs(t, -1.0, []) for t in range(1, 7)]}))
    out = s.schedule()
    assert shape(out) == [("b", 6, 5, True)] and out.seqs[0].prompt_logits == range(0, 4)  # the last scores output
    prompt_rows = [TokenLogprobs(t, -2.0, []) for t in [7, 8, 9, 50]]
    (first,) = s.update(out, SamplerOutput([3], [None], {"b": prompt_rows}))
    assert first.prompt_logprobs is not None and len(first.prompt_logprobs) == 11
    assert [row.token_id for row in first.prompt_logprobs[1:]] == [*range(1, 10), 50]
    assert first.num_cached_tokens == 0
    out, outs = step(s)
    assert out.seqs[0].prompt_logits == range(0) and outs["b"].prompt_logprobs is None
    s.add_request(req("c", [*range(10), 50], max_tokens=1))  # scoring done: others still hit the cache
    assert shape(s.schedule())[0][1] == 8


def test_a_completed_structured_output_stops_its_request_even_before_min_tokens():
    s = make()
    s.add_request(req("a", [1, 2, 3], max_tokens=10, min_tokens=5, ignore_eos=True))
    s.add_request(req("b", [4, 5], max_tokens=10, ignore_eos=True))
    out = s.schedule()
    outs = {o.request_id: o for o in s.update(out, SamplerOutput([7, 8], [None, None], completed=frozenset({"a"})))}
    assert (outs["a"].new_token_ids, outs["a"].finish_reason, outs["a"].stop_reason) == ([7], "stop", None)
    assert outs["b"].finish_reason is None and [r.request_id for r in s.running] == ["b"]
    assert s.kv.block_table("a") == []  # freed at once


def test_prefix_cache_hits_reduce_scheduled_tokens():
    s = make(max_num_batched_tokens=64)
    s.add_request(req("a", range(10), max_tokens=1))
    step(s)
    s.add_request(req("b", [*range(10), 50], max_tokens=2))
    out, outs = step(s)
    assert shape(out) == [("b", 8, 3, True)] and out.seqs[0].block_ids[:2] == [0, 1]
    assert outs["b"].num_cached_tokens == 8
    assert (s.kv.prefix_cache_queries, s.kv.prefix_cache_hits) == (21, 8)


def test_preempted_request_resumes_from_its_own_cached_blocks_and_keeps_num_cached_tokens():
    s = make(num_blocks=4, block_size=2, max_model_len=8)
    s.add_request(req("a", [1, 2, 3], max_tokens=5, ignore_eos=True))
    s.add_request(req("b", [4, 5, 6, 7], max_tokens=5, ignore_eos=True))
    step(s)
    assert step(s)[0].preempted_ids == ["b"]
    s.abort_requests(["a"])
    out, outs = step(s)
    assert shape(out) == [("b", 4, 1, True)]  # its 4 known tokens were in cached blocks
    assert outs["b"].num_cached_tokens == 0 and not s.waiting


# ------------------------------------------------------------------------------ property test


@st.composite
def configs(draw, tight: bool) -> dict:
    """tight: a pool just big enough for one max-length request, several concurrent long requests."""
    bs = draw(st.sampled_from([1, 2, 4]))
    max_model_len = draw(st.integers(8, 24) if tight else st.integers(4, 48))
    extra_blocks = 0 if tight else draw(st.sampled_from([0, 0, 1, 2, 4, 12]))
    return dict(
        num_blocks=-(-max_model_len // bs) + extra_blocks,
        block_size=bs,
        max_model_len=max_model_len,
        caching=tight or draw(st.booleans()),
        max_num_seqs=draw(st.integers(3 if tight else 1, 6)),
        max_num_batched_tokens=draw(st.integers(1, 48)),
        enable_chunked_prefill=draw(st.booleans()),
        long_prefill_token_threshold=draw(st.sampled_from([0, 0, 1, 3, 8])),
    )


@st.composite
def workloads(draw, tight: bool = False):
    config = draw(configs(tight))
    max_prompt = config["max_model_len"]
    if not config["enable_chunked_prefill"]:
        max_prompt = min(max_prompt, config["max_num_batched_tokens"])
    prefixes = draw(st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=4, max_size=24), min_size=1, max_size=3))
    arrivals: dict[int, list[Request]] = {}
    aborts: dict[int, list[str]] = {}
    mid_aborts: dict[int, list[str]] = {}
    for i in range(draw(st.integers(3 if tight else 1, 8))):
        base = draw(st.sampled_from(prefixes))
        prompt = base[: draw(st.integers(0, len(base)))] + draw(st.lists(st.integers(0, VOCAB - 1), max_size=4))
        max_tokens = draw(st.integers(8 if tight else 1, 24))
        params = SamplingParams(
            max_tokens=max_tokens,
            min_tokens=min(max_tokens, draw(st.integers(0, 2))),
            ignore_eos=draw(st.booleans()),
            stop_token_ids=tuple(draw(st.lists(st.integers(0, VOCAB - 1), max_size=2))),
            prompt_logprobs=draw(st.sampled_from([None, None, 0])),
        )
        r = Request(f"r{i}", prompt[:max_prompt] or [0], params, eos_token_id=EOS)
        arrivals.setdefault(draw(st.integers(0, 6)), []).append(r)
        abort = draw(st.none() | st.tuples(st.integers(0, 40), st.booleans()))
        if abort is not None:
            (mid_aborts if abort[1] else aborts).setdefault(abort[0], []).append(r.request_id)
    return config, arrivals, aborts, mid_aborts


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_random_workloads_finish_with_exact_outputs_and_an_empty_pool(workload):
    check_workload(workload)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads(tight=True))
def test_random_workloads_under_memory_pressure(workload):
    check_workload(workload)


def check_workload(workload) -> None:
    config, arrivals, aborts, mid_aborts = workload
    s = make(**config)
    results = drive(s, arrivals, aborts, mid_aborts)
    event(f"preemptions: {min(s.num_preemptions_total, 3)}+")
    event(f"prefix hits: {s.kv.prefix_cache_hits > 0}")
    event(f"aborted: {sum(r.finish_reason == 'abort' for r in results.values()) > 0}")
    event(f"requests: {len(results)}")
    for r in (r for rs in arrivals.values() for r in rs):
        got = results[r.request_id]
        want = reference(r.prompt_token_ids, r.sampling_params, config["max_model_len"])
        if got.finish_reason == "abort":
            assert got.tokens == want[0][: len(got.tokens)]
        else:
            assert (got.tokens, got.finish_reason, got.stop_reason) == want
        check_prompt_logprobs(r, got)
    assert s.kv.usage == 0 and s.kv.num_free_blocks == config["num_blocks"]
    assert not s.running and not s.waiting
    s.kv.check_invariants()
