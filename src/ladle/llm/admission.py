"""Admission into one LLM engine's waiting queue, bounded by sequences and by queued prompt tokens.

Invariant: only the event loop touches a WaitingBudget, so admission is exact without locks: its counts are the
sequences admitted and not yet seen to leave the waiting state (first scheduled, finished or aborted), and a
request's sequences are admitted all together or not at all.
"""

from __future__ import annotations

from ladle.errors import InvalidInput, QueueFull


class WaitingBudget:
    def __init__(self, model: str, max_sequences: int, max_tokens: int) -> None:
        self.model = model
        self.max_sequences = max_sequences
        self.max_tokens = max_tokens
        self.sequences = 0
        self.tokens = 0
        self._pending: dict[str, int] = {}  # request id -> prompt tokens it counts while waiting

    def admit(self, sequences: list[tuple[str, int]], prompt_param: str = "prompt") -> None:
        """Count every (request id, prompt tokens) as waiting, or raise without counting any: a 400 for a request
        that could never fit, a 503 (QueueFull, Retry-After) when the queue is too full for it now."""
        count, tokens = len(sequences), sum(n for _, n in sequences)
        if count > self.max_sequences:
            raise InvalidInput(f"the request starts {count} sequences, but at most {self.max_sequences} may wait "
                               f"for model {self.model}; lower n or send fewer prompts", param="n")
        if tokens > self.max_tokens:
            raise InvalidInput(f"the request queues {tokens} prompt tokens (prompts x n), but at most "
                               f"{self.max_tokens} may wait for model {self.model}; shorten the prompt or lower n",
                               param=prompt_param)
        if self.sequences + count > self.max_sequences or self.tokens + tokens > self.max_tokens:
            raise QueueFull(f"model {self.model} is at capacity ({self.sequences} sequences and {self.tokens} "
                            "prompt tokens waiting); retry later")
        pending = self._pending
        for request_id, n in sequences:
            pending[request_id] = n
        self.sequences += count
        self.tokens += tokens

    def precheck(self, count: int) -> None:
        """Refuse at once (503) when `count` more sequences cannot wait now, before the request is tokenized: under
        overload most requests are refused, and each should cost as little as possible. admit() stays exact."""
        if count <= self.max_sequences and (self.sequences + count > self.max_sequences
                                            or self.tokens >= self.max_tokens):
            raise QueueFull(f"model {self.model} is at capacity ({self.sequences} sequences and {self.tokens} "
                            "prompt tokens waiting); retry later")

    def release(self, request_id: str) -> None:
        """The request left the waiting state (or never will run); releasing twice is harmless."""
        tokens = self._pending.pop(request_id, None)
        if tokens is not None:
            self.sequences -= 1
            self.tokens -= tokens
