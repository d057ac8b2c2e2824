"""EngineCore: one engine step is schedule -> execute -> sample -> update, and nothing else.

Invariant: the core is single-threaded (only the engine thread calls it) and owns every
per-request object; a seeded request's draw for its t-th token depends only on (seed, t) (sampler.token_seed), so
its tokens do not depend on what else shares the batch. Deadlines are checked between steps, never inside one.
"""

from __future__ import annotations

import heapq
import itertools
import time
from dataclasses import replace
from typing import Any

import torch

from ladle.llm.outputs import RequestOutput, SamplerOutput, SchedulerOutput
from ladle.llm.request import Request, RequestStatus
from ladle.llm.runner import ModelRunner
from ladle.llm.sampler import PromptScoring, SamplingMetadata, SamplingRow, sample, token_seed
from ladle.llm.scheduler import Scheduler
from ladle.llm.structured import StructuredOutputs


class EngineCore:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, structured: StructuredOutputs | None = None) -> None:
        self.runner = runner
        self.scheduler = scheduler
        self.structured = structured
        self.requests: dict[str, Request] = {}
        self.seeds: dict[str, int] = {}
        self._row_generators: list[torch.Generator] = []  # one per logits row, re-seeded for the row's token
        self.first_scheduled: dict[str, float] = {}  # request id -> when its first step began (queue time)
        self.started: list[str] = []  # requests first scheduled since the caller last took this list
        self.last_step_tokens = 0
        # (deadline, tie-breaker, request): a min-heap, so the check per step is one comparison with its head
        self._deadlines: list[tuple[float, int, Request]] = []
        self._ties = itertools.count()

    def add_request(self, request: Request, matcher: Any = None, deadline: float | None = None) -> None:
        """Queue a request; `matcher` (from structured.compile) constrains its output; past `deadline`
        (time.monotonic()) `expire` finishes it."""
        self.scheduler.add_request(request)
        self.requests[request.request_id] = request
        if matcher is not None:
            if self.structured is None:
                raise ValueError("this engine was built without structured output support")
            self.structured.add(request.request_id, matcher)
        if request.sampling_params.seed is not None:
            self.seeds[request.request_id] = request.sampling_params.seed
        if deadline is not None:
            heapq.heappush(self._deadlines, (deadline, next(self._ties), request))
            if len(self._deadlines) > 2 * len(self.requests) + 64:
                # entries of requests that finished early stay until due: drop them now and then (amortized O(1))
                self._deadlines = [e for e in self._deadlines if self.requests.get(e[2].request_id) is e[2]]
                heapq.heapify(self._deadlines)

    def expire(self, now: float) -> list[RequestOutput]:
        """Finish the requests whose deadline has passed, waiting or running, and free their blocks now; their
        outputs have finish_reason "timeout". One comparison when none is due: it runs at every step boundary."""
        heap = self._deadlines
        if not heap or heap[0][0] > now:
            return []
        expired: list[Request] = []
        while heap and heap[0][0] <= now:
            request = heapq.heappop(heap)[2]
            if self.requests.get(request.request_id) is request:  # else it already finished
                expired.append(request)
        self.scheduler.finish_requests([r.request_id for r in expired], RequestStatus.FINISHED_TIMEOUT)
        for request in expired:
            self._drop(request.request_id)
        return [RequestOutput(r.request_id, [], [], "timeout", None, r.num_prompt_tokens, r.num_cached_tokens)
                for r in expired]

    def abort(self, request_ids: list[str]) -> list[RequestOutput]:
        outputs = self.scheduler.abort_requests([r for r in request_ids if r in self.requests])
        self._forget(outputs)
        return outputs

    def finish(self, request_ids: list[str], stop_reason: dict[str, str]) -> None:
        """Finish requests the output processor stopped (a stop string): free their blocks now."""
        for request_id in request_ids:
            self.scheduler.finish_requests([request_id], RequestStatus.FINISHED_STOPPED, stop_reason.get(request_id))
            self._drop(request_id)

    def restart(self) -> list[str]:
        """After a step raised: forget every request (their ids are returned, to be failed) and continue from an
        empty scheduler and block pool. The KV tensors are reused as they are: no block is owned any more, so
        their contents are never read before being written again (the prefix cache starts empty)."""
        failed = list(self.requests)
        self.scheduler = self.scheduler.fresh()
        for request_id in failed:
            self._drop(request_id)
        self.first_scheduled.clear()
        self.started.clear()
        self._deadlines.clear()
        return failed

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        self._propose()
        sched = self.scheduler.schedule()
        if sched.empty:
            return []
        self._note_first_schedule(sched)
        self.last_step_tokens = sched.num_batched_tokens
        logits = self.runner.execute(sched)
        sampled = self._sample(logits, sched)
        outputs = self.scheduler.update(sched, sampled)
        self._forget(outputs)
        return outputs

    def _propose(self) -> None:
        """Before scheduling: speculative decoding's drafts (spec/engine.py); nothing for plain decoding."""

    def _sample(self, logits: torch.Tensor, sched: SchedulerOutput) -> SamplerOutput:
        """Sample the step's rows; structured requests are masked to their grammar and advance it."""
        constrained = self.structured is not None and bool(self.structured.matchers)
        allowed = self.structured.bitmask(sched.sampled_ids) if constrained else None
        sampled = sample(logits, self._sampling_metadata(sched, allowed))
        if constrained and (complete := self.structured.accept(sched.sampled_ids, sampled.token_ids)):
            sampled = replace(sampled, completed=complete)
        return sampled

    def _sampling_metadata(self, sched: SchedulerOutput, allowed: tuple[torch.Tensor, torch.Tensor] | None = None
                           ) -> SamplingMetadata:
        return SamplingMetadata.build(self._sampling_rows(sched), self.runner.device, self._prompt_scoring(sched),
                                      allowed)

    def _sampling_rows(self, sched: SchedulerOutput) -> list[SamplingRow]:
        """One row per logits row: a seq with draft tokens gets one per verified position, each seeing the drafts
        before it as output."""
        rows: list[SamplingRow] = []
        for seq in sched.seqs:
            if not seq.sample:
                continue
            request = self.requests[seq.request_id]
            seed = self.seeds.get(seq.request_id)
            drafts = seq.spec_token_ids
            for j in range(seq.num_rows):
                generator = None if seed is None else self.row_generator(len(rows), token_seed(
                    seed, request.num_output_tokens + j))
                rows.append(SamplingRow(request.sampling_params, request.prompt_token_ids, request.output_token_ids,
                                        generator, request.eos_token_id, drafts[:j]))
        return rows

    def row_generator(self, row: int, seed: int) -> torch.Generator:
        """The generator of logits row `row` this step, seeded with `seed` (generators are reused across steps)."""
        pool = self._row_generators
        while len(pool) <= row:
            pool.append(torch.Generator(device=self.runner.device))
        generator = pool[row]
        generator.manual_seed(seed)
        return generator

    def _prompt_scoring(self, sched: SchedulerOutput) -> PromptScoring | None:
        """Which prompt token each scored position predicts (the one after it)."""
        scored = sched.scored_prompts
        if not scored:
            return None
        targets: list[int] = []
        for seq in scored:
            prompt = self.requests[seq.request_id].prompt_token_ids
            first = seq.start_pos + seq.prompt_logits.start + 1
            targets += prompt[first : first + len(seq.prompt_logits)]
        return PromptScoring(
            tuple(s.request_id for s in scored), tuple(len(s.prompt_logits) for s in scored),
            tuple(self.requests[s.request_id].sampling_params.prompt_logprobs or 0 for s in scored),
            torch.tensor(targets, dtype=torch.long, device=self.runner.device),
        )

    def _note_first_schedule(self, sched: SchedulerOutput) -> None:
        now = time.monotonic()
        first = self.first_scheduled
        for seq in sched.seqs:
            if seq.request_id not in first:
                first[seq.request_id] = now
                self.started.append(seq.request_id)

    def _forget(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            if output.finish_reason is not None:
                self._drop(output.request_id)

    def _drop(self, request_id: str) -> None:
        self.requests.pop(request_id, None)
        self.seeds.pop(request_id, None)
        if self.structured is not None:
            self.structured.remove(request_id)
