"""The n-gram drafter: prompt lookup (spec/ngram.py) for every decoding request, sized by the policy.

Invariant: a lookup costs no model time, so a request the policy gives no drafts still has its proposal checked
against the token it then emits: its acceptance estimate keeps learning, and speculation resumes when text starts
being copied again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ladle.llm.outputs import SamplerOutput, SchedulerOutput
from ladle.llm.request import Request
from ladle.llm.sampler import SamplingMetadata
from ladle.llm.spec.ngram import NgramProposer

if TYPE_CHECKING:
    from ladle.llm.spec.engine import SpecEngineCore


class NgramDrafter:
    def __init__(self, ngram_min: int, ngram_max: int) -> None:
        self.proposer = NgramProposer(ngram_min, ngram_max)
        # request id -> (proposal not verified, num_tokens when proposed): scored once the next token is known
        self._shadow: dict[str, tuple[list[int], int]] = {}

    def propose(self, core: SpecEngineCore, decoding: list[Request], extra_tokens: int) -> None:
        proposals: dict[str, list[int]] = {}
        for request in decoding:
            self._score_shadow(core, request)
            limit = core.max_drafts(request)
            drafts = self.proposer.propose(request.request_id, request.all_token_ids, limit) if limit else []
            proposals[request.request_id] = core.cut_to_grammar(request, drafts)
        chosen = core.policy.choose(len(decoding), {rid: len(p) for rid, p in proposals.items()}, extra_tokens)
        for request in decoding:
            drafts = proposals[request.request_id]
            k = chosen.get(request.request_id, 0)
            request.spec_token_ids = drafts[:k]
            if drafts and k == 0:
                self._shadow[request.request_id] = (drafts, request.num_tokens)

    def _score_shadow(self, core: SpecEngineCore, request: Request) -> None:
        entry = self._shadow.pop(request.request_id, None)
        if entry is None:
            return
        drafts, num_tokens = entry
        emitted = request.all_token_ids[num_tokens : num_tokens + len(drafts)]
        accepted = 0
        while accepted < len(emitted) and emitted[accepted] == drafts[accepted]:
            accepted += 1
        core.policy.observe(request.request_id, len(emitted), accepted)

    def verify(self, core: SpecEngineCore, logits: torch.Tensor, meta: SamplingMetadata, sched: SchedulerOutput,
               sampled: SamplerOutput) -> SamplerOutput:
        return sampled  # n-gram drafts are one-hot proposals: the engine's sample-and-compare is exact for them

    def remove(self, request_id: str) -> None:
        self.proposer.remove(request_id)
        self._shadow.pop(request_id, None)

    def clear(self) -> None:
        self.proposer.clear()
        self._shadow.clear()
