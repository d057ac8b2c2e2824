"""Scheduler with background (batch-job) requests: exact schedules for the caps, seat and block preemption, queue
order and aborts, the LLMConfig knob, and a property test over random mixes of real-time and background work."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ladle.config import LLMConfig
from ladle.llm.outputs import SchedulerOutput
from ladle.llm.request import Request, RequestStatus
from ladle.llm.sampling_params import SamplingParams
from ladle.llm.scheduler import Scheduler
from tests.llm.scheduler_harness import EOS, VOCAB, FakeModel, Result, make, record, reference, req, shape, step


def bg(rid: str, tokens, eos: int | None = EOS, **params) -> Request:
    return Request(rid, list(tokens), SamplingParams(**params), eos_token_id=eos, background=True)


def ids(requests) -> list[str]:
    return [r.request_id for r in requests]


# ------------------------------------------------------------------------------------------ the caps


def test_background_alone_uses_the_whole_engine():
    s = make(max_num_seqs=4, max_num_batched_tokens=16, background_max_seqs=1, background_max_tokens=2)
    for i in range(5):
        s.add_request(bg(f"b{i}", [i, i + 1, i + 2]))
    out, _ = step(s)
    assert shape(out) == [(f"b{i}", 0, 3, True) for i in range(4)] and out.num_batched_tokens == 12
    assert (s.num_running, s.num_background_running, s.num_waiting) == (4, 4, 1)
    assert ids(s.background_waiting) == ["b4"] and not s.waiting
    long = make(max_num_batched_tokens=16, background_max_seqs=1, background_max_tokens=2)
    long.add_request(bg("b", range(20)))
    assert shape(step(long)[0]) == [("b", 0, 16, False)]  # the whole token budget


def test_caps_apply_while_real_time_is_present_and_lift_when_it_leaves():
    s = make(max_num_seqs=4, max_num_batched_tokens=16, background_max_seqs=2, background_max_tokens=3,
             isolate_admissions=True)
    s.add_request(req("r", [1, 2], max_tokens=3))
    for i in range(4):
        s.add_request(bg(f"b{i}", [10 + i, 20 + i]))
    assert shape(step(s)[0]) == [("r", 0, 2, True)]  # a step admitting real-time work carries no background work
    # then 2 seats and 3 tokens for background work: b1 gets a 1-token chunk
    assert shape(step(s)[0]) == [("r", 2, 1, True), ("b0", 0, 2, True), ("b1", 0, 1, False)]
    assert ids(s.running) == ["r", "b0", "b1"] and ids(s.background_waiting) == ["b2", "b3"]
    out, outs = step(s)  # the caps still hold (2 seats taken, so b2 waits)
    assert shape(out) == [("r", 3, 1, True), ("b0", 2, 1, True), ("b1", 1, 1, True)]
    assert outs["r"].finish_reason == "length"
    out, _ = step(s)  # no real-time request left: the whole engine
    assert shape(out) == [("b0", 3, 1, True), ("b1", 2, 1, True), ("b2", 0, 2, True), ("b3", 0, 2, True)]


def test_the_token_cap_counts_prefill_chunks_decodes_and_drafts():
    s = make(max_num_batched_tokens=32, background_max_seqs=8, background_max_tokens=4)
    s.add_request(req("r", [1], max_tokens=50, ignore_eos=True))
    s.add_request(bg("b0", [5], max_tokens=50, ignore_eos=True))
    s.add_request(bg("b1", [6], max_tokens=50, ignore_eos=True))
    s.add_request(bg("b2", range(10)))
    out, _ = step(s)
    assert shape(out) == [("r", 0, 1, True), ("b0", 0, 1, True), ("b1", 0, 1, True), ("b2", 0, 2, False)]
    out, _ = step(s)
    assert shape(out) == [("r", 1, 1, True), ("b0", 1, 1, True), ("b1", 1, 1, True), ("b2", 2, 2, False)]
    s.running[1].spec_token_ids = [7, 8, 9]  # b0's drafts take background tokens, one kept back for each later seq
    out = s.schedule()
    assert shape(out) == [("r", 2, 1, True), ("b0", 2, 2, True), ("b1", 2, 1, True), ("b2", 4, 1, False)]
    assert out.seqs[1].num_spec == 1 and out.num_batched_tokens == 5


def test_background_max_tokens_without_chunked_prefill_holds_a_prompt_that_does_not_fit():
    s = make(max_num_batched_tokens=8, enable_chunked_prefill=False, background_max_tokens=2)
    s.add_request(req("r", [1], max_tokens=2))
    s.add_request(bg("b", [2, 3, 4]))
    assert shape(step(s)[0]) == [("r", 0, 1, True)]  # b (3 tokens) waits for a background budget it fits in
    out, outs = step(s)
    assert shape(out) == [("r", 1, 1, True)] and outs["r"].finish_reason == "length"
    assert shape(step(s)[0]) == [("b", 0, 3, True)]


# ------------------------------------------------------------------------------------ seat preemption


def test_waiting_real_time_requests_take_seats_from_the_newest_background_requests():
    s = make(max_num_seqs=3)
    for i in range(4):
        s.add_request(bg(f"b{i}", [i + 1], max_tokens=10, ignore_eos=True))
    step(s)
    assert ids(s.running) == ["b0", "b1", "b2"] and ids(s.background_waiting) == ["b3"]
    s.add_request(req("r0", [7], max_tokens=10))
    s.add_request(req("r1", [8], max_tokens=10))
    out, _ = step(s)
    assert out.preempted_ids == ["b2", "b1"]  # newest first, just enough seats for both
    assert shape(out) == [("b0", 1, 1, True), ("r0", 0, 1, True), ("r1", 0, 1, True)]
    assert ids(s.running) == ["r0", "r1", "b0"] and s.num_background_running == 1
    assert ids(s.background_waiting) == ["b1", "b2", "b3"]  # preempted ones resume first, in their order
    b1 = s.background_waiting[0]
    assert (b1.status, b1.num_computed_tokens, b1.num_preemptions) == (RequestStatus.PREEMPTED, 0, 1)
    assert s.num_preemptions_total == 2 and s.kv.block_table("b1") == []
    s.abort_requests(["r0", "r1"])
    assert shape(step(s)[0]) == [("b0", 2, 1, True), ("b1", 0, 2, True), ("b2", 0, 2, True)]


def test_background_work_above_the_cap_is_not_preempted_for_the_cap_alone():
    s = make(max_num_seqs=4, background_max_seqs=1)
    for i in range(4):
        s.add_request(bg(f"b{i}", [i + 1], max_tokens=2, ignore_eos=True))
    s.add_request(bg("b4", [9], max_tokens=2, ignore_eos=True))
    step(s)
    s.add_request(req("r", [7], max_tokens=10))
    out, outs = step(s)
    assert out.preempted_ids == ["b3"]  # r's seat only: b0-b2 keep their work, and finish
    assert shape(out) == [("b0", 1, 1, True), ("b1", 1, 1, True), ("b2", 1, 1, True), ("r", 0, 1, True)]
    assert {outs[b].finish_reason for b in ("b0", "b1", "b2")} == {"length"}
    assert s.num_background_running == 0 and ids(s.background_waiting) == ["b3", "b4"]
    out, _ = step(s)  # under the cap again: one background request joins r (b3 recomputes its first token)
    assert shape(out) == [("r", 1, 1, True), ("b3", 0, 2, True)] and ids(s.background_waiting) == ["b4"]


def test_a_real_time_admission_step_carries_no_background_work_when_isolated():
    s = make(max_num_batched_tokens=32, block_size=4, num_blocks=32, isolate_admissions=True)
    s.add_request(bg("long", range(1, 21)))
    s.add_request(bg("short", [5], max_tokens=10, ignore_eos=True))
    s.long_prefill_token_threshold = 8  # the long prompt is fed 8 tokens a step
    step(s)
    s.add_request(req("r", [7, 8], max_tokens=4))
    out, _ = step(s)
    assert shape(out) == [("r", 0, 2, True)]  # r's first token comes as fast as without background work
    out, _ = step(s)
    assert shape(out) == [("r", 2, 1, True), ("long", 8, 8, False), ("short", 1, 1, True)]


def test_the_caps_hold_for_background_hold_s_after_real_time_leaves():
    now = [0.0]
    s = make(max_num_seqs=4, background_max_seqs=1, background_hold_s=2.0, clock=lambda: now[0])
    s.add_request(req("r", [1], max_tokens=1))
    for i in range(3):
        s.add_request(bg(f"b{i}", [i + 2], max_tokens=20, ignore_eos=True))
    out, outs = step(s)
    assert shape(out) == [("r", 0, 1, True), ("b0", 0, 1, True)] and outs["r"].finish_reason == "length"
    now[0] = 1.5  # r is gone, but within the hold: still one background seat
    assert [q.request_id for q in step(s)[0].seqs] == ["b0"]
    now[0] = 2.5  # the hold is over: the whole engine
    assert [q.request_id for q in step(s)[0].seqs] == ["b0", "b1", "b2"]


def test_no_seat_preemption_when_seats_are_free():
    s = make(max_num_seqs=4)
    s.add_request(bg("b0", [1], max_tokens=10))
    step(s)
    s.add_request(req("r", [7], max_tokens=10))
    out, _ = step(s)
    assert out.preempted_ids == [] and shape(out) == [("b0", 1, 1, True), ("r", 0, 1, True)]


# ----------------------------------------------------------------------------------- block preemption


def test_a_real_time_request_short_of_blocks_takes_background_blocks_first_then_real_time_ones():
    s = make(num_blocks=7, block_size=2, max_model_len=14, max_num_batched_tokens=16, caching=False,
             long_prefill_token_threshold=6)
    s.add_request(req("r0", range(12), max_tokens=2))
    s.add_request(req("r1", [20, 21, 22], max_tokens=8, ignore_eos=True))
    s.add_request(bg("b0", [30, 30], max_tokens=8, ignore_eos=True))
    out, _ = step(s)
    assert shape(out) == [("r0", 0, 6, False), ("r1", 0, 3, True), ("b0", 0, 2, True)]
    assert s.kv.num_free_blocks == 1
    out, _ = step(s)  # r0's next chunk needs 3 blocks: b0's one and then r1's two
    assert out.preempted_ids == ["b0", "r1"] and shape(out) == [("r0", 6, 6, True)]
    assert ids(s.waiting) == ["r1"] and ids(s.background_waiting) == ["b0"] and ids(s.running) == ["r0"]


def test_background_requests_short_of_blocks_only_preempt_background_ones():
    s = make(num_blocks=4, block_size=2, max_model_len=8, caching=False)
    s.add_request(req("r0", [1, 2, 3], max_tokens=8, ignore_eos=True))
    s.add_request(bg("b0", [4, 5], max_tokens=8, ignore_eos=True))
    s.add_request(bg("b1", [6, 7], max_tokens=8, ignore_eos=True))
    step(s)
    assert s.kv.num_free_blocks == 0
    out, _ = step(s)  # b0 needs a block: b1, the newest, gives it up
    assert out.preempted_ids == ["b1"] and shape(out) == [("r0", 3, 1, True), ("b0", 2, 1, True)]
    out, _ = step(s)  # r0 needs a block: b0 gives it up (background first)
    assert out.preempted_ids == ["b0"] and shape(out) == [("r0", 4, 1, True)]
    assert ids(s.background_waiting) == ["b0", "b1"] and s.num_background_running == 0


def test_a_background_request_that_is_the_newest_preempts_itself_never_a_real_time_one():
    s = make(num_blocks=4, block_size=2, max_model_len=8, caching=False)
    r0 = req("r0", [1, 2, 3, 4, 5], max_tokens=8, ignore_eos=True)
    s.add_request(r0)
    s.add_request(bg("b0", [6, 7], max_tokens=8, ignore_eos=True))
    step(s)
    out, _ = step(s)
    assert out.preempted_ids == ["b0"] and shape(out) == [("r0", 5, 1, True)]
    assert r0.status == RequestStatus.RUNNING and r0.num_preemptions == 0
    assert shape(step(s)[0]) == [("r0", 6, 1, True)]  # b0's 2 blocks are not free: it waits


def test_a_waiting_real_time_head_takes_the_blocks_its_first_chunk_needs_from_background_work():
    s = make(num_blocks=4, block_size=2, max_model_len=8, caching=False)
    s.add_request(bg("b0", [1, 2, 3], max_tokens=8, ignore_eos=True))
    s.add_request(bg("b1", [4, 5, 6], max_tokens=8, ignore_eos=True))
    step(s)
    assert s.kv.num_free_blocks == 0
    s.add_request(req("r", [7, 8, 9], max_tokens=8))
    out, _ = step(s)  # r needs 2 blocks: b1 (newest) is preempted before anything is scheduled
    assert out.preempted_ids == ["b1"] and shape(out) == [("b0", 3, 1, True), ("r", 0, 3, True)]
    assert ids(s.running) == ["r", "b0"]


# ------------------------------------------------------------------------------------------ queue order


def test_background_work_never_overtakes_a_waiting_real_time_request():
    s = make(max_num_batched_tokens=8, enable_chunked_prefill=False)
    s.add_request(req("r0", range(6), max_tokens=4))
    s.add_request(req("r1", range(100, 107), max_tokens=4))
    s.add_request(bg("b0", [1]))
    assert shape(step(s)[0]) == [("r0", 0, 6, True)]  # r1 (7) does not fit in 2; b0 (1) must not overtake it
    assert shape(step(s)[0]) == [("r0", 6, 1, True), ("r1", 0, 7, True)]
    assert shape(step(s)[0]) == [("r0", 7, 1, True), ("r1", 7, 1, True), ("b0", 0, 1, True)]


def test_fcfs_among_background_requests():
    s = make(max_num_batched_tokens=8, enable_chunked_prefill=False)
    s.add_request(bg("b0", range(6), max_tokens=4))
    s.add_request(bg("b1", range(100, 107), max_tokens=4))
    s.add_request(bg("b2", [1]))
    assert shape(step(s)[0]) == [("b0", 0, 6, True)]
    assert shape(step(s)[0]) == [("b0", 6, 1, True), ("b1", 0, 7, True)]
    assert shape(step(s)[0]) == [("b0", 7, 1, True), ("b1", 7, 1, True), ("b2", 0, 1, True)]


def test_real_time_requests_admitted_beside_background_work_run_before_it():
    s = make()
    s.add_request(bg("b0", [1], max_tokens=9))
    s.add_request(req("r0", [2], max_tokens=9))
    assert ids(step(s)[0].seqs) == ["r0", "b0"]
    s.add_request(bg("b1", [3], max_tokens=9))
    s.add_request(req("r1", [4], max_tokens=9))
    assert ids(step(s)[0].seqs) == ["r0", "b0", "r1", "b1"]
    assert ids(s.running) == ["r0", "r1", "b0", "b1"]
    assert ids(step(s)[0].seqs) == ["r0", "r1", "b0", "b1"]


# --------------------------------------------------------------------------------- aborts and counts


def test_abort_and_finish_of_waiting_and_running_background_requests():
    s = make(max_num_seqs=4)
    s.add_request(bg("b0", [1, 2], max_tokens=9))
    s.add_request(req("r0", [3], max_tokens=9))
    s.add_request(bg("b1", [4], max_tokens=9))
    step(s)
    s.add_request(bg("b2", [5], max_tokens=9))
    assert (s.num_running, s.num_background_running, s.num_waiting) == (3, 2, 1)
    outs = s.abort_requests(["b0", "b2"])
    assert [(o.request_id, o.finish_reason) for o in outs] == [("b0", "abort"), ("b2", "abort")]
    assert ids(s.running) == ["r0", "b1"] and s.num_background_running == 1 and s.num_waiting == 0
    assert s.kv.block_table("b0") == [] and not s.background_waiting
    s.finish_requests(["b1"], RequestStatus.FINISHED_STOPPED, "###")
    assert ids(s.running) == ["r0"] and s.num_background_running == 0 and s.kv.block_table("b1") == []
    s.abort_requests(["r0"])
    assert s.kv.usage == 0 and not s.has_unfinished_requests()


def test_background_requests_finishing_in_update_leave_the_count_exact():
    s = make()
    s.add_request(req("r", [1], max_tokens=5))
    s.add_request(bg("b0", [2], max_tokens=1))
    s.add_request(bg("b1", [3], max_tokens=5))
    _, outs = step(s)
    assert outs["b0"].finish_reason == "length"
    assert ids(s.running) == ["r", "b1"] and s.num_background_running == 1


def test_only_background_waiting_counts_as_unfinished_and_waiting():
    s = make()
    s.add_request(bg("b", [1]))
    assert s.has_unfinished_requests() and s.num_waiting == 1 and s.num_running == 0


def test_background_limits_are_validated_and_kept_by_fresh():
    with pytest.raises(ValueError, match="background_max_seqs"):
        make(background_max_seqs=0)
    with pytest.raises(ValueError, match="background_max_tokens"):
        make(background_max_tokens=0)
    s = make(background_max_seqs=3, background_max_tokens=7).fresh()
    assert (s.background_max_seqs, s.background_max_tokens) == (3, 7)
    assert (make().background_max_seqs, make().background_max_tokens) == (None, None)


def test_batch_share_sets_the_caps_and_is_validated():
    from ladle.llm.factory import background_caps
    from ladle.serving.builders import llm_config_from_parameters

    assert background_caps(LLMConfig()) == (2, 64)  # the default share, 1/32
    assert background_caps(LLMConfig(max_num_seqs=3, max_num_batched_tokens=10, batch_share=0.1)) == (1, 1)
    assert background_caps(LLMConfig(max_num_seqs=8, batch_share=1)) == (8, 2048)
    for bad in (0, -0.5, 1.5, True, "half"):
        with pytest.raises(ValueError, match="batch_share"):
            background_caps(LLMConfig(batch_share=bad))
    parsed = llm_config_from_parameters({"batch_share": 0.5, "max_num_seqs": 8}, Path("/m/1"), "/m")
    assert (parsed.batch_share, background_caps(parsed)) == (0.5, (4, 1024))
    # a repository LLM that sets none takes the server's --batch-share; its own wins
    server = LLMConfig(batch_share=0.125)
    assert llm_config_from_parameters({}, Path("/m/1"), "/m", server).batch_share == 0.125
    assert llm_config_from_parameters({"batch_share": 0.5}, Path("/m/1"), "/m", server).batch_share == 0.5


# ------------------------------------------------------------------------------------------ property test


@st.composite
def workloads(draw, tight: bool):
    """Random real-time and background arrivals, aborts (before a step or inside it) and outside finishes.
    tight: a pool just big enough for one max-length request, so preemption is frequent."""
    bs = draw(st.sampled_from([1, 2, 4]))
    max_model_len = draw(st.integers(8, 24) if tight else st.integers(4, 48))
    config = dict(
        num_blocks=-(-max_model_len // bs) + (0 if tight else draw(st.sampled_from([0, 1, 2, 4, 12]))),
        block_size=bs, max_model_len=max_model_len, caching=draw(st.booleans()),
        max_num_seqs=draw(st.integers(1, 6)), max_num_batched_tokens=draw(st.integers(1, 48)),
        enable_chunked_prefill=draw(st.booleans()),
        long_prefill_token_threshold=draw(st.sampled_from([0, 0, 1, 3, 8])),
        background_max_seqs=draw(st.sampled_from([None, 1, 2, 3])),
        background_max_tokens=draw(st.sampled_from([None, 1, 2, 5, 16])),
        isolate_admissions=draw(st.booleans()),
    )
    max_prompt = max_model_len if config["enable_chunked_prefill"] else min(max_model_len,
                                                                            config["max_num_batched_tokens"])
    events: dict[str, dict[int, list]] = {"arrive": {}, "abort": {}, "mid_abort": {}, "finish": {}}
    for i in range(draw(st.integers(2, 10))):
        prompt = draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=max_prompt))
        max_tokens = draw(st.integers(1, 24))
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=draw(st.booleans()),
                                prompt_logprobs=draw(st.sampled_from([None, None, 0])))
        background = draw(st.booleans())
        r = Request(f"{'b' if background else 'r'}{i}", prompt, params, eos_token_id=EOS, background=background)
        # a job tends to be running when real-time requests come
        events["arrive"].setdefault(draw(st.integers(0, 2) if background else st.integers(0, 12)), []).append(r)
        end = draw(st.none() | st.tuples(st.sampled_from(["abort", "mid_abort", "finish"]), st.integers(0, 40)))
        if end is not None:
            events[end[0]].setdefault(end[1], []).append(r.request_id)
    return config, events


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads(tight=False))
def test_random_mixes_keep_the_invariants_and_exact_outputs(workload):
    check_workload(*workload)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads(tight=True))
def test_random_mixes_under_memory_pressure(workload):
    check_workload(*workload)


def check_workload(config: dict, events: dict[str, dict[int, list]]) -> None:
    s = make(**config)
    arrivals = events["arrive"]
    requests = {r.request_id: r for rs in arrivals.values() for r in rs}
    results = run(s, events)
    event(f"preemptions: {min(s.num_preemptions_total, 3)}+")
    event(f"classes: {sorted({r.background for r in requests.values()})}")
    for rid, r in requests.items():
        got = results[rid]
        want = reference(r.prompt_token_ids, r.sampling_params, config["max_model_len"])
        if got.finish_reason in ("abort", "finished outside"):
            assert got.tokens == want[0][: len(got.tokens)]
        else:
            assert (got.tokens, got.finish_reason, got.stop_reason) == want
        assert s.kv.block_table(rid) == []
    assert s.kv.usage == 0 and s.kv.num_free_blocks == config["num_blocks"]
    assert not s.has_unfinished_requests() and s.num_background_running == 0
    s.kv.check_invariants()


def run(s: Scheduler, events: dict[str, dict[int, list]], max_steps: int = 5000) -> dict[str, Result]:
    """The engine loop of scheduler_harness.drive, with outside finishes and every invariant checked each step."""
    requests: dict[str, Request] = {}
    results: dict[str, Result] = {}
    model = FakeModel(s, requests)
    last_arrival = max(events["arrive"], default=0)
    for n in range(max_steps):
        for r in events["arrive"].get(n, []):
            requests[r.request_id] = r
            results[r.request_id] = Result()
            s.add_request(r)
        record(results, s.abort_requests(events["abort"].get(n, [])))
        finish_outside(s, results, events["finish"].get(n, []))
        check_places(s, requests, results)
        if not s.has_unfinished_requests():
            if n >= last_arrival:
                return results
            continue
        out = checked_schedule(s, requests)
        sampled = model(out)
        record(results, s.abort_requests(events["mid_abort"].get(n, [])))
        record(results, s.update(out, sampled))
        s.kv.check_invariants()
    raise AssertionError(f"not finished after {max_steps} steps")


def finish_outside(s: Scheduler, results: dict[str, Result], request_ids: list[str]) -> None:
    """A stop string seen by the detokenizer: the request ends with no more output."""
    live = [rid for rid in request_ids if rid in results and results[rid].finish_reason is None]
    s.finish_requests(live, RequestStatus.FINISHED_STOPPED, "###")
    for rid in live:
        results[rid].finish_reason = "finished outside"


def checked_schedule(s: Scheduler, requests: dict[str, Request]) -> SchedulerOutput:
    """schedule(), checking the caps while real-time work is present and who may preempt or be admitted."""
    real_time_present = bool(s.waiting) or any(not r.background for r in s.running)
    background_waiting = set(ids(s.background_waiting))
    before = s.num_background_running
    admitting = bool(s.waiting)
    if s.waiting and s.num_background_running > (s.background_max_seqs or s.max_num_seqs):
        event("real-time requests wait while background work is above its cap")
    out = s.schedule()
    background = [q for q in out.seqs if requests[q.request_id].background]
    if real_time_present:
        if s.background_max_tokens is not None:
            assert sum(q.num_tokens for q in background) <= s.background_max_tokens
        if s.background_max_seqs is not None:  # background work above the cap finishes; none joins it
            assert s.num_background_running <= max(s.background_max_seqs, before)
    if admitting and s.isolate_admissions:
        assert not background, "background work in a step that admits real-time requests"
    if any(q.request_id in background_waiting for q in background):
        assert not s.waiting, "a background request was admitted while a real-time one waits"
    first_real_time = next((i for i, rid in enumerate(out.preempted_ids) if not requests[rid].background), None)
    if first_real_time is not None:  # real-time requests are preempted only once no background request runs
        assert all(not requests[rid].background for rid in out.preempted_ids[first_real_time:])
        assert s.num_background_running == 0
        event("a real-time request preempted")
    if any(requests[rid].background for rid in out.preempted_ids):
        event("a background request preempted")
    if real_time_present and background:
        event("background work beside real-time work")
    return out


def check_places(s: Scheduler, requests: dict[str, Request], results: dict[str, Result]) -> None:
    """Every unfinished request in exactly one place, of its class; real-time ones first in `running`; waiting
    requests and finished ones hold no blocks."""
    live = sorted(rid for rid, res in results.items() if res.finish_reason is None)
    assert sorted(ids(s.running) + ids(s.waiting) + ids(s.background_waiting)) == live
    assert not any(r.background for r in s.waiting) and all(r.background for r in s.background_waiting)
    flags = [r.background for r in s.running]
    assert flags == sorted(flags) and sum(flags) == s.num_background_running
    assert all(r.status == RequestStatus.RUNNING for r in s.running)
    for r in [*s.waiting, *s.background_waiting]:
        assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED) and s.kv.block_table(r.request_id) == []
    for rid, res in results.items():
        if res.finish_reason is not None:
            assert s.kv.block_table(rid) == [] and requests[rid].status.finished
