"""Continuous-batching scheduler: each step hands a token budget to running requests, then waiting ones.

Two classes of requests: real-time ones, and background ones (batch jobs: the Batches API, /v2/jobs), which come
after every real-time request of a step and are admitted only while no real-time request waits. While a real-time
request is waiting or running, background work holds at most `background_max_seqs` seats and `background_max_tokens`
tokens of a step; it gives up seats (and the blocks the real-time head's first chunk needs) to waiting real-time
requests, and is the first victim when a running real-time request needs blocks. With no real-time request present
it uses the whole engine. A background request never preempts a real-time one.

Invariant: an unfinished request is in exactly one of `waiting` (real-time) or `background_waiting` (both holding no
blocks) or `running` (its table covers its computed tokens); finishing, aborting or preempting frees its blocks at
once. `running` holds the running real-time requests in admission order, then the `num_background_running`
background ones in admission order: the newest background request is always the last.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable

from ladle.llm.block_pool import BlockPool
from ladle.llm.kv_cache import KVCacheManager
from ladle.llm.outputs import RequestOutput, SamplerOutput, ScheduledSeq, SchedulerOutput, TokenLogprobs
from ladle.llm.request import Request, RequestStatus

_RUNNING = RequestStatus.RUNNING
_STOPPED = RequestStatus.FINISHED_STOPPED
_LENGTH = RequestStatus.FINISHED_LENGTH


class Scheduler:
    """Schedules tokens, not phases (DESIGN rule 3): a request's next tokens are
    all_token_ids[num_computed_tokens:], so prefill, chunked prefill, prefix hits and decode are one case.
    """

    def __init__(
        self,
        kv: KVCacheManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        enable_chunked_prefill: bool = True,
        long_prefill_token_threshold: int = 0,
        background_max_seqs: int | None = None,
        background_max_tokens: int | None = None,
        background_hold_s: float = 0.0,
        isolate_admissions: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1 or long_prefill_token_threshold < 0:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1, long_prefill_token_threshold >= 0")
        if (background_max_seqs is not None and background_max_seqs < 1) or (
            background_max_tokens is not None and background_max_tokens < 1
        ):
            raise ValueError("background_max_seqs and background_max_tokens must be >= 1 (or None: no cap)")
        if max_model_len > kv.max_model_len:
            raise ValueError(f"max_model_len={max_model_len} exceeds the KV cache manager's {kv.max_model_len}")
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.enable_chunked_prefill = enable_chunked_prefill
        # Caps one request's prefill chunk so a long prompt can't crowd out others' (chunking only).
        self.long_prefill_token_threshold = long_prefill_token_threshold if enable_chunked_prefill else 0
        # what background requests may hold while a real-time request is present (None: no cap)
        self.background_max_seqs = background_max_seqs
        self.background_max_tokens = background_max_tokens
        # the caps stay on this long after the last real-time request left: under a steady trickle of real-time
        # traffic, lifting them in every short gap let background work fill the engine, only to be preempted (and
        # recomputed) at the next arrival, and that arrival waited behind the refill's long prefill step
        self.background_hold_s = background_hold_s
        # a step that admits real-time requests carries no background work: their first token (TTFT) comes as fast
        # as without it (a background step costs the admission step ~1 ms per background sequence on 2 CPU cores)
        self.isolate_admissions = isolate_admissions
        self.clock = clock
        self._real_time_seen = -math.inf
        self.waiting: deque[Request] = deque()  # real-time requests, FCFS
        self.background_waiting: deque[Request] = deque()  # background requests, FCFS
        # real-time requests in admission order, then background ones in admission order: the last is the newest
        self.running: list[Request] = []
        self._num_background_running = 0  # the background requests at the end of `running`
        self._requests: dict[str, Request] = {}  # every unfinished request
        self.num_preemptions_total = 0

    def fresh(self) -> Scheduler:
        """The same limits over a new, empty block pool of the same shape: what an engine restarts from after a
        failed step left this one's bookkeeping in an unknown state."""
        pool = self.kv.pool
        pool = BlockPool(pool.num_blocks, pool.block_size, pool.enable_prefix_caching)
        kv = KVCacheManager(pool, self.kv.max_model_len, self.kv.reserve_ahead)
        return Scheduler(kv, self.max_num_seqs, self.max_num_batched_tokens, self.max_model_len,
                         self.enable_chunked_prefill, self.long_prefill_token_threshold,
                         self.background_max_seqs, self.background_max_tokens, self.background_hold_s,
                         self.isolate_admissions, self.clock)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.background_waiting)

    @property
    def num_background_running(self) -> int:
        return self._num_background_running

    def has_unfinished_requests(self) -> bool:
        return bool(self.running or self.waiting or self.background_waiting)

    def _real_time_present(self) -> bool:
        """A real-time request is waiting or running, or was within the last background_hold_s."""
        if self.waiting or len(self.running) > self._num_background_running:
            if self.background_hold_s:
                self._real_time_seen = self.clock()
            return True
        return bool(self.background_hold_s) and self.clock() - self._real_time_seen < self.background_hold_s

    def add_request(self, request: Request) -> None:
        """Queue a new request (FCFS within its class). Raises ValueError for one this scheduler could never run."""
        rid, n = request.request_id, request.num_tokens
        if rid in self._requests:
            raise ValueError(f"request id {rid!r} is already in use")
        if n > self.max_model_len:
            raise ValueError(f"the prompt has {n} tokens, more than max_model_len={self.max_model_len}")
        if not self.enable_chunked_prefill and n > self.max_num_batched_tokens:
            raise ValueError(
                f"the prompt has {n} tokens, more than max_num_batched_tokens={self.max_num_batched_tokens}, "
                "and chunked prefill is off; enable chunked prefill or raise max_num_batched_tokens"
            )
        request.status = RequestStatus.WAITING
        self._requests[rid] = request
        (self.background_waiting if request.background else self.waiting).append(request)

    def abort_requests(self, request_ids: Iterable[str]) -> list[RequestOutput]:
        """Finish the requests as aborted and free their blocks now; unknown or finished ids are ignored."""
        outputs = []
        for rid in request_ids:
            req = self._requests.get(rid)
            if req is not None:
                self._finish_unscheduled(req, RequestStatus.FINISHED_ABORTED, None)
                outputs.append(self._output(req, [], []))
        return outputs

    def finish_requests(
        self, request_ids: Iterable[str], status: RequestStatus, stop_reason: int | str | None = None
    ) -> None:
        """Finish requests stopped outside the scheduler (e.g. a stop string) and free their blocks."""
        assert status.finished, f"{status.name} is not a finished status"
        for rid in request_ids:
            req = self._requests.get(rid)
            if req is not None:
                self._finish_unscheduled(req, status, stop_reason)

    def _finish_unscheduled(self, req: Request, status: RequestStatus, stop_reason: int | str | None) -> None:
        # Rare (client gone, stop string): O(queue length) removal is fine here.
        if req.status == _RUNNING:
            self.running.remove(req)
            self._num_background_running -= req.background
        else:
            (self.background_waiting if req.background else self.waiting).remove(req)
        self._finish(req, status, stop_reason)

    def _finish(self, req: Request, status: RequestStatus, stop_reason: int | str | None) -> None:
        req.status = status
        req.stop_reason = stop_reason
        self.kv.free(req.request_id)
        del self._requests[req.request_id]

    # ----------------------------------------------------------------- schedule

    def schedule(self) -> SchedulerOutput:
        """Pick this step's tokens: running real-time requests, running background ones, then waiting real-time
        requests (FCFS), then waiting background ones (FCFS, and only once no real-time request is left waiting)."""
        seqs: list[ScheduledSeq] = []
        preempted: list[str] = []
        background = bool(self._num_background_running or self.background_waiting)
        capped = self._real_time_present() and background
        if capped and self.waiting:
            self._make_room(preempted)
        num_seat_preemptions = len(preempted)
        tokens = self.background_max_tokens if capped else None  # background tokens this step may still take
        if capped and self.waiting and self.isolate_admissions:
            tokens = 0
        budget, tokens = self._schedule_running(seqs, preempted, tokens)
        if len(preempted) == num_seat_preemptions:  # blocks are short: admitting now would only preempt again
            budget = self._schedule_waiting(seqs, budget)
            if background and not self.waiting:  # background work never overtakes a waiting real-time request
                budget = self._schedule_background_waiting(seqs, budget, tokens, capped)
        return SchedulerOutput(seqs, self.max_num_batched_tokens - budget, preempted)

    def _make_room(self, preempted: list[str]) -> None:
        """Real-time requests are waiting: running background requests are preempted, newest first, until each
        waiting real-time request has a free seat and the free blocks hold the first chunk of the real-time head
        (done before anything is scheduled: a request scheduled this step must keep its blocks). Background
        requests above background_max_seqs are not preempted for the cap alone: they finish (their work is not
        thrown away), and no new one is admitted until they are under it."""
        running = self.running
        while self._num_background_running and self.max_num_seqs - len(running) < len(self.waiting):
            self._preempt_newest(preempted)
        head = self.waiting[0]
        while self._num_background_running and self._blocks_to_admit(head) > self.kv.num_free_blocks:
            self._preempt_newest(preempted)

    def _blocks_to_admit(self, req: Request) -> int:
        """Free blocks a waiting request's first chunk takes, were the whole step's budget its own: new blocks
        plus the prefix-cache hits sitting in the free queue (as allocate_slots counts them)."""
        hit_blocks, num_hit = self.kv.get_computed_blocks(req)
        n = self._num_new_tokens(req.num_tokens - num_hit, self.max_num_batched_tokens)
        ref_cnt = self.kv.pool.ref_cnt
        revived = sum(1 for b in hit_blocks if ref_cnt[b] == 0)
        return -(-(num_hit + n) // self.kv.block_size) - len(hit_blocks) + revived

    def _schedule_running(
        self, seqs: list[ScheduledSeq], preempted: list[str], background_tokens: int | None
    ) -> tuple[int, int | None]:
        """Running real-time requests, then running background ones within `background_tokens` (None: no cap).
        Returns the budget left and the background tokens left."""
        running = self.running
        # draft tokens never take the budget of a later request's next token: one token is kept back for each
        reserved = len(running) if any(req.spec_token_ids for req in running) else 0
        num_real_time = len(running) - self._num_background_running
        budget, reserved = self._schedule_span(seqs, preempted, 0, num_real_time, self.max_num_batched_tokens, reserved)
        if not self._num_background_running:
            return budget, background_tokens
        # preemptions so far took background requests from the end: they still start at num_real_time
        limit = budget if background_tokens is None or background_tokens > budget else background_tokens
        used = limit - self._schedule_span(seqs, preempted, num_real_time, len(running), limit, reserved)[0]
        return budget - used, None if background_tokens is None else background_tokens - used

    def _schedule_span(
        self, seqs: list[ScheduledSeq], preempted: list[str], i: int, stop: int, budget: int, reserved: int
    ) -> tuple[int, int]:
        """Schedule running[i:stop] in order within `budget` (preemptions shorten `running` from its end). Returns
        the budget left and the tokens still reserved for later requests' next tokens."""
        running = self.running
        while i < stop and i < len(running) and budget > 0:
            req = running[i]
            reserved = max(reserved - 1, 0)
            remaining = req.num_tokens - req.num_computed_tokens
            num_spec = self._num_spec(req, budget - reserved) if req.spec_token_ids and remaining == 1 else 0
            if num_spec and not self.kv.allocate_slots(req, 1 + num_spec):
                num_spec = 0  # drafts are a bet: they never preempt anyone (the plain token may, below)
            n = num_spec + self._num_new_tokens(remaining, budget - num_spec)
            if n:
                if not self._allocate_or_preempt(req, n, preempted):
                    break
                seqs.append(self._scheduled_seq(req, n, num_spec))
                budget -= n
            i += 1
        return budget, reserved

    def _num_spec(self, req: Request, budget: int) -> int:
        """Draft tokens to verify with a decode step: what was proposed, within the budget (the last known token
        comes first), the context window, and the tokens max_tokens still allows (all accepted + 1 must fit)."""
        params = req.sampling_params
        limit = min(budget - 1, self.max_model_len - req.num_tokens, params.max_tokens - req.num_output_tokens - 1)
        return max(0, min(len(req.spec_token_ids), limit))

    def _allocate_or_preempt(self, req: Request, n: int, preempted: list[str]) -> bool:
        """Allocate n slots for req, preempting the newest running requests until they fit; False when
        req itself was the newest and got preempted. Background requests are the last in `running`, so a real-time
        req takes them first, and a background req (one of them) reaches itself before any real-time request."""
        while not self.kv.allocate_slots(req, n):
            if self._preempt_newest(preempted) is req:
                return False
        return True

    def _preempt_newest(self, preempted: list[str]) -> Request:
        victim = self.running.pop()
        self._num_background_running -= victim.background
        self._preempt(victim)
        preempted.append(victim.request_id)
        return victim

    def _preempt(self, req: Request) -> None:
        # Recompute on resumption: all_token_ids (prompt + outputs so far) is prefilled again.
        self.kv.free(req.request_id)
        req.spec_token_ids = []
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions_total += 1
        (self.background_waiting if req.background else self.waiting).appendleft(req)

    def _schedule_waiting(self, seqs: list[ScheduledSeq], budget: int) -> int:
        waiting, running = self.waiting, self.running
        while waiting and budget > 0 and len(running) < self.max_num_seqs:
            n = self._admit_head(waiting, budget)
            if n <= 0:
                break  # FCFS: nobody overtakes the head of the queue
            req = waiting.popleft()
            if self._num_background_running:  # real-time requests stay ahead of the background ones
                running.insert(len(running) - self._num_background_running, req)
            else:
                running.append(req)
            seqs.append(self._scheduled_seq(req, n))
            budget -= n
        return budget

    def _schedule_background_waiting(
        self, seqs: list[ScheduledSeq], budget: int, tokens: int | None, capped: bool
    ) -> int:
        """Admit waiting background requests (FCFS) within `tokens` (None: no cap) and, when `capped`,
        background_max_seqs."""
        waiting, running = self.background_waiting, self.running
        seats = self.max_num_seqs
        if capped and self.background_max_seqs is not None:
            seats = min(seats, len(running) - self._num_background_running + self.background_max_seqs)
        while waiting and budget > 0 and len(running) < seats and (tokens is None or tokens > 0):
            limit = budget if tokens is None or tokens > budget else tokens
            n = self._admit_head(waiting, limit)
            if n <= 0:
                break  # FCFS within the class too
            req = waiting.popleft()
            running.append(req)
            self._num_background_running += 1
            seqs.append(self._scheduled_seq(req, n))
            budget -= n
            if tokens is not None:
                tokens -= n
        return budget

    def _admit_head(self, waiting: deque[Request], budget: int) -> int:
        """Allocate the first chunk of the queue's head within `budget` and mark it running (the caller moves it);
        0 when the budget or the blocks are short."""
        req = waiting[0]
        hit_blocks, num_hit = self.kv.get_computed_blocks(req)
        n = self._num_new_tokens(req.num_tokens - num_hit, budget)
        if not n or not self.kv.allocate_slots(req, n, hit_blocks, num_hit):
            return 0
        if req.status == RequestStatus.WAITING:
            req.num_cached_tokens = num_hit
        req.num_computed_tokens = num_hit
        req.status = _RUNNING
        return n

    def _num_new_tokens(self, remaining: int, budget: int) -> int:
        """Tokens to schedule for a request with `remaining` unfed tokens; 0 means not this step."""
        if self.enable_chunked_prefill:
            threshold = self.long_prefill_token_threshold
            if threshold and remaining > threshold:
                remaining = threshold
            return remaining if remaining <= budget else budget
        if remaining <= budget:
            return remaining
        # Without chunking a prompt waits for a budget it fits in; but a preempted request's prompt plus
        # outputs can outgrow the whole budget, and must then be fed in chunks or it never resumes.
        return budget if remaining > self.max_num_batched_tokens else 0

    def _scheduled_seq(self, req: Request, n: int, num_spec: int = 0) -> ScheduledSeq:
        start = req.num_computed_tokens
        end = start + n - num_spec  # known tokens fed; the draft tokens follow them
        assert req.num_tokens + num_spec <= self.max_model_len, f"{req.request_id}: exceeds max_model_len"
        token_ids = req.all_token_ids[start:end]
        if num_spec:
            token_ids += req.spec_token_ids[:num_spec]
        req.spec_token_ids = []  # drafts are for one step: the drafter proposes afresh
        return ScheduledSeq(
            req.request_id, token_ids, start, list(self.kv.block_table(req.request_id)),
            end == req.num_tokens, _prompt_logits(req, start, end), num_spec,
        )

    # ------------------------------------------------------------------- update

    def update(self, sched: SchedulerOutput, sampled: SamplerOutput) -> list[RequestOutput]:
        """Advance computed tokens, cache full blocks, append sampled tokens and apply stop conditions.

        Rows of `sampled` align with sched.sampled_ids (1 + num_spec rows per seq). Requests finished (or aborted)
        since `sched` was made are skipped. Returns one RequestOutput per request that got tokens or finished.
        """
        outputs: list[RequestOutput] = []
        requests = self._requests
        accepted = sampled.num_accepted
        row = nth = 0
        finished = False
        for seq in sched.seqs:
            r = row
            row += seq.num_rows
            num_accepted = accepted[nth] if accepted is not None and seq.sample else 0
            nth += seq.sample
            req = requests.get(seq.request_id)
            if req is None or req.status != _RUNNING:
                continue
            assert req.num_computed_tokens == seq.start_pos, f"{req.request_id}: update out of step"
            # rejected draft tokens were fed but their K/V is not the request's: they are computed again
            req.num_computed_tokens += len(seq.token_ids) - (seq.num_spec - num_accepted)
            if seq.prompt_logits:
                req.prompt_logprobs.extend(sampled.prompt_logprobs[req.request_id])
            if not seq.sample:
                self.kv.cache_blocks(req, req.num_computed_tokens)
                continue
            output = self._emit(req, sampled, r, num_accepted + 1)
            if seq.num_spec > num_accepted and output.finish_reason is None:
                self.kv.truncate(req.request_id, req.num_tokens)  # roll back the blocks only rejected drafts used
            finished |= output.finish_reason is not None
            outputs.append(output)
        if finished:  # continuous batching: finished requests leave the batch before the next step
            self.running = [req for req in self.running if req.status == _RUNNING]
            if self._num_background_running:
                self._num_background_running = sum(req.background for req in self.running)
        return outputs

    def _emit(self, req: Request, sampled: SamplerOutput, row: int, count: int) -> RequestOutput:
        """Append the request's `count` emitted tokens (rows row, row + 1, ...) up to the first that stops it."""
        tokens = sampled.token_ids[row : row + count]
        status = stop_reason = None
        for i, token in enumerate(tokens):
            req.append_output_token(token)
            if i == count - 1 and req.request_id in sampled.completed:  # structured output whole: nothing follows
                status, stop_reason = _STOPPED, None
            else:
                status, stop_reason = self._check_stop(req, token)
            if status is not None:
                tokens = tokens[: i + 1]
                break
        # accepted drafts are in all_token_ids now; a stop may leave computed tokens past the last one kept
        self.kv.cache_blocks(req, min(req.num_computed_tokens, req.num_tokens))
        if status is not None:
            self._finish(req, status, stop_reason)
        logprobs = sampled.logprobs[row : row + len(tokens)] if sampled.logprobs else [None] * len(tokens)
        return RequestOutput(
            req.request_id, tokens, logprobs,
            status.finish_reason if status is not None else None, stop_reason,
            req.num_prompt_tokens, req.num_cached_tokens,
            req.prompt_logprobs if req.prompt_logprobs and req.num_output_tokens == len(tokens) else None,
        )

    def _check_stop(self, req: Request, token: int) -> tuple[RequestStatus | None, int | None]:
        """Stop token, then EOS, then length. min_tokens means at least that many tokens precede a stop
        or EOS token (the sampler masks them until then, as in vLLM); before that they are ordinary."""
        params = req.sampling_params
        num_output = req.num_output_tokens
        if num_output > params.min_tokens:
            if token in params.stop_token_ids:
                return _STOPPED, token
            if token == req.eos_token_id and not params.ignore_eos:
                return _STOPPED, None
        if num_output >= params.max_tokens or req.num_tokens >= self.max_model_len:
            return _LENGTH, None
        return None, None

    @staticmethod
    def _output(req: Request, token_ids: list[int], logprobs: list[TokenLogprobs | None]) -> RequestOutput:
        return RequestOutput(
            req.request_id, token_ids, logprobs, req.status.finish_reason, req.stop_reason,
            req.num_prompt_tokens, req.num_cached_tokens,
        )


def _prompt_logits(req: Request, start: int, end: int) -> range:
    """Indexes into this step's fed tokens [start, end) whose logits score a prompt token not yet scored.

    Position p scores token p + 1, so positions run up to num_prompt_tokens - 2 (the last prompt position's logits
    pick the first output token instead). A recompute after preemption feeds scored positions again: skipped."""
    if not req.needs_prompt_logprobs:
        return range(0)
    first = max(start, len(req.prompt_logprobs) - 1)
    last = min(end, req.num_prompt_tokens - 1)
    return range(first - start, last - start) if last > first else range(0)
