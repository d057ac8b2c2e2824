"""The typed contracts between the engine's stages: what the scheduler asks to run, what comes out.

Scheduler -> runner: SchedulerOutput (plain ints and lists, no tensors).
Engine -> API: RequestOutput per request per step (new token ids and, when done, why).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ScheduledSeq:
    """One request's share of a step: feed `token_ids` at positions start_pos, start_pos+1, ...

    `block_ids` is the request's whole block table after this step's allocation (enough blocks
    for start_pos + len(token_ids) tokens). `sample` is true when the last fed token is the last
    known token of the request, so its logits pick the next token; false for a prefill chunk that
    does not yet reach the end of the prompt. `prompt_logits` indexes the fed tokens whose logits
    score the next prompt token (prompt logprobs); empty for nearly every request. The last `num_spec` fed tokens
    are draft tokens (speculative decoding) to verify: a sampled seq then gets 1 + num_spec logits rows.
    """

    request_id: str
    token_ids: list[int]
    start_pos: int
    block_ids: list[int]
    sample: bool
    prompt_logits: range = range(0)
    num_spec: int = 0

    @property
    def num_rows(self) -> int:
        """Logits rows this seq gets in the sampled part of the step's logits."""
        return 1 + self.num_spec if self.sample else 0

    @property
    def spec_token_ids(self) -> list[int]:
        return self.token_ids[len(self.token_ids) - self.num_spec:] if self.num_spec else []

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def context_len(self) -> int:
        """Tokens in the KV cache once this step has run."""
        return self.start_pos + len(self.token_ids)


@dataclass(frozen=True)
class SchedulerOutput:
    """Everything one engine step runs, in the scheduler's order (the runner may regroup
    internally, but returns logits rows in `sampled_ids` order, 1 + num_spec rows per sampled seq, then the
    `prompt_logits` rows of each seq in seq order)."""

    seqs: list[ScheduledSeq]
    num_batched_tokens: int
    preempted_ids: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.seqs

    @property
    def sampled_ids(self) -> list[str]:
        """Request ids whose logits the runner returns, in row order."""
        return [s.request_id for s in self.seqs if s.sample]

    @property
    def num_spec_tokens(self) -> int:
        return sum(s.num_spec for s in self.seqs)

    @property
    def scored_prompts(self) -> list[ScheduledSeq]:
        """Seqs whose prompt positions get logits (rows after the sampled ones), in row order."""
        return [s for s in self.seqs if s.prompt_logits]


@dataclass(frozen=True)
class TokenLogprobs:
    """Logprob of the sampled token, and the top-k alternatives (token id, logprob), best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass(frozen=True)
class SamplerOutput:
    """One token per sampled logits row, in SchedulerOutput.sampled_ids order (1 + num_spec rows per seq); prompt
    logprobs by request id, one entry per scored prompt position (the logprob of the prompt token that follows it).

    Speculative decoding: `num_accepted[i]` is how many draft tokens of the i-th sampled seq were accepted, and its
    rows' first num_accepted + 1 tokens are what it emits (the accepted drafts, then the target's own token).
    """

    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    completed: frozenset[str] = frozenset()  # requests whose structured output this step completed
    num_accepted: list[int] | None = None  # per sampled seq; None: no seq carried draft tokens


@dataclass
class RequestOutput:
    """What one step produced for one request, as token ids (the output processor detokenizes)."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs | None]
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    # with the first token, when asked: one entry per prompt token, None for the first (nothing precedes it)
    prompt_logprobs: list[TokenLogprobs | None] | None = None
