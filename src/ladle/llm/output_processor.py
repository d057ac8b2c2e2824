"""Turns the core's token outputs into text deltas: incremental detokenization, stop strings,
and the per-request latency metrics (TTFT, inter-token latency, end-to-end, queue time) and rollout window.

Invariant: text is emitted only when it is complete UTF-8 and can no longer turn out to be part
of a stop string; a stop string match finishes the request in the same step. Each sequence that finishes
(but for aborts and timeouts) lands in the version's window exactly once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ladle.llm.detokenizer import IncrementalDetokenizer, StopStringMatcher
from ladle.llm.outputs import RequestOutput, TokenLogprobs
from ladle.llm.request import Request
from ladle.metrics import LLMMetrics

if TYPE_CHECKING:  # the tokenizer needs the llm extra; the API imports StreamDelta on a core install too
    from ladle.llm.tokenizer import Tokenizer

#: finishes that say nothing about a version's health (the client left; its own deadline passed): kept out of the
#: window a rollout's gates read
UNJUDGED = frozenset({"abort", "timeout"})


@dataclass
class StreamDelta:
    """What one step adds to one request, as the API layer streams it."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # with the first token, when asked
    scheduled_at: float | None = None  # with the first token: when its first step began (time.monotonic(); tracing)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass
class _State:
    detokenizer: IncrementalDetokenizer
    stop: StopStringMatcher | None
    arrival: float
    num_prompt_tokens: int
    num_output_tokens: int = 0
    last_token_at: float | None = None
    ttft: float | None = None  # the window's latency: a rollout gate judges how soon an answer starts
    stopped_by_string: bool = False


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, metrics: LLMMetrics | None = None) -> None:
        self.tokenizer = tokenizer
        self.metrics = metrics
        self._states: dict[str, _State] = {}

    def add_request(self, request: Request) -> None:
        params = request.sampling_params
        stop = StopStringMatcher(params.stop, params.include_stop_str_in_output) if params.stop else None
        detok = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, params.skip_special_tokens)
        self._states[request.request_id] = _State(detok, stop, request.arrival_time, request.num_prompt_tokens)

    def process(
        self, outputs: list[RequestOutput], first_scheduled: dict[str, float]
    ) -> tuple[list[StreamDelta], dict[str, str]]:
        """Deltas for the API, and {request id: stop string} for requests a stop string just finished."""
        now = time.monotonic()
        deltas: list[StreamDelta] = []
        stopped: dict[str, str] = {}
        for output in outputs:
            state = self._states.get(output.request_id)
            if state is None:
                continue
            delta = self._delta(state, output, now, first_scheduled.get(output.request_id))
            if state.stopped_by_string and output.finish_reason is None:
                stopped[output.request_id] = delta.stop_reason
            if delta.finished:
                self._finish(state, delta, now)
                first_scheduled.pop(output.request_id, None)
                del self._states[output.request_id]
            deltas.append(delta)
        return deltas, stopped

    def abort(self, request_id: str) -> None:
        self._states.pop(request_id, None)

    def fail(self, request_id: str) -> None:
        """A sequence the engine dropped because a step raised: an "error" finish, and a failure in the window."""
        state = self._states.pop(request_id, None)
        if self.metrics is not None:
            self.metrics.finished("error")
            if state is not None:  # no state: already finished (and recorded), or never added
                now = time.monotonic()
                self.metrics.window.record(state.ttft if state.ttft is not None else now - state.arrival, True, now)

    def _delta(self, state: _State, output: RequestOutput, now: float, scheduled_at: float | None) -> StreamDelta:
        if state.stop is not None and len(output.new_token_ids) > 1:
            delta = self._tokenwise(state, output)
        else:
            delta = self._text_delta(state, output)
        if delta.token_ids:
            if state.last_token_at is None:
                delta.scheduled_at = scheduled_at or now
            self._time_tokens(state, len(delta.token_ids), now, scheduled_at)
        delta.num_output_tokens = state.num_output_tokens
        return delta

    def _text_delta(self, state: _State, output: RequestOutput) -> StreamDelta:
        text = state.detokenizer.push(output.new_token_ids) if output.new_token_ids else ""
        finish, stop_reason = output.finish_reason, output.stop_reason
        if finish is not None:
            text += state.detokenizer.flush()
        if state.stop is not None:
            text = state.stop.push(text)
            if state.stop.matched is not None:
                state.stopped_by_string = True
                finish, stop_reason = "stop", state.stop.matched
            elif finish is not None:
                text += state.stop.flush()
        return StreamDelta(
            output.request_id, text, list(output.new_token_ids), list(output.new_logprobs), finish, stop_reason,
            output.num_prompt_tokens or state.num_prompt_tokens, 0, output.num_cached_tokens,
            prompt_logprobs=output.prompt_logprobs,
        )

    def _tokenwise(self, state: _State, output: RequestOutput) -> StreamDelta:
        """Several tokens in one step (speculative decoding) under stop strings: fed one at a time, and those after
        the token that completes a stop string are dropped, as if the tokens had come one per step."""
        ids, parts = output.new_token_ids, []
        for i in range(len(ids)):
            last = i == len(ids) - 1
            parts.append(self._text_delta(state, replace(
                output, new_token_ids=ids[i : i + 1], new_logprobs=output.new_logprobs[i : i + 1],
                finish_reason=output.finish_reason if last else None, stop_reason=output.stop_reason if last else None,
                prompt_logprobs=output.prompt_logprobs if i == 0 else None)))
            if state.stopped_by_string:
                break
        end = parts[-1]
        return replace(end, text="".join(p.text for p in parts), token_ids=[t for p in parts for t in p.token_ids],
                       logprobs=[lp for p in parts for lp in p.logprobs], prompt_logprobs=parts[0].prompt_logprobs)

    def _time_tokens(self, state: _State, count: int, now: float, scheduled_at: float | None) -> None:
        state.num_output_tokens += count
        m = self.metrics
        if m is not None:
            m.generation_tokens.inc(count)
            if state.last_token_at is None:
                state.ttft = now - state.arrival
                m.ttft.observe(state.ttft)
                m.queue.observe(max((scheduled_at or now) - state.arrival, 0.0))
                m.prompt_tokens.inc(state.num_prompt_tokens)
            else:
                m.itl.observe((now - state.last_token_at) / count)
        state.last_token_at = now

    def _finish(self, state: _State, delta: StreamDelta, now: float) -> None:
        m = self.metrics
        if m is None:
            return
        m.e2e.observe(now - state.arrival)
        m.finished(delta.finish_reason or "error")
        if delta.finish_reason not in UNJUDGED:
            latency = state.ttft if state.ttft is not None else now - state.arrival
            m.window.record(latency, delta.finish_reason in (None, "error"), now)
