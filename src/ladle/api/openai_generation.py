"""The engine requests behind one OpenAI API call (`Generation`): admitted all at once before anything is sent,
merged into one stream of deltas, aborted together — shared by the API handlers and shadow replays."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from ladle.api import tracing
from ladle.api.openai_format import Choice, usage
from ladle.api.openai_protocol import ChatCompletionRequest, CompletionRequest
from ladle.api.sse import merge
from ladle.errors import DeadlineExceeded, ModelError
from ladle.llm.output_processor import StreamDelta
from ladle.llm.request import SequenceSpec
from ladle.llm.sampling_params import SamplingParams

if TYPE_CHECKING:  # the engine pulls in torch; a server without LLMs never imports it
    from ladle.llm.async_engine import AsyncEngine, RequestStream

#: sequences a request fans out into on the event loop; more (a raised max_sequences_per_request) on a thread
FAN_OUT_ON_LOOP = 256


class Generation:
    """The engine requests behind one API call: choice i of prompt p is stream p * n + i.
    Built with `start`, which admits them all (or none); `close` aborts those not finished."""

    def __init__(self, engine: AsyncEngine, prompts: list[list[int]], params: SamplingParams) -> None:
        engine.check_token_ids(params)
        self.engine, self.prompts, self.n = engine, prompts, params.n
        self.id = uuid.uuid4().hex
        self.created = int(time.time())
        self.streams: list[RequestStream] = []
        self.choices: list[Choice] = []
        self.cached_tokens = 0
        # time.monotonic() readings for the request's trace: admitted, first step, first token here, last delta
        self.submitted_at = 0.0
        self.scheduled_at: float | None = None
        self.first_token_at: float | None = None
        self.finished_at: float | None = None

    @classmethod
    async def start(cls, engine: AsyncEngine, prompts: list[list[int]], params: SamplingParams, matcher: Any,
                    deadline_at: float | None, prompt_param: str, background: bool = False) -> Generation:
        """Admit every sequence before anything is sent: a refusal raises here (a status code, not an event)."""
        gen = cls(engine, prompts, params)
        if len(prompts) * params.n <= FAN_OUT_ON_LOOP:
            specs = gen._specs(params, matcher, background)
        else:
            specs = await asyncio.to_thread(gen._specs, params, matcher, background)
        gen.submitted_at = time.monotonic()
        gen.streams = engine.submit(specs, deadline_at, prompt_param)
        gen.choices = [Choice(index) for index in range(len(gen.streams))]
        return gen

    def _specs(self, params: SamplingParams, matcher: Any, background: bool) -> list[SequenceSpec]:
        # each stream walks the grammar on its own copy of the compiled matcher
        return [
            SequenceSpec(f"{self.id}-{p}-{i}", ids, params.child(i), None if matcher is None else matcher.deep_copy(),
                         background)
            for p, ids in enumerate(self.prompts) for i in range(params.n)
        ]

    async def deltas(self) -> AsyncIterator[tuple[Choice, StreamDelta]]:
        async with contextlib.aclosing(merge(self.streams)) as merged:
            async for index, delta in merged:
                if delta.error is not None:
                    raise ModelError(f"generation failed: {delta.error}")
                if delta.finish_reason == "timeout":
                    raise DeadlineExceeded("the request did not finish before its deadline (`timeout`, the "
                                           "X-Request-Timeout header or the server's --request-timeout) and was "
                                           "stopped", param="timeout")
                choice = self.choices[index]
                choice.add(delta)
                if self.first_token_at is None and delta.token_ids:
                    self.first_token_at, self.scheduled_at = time.monotonic(), delta.scheduled_at
                if delta.finished and index % self.n == 0:
                    self.cached_tokens += delta.num_cached_tokens
                yield choice, delta
        self.finished_at = time.monotonic()

    async def run(self) -> None:
        async for _ in self.deltas():
            pass

    def trace(self, span: Any) -> None:
        """Children of the request's span: `queue` (admitted -> its first engine step), `first_token` (admitted -> the
        first token reached the event loop), `generation` (first token -> last delta: decode and incremental
        detokenizing). With several choices, the first token of any of them."""
        if self.first_token_at is None:
            return
        tracing.child(span, "queue", self.submitted_at, self.scheduled_at or self.first_token_at)
        tracing.child(span, "first_token", self.submitted_at, self.first_token_at)
        tokens = sum(c.num_output_tokens for c in self.choices)
        tracing.child(span, "generation", self.first_token_at, self.finished_at or time.monotonic(),
                      {"ladle.completion_tokens": tokens})

    def close(self) -> None:
        """Abort every sequence not finished yet (client gone, error, deadline): frees its KV blocks."""
        self.engine.abort(self.streams)

    def usage(self) -> dict[str, Any]:
        completion = sum(c.num_output_tokens for c in self.choices)
        return usage(sum(len(p) for p in self.prompts), completion, self.cached_tokens)

    def prompt_of(self, choice: Choice) -> list[int]:
        return self.prompts[choice.index // self.n]



async def matcher(engine: AsyncEngine, req: CompletionRequest | ChatCompletionRequest) -> Any:
    """The compiled output constraint of a request, if it has one (a 400 when it does not compile)."""
    found = req.structured()
    return None if found is None else await engine.compile_structured(*found)
