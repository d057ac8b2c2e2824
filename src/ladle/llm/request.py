"""One generation request as the engine tracks it: tokens so far, how many have KV computed, status.

Invariant: `all_token_ids == prompt_token_ids + output_token_ids` and
`0 <= num_computed_tokens <= num_tokens`. Only the scheduler moves status and num_computed_tokens.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import Any

from ladle.llm.outputs import TokenLogprobs
from ladle.llm.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3  # EOS, a stop token or a stop string
    FINISHED_LENGTH = 4  # max_tokens or the context window
    FINISHED_ABORTED = 5  # client went away or was cancelled
    FINISHED_TIMEOUT = 6  # its deadline passed (queued or running)

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return {3: "stop", 4: "length", 5: "abort", 6: "timeout"}.get(int(self))


@dataclass(frozen=True)
class SequenceSpec:
    """One engine request as the API asks for it: its id, prompt, sampling params, (structured output only)
    matcher, which holds the grammar's state and so is never shared between sequences, and whether it is
    batch-job work (`background`: the lowest priority, capped while real-time requests wait)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    matcher: Any = None
    background: bool = False


class Request:
    __slots__ = (
        "all_token_ids", "arrival_time", "background", "eos_token_id", "num_cached_tokens", "num_computed_tokens",
        "num_preemptions", "output_token_ids", "prompt_logprobs", "prompt_token_ids", "request_id",
        "sampling_params", "spec_token_ids", "status", "stop_reason",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_id: int | None = None,
        arrival_time: float | None = None,
        background: bool = False,
    ) -> None:
        if not prompt_token_ids:
            raise ValueError("a request needs at least one prompt token")
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_id = eos_token_id
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        # batch-job work (Batches API, /v2/jobs): scheduled after real-time requests, within caps while they wait
        self.background = background
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache at first schedule
        self.num_preemptions = 0
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None  # the stop token id or stop string that ended it
        # speculative decoding: draft tokens proposed for the next step (the scheduler feeds them after the last
        # known token, and the target model verifies them); empty without speculation
        self.spec_token_ids: list[int] = []
        # prompt_logprobs[i] scores prompt token i; it grows as prefill chunks run (token 0 has nothing before it)
        self.prompt_logprobs: list[TokenLogprobs | None] = [None] if sampling_params.prompt_logprobs is not None else []

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Prompt logprobs asked for and not all scored yet: its prompt must be computed, not served from cache."""
        return 0 < len(self.prompt_logprobs) < len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens})"
        )
