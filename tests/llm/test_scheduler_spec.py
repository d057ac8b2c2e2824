"""Scheduler + KV cache with draft tokens: exact schedules and updates for each cap and acceptance, stops inside an
accepted run, block roll-back and prefix caching, preemption, and a property test against the no-draft reference."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ladle.llm.outputs import SamplerOutput, SchedulerOutput, TokenLogprobs
from ladle.llm.request import Request, RequestStatus
from ladle.llm.sampling_params import SamplingParams
from ladle.llm.scheduler import Scheduler
from tests.llm.scheduler_harness import (
    EOS,
    SEED,
    VOCAB,
    FakeModel,
    Result,
    kv_value,
    make,
    next_token,
    reference,
    req,
    shape,
    step,
)

FILLER = 0  # rows past the emitted ones: whatever the target sampled after the first rejected draft


def spec_step(
    s: Scheduler,
    emit: dict[str, list[int]] | None = None,
    accepted: dict[str, int] | None = None,
    completed: tuple[str, ...] = (),
) -> tuple[SchedulerOutput, dict]:
    """One engine step: each sampled seq's rows start with its `emit` tokens (FILLER after), `accepted[rid]` of its
    drafts accepted (0 if absent). Row r's logprob is -r, a prompt position p's is p: alignment is visible."""
    out = s.schedule()
    s.kv.check_invariants()
    tokens: list[int] = []
    num_accepted = []
    for q in out.seqs:
        if q.sample:
            tokens += ((emit or {}).get(q.request_id, []) + [FILLER] * q.num_rows)[: q.num_rows]
            num_accepted.append((accepted or {}).get(q.request_id, 0))
    logprobs = [TokenLogprobs(t, -float(r), []) for r, t in enumerate(tokens)]
    prompt = {q.request_id: [TokenLogprobs(-1, float(q.start_pos + i), []) for i in q.prompt_logits]
              for q in out.scored_prompts}
    sampled = SamplerOutput(tokens, logprobs, prompt, frozenset(completed), num_accepted)
    outs = {o.request_id: o for o in s.update(out, sampled)}
    s.kv.check_invariants()
    return out, outs


def decoding(s: Scheduler, *requests: Request, first: int = 9) -> Request:
    """Add the requests and run their prefills (one step) so that each emits `first` and is in decode state."""
    for r in requests:
        s.add_request(r)
    step(s, dict.fromkeys((r.request_id for r in requests), first))
    for r in requests:
        assert r.num_computed_tokens == r.num_tokens - 1 and r.output_token_ids == [first]
    return requests[0]


def emitted(o) -> tuple[list[int], str | None, int | str | None]:
    return o.new_token_ids, o.finish_reason, o.stop_reason


# ------------------------------------------------------------------------------------------- scheduled shapes


def test_drafts_follow_the_last_token_and_get_one_row_each():
    s = make()
    a = decoding(s, req("a", [1, 2, 3], max_tokens=10))
    a.spec_token_ids = [5, 6, 7]
    out = s.schedule()
    (q,) = out.seqs
    assert shape(out) == [("a", 3, 4, True)] and q.token_ids == [9, 5, 6, 7]
    assert (q.num_spec, q.num_rows, q.spec_token_ids, q.context_len) == (3, 4, [5, 6, 7], 7)
    assert q.block_ids == [0, 1] and s.kv.num_free_blocks == 14  # KV for every draft position
    assert (out.num_batched_tokens, out.num_spec_tokens, out.sampled_ids) == (4, 3, ["a"])
    assert q.prompt_logits == range(0)


def test_the_budget_caps_drafts_and_the_last_token_comes_first():
    s = make(max_num_batched_tokens=6)
    a, b = req("a", [1, 2, 3], max_tokens=10), req("b", [4, 5, 6], max_tokens=10)
    decoding(s, a, b)
    a.spec_token_ids, b.spec_token_ids = [5, 6, 7], [5, 6, 7]
    out = s.schedule()
    assert shape(out) == [("a", 3, 4, True), ("b", 3, 2, True)] and out.num_batched_tokens == 6
    assert [(q.token_ids, q.num_spec, q.num_rows) for q in out.seqs] == [([9, 5, 6, 7], 3, 4), ([9, 5], 1, 2)]


def test_a_budget_of_one_leaves_no_room_for_drafts():
    s = make(max_num_batched_tokens=1)
    a = req("a", [1], max_tokens=10)
    decoding(s, a)
    a.spec_token_ids = [5, 6]
    (q,) = s.schedule().seqs
    assert (q.token_ids, q.num_spec, q.num_rows, q.spec_token_ids) == ([9], 0, 1, [])


def test_drafts_never_take_the_budget_a_later_decode_needs():
    s = make(max_num_batched_tokens=4)
    a = decoding(s, req("a", [1, 2], max_tokens=10), req("b", [3, 4], max_tokens=10))
    a.spec_token_ids = [5, 6, 7, 8]
    assert shape(s.schedule()) == [("a", 2, 3, True), ("b", 2, 1, True)]  # one token kept back for b


def test_max_model_len_caps_drafts_and_stops_the_accepted_run():
    s = make(num_blocks=4, block_size=2, max_model_len=8)
    a = decoding(s, req("a", range(5), max_tokens=50, ignore_eos=True))
    a.spec_token_ids = [5, 6, 7]
    out, outs = spec_step(s, {"a": [5, 6, 8]}, {"a": 2})
    (q,) = out.seqs
    assert (q.token_ids, q.num_spec, q.context_len) == ([9, 5, 6], 2, 8)  # 8 - 6 known tokens
    assert emitted(outs["a"]) == ([5, 6], "length", None)  # the target's own token would be the 9th: dropped
    assert a.output_token_ids == [9, 5, 6] and s.kv.usage == 0 and not s.running


def test_max_tokens_caps_drafts_so_all_accepted_plus_one_fits():
    s = make()
    a = decoding(s, req("a", [1, 2], max_tokens=4, ignore_eos=True))
    a.spec_token_ids = [5, 6, 7]
    out, outs = spec_step(s, {"a": [5, 6, 8]}, {"a": 2})
    assert (out.seqs[0].token_ids, out.seqs[0].num_spec) == ([9, 5, 6], 2)  # 4 - 1 output - 1
    assert emitted(outs["a"]) == ([5, 6, 8], "length", None) and s.kv.usage == 0
    b = decoding(s, req("b", [1, 2], max_tokens=2))
    b.spec_token_ids = [5, 6, 7]
    (q,) = s.schedule().seqs
    assert (q.token_ids, q.num_spec, q.num_rows) == ([9], 0, 1)  # one token left: nothing to verify


def test_drafts_on_a_request_that_is_not_decoding_are_ignored():
    s = make(max_num_batched_tokens=8)
    a = req("a", range(20), max_tokens=5)
    a.spec_token_ids = [5, 6]  # waiting
    s.add_request(a)
    out, _ = spec_step(s)
    assert shape(out) == [("a", 0, 8, False)] and out.seqs[0].num_spec == 0
    out, _ = spec_step(s)  # prefilling
    assert shape(out) == [("a", 8, 8, False)] and out.seqs[0].token_ids == list(range(8, 16))
    assert out.num_spec_tokens == 0 and a.num_computed_tokens == 16


# --------------------------------------------------------------------------------------------------- updates


def four_token_prompt(s: Scheduler, **params) -> Request:
    """Block size 4: a 4-token prompt whose block 0 is full and registered, first output 9, drafts [5, 6, 7, 8]
    (positions 4..8: blocks 1 and 2 join block 0 once scheduled)."""
    params.setdefault("max_tokens", 20)
    params.setdefault("ignore_eos", True)
    a = decoding(s, req("a", [1, 2, 3, 4], **params))
    assert s.kv.block_table("a") == [0] and s.kv.num_free_blocks == 15 and s.kv.pool.block_key[0] is not None
    a.spec_token_ids = [5, 6, 7, 8]
    return a


def test_all_drafts_accepted():
    s = make()
    a = four_token_prompt(s)
    out, outs = spec_step(s, {"a": [5, 6, 7, 8, 10]}, {"a": 4})
    assert out.seqs[0].token_ids == [9, 5, 6, 7, 8] and out.seqs[0].block_ids == [0, 1, 2]
    assert emitted(outs["a"]) == ([5, 6, 7, 8, 10], None, None)
    assert [lp.logprob for lp in outs["a"].new_logprobs] == [0.0, -1.0, -2.0, -3.0, -4.0]
    assert (a.num_computed_tokens, a.num_tokens, a.output_token_ids) == (9, 10, [9, 5, 6, 7, 8, 10])
    assert s.kv.block_table("a") == [0, 1, 2] and s.kv.num_free_blocks == 13
    key = s.kv.pool.block_key
    assert key[1] is not None and key[1][1] == (9, 5, 6, 7) and key[2] is None  # block 2: 1 of 4 computed
    a.spec_token_ids = []
    out, _ = spec_step(s, {"a": [11]})  # nothing proposed: a plain decode of the target's own token
    assert shape(out) == [("a", 9, 1, True)] and out.seqs[0].token_ids == [10]


def test_no_draft_accepted_rolls_back_the_block_only_drafts_used():
    s = make()
    a = four_token_prompt(s)
    cached = s.kv.pool.num_cached_blocks
    out, outs = spec_step(s, {"a": [11, 12, 13, 14, 15]}, {"a": 0})
    assert out.seqs[0].block_ids == [0, 1, 2]
    assert emitted(outs["a"]) == ([11], None, None) and [lp.logprob for lp in outs["a"].new_logprobs] == [0.0]
    assert (a.num_computed_tokens, a.num_tokens, a.output_token_ids) == (5, 6, [9, 11])
    assert s.kv.block_table("a") == [0, 1] and s.kv.num_free_blocks == 14
    pool = s.kv.pool
    assert pool.free_queue()[0] == 2 and pool.block_key[2] is None  # unregistered: reused first
    assert pool.block_key[1] is None and pool.num_cached_blocks == cached
    a.spec_token_ids = []
    out, _ = spec_step(s, {"a": [12]})
    assert shape(out) == [("a", 5, 1, True)] and out.seqs[0].token_ids == [11] and out.seqs[0].block_ids == [0, 1]


def test_partial_acceptance():
    s = make()
    a = four_token_prompt(s)
    out, outs = spec_step(s, {"a": [5, 6, 12, 13, 14]}, {"a": 2})
    assert emitted(outs["a"]) == ([5, 6, 12], None, None)
    assert [lp.logprob for lp in outs["a"].new_logprobs] == [0.0, -1.0, -2.0]
    assert (a.num_computed_tokens, a.num_tokens, a.output_token_ids) == (7, 8, [9, 5, 6, 12])
    assert s.kv.block_table("a") == [0, 1] and s.kv.num_free_blocks == 14
    assert s.kv.pool.block_key[1] is None  # 3 of its 4 tokens computed
    a.spec_token_ids = []
    out, _ = spec_step(s, {"a": [13]})
    assert shape(out) == [("a", 7, 1, True)] and out.seqs[0].token_ids == [12]
    assert s.kv.pool.block_key[1][1] == (9, 5, 6, 12)  # registered with the tokens kept, not the drafts


def test_logprobs_and_acceptance_align_with_rows_around_a_prefill_chunk():
    s = make(max_num_batched_tokens=16, long_prefill_token_threshold=4)
    a, b, c = req("a", [1, 2, 3], max_tokens=10), req("b", range(30), max_tokens=10), req("c", [4, 5], max_tokens=10)
    for r in (a, b, c):
        s.add_request(r)
    out, _ = spec_step(s, {"a": [9], "c": [8]})
    assert shape(out) == [("a", 0, 3, True), ("b", 0, 4, False), ("c", 0, 2, True)]
    a.spec_token_ids, b.spec_token_ids, c.spec_token_ids = [5, 6, 7], [1, 1], [6, 7]
    out, outs = spec_step(s, {"a": [5, 20, 21, 22], "c": [6, 7, 23]}, {"a": 1, "c": 2})
    assert shape(out) == [("a", 3, 4, True), ("b", 4, 4, False), ("c", 2, 3, True)]
    assert [q.num_rows for q in out.seqs] == [4, 0, 3]
    assert emitted(outs["a"]) == ([5, 20], None, None) and emitted(outs["c"]) == ([6, 7, 23], None, None)
    assert [lp.logprob for lp in outs["a"].new_logprobs] == [0.0, -1.0]  # rows 0-3 are a's
    assert [lp.logprob for lp in outs["c"].new_logprobs] == [-4.0, -5.0, -6.0]  # rows 4-6 are c's
    assert "b" not in outs and b.num_computed_tokens == 8 and b.output_token_ids == []
    assert (a.num_computed_tokens, c.num_computed_tokens) == (5, 5)


def test_a_seq_aborted_mid_step_keeps_later_rows_and_acceptance_aligned():
    s = make()
    a, b = req("a", [1, 2], max_tokens=10), req("b", [3, 4], max_tokens=10)
    decoding(s, a, b)
    a.spec_token_ids, b.spec_token_ids = [5, 6], [7, 8]
    out = s.schedule()
    s.abort_requests(["a"])
    sampled = SamplerOutput([5, 6, 1, 7, 12, 2], [None] * 6, num_accepted=[2, 1])
    (o,) = s.update(out, sampled)
    assert (o.request_id, o.new_token_ids) == ("b", [7, 12]) and b.num_computed_tokens == 4
    s.kv.check_invariants()


def test_without_logprobs_each_emitted_token_gets_none():
    s = make()
    a = four_token_prompt(s)
    out = s.schedule()
    (o,) = s.update(out, SamplerOutput([5, 6, 1, 1, 1], [], num_accepted=[2]))
    assert (o.new_token_ids, o.new_logprobs) == ([5, 6, 1], [None, None, None]) and a.num_tokens == 8


# ------------------------------------------------------------------------------------- stops inside a run


def test_eos_inside_the_accepted_run_stops_there():
    s = make()
    a = decoding(s, req("a", [1, 2, 3, 4], max_tokens=20))
    a.spec_token_ids = [5, EOS, 7, 8]
    _, outs = spec_step(s, {"a": [5, EOS, 7, 8, 10]}, {"a": 4})
    assert emitted(outs["a"]) == ([5, EOS], "stop", None) and len(outs["a"].new_logprobs) == 2
    assert a.output_token_ids == [9, 5, EOS] and a.status == RequestStatus.FINISHED_STOPPED
    assert s.kv.usage == 0 and not s.running and s.kv.block_table("a") == []
    s.kv.check_invariants()


def test_a_stop_token_inside_the_accepted_run_stops_there():
    s = make()
    a = decoding(s, req("a", [1, 2, 3, 4], max_tokens=20, stop_token_ids=(6,)))
    a.spec_token_ids = [5, 6, 7]
    _, outs = spec_step(s, {"a": [5, 6, 7, 8]}, {"a": 3})
    assert emitted(outs["a"]) == ([5, 6], "stop", 6) and a.output_token_ids == [9, 5, 6] and s.kv.usage == 0


def test_a_stop_in_the_accepted_run_registers_only_blocks_of_kept_tokens():
    s = make()
    decoding(s, req("a", [1, 2, 3, 4], max_tokens=20, stop_token_ids=(8,)))
    s.running[0].spec_token_ids = [5, 6, 7, 8, 1, 2, 3]  # 8 kept: tokens 0..8, block 1 full; block 2 was fed
    spec_step(s, {"a": [5, 6, 7, 8, 1, 2, 3, 4]}, {"a": 7})
    assert s.kv.usage == 0
    s.add_request(req("b", [1, 2, 3, 4, 9, 5, 6, 7, 8, 1, 2, 3, 4, 0]))
    out, outs = step(s)
    assert shape(out) == [("b", 8, 6, True)] and outs["b"].num_cached_tokens == 8


def test_min_tokens_applies_token_by_token_inside_the_run():
    s = make()
    a = decoding(s, req("a", [1, 2], max_tokens=20, min_tokens=2))
    a.spec_token_ids = [EOS, EOS, 5]
    _, outs = spec_step(s, {"a": [EOS, EOS, 5, 6]}, {"a": 3})
    assert emitted(outs["a"]) == ([EOS, EOS], "stop", None)  # the first EOS is the 2nd output: not > min_tokens


def test_a_completed_structured_output_finishes_at_the_last_emitted_token():
    s = make()
    a = decoding(s, req("a", [1, 2], max_tokens=20, min_tokens=10))
    a.spec_token_ids = [5, 6, 7]
    _, outs = spec_step(s, {"a": [5, 6, 8, 9]}, {"a": 1}, completed=("a",))
    assert emitted(outs["a"]) == ([5, 6], "stop", None) and a.status == RequestStatus.FINISHED_STOPPED
    assert s.kv.usage == 0 and not s.running


def test_a_stop_token_before_the_completed_one_wins():
    s = make()
    a = decoding(s, req("a", [1, 2], max_tokens=20, stop_token_ids=(5,)))
    a.spec_token_ids = [5, 6, 7]
    _, outs = spec_step(s, {"a": [5, 6, 8]}, {"a": 2}, completed=("a",))
    assert emitted(outs["a"]) == ([5], "stop", 5)


# ---------------------------------------------------------------------------------------------- prompt logprobs


def test_a_prompt_logprobs_request_decodes_with_drafts_and_gets_its_prompt_logprobs_once():
    s = make()
    b = req("b", range(6), max_tokens=10, prompt_logprobs=0)
    s.add_request(b)
    out, outs = spec_step(s, {"b": [9]})
    assert out.seqs[0].prompt_logits == range(0, 5)
    first = outs["b"].prompt_logprobs
    assert first is not None and [p.logprob for p in first[1:]] == [0.0, 1.0, 2.0, 3.0, 4.0]
    b.spec_token_ids = [5, 6]
    out, outs = spec_step(s, {"b": [5, 6, 7]}, {"b": 2})
    assert out.seqs[0].prompt_logits == range(0) and out.seqs[0].token_ids == [9, 5, 6]
    assert emitted(outs["b"]) == ([5, 6, 7], None, None) and outs["b"].prompt_logprobs is None
    assert len(b.prompt_logprobs) == 6


def test_drafts_after_a_prefill_chunk_that_leaves_only_the_last_prompt_token():
    s = make(max_num_batched_tokens=5)
    b = req("b", range(6), max_tokens=10, prompt_logprobs=0)
    s.add_request(b)
    out, outs = spec_step(s)
    assert shape(out) == [("b", 0, 5, False)] and out.seqs[0].prompt_logits == range(0, 5) and outs == {}
    b.spec_token_ids = [6, 7]
    out, outs = spec_step(s, {"b": [6, 7, 8]}, {"b": 2})
    (q,) = out.seqs
    assert (q.token_ids, q.num_spec, q.prompt_logits) == ([5, 6, 7], 2, range(0))
    assert emitted(outs["b"]) == ([6, 7, 8], None, None)
    lps = outs["b"].prompt_logprobs
    assert lps is not None and lps[0] is None and [p.logprob for p in lps[1:]] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert b.num_computed_tokens == 8 and b.num_tokens == 9


def test_a_prompt_logprobs_prefill_beside_a_speculating_request():
    s = make(max_num_batched_tokens=8)
    a = decoding(s, req("a", [1, 2], max_tokens=10))
    b = req("b", range(10), max_tokens=10, prompt_logprobs=0)
    s.add_request(b)
    a.spec_token_ids = [5, 6, 7]
    out, outs = spec_step(s, {"a": [5, 6, 7, 8]}, {"a": 3})
    assert shape(out) == [("a", 2, 4, True), ("b", 0, 4, False)] and out.seqs[1].prompt_logits == range(0, 4)
    assert emitted(outs["a"]) == ([5, 6, 7, 8], None, None) and "b" not in outs
    a.spec_token_ids = []
    out, outs = spec_step(s, {"b": [3]})
    assert shape(out) == [("a", 6, 1, True), ("b", 4, 6, True)] and out.seqs[1].prompt_logits == range(0, 5)
    assert [p.logprob for p in outs["b"].prompt_logprobs[1:]] == [float(p) for p in range(9)]


# ------------------------------------------------------------------------------------------- KV roll-back


def test_truncate_releases_every_block_only_rejected_drafts_used():
    s = make(block_size=2, max_model_len=32)
    a = decoding(s, req("a", [1, 2], max_tokens=20, ignore_eos=True))
    assert s.kv.block_table("a") == [0] and s.kv.num_free_blocks == 15
    a.spec_token_ids = [5, 6, 7, 8, 9, 10]
    out, _ = spec_step(s, {"a": [11]}, {"a": 0})
    assert out.seqs[0].block_ids == [0, 1, 2, 3, 4]  # positions 2..8
    assert s.kv.block_table("a") == [0, 1] and s.kv.num_free_blocks == 14  # 4 tokens: 2 blocks
    assert s.kv.pool.free_queue()[:3] == [2, 3, 4]  # released tail first... each to the head: reused first
    assert s.kv.pool.num_cached_blocks == 1  # [1, 2] only


def test_truncate_itself():
    s = make(block_size=2, max_model_len=32)
    a = decoding(s, req("a", [1, 2, 3, 4, 5], max_tokens=20))
    kv = s.kv
    assert kv.block_table("a") == [0, 1, 2] and kv.num_free_blocks == 13  # 6 tokens, 2 blocks registered
    kv.truncate("zzz", 0)  # unknown: nothing
    kv.truncate("a", 6)  # the table covers no more than 6 tokens
    assert kv.block_table("a") == [0, 1, 2]
    assert kv.allocate_slots(a, 4) and kv.block_table("a") == [0, 1, 2, 3, 4]  # as for 3 drafts after the last
    kv.truncate("a", 6)
    assert kv.block_table("a") == [0, 1, 2] and kv.num_free_blocks == 13 and kv.pool.free_queue()[:2] == [3, 4]
    with pytest.raises(AssertionError, match="truncating registered blocks"):
        kv.truncate("a", 2)  # blocks 0 and 1 are registered
    assert kv.block_table("a") == [0, 1, 2]
    kv.check_invariants()


# ------------------------------------------------------------------------------------------- prefix cache


def test_accepted_drafts_are_registered_and_a_later_request_hits_them():
    s = make()
    a = four_token_prompt(s)
    spec_step(s, {"a": [5, 6, 7, 8, 10]}, {"a": 4})
    s.add_request(req("b", [1, 2, 3, 4, 9, 5, 6, 7, 42]))
    a.spec_token_ids = []
    out, outs = spec_step(s)
    assert shape(out) == [("a", 9, 1, True), ("b", 8, 1, True)] and out.seqs[1].block_ids[:2] == [0, 1]
    assert outs["b"].num_cached_tokens == 8 and s.kv.pool.ref_cnt[1] == 2


def test_rejected_drafts_are_never_hit():
    s = make()
    a = four_token_prompt(s)
    spec_step(s, {"a": [11]}, {"a": 0})  # block 1's slots hold K/V of 9, 5, 6, 7: only 9 is a's
    s.add_request(req("b", [1, 2, 3, 4, 9, 5, 6, 7, 42]))
    a.spec_token_ids = []
    out, outs = spec_step(s)
    assert shape(out) == [("a", 5, 1, True), ("b", 4, 5, True)] and outs["b"].num_cached_tokens == 4


# -------------------------------------------------------------------------------------------------- preemption


def test_drafts_that_need_a_block_are_dropped_and_never_preempt():
    s = make(num_blocks=4, block_size=2, max_model_len=8)
    a, b = req("a", [1, 2, 3], max_tokens=3, ignore_eos=True), req("b", [4, 5, 6], max_tokens=8, ignore_eos=True)
    decoding(s, a, b)
    assert s.kv.num_free_blocks == 0
    a.spec_token_ids, b.spec_token_ids = [5], [8]
    out, outs = spec_step(s, {"a": [10], "b": [11]})
    assert out.preempted_ids == [] and shape(out) == [("a", 3, 1, True), ("b", 3, 1, True)]
    assert [q.num_spec for q in out.seqs] == [0, 0] and a.spec_token_ids == b.spec_token_ids == []
    assert emitted(outs["a"])[0] == [10] and b.output_token_ids == [9, 11]
    s.kv.check_invariants()


def test_a_decode_that_needs_a_block_still_preempts_the_newest_which_loses_its_drafts():
    s = make(num_blocks=4, block_size=2, max_model_len=8)
    a, b = req("a", [1, 2, 3], max_tokens=8, ignore_eos=True), req("b", [4, 5, 6], max_tokens=8, ignore_eos=True)
    decoding(s, a, b)
    spec_step(s, {"a": [10], "b": [11]})  # both now hold 5 tokens in 2 full blocks: the next decode needs a third
    b.spec_token_ids = [5, 6]
    out = s.schedule()
    assert shape(out) == [("a", 4, 1, True)] and out.preempted_ids == ["b"]
    assert b.spec_token_ids == [] and s.waiting[0] is b and s.kv.block_table("b") == []
    assert (b.status, b.num_computed_tokens, b.num_preemptions) == (RequestStatus.PREEMPTED, 0, 1)


# --------------------------------------------------------------------------------------------- property test


class SpecModel(FakeModel):
    """The harness's FakeModel, verifying drafts: every fed position's K/V (drafts too) goes into the store, each
    sampled seq gets 1 + num_spec rows, and a draft is accepted iff it equals the row before it (honest), or a random
    number of drafts is (dishonest: the outputs then differ from the reference, the bookkeeping must not). The
    harness's checks stay: reads see exactly the true prefix (no K/V of a rejected draft), writes hit owned blocks."""

    def __init__(self, sched: Scheduler, requests: dict[str, Request], rng: random.Random, honest: bool) -> None:
        super().__init__(sched, requests)
        self.rng, self.honest = rng, honest
        self.proposed: dict[str, list[int]] = {}
        self.num_drafted = self.num_accepted = 0

    def propose(self, max_drafts: int) -> None:
        """Drafts for decoding requests: the true continuation, a true prefix then noise, or noise; and noise on
        some requests not decoding (which the scheduler must ignore)."""
        rng = self.rng
        for r in self.requests.values():
            if r.status.finished:
                continue
            k = rng.randint(0, max_drafts)
            if r.status == RequestStatus.RUNNING and r.num_tokens - r.num_computed_tokens == 1:
                true = true_continuation(r.all_token_ids, k)
                m = rng.choice([k, k, rng.randint(0, k), 0])
                r.spec_token_ids = true[:m] + [rng.randrange(VOCAB) for _ in range(k - m)]
                self.proposed[r.request_id] = list(r.spec_token_ids)
            elif rng.random() < 0.3:
                r.spec_token_ids = [rng.randrange(VOCAB) for _ in range(k)]

    def __call__(self, out: SchedulerOutput) -> SamplerOutput:
        s, rng = self.sched, self.rng
        assert out.num_batched_tokens == sum(q.num_tokens for q in out.seqs) <= s.max_num_batched_tokens
        assert len(out.seqs) <= s.max_num_seqs and len({q.request_id for q in out.seqs}) == len(out.seqs)
        rows: list[int] = []
        logprobs: list[TokenLogprobs] = []
        accepted: list[int] = []
        prompt = {}
        for q in out.seqs:
            r = self.requests[q.request_id]
            known = q.num_tokens - q.num_spec
            assert known > 0 and q.token_ids[:known] == r.all_token_ids[q.start_pos : q.start_pos + known]
            assert q.sample == (q.start_pos + known == r.num_tokens)
            if q.num_spec:
                params = r.sampling_params
                assert known == 1 and q.sample and q.spec_token_ids == self.proposed[r.request_id][: q.num_spec]
                assert r.spec_token_ids == [], "drafts are for one step: scheduling consumes them"
                assert q.num_spec <= min(s.max_model_len - r.num_tokens, params.max_tokens - r.num_output_tokens - 1)
            assert len(q.block_ids) == -(-q.context_len // self.bs) and q.context_len <= s.max_model_len
            v = self._read(q.block_ids, r.all_token_ids[: q.start_pos])
            seq_rows = []
            for i, token in enumerate(q.token_ids):
                pos = q.start_pos + i
                v = kv_value(v, token)
                block = q.block_ids[pos // self.bs]
                assert s.kv.pool.ref_cnt[block] == 1, "writing K/V into a shared block"
                self.store[block, pos % self.bs] = v
                if q.sample and i >= known - 1:
                    seq_rows.append(next_token(v))
            if q.sample:
                drafts = q.spec_token_ids
                if self.honest:
                    n = 0
                    while n < len(drafts) and drafts[n] == seq_rows[n]:
                        n += 1
                else:
                    n = rng.randint(0, len(drafts))
                    seq_rows[:n] = drafts[:n]
                self.num_drafted += len(drafts)
                self.num_accepted += n
                accepted.append(n)
                first = q.start_pos + known - 1  # the position whose logits give row 0
                logprobs += [TokenLogprobs(t, float(first + j), []) for j, t in enumerate(seq_rows)]
                rows += seq_rows
            if q.prompt_logits:
                prompt[q.request_id] = self._score(r, q)
        assert len(accepted) == len(out.sampled_ids) and len(rows) == sum(q.num_rows for q in out.seqs)
        num_accepted = accepted if out.num_spec_tokens or rng.random() < 0.5 else None
        return SamplerOutput(rows, logprobs, prompt, num_accepted=num_accepted)


def true_continuation(tokens: list[int], k: int) -> list[int]:
    """The k tokens the fake target model would emit next, stop conditions aside."""
    v = SEED
    for t in tokens:
        v = kv_value(v, t)
    out = []
    for _ in range(k):
        out.append(next_token(v))
        v = kv_value(v, out[-1])
    return out


def drive_spec(s: Scheduler, arrivals: dict[int, list[Request]], model_rng: random.Random, honest: bool,
               max_drafts: int, aborts: dict[int, list[str]], mid_aborts: dict[int, list[str]]):
    requests: dict[str, Request] = {}
    results: dict[str, Result] = {}
    model = SpecModel(s, requests, model_rng, honest)
    last_arrival = max(arrivals, default=0)
    bs = s.kv.block_size
    for n in range(5000):
        for r in arrivals.get(n, []):
            requests[r.request_id] = r
            results[r.request_id] = Result()
            s.add_request(r)
        record(requests, results, s.abort_requests(aborts.get(n, [])))
        if not s.has_unfinished_requests():
            if n >= last_arrival:
                return results, model
            continue
        model.propose(max_drafts)
        out = s.schedule()
        assert not out.empty, "no progress with unfinished requests"
        for rid in out.preempted_ids:
            r = requests[rid]
            assert r.spec_token_ids == [] and r.num_computed_tokens == 0 and s.kv.block_table(rid) == []
        sampled = model(out)
        record(requests, results, s.abort_requests(mid_aborts.get(n, [])))
        record(requests, results, s.update(out, sampled))
        s.kv.check_invariants()
        for r in s.running:
            assert r.status == RequestStatus.RUNNING and r.num_computed_tokens < r.num_tokens
            # no block is kept that only rejected drafts used
            assert len(s.kv.block_table(r.request_id)) <= -(-r.num_tokens // bs)
    raise AssertionError("not finished after 5000 steps")


def record(requests: dict[str, Request], results: dict[str, Result], outputs) -> None:
    for o in outputs:
        res = results[o.request_id]
        assert res.finish_reason is None, f"{o.request_id} got output after finishing"
        first = requests[o.request_id].num_prompt_tokens + len(res.tokens) - 1
        for j, (token, lp) in enumerate(zip(o.new_token_ids, o.new_logprobs, strict=True)):
            assert lp.token_id == token and lp.logprob == float(first + j), "logprobs out of step with tokens"
        res.tokens += o.new_token_ids
        if o.prompt_logprobs is not None:
            assert res.prompt_logprobs is None, f"{o.request_id}: prompt logprobs sent twice"
            res.prompt_logprobs = list(o.prompt_logprobs)
        res.finish_reason, res.stop_reason = o.finish_reason, o.stop_reason


def first_stop(prompt_len: int, tokens: list[int], params: SamplingParams, max_model_len: int):
    """Where the stop rules end a stream of tokens: (index, finish_reason, stop_reason), or None."""
    for i, t in enumerate(tokens):
        if i + 1 > params.min_tokens and t in params.stop_token_ids:
            return i, "stop", t
        if i + 1 > params.min_tokens and t == EOS and not params.ignore_eos:
            return i, "stop", None
        if i + 1 >= params.max_tokens or prompt_len + i + 1 >= max_model_len:
            return i, "length", None
    return None


def check_prompt_logprobs(r: Request, got: Result) -> None:
    if r.sampling_params.prompt_logprobs is None or not got.tokens:
        assert got.prompt_logprobs is None
        return
    expected = [None] + [TokenLogprobs(t, float(p), []) for p, t in enumerate(r.prompt_token_ids[1:])]
    assert got.prompt_logprobs == expected


@st.composite
def spec_workloads(draw):
    """Half of them tight: a pool just big enough for one max-length request, several long requests (preemption)."""
    tight = draw(st.booleans())
    bs = draw(st.sampled_from([1, 2, 4]))
    max_model_len = draw(st.integers(6, 32))
    config = dict(
        num_blocks=-(-max_model_len // bs) + (0 if tight else draw(st.sampled_from([0, 1, 2, 4, 16]))),
        block_size=bs,
        max_model_len=max_model_len,
        caching=tight or draw(st.booleans()),
        max_num_seqs=draw(st.integers(1, 6)),
        max_num_batched_tokens=draw(st.integers(1, 40)),
        enable_chunked_prefill=draw(st.booleans()),
        long_prefill_token_threshold=draw(st.sampled_from([0, 0, 2, 8])),
    )
    max_prompt = max_model_len
    if not config["enable_chunked_prefill"]:
        max_prompt = min(max_prompt, config["max_num_batched_tokens"])
    prefixes = draw(st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=2, max_size=20), min_size=1, max_size=3))
    arrivals: dict[int, list[Request]] = {}
    aborts: dict[int, list[str]] = {}
    mid_aborts: dict[int, list[str]] = {}
    for i in range(draw(st.integers(3 if tight else 1, 7))):
        base = draw(st.sampled_from(prefixes))
        prompt = base[: draw(st.integers(0, len(base)))] + draw(st.lists(st.integers(0, VOCAB - 1), max_size=3))
        max_tokens = draw(st.integers(8 if tight else 1, 24))
        params = SamplingParams(
            max_tokens=max_tokens,
            min_tokens=min(max_tokens, draw(st.integers(0, 2))),
            ignore_eos=draw(st.booleans()),
            stop_token_ids=tuple(draw(st.lists(st.integers(0, VOCAB - 1), max_size=2))),
            prompt_logprobs=draw(st.sampled_from([None, None, 0])),
        )
        r = Request(f"r{i}", prompt[:max_prompt] or [0], params, eos_token_id=EOS)
        arrivals.setdefault(draw(st.integers(0, 5)), []).append(r)
        abort = draw(st.none() | st.none() | st.tuples(st.integers(0, 30), st.booleans()))
        if abort is not None:
            (mid_aborts if abort[1] else aborts).setdefault(abort[0], []).append(r.request_id)
    return config, arrivals, aborts, mid_aborts, draw(st.integers(1, 6)), draw(st.integers(0, 2**32))


def check_spec_workload(workload, honest: bool) -> None:
    config, arrivals, aborts, mid_aborts, max_drafts, seed = workload
    s = make(**config)
    results, model = drive_spec(s, arrivals, random.Random(seed), honest, max_drafts, aborts, mid_aborts)
    event(f"preemptions: {min(s.num_preemptions_total, 3)}+")
    event(f"drafts accepted: {model.num_accepted > 0}, rejected: {model.num_accepted < model.num_drafted}")
    event(f"prefix hits: {s.kv.prefix_cache_hits > 0}")
    mml = config["max_model_len"]
    for r in (r for rs in arrivals.values() for r in rs):
        got = results[r.request_id]
        if honest:
            want = reference(r.prompt_token_ids, r.sampling_params, mml)
            if got.finish_reason == "abort":
                assert got.tokens == want[0][: len(got.tokens)]
            else:
                assert (got.tokens, got.finish_reason, got.stop_reason) == want
        elif got.finish_reason != "abort":
            stop = first_stop(r.num_prompt_tokens, got.tokens, r.sampling_params, mml)
            assert stop == (len(got.tokens) - 1, got.finish_reason, got.stop_reason)
        else:
            assert first_stop(r.num_prompt_tokens, got.tokens, r.sampling_params, mml) is None
        assert got.tokens == r.output_token_ids
        check_prompt_logprobs(r, got)
    assert s.kv.usage == 0 and s.kv.num_free_blocks == config["num_blocks"]
    assert not s.running and not s.waiting
    s.kv.check_invariants()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec_workloads())
def test_random_drafts_verified_honestly_give_the_reference_outputs(workload):
    check_spec_workload(workload, honest=True)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec_workloads())
def test_random_acceptance_keeps_the_kv_bookkeeping_and_stop_rules_exact(workload):
    check_spec_workload(workload, honest=False)
