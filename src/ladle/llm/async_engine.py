"""The async client of one LLM engine: the API awaits token deltas while EngineCore runs in its own thread.

Invariants: only the engine thread touches the core; the event loop only enqueues commands and
receives one batched callback per step. A request is admitted (or refused with a status) synchronously,
before anything is sent to its client; one whose consumer goes away (client disconnect, cancelled task),
or whose deadline passes, is finished and its KV blocks freed at the next step boundary.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

from ladle.config import LLMConfig
from ladle.errors import InvalidInput, QueueFull, Unavailable
from ladle.llm.admission import WaitingBudget
from ladle.llm.engine import EngineCore
from ladle.llm.output_processor import OutputProcessor, StreamDelta
from ladle.llm.request import Request, SequenceSpec
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


class RequestStream:
    """The deltas of one admitted request, as an async iterator; `close()` before its last delta aborts it."""

    __slots__ = ("_done", "_engine", "_queue", "request_id")

    def __init__(self, engine: AsyncEngine, request_id: str, queue: asyncio.Queue[StreamDelta]) -> None:
        self._engine, self.request_id, self._queue = engine, request_id, queue
        self._done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> StreamDelta:
        if self._done:
            raise StopAsyncIteration
        delta = await self._queue.get()
        if delta.finished:
            self._done = True
        return delta

    def close(self) -> None:
        self._engine.abort([self])


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
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue[StreamDelta]] = {}
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = threading.Event()
        self._started = threading.Event()
        self._dead: str | None = None
        self._counts = (0, 0, 0)  # preemptions, prefix hits, prefix queries already exported
        self._spec_counts: tuple[list[int], list[int]] | None = None  # draft / accepted per position, exported
        self._closing = False
        self._admission = WaitingBudget(name, self.config.max_waiting_requests, self.config.max_waiting_tokens)
        self.core = self._build_on_thread(name, build_core)
        if metrics is not None:  # read at scrape time: the decoder may finish compiling while the engine idles
            runner = weakref.ref(self.core.runner)  # the registry outlives an unloaded model: keep no weights alive
            metrics.compiled.set_function(lambda: float(getattr(runner(), "compile_state", "") == "compiled"))
        scheduler = self.core.scheduler
        self.info = EngineInfo(name, scheduler.max_model_len, self.core.runner.vocab_size, int(time.time()))
        # a prompt longer than one step's budget is only schedulable in chunks
        self._max_unchunked = None if scheduler.enable_chunked_prefill else scheduler.max_num_batched_tokens

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

    @property
    def alive(self) -> bool:
        """The engine thread runs and its loop has not crashed (readiness probes include this)."""
        return self._dead is None and self._thread.is_alive()

    # -- the API side ----------------------------------------------------------------------------
    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None, matcher: Any = None,
        deadline: float | None = None,
    ) -> AsyncIterator[StreamDelta]:
        """Stream one request's deltas; leaving the iteration early aborts the request. A request with
        params.structured needs its `matcher` (compile_structured, one per request: they hold its state).
        Admission happens at the first iteration; the API uses `submit`, which admits at once."""
        self.check_length(len(prompt_token_ids), params.max_tokens)
        spec = SequenceSpec(request_id or f"req-{next(self._ids)}", prompt_token_ids, params, matcher)
        [stream] = self.submit([spec], deadline)
        try:
            async for delta in stream:
                yield delta
        finally:
            stream.close()

    @property
    def waiting_sequences(self) -> int:
        """Sequences admitted and not scheduled yet (a backlog: the model host makes no shadow copies then)."""
        return self._admission.sequences

    def precheck(self, num_sequences: int) -> None:
        """A cheap early refusal (503) for a request that could not be admitted now, before it is tokenized."""
        self._check_open()
        try:
            self._admission.precheck(num_sequences)
        except QueueFull:
            self._count_refusal()
            raise

    def _count_refusal(self) -> None:
        if self.metrics is not None and self.metrics.queue_full is not None:
            self.metrics.queue_full.inc()

    def submit(self, specs: list[SequenceSpec], deadline: float | None = None, prompt_param: str = "prompt"
               ) -> list[RequestStream]:
        """Admit every sequence or none, synchronously, so that a refusal is a status code and never an error after
        HTTP 200: Unavailable (the engine stopped or is shutting down), QueueFull (503: too many sequences or
        prompt tokens waiting), InvalidInput (an id in use, a request that could never fit). Past `deadline`
        (time.monotonic()) the engine finishes the sequences with finish_reason "timeout"."""
        self._check_open()
        streams = self._streams
        ids = {spec.request_id for spec in specs}
        if len(ids) != len(specs) or not ids.isdisjoint(streams):
            raise InvalidInput("a request id is already in use")
        for spec in specs:
            if (spec.params.structured is None) != (spec.matcher is None):
                raise ValueError("a structured request needs its matcher (and only a structured one has one)")
            if self._max_unchunked is not None and len(spec.prompt_token_ids) > self._max_unchunked:
                raise InvalidInput(f"the prompt has {len(spec.prompt_token_ids)} tokens, more than one step's "
                                   f"{self._max_unchunked} with chunked prefill off", param=prompt_param)
        try:
            self._admission.admit([(spec.request_id, len(spec.prompt_token_ids)) for spec in specs], prompt_param)
        except QueueFull:
            self._count_refusal()
            raise
        admitted = []
        for spec in specs:
            queue: asyncio.Queue[StreamDelta] = asyncio.Queue()
            streams[spec.request_id] = queue
            admitted.append(RequestStream(self, spec.request_id, queue))
        self._commands.put(("add", (specs, deadline, time.monotonic())))
        return admitted

    def abort(self, streams: list[RequestStream]) -> None:
        """Abort the streams not finished yet (one engine command for all); closing one twice is harmless."""
        aborted = []
        for stream in streams:
            if not stream._done:
                stream._done = True
                if self._streams.get(stream.request_id) is stream._queue:
                    del self._streams[stream.request_id]
                    self._admission.release(stream.request_id)
                    aborted.append(stream.request_id)
        if aborted:
            self._commands.put(("abort", aborted))

    def _check_open(self) -> None:
        if self._dead is not None:
            raise Unavailable(f"the engine for {self.info.name} stopped: {self._dead}")
        if self._closing:
            raise Unavailable(f"model {self.info.name} is shutting down; retry later")

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

    def _request(self, spec: SequenceSpec, arrival: float) -> Request:
        params = spec.params
        eos = self.tokenizer.eos_token_id
        extra_eos = [t for t in self.tokenizer.eos_token_ids if t != eos]
        if extra_eos and not params.ignore_eos:
            # every EOS of the checkpoint stops generation; the scheduler knows one, the rest become stop tokens
            params = replace(params, stop_token_ids=tuple(dict.fromkeys([*params.stop_token_ids, *extra_eos])))
        return Request(
            spec.request_id, spec.prompt_token_ids, params, eos_token_id=eos, arrival_time=arrival,
            background=spec.background,
        )

    def _deliver(self, deltas: list[StreamDelta], started: list[str] | None = None) -> None:
        """On the loop: requests the engine scheduled for the first time stop counting as waiting; a request's last
        delta frees its id and its admission."""
        release = self._admission.release
        for request_id in started or ():
            release(request_id)
        streams = self._streams
        for delta in deltas:
            stream = streams.get(delta.request_id)
            if stream is not None:
                stream.put_nowait(delta)
                if delta.finished:
                    del streams[delta.request_id]
                    release(delta.request_id)

    # -- the engine thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                if not self._apply_commands(block=not self.core.has_unfinished_requests()):
                    self._record_state()  # idle now (e.g. the last request was aborted): gauges say so
                    continue
                try:
                    self._expire()
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

    def _apply(self, command: tuple[str, Any]) -> None:
        kind, payload = command
        if kind == "add":
            self._add(*payload)
        elif kind == "abort":
            # nobody reads these streams any more; processing the abort outputs still records their metrics
            self.processor.process(self.core.abort(payload), self.core.first_scheduled)

    def _add(self, specs: list[SequenceSpec], deadline: float | None, arrival: float) -> None:
        failed = []
        for spec in specs:
            request = self._request(spec, arrival)
            self.processor.add_request(request)
            try:
                self.core.add_request(request, spec.matcher, deadline)
            except ValueError as exc:
                self.processor.abort(request.request_id)
                failed.append(StreamDelta(request.request_id, "", [], [], error=str(exc)))
        if failed:
            self._post(failed)

    def _expire(self) -> None:
        """Requests past their deadline end with finish_reason "timeout" and free their blocks (between steps)."""
        outputs = self.core.expire(time.monotonic())
        if outputs:
            deltas = self.processor.process(outputs, self.core.first_scheduled)[0]
            self._record_state()  # before the clients hear of it: the gauges agree with their answers
            self._post(deltas)

    def _step(self) -> None:
        core = self.core
        outputs = core.step()
        deltas, stopped = self.processor.process(outputs, core.first_scheduled)
        if stopped:
            core.finish(list(stopped), stopped)
        if self.metrics is not None:
            self.metrics.batch_tokens.observe(core.last_step_tokens)
        self._record_state()  # before the clients hear of the step: the gauges agree with their answers
        started = core.started
        if started:
            core.started = []
        if deltas or started:
            self._post(deltas, started)

    def _restart(self, exc: Exception) -> None:
        """A step raised (a bug, a device error): which request caused it is unknown, so every request in the
        engine fails with the reason, and the engine continues from an empty KV cache instead of dying."""
        failed = self.core.restart()
        log.exception("engine %s: a step failed; failing its %d request(s) and continuing with an empty KV cache",
                      self.info.name, len(failed))
        message = f"the engine step failed ({type(exc).__name__}: {exc}); the request was dropped"
        for request_id in failed:
            self.processor.fail(request_id)  # counts the "error" finish and the window's failure
        self._post([StreamDelta(request_id, "", [], [], error=message) for request_id in failed])
        self._counts = (0, 0, 0)  # the fresh scheduler counts from zero again
        if self.metrics is not None:
            self.metrics.step_failures.inc()
        self._record_state()

    def _post(self, deltas: list[StreamDelta], started: list[str] | None = None) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._deliver, deltas, started)

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
        stats = getattr(self.core, "stats", None)  # a speculative core's draft / accepted counts
        if stats is not None:
            drafted, accepted = list(stats.drafted), list(stats.accepted)
            before_d, before_a = self._spec_counts or ([0] * len(drafted), [0] * len(accepted))
            m.speculation([n - b for n, b in zip(drafted, before_d, strict=True)],
                          [n - b for n, b in zip(accepted, before_a, strict=True)])
            self._spec_counts = (drafted, accepted)

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
