"""Block pool and KV-cache manager: exact block ids, eviction order, prefix hits, and a stateful
property test that checks every invariant plus the (simulated) KV contents after every step."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ladle.llm.kv_cache import ROOT_UID, BlockPool, KVCacheManager
from ladle.llm.request import Request
from ladle.llm.sampling_params import SamplingParams


def make(num_blocks: int = 8, block_size: int = 4, max_model_len: int | None = None, caching: bool = True):
    pool = BlockPool(num_blocks, block_size, enable_prefix_caching=caching)
    return pool, KVCacheManager(pool, max_model_len or num_blocks * block_size)


def req(rid: str, tokens) -> Request:
    return Request(rid, list(tokens), SamplingParams())


def compute(kv: KVCacheManager, r: Request, n: int | None = None) -> None:
    """Admit (with prefix hits) or grow r by n tokens (default: all remaining), as an engine step would."""
    if kv.block_table(r.request_id):
        hits, num_hit = [], 0
    else:
        hits, num_hit = kv.get_computed_blocks(r)
        r.num_computed_tokens = 0
    n = r.num_tokens - r.num_computed_tokens - num_hit if n is None else n
    assert kv.allocate_slots(r, n, hits, num_hit)
    r.num_computed_tokens += num_hit + n
    kv.cache_blocks(r, r.num_computed_tokens)
    kv.check_invariants()


def test_allocation_and_free_without_caching_reuses_blocks_head_first():
    pool, kv = make()
    a, b = req("a", range(10)), req("b", range(5))
    assert kv.allocate_slots(a, 10)
    assert kv.allocate_slots(b, 5)
    assert kv.block_table("a") == [0, 1, 2] and kv.block_table("b") == [3, 4]
    assert pool.free_queue() == [5, 6, 7]
    assert kv.usage == pytest.approx(5 / 8) and kv.num_free_blocks == 3
    kv.free("a")  # nothing cached in them: back to the head, ahead of never-used blocks
    assert pool.free_queue() == [0, 1, 2, 5, 6, 7]
    assert kv.block_table("a") == []
    assert kv.allocate_slots(req("c", range(4)), 4)
    assert kv.block_table("c") == [0]
    kv.check_invariants()


def test_decode_growth_takes_a_block_only_at_block_boundaries():
    pool, kv = make()
    a = req("a", range(4))
    compute(kv, a)
    assert kv.block_table("a") == [0] and pool.block_key[0] == (ROOT_UID, (0, 1, 2, 3))
    for step in range(5):
        a.append_output_token(100 + step)
        compute(kv, a, 1)
    assert kv.block_table("a") == [0, 1, 2]  # 9 tokens
    assert pool.block_key[1] == (pool.block_uid[0], (100, 101, 102, 103))
    assert pool.block_key[2] is None  # partial last block is never cached


def test_lru_eviction_never_used_first_then_tail_blocks_before_prefix_blocks():
    pool, kv = make()
    a, b = req("a", range(12)), req("b", range(100, 108))
    compute(kv, a)
    compute(kv, b)
    assert kv.block_table("a") == [0, 1, 2] and kv.block_table("b") == [3, 4]
    kv.free("a")
    kv.free("b")
    assert pool.free_queue() == [5, 6, 7, 2, 1, 0, 4, 3]
    assert pool.num_cached_blocks == 5  # freed but still hittable
    compute(kv, req("c", range(200, 212)))
    assert kv.block_table("c") == [5, 6, 7]
    compute(kv, req("d", range(300, 308)))
    assert kv.block_table("d") == [2, 1]  # a's tail blocks evicted, its head block kept
    assert kv.get_computed_blocks(req("a2", range(13))) == ([0], 4)
    assert kv.get_computed_blocks(req("b2", range(100, 109))) == ([3, 4], 8)


def test_prefix_hit_shares_blocks_and_partial_block_is_never_hit():
    pool, kv = make()
    a = req("a", range(10))
    compute(kv, a)
    assert [k is not None for k in pool.block_key[:3]] == [True, True, False]
    b = req("b", [*range(8), 50, 51, 52])
    assert kv.get_computed_blocks(b) == ([0, 1], 8)
    compute(kv, b)
    assert kv.block_table("b") == [0, 1, 3] and b.num_computed_tokens == 11
    assert pool.ref_cnt[:4] == [2, 2, 1, 1]
    assert kv.get_computed_blocks(req("c", range(10))) == ([0, 1], 8)  # block 2 is partial: no hit
    kv.free("a")
    assert pool.ref_cnt[:4] == [1, 1, 0, 1] and pool.free_queue()[0] == 2
    kv.free("b")
    assert pool.ref_cnt == [0] * 8
    assert pool.free_queue() == [3, 2, 4, 5, 6, 7, 1, 0]
    kv.check_invariants()


def test_fully_cached_prompt_backs_off_one_block():
    pool, kv = make()
    compute(kv, req("a", range(8)))
    b = req("b", range(8))
    assert kv.get_computed_blocks(b) == ([0], 4)  # at least one token must be fed for logits
    compute(kv, b)
    assert kv.block_table("b") == [0, 2] and pool.ref_cnt[:3] == [2, 1, 1]
    assert pool.block_key[2] is None  # same content as block 1, which stays the cached copy
    assert kv.get_computed_blocks(req("c", range(9))) == ([0, 1], 8)
    assert kv.get_computed_blocks(req("d", range(4))) == ([], 0)


def test_allocate_is_all_or_nothing_and_counts_revived_cached_blocks():
    pool, kv = make(num_blocks=4)
    compute(kv, req("a", range(8)))
    kv.free("a")
    assert pool.free_queue() == [2, 3, 1, 0]
    assert kv.allocate_slots(req("x", [99]), 1) and kv.block_table("x") == [2]
    b = req("b", range(16))
    hits, num_hit = kv.get_computed_blocks(b)
    assert (hits, num_hit) == ([0, 1], 8)
    before = (list(pool.ref_cnt), pool.free_queue(), kv.prefix_cache_queries, kv.prefix_cache_hits)
    # 2 new blocks + 2 hits that sit in the free queue = 4 > 3 free: refused, nothing touched
    assert not kv.allocate_slots(b, 8, hits, num_hit)
    assert (list(pool.ref_cnt), pool.free_queue(), kv.prefix_cache_queries, kv.prefix_cache_hits) == before
    assert kv.block_table("b") == []
    c = req("c", range(10))
    assert kv.allocate_slots(c, 2, hits, num_hit)  # 1 new + 2 revived = 3
    assert kv.block_table("c") == [0, 1, 3] and kv.num_free_blocks == 0
    assert not kv.allocate_slots(req("y", [1]), 1)
    kv.check_invariants()


def test_hash_collision_is_not_a_hit():
    _, kv = make(block_size=2)
    big = 2**61 - 1  # CPython hashes ints modulo 2**61 - 1, so hash(big) == hash(0)
    assert hash((ROOT_UID, (0, 5))) == hash((ROOT_UID, (big, 5)))
    compute(kv, req("a", [0, 5, 7]))
    assert kv.get_computed_blocks(req("b", [big, 5, 7])) == ([], 0)
    assert kv.get_computed_blocks(req("c", [0, 5, 7])) == ([0], 2)


def test_child_of_an_evicted_parent_is_never_hit_through_new_content():
    pool = BlockPool(2, 2)
    assert pool.take(2) == [0, 1]
    u1 = pool.cache_block(0, (ROOT_UID, (1, 2)))
    u2 = pool.cache_block(1, (u1, (3, 4)))
    pool.release([0])
    assert pool.take(1) == [0] and pool.lookup((ROOT_UID, (1, 2))) is None
    u3 = pool.cache_block(0, (ROOT_UID, (1, 2)))  # same tokens recomputed: a fresh uid
    assert len({u1, u2, u3}) == 3
    assert pool.lookup((u3, (3, 4))) is None  # block 1 was computed after the *old* block 0
    assert pool.lookup((u1, (3, 4))) == 1
    pool.check_invariants()


def test_reset_prefix_cache_refused_while_in_use():
    pool, kv = make()
    compute(kv, req("a", range(8)))
    assert not kv.reset_prefix_cache()
    assert kv.get_computed_blocks(req("b", range(9))) == ([0, 1], 8)
    kv.free("a")
    assert kv.reset_prefix_cache()
    assert pool.num_cached_blocks == 0 and kv.get_computed_blocks(req("b", range(9))) == ([], 0)
    kv.check_invariants()


def test_prefix_cache_counters_count_once_per_admission():
    _, kv = make()
    compute(kv, req("a", range(10)))
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (10, 0)
    b = req("b", range(12))
    compute(kv, b)
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (22, 8)
    b.append_output_token(1)
    compute(kv, b, 1)  # growing is not a new query
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (22, 8)


def test_prefix_caching_disabled():
    pool, kv = make(caching=False)
    compute(kv, req("a", range(8)))
    assert pool.block_key == [None] * 8
    assert kv.get_computed_blocks(req("b", range(8))) == ([], 0)
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (0, 0)
    kv.free("a")
    assert pool.free_queue()[:2] == [0, 1]


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="fewer than max_model_len"):
        KVCacheManager(BlockPool(2, 4), 9)
    with pytest.raises(ValueError):
        BlockPool(0, 4)
    with pytest.raises(ValueError, match="only 2 are free"):
        BlockPool(2, 4).take(3)


# --------------------------------------------------------------------------------- reservations


def test_a_reservation_keeps_a_growing_table_consecutive_while_others_grow() -> None:
    """Four requests decode in turns, a block each every block_size tokens: without reservations their tables
    interleave block by block; with them each table stays one run (what the decode kernel reads fastest)."""
    for reserve, consecutive in ((0, False), (8, True)):
        pool = BlockPool(64, 4)
        kv = KVCacheManager(pool, 256, reserve_ahead=reserve)
        reqs = [Request(f"r{i}", [i] * 4, SamplingParams(max_tokens=20)) for i in range(4)]
        for r in reqs:
            compute(kv, r)
        for step in range(20):
            for r in reqs:
                r.append_output_token(step)
                compute(kv, r, 1)
                kv.check_invariants()
        tables = [kv.block_table(r.request_id) for r in reqs]
        assert all(len(t) == 6 for t in tables)
        runs = all(t == list(range(t[0], t[0] + 6)) for t in tables)
        assert runs is consecutive, tables
        assert pool.num_free_blocks == 64 - 24  # reserved blocks still count as free


def test_reservations_are_bounded_by_max_tokens_and_reserve_ahead() -> None:
    pool = BlockPool(32, 4)
    kv = KVCacheManager(pool, 128, reserve_ahead=3)
    short = Request("short", [1] * 5, SamplingParams(max_tokens=4))  # 9 tokens in all: 3 blocks, 2 held
    long = Request("long", [2] * 4, SamplingParams(max_tokens=100))
    compute(kv, short)
    compute(kv, long)
    assert kv.block_table("short") == [0, 1] and pool.reserved_for("short") == [2]
    assert kv.block_table("long") == [3] and pool.reserved_for("long") == [4, 5, 6]
    assert pool.num_reserved_blocks == 4 and pool.num_free_blocks == 32 - 3
    assert pool.free_queue()[0] == 7
    kv.free("long")
    # the reservation back at the head in order; its full (cached) prompt block at the tail, still hittable
    assert pool.reserved_for("long") == [] and pool.free_queue()[:4] == [4, 5, 6, 7] and pool.free_queue()[-1] == 3
    kv.check_invariants()


def test_reserved_blocks_are_taken_by_others_only_when_the_queue_is_empty() -> None:
    pool = BlockPool(10, 2)
    assert pool.take(2, "a", reserve=4) == [0, 1] and pool.reserved_for("a") == [2, 3, 4, 5]
    assert pool.take(1, "b", reserve=2) == [6] and pool.reserved_for("b") == [7, 8]
    assert pool.take(1, "c") == [9]  # the queue's last block
    assert pool.take(2, "c") == [5, 4]  # then the largest reservation's tail
    assert pool.reserved_for("a") == [2, 3] and pool.num_free_blocks == 4
    # the largest reservation (ties: the older) from its tail, then the next
    assert pool.take(4, "d") == [3, 2, 8, 7] and pool.num_free_blocks == 0
    pool.check_invariants()
    with pytest.raises(ValueError, match="only 0 are free"):
        pool.take(1, "a")


def test_a_reservation_stops_at_blocks_in_use_or_cached() -> None:
    pool = BlockPool(8, 2)
    pool.release(reversed(pool.take(3)))  # 0-2 back at the head, uncached
    cached = pool.take(1)[0]  # block 0
    pool.cache_block(cached, (ROOT_UID, (1, 2)))
    pool.release([cached])  # to the tail, still hittable
    held = pool.take(1)  # block 1
    pool.take(1, "x", reserve=5)  # block 2: its run stops at 3..7 (the end of the pool)
    assert held == [1] and pool.reserved_for("x") == [3, 4, 5, 6, 7]
    other = BlockPool(8, 2)
    mid = other.take(5)  # 0-4 in use
    other.release([mid[3]])  # block 3 free again, at the head: a run of one (4 is in use)
    assert other.take(1, "y", reserve=4) == [5] and other.reserved_for("y") == [6, 7]  # the run 5-7 instead
    assert other.free_queue() == [3]
    first = BlockPool(4, 2)
    block = first.take(2)
    first.cache_block(block[1], (ROOT_UID, (5, 6)))
    first.release([block[1]])  # block 1: free and cached, at the tail
    first.release([block[0]])  # block 0: free, uncached, at the head; its run ends at the cached block 1
    assert first.take(1, "z", reserve=3) == [2] and first.reserved_for("z") == [3]
    assert first.lookup((ROOT_UID, (5, 6))) == 1 and first.free_queue() == [0, 1]
    for p in (pool, other, first):
        p.check_invariants()


def test_a_new_table_starts_at_a_run_of_free_blocks_not_wherever_the_queue_head_is() -> None:
    pool = BlockPool(16, 2)
    pool.take(16)
    pool.release([7])
    pool.release(reversed([10, 11, 12, 13]))
    pool.release([2])  # the queue: 2, 10, 11, 12, 13, 7 — a fragmented head
    assert pool.free_queue() == [2, 10, 11, 12, 13, 7]
    assert pool.take(2, "n", reserve=2) == [10, 11] and pool.reserved_for("n") == [12, 13]
    assert pool.take(2) == [2, 7]  # without an owner: the head, as before
    pool.check_invariants()


def test_truncating_returns_the_reservation_so_the_table_regrows_in_one_run() -> None:
    pool = BlockPool(16, 2)
    kv = KVCacheManager(pool, 32, reserve_ahead=4)
    r = Request("r", [1, 2, 3], SamplingParams(max_tokens=20))
    assert kv.allocate_slots(r, 3)  # blocks 0, 1; reserved 2-5
    r.num_computed_tokens = 3
    assert kv.allocate_slots(r, 4)  # draft tokens: blocks 2, 3 (from the reservation)
    assert kv.block_table("r") == [0, 1, 2, 3] and pool.reserved_for("r") == [4, 5]
    kv.truncate("r", 4)  # drafts rejected past token 4: blocks 2 and 3 go back ahead of its reservation
    assert kv.block_table("r") == [0, 1] and pool.reserved_for("r") == [2, 3, 4, 5]
    assert pool.free_queue()[0] == 6 and pool.num_free_blocks == 14
    other = Request("o", [7], SamplingParams(max_tokens=1))
    assert kv.allocate_slots(other, 1) and kv.block_table("o") == [6]  # another request takes from the queue
    assert kv.allocate_slots(r, 5)  # 8 tokens: 4 blocks, the run resumed
    assert kv.block_table("r") == [0, 1, 2, 3] and pool.reserved_for("r") == [4, 5]
    kv.check_invariants()


def test_released_blocks_rejoin_a_reservation_only_as_its_consecutive_uncached_head() -> None:
    pool = BlockPool(12, 2)
    table = pool.take(3, "a", reserve=2)  # [0, 1, 2], reserved [3, 4]
    pool.release([table[2]])
    pool.reserve_back("a", [table[2]])
    assert pool.reserved_for("a") == [2, 3, 4]
    lone = pool.take(1, "b")  # block 5 (the queue's head), no reservation
    pool.release(lone)
    pool.reserve_back("b", lone)  # no reservation to run into: it starts one
    assert pool.reserved_for("b") == [5]
    gap = pool.take(2)  # 6, 7
    pool.release(reversed(gap))  # tail first, as a table is released
    pool.reserve_back("a", gap)  # 7 + 1 is not the reservation's head (2): both stay queued
    assert pool.reserved_for("a") == [2, 3, 4] and pool.free_queue()[:2] == [6, 7]
    cached = pool.take(1)  # block 6
    pool.cache_block(cached[0], (ROOT_UID, (9, 9)))
    pool.release(cached)
    pool.reserve_back("b", cached)  # cached content is never reserved
    assert pool.reserved_for("b") == [5] and pool.lookup((ROOT_UID, (9, 9))) == 6
    pool.check_invariants()


def test_a_fresh_scheduler_keeps_the_reservation_size() -> None:
    """Scheduler.fresh (after a failed step) rebuilds the pool: its KV manager reserves as the old one did (the
    factory's own setting is checked in test_kv_runs.py)."""
    from ladle.llm.kv_cache import RESERVE_AHEAD
    from ladle.llm.scheduler import Scheduler

    pool = BlockPool(64, 4)
    scheduler = Scheduler(KVCacheManager(pool, 256, RESERVE_AHEAD), max_num_seqs=4, max_num_batched_tokens=64,
                          max_model_len=256)
    assert scheduler.fresh().kv.reserve_ahead == RESERVE_AHEAD > 0


# --------------------------------------------------------------------------------- stateful

SEED = 7


def kv_value(prev: int, token: int) -> int:
    """Simulated K/V at a position: a function of the whole prefix, as real K/V is."""
    return hash((prev, token))


def expected_values(tokens: list[int]) -> list[int]:
    out, v = [], SEED
    for t in tokens:
        v = kv_value(v, t)
        out.append(v)
    return out


# Few distinct prefixes over a tiny vocabulary: hits, partial hits and equal blocks under different
# parents are all common.
PREFIXES = [[0, 1, 0, 1, 0, 1, 0, 1, 2, 3], [1, 0, 1, 0, 1, 0, 1, 0, 2, 3], [0, 1, 0, 1, 2, 2, 2, 2, 2, 2]]


class KVCacheMachine(RuleBasedStateMachine):
    @initialize(block_size=st.integers(1, 4), num_blocks=st.integers(1, 12), caching=st.booleans(),
                reserve=st.integers(0, 4))
    def setup(self, block_size: int, num_blocks: int, caching: bool, reserve: int) -> None:
        self.bs = block_size
        self.max_len = num_blocks * block_size
        self.pool = BlockPool(num_blocks, block_size, enable_prefix_caching=caching)
        self.kv = KVCacheManager(self.pool, self.max_len, reserve_ahead=reserve)
        self.live: dict[str, Request] = {}
        self.slots: dict[tuple[int, int], int] = {}  # (block, offset) -> simulated K/V
        self.next_id = 0

    def _run(self, r: Request, n: int, hits: list[int], num_hit: int) -> bool:
        snapshot = (list(self.pool.ref_cnt), self.pool.free_queue(), list(self.kv.block_table(r.request_id)),
                    self.pool.reserved_for(r.request_id), self.pool.num_reserved_blocks)
        if not self.kv.allocate_slots(r, n, hits, num_hit):
            after = (list(self.pool.ref_cnt), self.pool.free_queue(), list(self.kv.block_table(r.request_id)),
                     self.pool.reserved_for(r.request_id), self.pool.num_reserved_blocks)
            assert after == snapshot
            assert -(-(r.num_computed_tokens + num_hit + n) // self.bs) - len(snapshot[2]) > 0
            return False
        r.num_computed_tokens += num_hit
        table, values = self.kv.block_table(r.request_id), expected_values(r.all_token_ids)
        for pos in range(r.num_computed_tokens, r.num_computed_tokens + n):
            block = table[pos // self.bs]
            assert self.pool.ref_cnt[block] == 1, "writing K/V into a shared block"
            self.slots[block, pos % self.bs] = values[pos]
        r.num_computed_tokens += n
        self.kv.cache_blocks(r, r.num_computed_tokens)
        return True

    @rule(prefix=st.sampled_from(PREFIXES), cut=st.integers(1, 10), suffix=st.lists(st.integers(0, 3), max_size=6),
          frac=st.floats(0, 1))
    def admit(self, prefix: list[int], cut: int, suffix: list[int], frac: float) -> None:
        tokens = (prefix[:cut] + suffix)[: self.max_len]
        r = req(f"r{self.next_id}", tokens)
        self.next_id += 1
        hits, num_hit = self.kv.get_computed_blocks(r)
        assert num_hit == len(hits) * self.bs and num_hit < r.num_tokens
        values = expected_values(tokens)
        for pos in range(num_hit):  # a hit must hold exactly this prefix's K/V
            assert self.slots[hits[pos // self.bs], pos % self.bs] == values[pos]
        n = 1 + int(frac * (r.num_tokens - num_hit - 1))
        if self._run(r, n, hits, num_hit):
            self.live[r.request_id] = r

    @precondition(lambda self: self.live)
    @rule(pick=st.integers(0, 10**6), new_tokens=st.lists(st.integers(0, 3), max_size=3), frac=st.floats(0, 1))
    def grow(self, pick: int, new_tokens: list[int], frac: float) -> None:
        r = list(self.live.values())[pick % len(self.live)]
        for t in new_tokens[: self.max_len - r.num_tokens]:
            r.append_output_token(t)
        remaining = r.num_tokens - r.num_computed_tokens
        if remaining:
            self._run(r, 1 + int(frac * (remaining - 1)), [], 0)

    @precondition(lambda self: self.live)
    @rule(pick=st.integers(0, 10**6), extra=st.integers(1, 6))
    def reject_drafts(self, pick: int, extra: int) -> None:
        """Slots for draft tokens past the computed ones, all rejected: the table shrinks back (speculation)."""
        r = list(self.live.values())[pick % len(self.live)]
        extra = min(extra, self.max_len - r.num_computed_tokens)
        before = list(self.kv.block_table(r.request_id))
        if extra and self.kv.allocate_slots(r, extra):
            self.kv.truncate(r.request_id, r.num_computed_tokens)
        assert self.kv.block_table(r.request_id) == before

    @precondition(lambda self: self.live)
    @rule(pick=st.integers(0, 10**6))
    def free(self, pick: int) -> None:
        rid = list(self.live)[pick % len(self.live)]
        del self.live[rid]
        self.kv.free(rid)
        assert self.kv.block_table(rid) == [] and self.pool.reserved_for(rid) == []

    @rule()
    def reset(self) -> None:
        in_use = self.pool.num_free_blocks < self.pool.num_blocks
        assert self.kv.reset_prefix_cache() is not in_use
        if not in_use:
            assert self.pool.num_cached_blocks == 0

    @invariant()
    def consistent(self) -> None:
        self.kv.check_invariants()
        used = sum(1 for r in self.pool.ref_cnt if r > 0)
        assert used + self.kv.num_free_blocks == self.pool.num_blocks
        for r in self.live.values():
            table = self.kv.block_table(r.request_id)
            assert len(table) == -(-r.num_computed_tokens // self.bs)
            values = expected_values(r.all_token_ids)
            for pos in range(r.num_computed_tokens):
                assert self.slots[table[pos // self.bs], pos % self.bs] == values[pos]


KVCacheMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestKVCacheMachine = KVCacheMachine.TestCase
