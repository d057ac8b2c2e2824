"""The speculative engine step: propose -> schedule -> execute -> verify -> update (EngineCore.step, with
`_propose` filled in and `_sample` verifying). A drafter puts draft tokens on
decoding requests, the scheduler feeds them after each request's last token, the target model scores every position
in one forward pass, and verification keeps the longest prefix the target agrees with, plus one token of its own.

Invariant: the emitted tokens are distributed exactly as without speculation (greedy: identical). For a proposal
made without a draft distribution (n-gram, or a draft model's greedy guess), each verified position samples its
token as a normal step would (its own seeded draw, its grammar state after the drafts before it) and a draft token is
accepted iff it equals that sample: accept with probability p(d), otherwise a token from p without d, which is
rejection sampling with a one-hot q. Draft-model samples (q not one-hot) go through spec/rejection.py.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Protocol

import torch

from ladle.llm.engine import EngineCore
from ladle.llm.outputs import SamplerOutput, SchedulerOutput
from ladle.llm.request import Request
from ladle.llm.sampler import SamplingMetadata, sample
from ladle.llm.spec.policy import SpecPolicy, SpecStats

if TYPE_CHECKING:
    from ladle.llm.runner import ModelRunner
    from ladle.llm.scheduler import Scheduler
    from ladle.llm.structured import StructuredOutputs


class Drafter(Protocol):
    """Puts this step's draft tokens on decoding requests (request.spec_token_ids)."""

    def propose(self, core: SpecEngineCore, decoding: list[Request], extra_tokens: int) -> None: ...

    def verify(self, core: SpecEngineCore, logits: torch.Tensor, meta: SamplingMetadata, sched: SchedulerOutput,
               sampled: SamplerOutput) -> SamplerOutput:
        """Replace the sampled tokens of seqs whose drafts were sampled from a draft distribution (rejection
        sampling); the others are left as sampled."""
        ...

    def remove(self, request_id: str) -> None: ...

    def clear(self) -> None: ...


class SpecEngineCore(EngineCore):
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, structured: StructuredOutputs | None,
                 drafter: Drafter, policy: SpecPolicy, stats: SpecStats) -> None:
        super().__init__(runner, scheduler, structured)
        self.drafter, self.policy, self.stats = drafter, policy, stats

    def _propose(self) -> None:
        decoding: list[Request] = []
        extra = 0  # prefill tokens running requests still need: the step's size without drafts
        for request in self.scheduler.running:
            remaining = request.num_tokens - request.num_computed_tokens
            if remaining == 1:
                decoding.append(request)
            else:
                extra += remaining
        if decoding:
            self.drafter.propose(self, decoding, min(extra, self.scheduler.max_num_batched_tokens))

    def max_drafts(self, request: Request) -> int:
        """The most draft tokens worth proposing for a request (the scheduler enforces the same limits)."""
        params = request.sampling_params
        return max(0, min(self.policy.max_tokens, params.max_tokens - request.num_output_tokens - 1,
                          self.scheduler.max_model_len - request.num_tokens))

    def cut_to_grammar(self, request: Request, drafts: list[int]) -> list[int]:
        """Structured output: drop the drafts from the first one the request's grammar forbids."""
        if self.structured is None or not drafts or request.request_id not in self.structured.matchers:
            return drafts
        return drafts[: self.structured.valid_prefix(request.request_id, drafts)]

    def _sample(self, logits: torch.Tensor, sched: SchedulerOutput) -> SamplerOutput:
        """Sample every verified position, then accept each seq's drafts up to the first that differs from its
        position's sample; structured requests are masked per position and advanced over what is emitted."""
        structured = self.structured
        constrained = structured is not None and bool(structured.matchers)
        sampled_seqs = [seq for seq in sched.seqs if seq.sample]
        allowed = None
        if constrained:
            allowed = structured.bitmask_spec([(seq.request_id, seq.spec_token_ids) for seq in sampled_seqs])
        meta = self._sampling_metadata(sched, allowed)
        sampled = self.drafter.verify(self, logits, meta, sched, sample(logits, meta))
        tokens = sampled.token_ids
        num_accepted: list[int] = []
        completed: list[str] = []
        row = 0
        for seq in sampled_seqs:
            drafts = seq.spec_token_ids
            accepted = 0
            while accepted < len(drafts) and tokens[row + accepted] == drafts[accepted]:
                accepted += 1
            if constrained and (done := structured.accept_tokens(seq.request_id, tokens[row : row + accepted + 1])):
                accepted = done - 1
                completed.append(seq.request_id)
            if drafts:
                self.stats.record(len(drafts), accepted)
                self.policy.observe(seq.request_id, len(drafts), accepted)
            num_accepted.append(accepted)
            row += seq.num_rows
        return replace(sampled, num_accepted=num_accepted, completed=frozenset(completed))

    def restart(self) -> list[str]:
        self.drafter.clear()
        return super().restart()

    def _drop(self, request_id: str) -> None:
        super()._drop(request_id)
        self.drafter.remove(request_id)
        self.policy.remove(request_id)
