"""Test harness for the scheduler: a fake runner + greedy sampler over a simulated paged KV store, the
single-request reference it must agree with, and an engine loop that drives a Scheduler to completion."""

from __future__ import annotations

from dataclasses import dataclass, field

from ladle.llm.kv_cache import BlockPool, KVCacheManager
from ladle.llm.outputs import RequestOutput, SamplerOutput, SchedulerOutput, TokenLogprobs
from ladle.llm.request import Request, RequestStatus
from ladle.llm.sampling_params import SamplingParams
from ladle.llm.scheduler import Scheduler

VOCAB = 32
EOS = 31
SEED = 3


def kv_value(prev: int, token: int) -> int:
    """Simulated K/V at a position: a function of the whole prefix, as real K/V is."""
    return hash((prev, token))


def next_token(value: int) -> int:
    return value % VOCAB


def make(num_blocks: int = 16, block_size: int = 4, max_model_len: int = 64, caching: bool = True, **kw) -> Scheduler:
    kv = KVCacheManager(BlockPool(num_blocks, block_size, enable_prefix_caching=caching), max_model_len)
    kw.setdefault("max_num_seqs", 8)
    kw.setdefault("max_num_batched_tokens", 64)
    return Scheduler(kv, max_model_len=max_model_len, **kw)


def req(rid: str, tokens, eos: int | None = EOS, **params) -> Request:
    return Request(rid, list(tokens), SamplingParams(**params), eos_token_id=eos)


def shape(out: SchedulerOutput) -> list[tuple[str, int, int, bool]]:
    return [(s.request_id, s.start_pos, s.num_tokens, s.sample) for s in out.seqs]


def step(s: Scheduler, tokens: dict[str, int] | None = None, default: int = 1):
    """One engine step with chosen sampled tokens; returns (schedule, outputs by request id)."""
    out = s.schedule()
    ids = out.sampled_ids
    sampled = SamplerOutput([(tokens or {}).get(i, default) for i in ids], [None] * len(ids))
    s.kv.check_invariants()
    return out, {o.request_id: o for o in s.update(out, sampled)}


class FakeModel:
    """Runner + greedy sampler over a simulated paged KV store. Every step it checks that the K/V it
    reads through the block table is exactly the request's true prefix, that it only writes blocks the
    request owns alone, and it derives the next token from what it read."""

    def __init__(self, sched: Scheduler, requests: dict[str, Request]) -> None:
        self.sched, self.requests = sched, requests
        self.bs = sched.kv.block_size
        self.store: dict[tuple[int, int], int] = {}

    def __call__(self, out: SchedulerOutput) -> SamplerOutput:
        s = self.sched
        assert out.num_batched_tokens == sum(q.num_tokens for q in out.seqs) <= s.max_num_batched_tokens
        assert len(out.seqs) <= s.max_num_seqs and len({q.request_id for q in out.seqs}) == len(out.seqs)
        sampled, prompt = [], {}
        for q in out.seqs:
            r = self.requests[q.request_id]
            assert q.token_ids == r.all_token_ids[q.start_pos : q.context_len] and q.num_tokens > 0
            assert len(q.block_ids) == -(-q.context_len // self.bs) and q.context_len <= s.max_model_len
            assert q.sample == (q.context_len == r.num_tokens)
            v = self._read(q.block_ids, r.all_token_ids[: q.start_pos])
            for pos in range(q.start_pos, q.context_len):
                v = kv_value(v, r.all_token_ids[pos])
                block = q.block_ids[pos // self.bs]
                assert s.kv.pool.ref_cnt[block] == 1, "writing K/V into a shared block"
                self.store[block, pos % self.bs] = v
            if q.sample:
                sampled.append(next_token(v))
            if q.prompt_logits:
                prompt[q.request_id] = self._score(r, q)
        assert len(sampled) == len(out.sampled_ids)
        return SamplerOutput(sampled, [TokenLogprobs(t, -1.0, []) for t in sampled], prompt)

    @staticmethod
    def _score(r: Request, q) -> list[TokenLogprobs]:
        """Prompt logprobs whose value is the scoring position, so a test sees each scored exactly once."""
        assert r.sampling_params.prompt_logprobs is not None and q.prompt_logits.start >= 0
        assert q.prompt_logits.stop <= q.num_tokens and q.start_pos + q.prompt_logits.stop < r.num_prompt_tokens
        positions = [q.start_pos + i for i in q.prompt_logits]
        return [TokenLogprobs(r.prompt_token_ids[p + 1], float(p), []) for p in positions]

    def _read(self, block_ids: list[int], prefix: list[int]) -> int:
        v = SEED
        for pos, t in enumerate(prefix):
            v = kv_value(v, t)
            assert self.store[block_ids[pos // self.bs], pos % self.bs] == v, "stale K/V read"
        return v


def reference(prompt: list[int], params: SamplingParams, max_model_len: int) -> tuple[list[int], str, int | None]:
    """What the fake model generates for one request on its own: tokens, finish_reason, stop_reason."""
    v = SEED
    for t in prompt:
        v = kv_value(v, t)
    out: list[int] = []
    while True:
        t = next_token(v)
        out.append(t)
        if len(out) > params.min_tokens and t in params.stop_token_ids:
            return out, "stop", t
        if len(out) > params.min_tokens and t == EOS and not params.ignore_eos:
            return out, "stop", None
        if len(out) >= params.max_tokens or len(prompt) + len(out) >= max_model_len:
            return out, "length", None
        v = kv_value(v, t)


@dataclass
class Result:
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    prompt_logprobs: list | None = None


def drive(
    s: Scheduler,
    arrivals: dict[int, list[Request]],
    aborts: dict[int, list[str]] | None = None,
    mid_aborts: dict[int, list[str]] | None = None,
    max_steps: int = 5000,
) -> dict[str, Result]:
    """Run the engine loop until everything has arrived and finished. `aborts` land before a step's
    schedule(), `mid_aborts` between its schedule() and update()."""
    aborts, mid_aborts = aborts or {}, mid_aborts or {}
    requests: dict[str, Request] = {}
    results: dict[str, Result] = {}
    model = FakeModel(s, requests)
    last_arrival = max(arrivals, default=0)
    for n in range(max_steps):
        for r in arrivals.get(n, []):
            requests[r.request_id] = r
            results[r.request_id] = Result()
            s.add_request(r)
        record(results, s.abort_requests(aborts.get(n, [])))
        if not s.has_unfinished_requests():
            if n >= last_arrival:
                return results
            continue
        out = s.schedule()
        assert not out.empty, "no progress with unfinished requests"
        sampled = model(out)
        record(results, s.abort_requests(mid_aborts.get(n, [])))
        record(results, s.update(out, sampled))
        s.kv.check_invariants()
        assert all(r.status == RequestStatus.RUNNING for r in s.running)
    raise AssertionError(f"not finished after {max_steps} steps")


def record(results: dict[str, Result], outputs: list[RequestOutput]) -> None:
    for o in outputs:
        res = results[o.request_id]
        assert res.finish_reason is None, f"{o.request_id} got output after finishing"
        assert len(o.new_token_ids) == len(o.new_logprobs)
        res.tokens += o.new_token_ids
        if o.prompt_logprobs is not None:
            assert res.prompt_logprobs is None, f"{o.request_id}: prompt logprobs sent twice"
            res.prompt_logprobs = list(o.prompt_logprobs)
        res.finish_reason, res.stop_reason, res.num_cached_tokens = o.finish_reason, o.stop_reason, o.num_cached_tokens
