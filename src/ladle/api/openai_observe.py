"""What one OpenAI generation call leaves besides its answer: its trace (the SERVER span with `tokenize`, `queue`,
`first_token` and `generation` children) and its version's Triton statistics (success or fail, with its duration).

Invariant: `finish` runs once per call — when the handler returns a JSON answer or raises, or when a stream ends.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ladle.api import tracing
from ladle.api.body import ClientDisconnected

if TYPE_CHECKING:
    from ladle.api.openai_generation import Generation
    from ladle.serving.versions import ModelVersion


class Observation:
    __slots__ = ("done", "gen", "mv", "span", "started")

    def __init__(self, span: Any) -> None:
        self.span = span  # None while tracing is off
        self.started = time.monotonic()
        self.mv: ModelVersion | None = None
        self.gen: Generation | None = None
        self.done = False

    def routed(self, mv: ModelVersion) -> None:
        self.mv = mv
        if self.span is not None:
            self.span.set_attributes({"ladle.model": mv.name, "ladle.version": str(mv.version)})

    def tokenized(self, started: float, tokens: int) -> None:
        """The prompt became token ids between `started` and now (template, tokenizer; off the event loop)."""
        if self.span is not None:
            tracing.child(self.span, "tokenize", started, time.monotonic(), {"ladle.prompt_tokens": tokens})

    def finish(self, exc: BaseException | None = None) -> None:
        """A JSON answer (exc None), or what the call raised. A client that went away is neither success nor fail."""
        if self.done:
            return
        self.done = True
        gone = isinstance(exc, ClientDisconnected)
        if self.mv is not None and not gone:
            now = time.monotonic()
            self.mv.metrics.stats.request(exc is None, now - self.started, now)
        if self.span is None:
            return
        if self.gen is not None:
            self.gen.trace(self.span)
        if gone:
            tracing.set_outcome(self.span, "cancelled")
            exc = None
        tracing.end_span(self.span, exc)

    def finish_stream(self) -> None:
        """A stream ended: a success when every choice finished, else it broke off (an error event or the client
        left) and counts as a failure."""
        complete = self.gen is not None and all(c.finish_reason is not None for c in self.gen.choices)
        if not complete and self.span is not None:
            tracing.set_outcome(self.span, "incomplete")
        if complete or self.mv is None:
            self.finish()
            return
        now = time.monotonic()
        self.mv.metrics.stats.request(False, now - self.started, now)
        self.mv = None  # counted
        self.finish()
