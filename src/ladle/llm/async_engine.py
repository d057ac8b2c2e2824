"""The async client of one LLM engine: the API awaits token deltas while EngineCore runs in its own thread.

Invariants: only the engine thread touches the core; the event loop only enqueues commands and
receives one batched callback per step. A request whose consumer goes away (client disconnect,
cancelled task) is aborted and its KV blocks freed at the next step boundary.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

from ladle.config import LLMConfig
from ladle.errors import InvalidInput, Unavailable
from ladle.llm.engine import EngineCore
from ladle.llm.output_processor import OutputProcessor, StreamDelta
from ladle.llm.request import Request
from ladle.llm.sampling_params import SamplingParams, StructuredSpec
from ladle.llm.tokenizer import Tokenizer
from ladle.metrics import LLMMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineInfo:
    """What the API needs to know about a served LLM."""

    name: str
    max_model_len: int
    vocab_size: int
    created: int


class AsyncEngine:
    """Construction blocks until the engine thread has built the core (or failed to: the error is raised here).

    The core is built on the engine thread itself because oneDNN/OpenMP state is per thread: a model whose
    kernels first ran on one thread and then step on another was measured 1.5x slower per decode step.
    """

    def __init__(
        self, name: str, build_core: Callable[[], EngineCore], tokenizer: Tokenizer, metrics: LLMMetrics | None = None,
        config: LLMConfig | None = None,
    ) -> None:
        self.config = config or LLMConfig()  # the engine's limits (waiting queue, fan-out, templates, deadline)
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.processor = OutputProcessor(tokenizer, metrics)
        self._commands: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue[StreamDelta]] = {}
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = threading.Event()
        self._started = threading.Event()
        self._dead: str | None = None
        self._counts = (0, 0, 0)  # preemptions, prefix hits, prefix queries already exported
        self._closing = False
        self.core = self._build_on_thread(name, build_core)
        self.info = EngineInfo(name, self.core.scheduler.max_model_len, self.core.runner.vocab_size, int(time.time()))

    def _build_on_thread(self, name: str, build_core: Callable[[], EngineCore]) -> EngineCore:
        built: list[EngineCore | BaseException] = []
        ready = threading.Event()

        def main() -> None:
            try:
                built.append(build_core())
            except BaseException as exc:  # handed to the constructor's caller
                built.append(exc)
                return
            finally:
                ready.set()
            self._started.wait()
            self._run()

        self._thread = threading.Thread(target=main, name=f"engine-{name}", daemon=True)
        self._thread.start()
        ready.wait()
        if isinstance(built[0], BaseException):
            raise built[0]
        return built[0]

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._started.set()

    # -- the API side ----------------------------------------------------------------------------
    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None, matcher: Any = None
    ) -> AsyncIterator[StreamDelta]:
        """Stream the request's deltas; leaving the iteration early aborts the request. A request with
        params.structured needs its `matcher` (compile_structured, one per request: they hold its state)."""
        if self._dead is not None:
            raise Unavailable(f"the engine for {self.info.name} stopped: {self._dead}")
        if self._closing:
            raise Unavailable(f"model {self.info.name} is shutting down; retry later")
        self.check_length(len(prompt_token_ids), params.max_tokens)
        request_id = request_id or f"req-{next(self._ids)}"
        request = self._request(request_id, prompt_token_ids, params)
        if (params.structured is None) != (matcher is None):
            raise ValueError("a structured request needs its matcher (and only a structured one has one)")
        stream: asyncio.Queue[StreamDelta] = asyncio.Queue()
        self._streams[request_id] = stream
        self._commands.put(("add", (request, matcher)))
        finished = False
        try:
            while not finished:
                delta = await stream.get()
                finished = delta.finished
                yield delta
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._commands.put(("abort", request_id))

    def check_length(self, num_prompt_tokens: int, max_tokens: int, prompt_param: str = "prompt") -> None:
        """A prompt plus max_tokens over the context window is the client's error (400), never a crash."""
        limit = self.info.max_model_len
        if num_prompt_tokens >= limit:
            raise InvalidInput(
                f"the prompt is {num_prompt_tokens} tokens, but this model's context window is {limit} tokens",
                param=prompt_param,
            )
        if num_prompt_tokens + max_tokens > limit:
            raise InvalidInput(
                f"this model's context window is {limit} tokens, but {num_prompt_tokens + max_tokens} were requested "
                f"({num_prompt_tokens} in the prompt + {max_tokens} max_tokens); shorten the prompt or lower "
                "max_tokens", param="max_tokens",
            )

    async def compile_structured(self, spec: StructuredSpec, param: str) -> Any:
        """A matcher for a structured-output spec, compiled on a worker thread (complex schemas take up to ~1 s);
        a 400 naming `param` when the schema / regex / grammar is invalid."""
        if self.core.structured is None:
            raise InvalidInput("this model was started without structured output support", param=param)
        return await asyncio.to_thread(self.core.structured.compile, spec, param)

    def check_token_ids(self, params: SamplingParams) -> None:
        """Token ids a request names (logit_bias, stop_token_ids) must index the logits: a 400, not a failed step."""
        vocab = self.info.vocab_size
        named = (("logit_bias", [t for t, _ in params.logit_bias]), ("stop_token_ids", params.stop_token_ids))
        for param, ids in named:
            if outside := [t for t in ids if not 0 <= t < vocab]:
                raise InvalidInput(f"{param} names token ids outside the vocabulary [0, {vocab}): {outside[:5]}",
                                   param=param)

    def _request(self, request_id: str, prompt: list[int], params: SamplingParams) -> Request:
        eos = self.tokenizer.eos_token_id
        extra_eos = [t for t in self.tokenizer.eos_token_ids if t != eos]
        if extra_eos and not params.ignore_eos:
            # every EOS of the checkpoint stops generation; the scheduler knows one, the rest become stop tokens
            params = replace(params, stop_token_ids=tuple(dict.fromkeys([*params.stop_token_ids, *extra_eos])))
        return Request(request_id, prompt, params, eos_token_id=eos)

    def _deliver(self, deltas: list[StreamDelta]) -> None:
        for delta in deltas:
            stream = self._streams.get(delta.request_id)
            if stream is not None:
                stream.put_nowait(delta)

    # -- the engine thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                if not self._apply_commands(block=not self.core.has_unfinished_requests()):
                    self._record_state()  # idle now (e.g. the last request was aborted): gauges say so
                    continue
                try:
                    self._step()
                except Exception as exc:  # any failure in a step: fail its requests, keep serving
                    self._restart(exc)
        except Exception as exc:  # the engine loop itself is broken: fail every open stream rather than hang them
            log.exception("engine %s crashed", self.info.name)
            self._dead = f"{type(exc).__name__}: {exc}"
            self._fail_all(self._dead)

    def _apply_commands(self, block: bool) -> bool:
        """Apply queued adds/aborts; when idle, wait for one. Returns whether there is work to step."""
        try:
            command = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return self.core.has_unfinished_requests()
        while True:
            self._apply(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return self.core.has_unfinished_requests()

    def _apply(self, command: tuple[str, object]) -> None:
        kind, payload = command
        if kind == "add":
            request, matcher = payload
            self.processor.add_request(request)
            try:
                self.core.add_request(request, matcher)
            except ValueError as exc:
                self.processor.abort(request.request_id)
                self._post([StreamDelta(request.request_id, "", [], [], error=str(exc))])
        elif kind == "abort":
            # nobody reads this stream any more; processing the abort output still records its metrics
            self.processor.process(self.core.abort([str(payload)]), self.core.first_scheduled)

    def _step(self) -> None:
        outputs = self.core.step()
        deltas, stopped = self.processor.process(outputs, self.core.first_scheduled)
        if stopped:
            self.core.finish(list(stopped), stopped)
        if deltas:
            self._post(deltas)
        if self.metrics is not None:
            self.metrics.batch_tokens.observe(self.core.last_step_tokens)
        self._record_state()

    def _restart(self, exc: Exception) -> None:
        """A step raised (a bug, a device error): which request caused it is unknown, so every request in the
        engine fails with the reason, and the engine continues from an empty KV cache instead of dying."""
        failed = self.core.restart()
        log.exception("engine %s: a step failed; failing its %d request(s) and continuing with an empty KV cache",
                      self.info.name, len(failed))
        message = f"the engine step failed ({type(exc).__name__}: {exc}); the request was dropped"
        for request_id in failed:
            self.processor.abort(request_id)
        self._post([StreamDelta(request_id, "", [], [], error=message) for request_id in failed])
        self._counts = (0, 0, 0)  # the fresh scheduler counts from zero again
        if self.metrics is not None:
            self.metrics.step_failures.inc()
            for _ in failed:
                self.metrics.finished("error")
        self._record_state()

    def _post(self, deltas: list[StreamDelta]) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._deliver, deltas)

    def _record_state(self) -> None:
        m = self.metrics
        if m is None:
            return
        scheduler, kv = self.core.scheduler, self.core.scheduler.kv
        m.running.set(scheduler.num_running)
        m.waiting.set(scheduler.num_waiting)
        m.kv_usage.set(kv.usage)
        counts = (scheduler.num_preemptions_total, kv.prefix_cache_hits, kv.prefix_cache_queries)
        for counter, now, before in zip((m.preemptions, m.prefix_hits, m.prefix_queries), counts, self._counts,
                                        strict=True):
            if now > before:
                counter.inc(now - before)
        self._counts = counts

    def _fail_all(self, message: str) -> None:
        self._post([StreamDelta(rid, "", [], [], error=message) for rid in list(self._streams)])

    async def close(self, drain_timeout_s: float = 30.0) -> None:
        """Stop taking requests, let open streams finish (up to the timeout), then stop the thread."""
        self._closing = True
        deadline = time.monotonic() + drain_timeout_s
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._stopping.set()
        self._started.set()
        if self._thread.is_alive():
            await asyncio.to_thread(self._thread.join, 10)
