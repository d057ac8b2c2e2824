"""The OpenAI-compatible API: /v1/models, /v1/completions, /v1/chat/completions, streaming over SSE.

A thin adapter: pydantic validation at the edge, prompts to token ids, one engine request per
(prompt, choice), then JSON or server-sent events. Every engine request is admitted before the first
byte is sent, so refusals are status codes; a client that disconnects aborts its requests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ladle.api import tracing
from ladle.api.body import ClientDisconnected, is_batch, read_body, until_disconnect
from ladle.api.errors import openai_error_body, public_message
from ladle.api.openai_format import Choice, chat_logprobs, completion_logprobs, echo_logprobs
from ladle.api.openai_generation import Generation, matcher
from ladle.api.openai_limits import check_fan_out, count_prompts, deadline
from ladle.api.openai_observe import Observation
from ladle.api.openai_prompts import chat_prompt, completion_prompts
from ladle.api.openai_protocol import ChatCompletionRequest, CompletionRequest, Schema, parse_body
from ladle.api.openai_shadow import shadow_copier
from ladle.api.sse import DONE, sse
from ladle.errors import LadleError, NotFound
from ladle.serving.host import ModelHost
from ladle.serving.versions import ModelVersion

if TYPE_CHECKING:  # the engine pulls in torch; a server without LLMs never imports it
    from ladle.llm.async_engine import AsyncEngine


def _json(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


class OpenAIAPI:
    """Serves the host's LLMs: the repository's `backend: llm` models and the one given with --model."""

    def __init__(self, host: ModelHost, max_request_bytes: int) -> None:
        self.host = host
        self.max_request_bytes = max_request_bytes

    def routes(self) -> list[Route]:
        return [
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
        ]

    def _served(self) -> dict[str, AsyncEngine]:
        """Every servable LLM by name (a model by its newest version: what /v1/models describes)."""
        return self.host.llm_engines()  # type: ignore[return-value]  # the host holds AsyncEngines

    async def models(self, request: Request) -> Response:
        data = [
            {"id": name, "object": "model", "created": e.info.created, "owned_by": "ladle", "root": name,
             "max_model_len": e.info.max_model_len}
            for name, e in sorted(self._served().items())
        ]
        return _json({"object": "list", "data": data})

    # -- completions ------------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        return await self._observed(request, "POST /v1/completions", self._completions)

    async def _completions(self, request: Request, obs: Observation) -> Response:
        started = obs.started
        req = await self._parse(request, CompletionRequest)
        mv = self._version(request, req)
        obs.routed(mv)
        engine: AsyncEngine = mv.engine  # type: ignore[assignment]  # the host holds AsyncEngines
        deadline_at = deadline(request, req.timeout, engine.config, started)
        num_prompts = count_prompts(req.prompt)
        check_fan_out(engine.config, num_prompts, req.n, "prompt")
        engine.precheck(num_prompts * req.n)  # under overload, refuse before tokenizing
        tokenizing = time.monotonic()
        prompts = await completion_prompts(engine, req.prompt)
        obs.tokenized(tokenizing, sum(map(len, prompts)))
        max_tokens = req.max_tokens or 16
        for ids in prompts:
            engine.check_length(len(ids), max_tokens, "prompt")
        # echo + logprobs scores the prompt too, as OpenAI's legacy completions do
        params = req.sampling_params(max_tokens, req.logprobs, req.logprobs if req.echo else None)
        obs.gen = gen = await Generation.start(engine, prompts, params, await matcher(engine, req), deadline_at,
                                               "prompt", is_batch(request))
        model = req.model or engine.info.name
        shadow = shadow_copier(self.host, mv, req, params, gen, started,
                               lambda e: completion_prompts(e, req.prompt), "prompt")
        if req.stream:
            return _EventStream(self._completion_chunks(gen, req, model), gen, shadow)
        await _run_unless_disconnected(request, gen)
        shadow()
        choices = [self._completion_choice(gen, req, c) for c in gen.choices]
        return _json({"id": f"cmpl-{gen.id}", "object": "text_completion", "created": gen.created, "model": model,
                      "choices": choices, "usage": gen.usage()})

    def _completion_choice(self, gen: Generation, req: CompletionRequest, c: Choice) -> dict[str, Any]:
        tokenizer = gen.engine.tokenizer
        prefix = tokenizer.decode(gen.prompt_of(c), skip_special_tokens=False) if req.echo else ""
        logprobs = None
        if req.logprobs is not None:
            logprobs = completion_logprobs(tokenizer, c.token_ids, c.logprobs, len(prefix))
            if req.echo:
                logprobs = echo_logprobs(tokenizer, gen.prompt_of(c), c.prompt_logprobs, logprobs)
        return {"index": c.index, "text": prefix + c.text, "logprobs": logprobs, "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason}

    async def _completion_chunks(self, gen: Generation, req: CompletionRequest, model: str) -> AsyncIterator[bytes]:
        head = {"id": f"cmpl-{gen.id}", "object": "text_completion", "created": gen.created, "model": model}
        tokenizer = gen.engine.tokenizer
        offsets = [0] * len(gen.choices)
        echoed = [not req.echo] * len(gen.choices)
        async for choice, delta in gen.deltas():
            text, prompt = delta.text, ""
            if not echoed[choice.index]:
                prompt = tokenizer.decode(gen.prompt_of(choice), skip_special_tokens=False)
                text = prompt + text
                echoed[choice.index] = True
            if not text and not delta.finished and req.logprobs is None:
                continue
            logprobs = None
            if req.logprobs is not None:
                offset = offsets[choice.index] + len(prompt)
                logprobs = completion_logprobs(tokenizer, delta.token_ids, delta.logprobs, offset)
                # offsets follow the tokens' texts, as in the non-streamed answer (emitted text can lag a token)
                offsets[choice.index] = offset + sum(map(len, logprobs["tokens"]))
                if prompt:
                    logprobs = echo_logprobs(tokenizer, gen.prompt_of(choice), delta.prompt_logprobs, logprobs)
            yield sse({**head, "choices": [{"index": choice.index, "text": text, "logprobs": logprobs,
                                            "finish_reason": delta.finish_reason, "stop_reason": delta.stop_reason}]})
        if req.include_usage:
            yield sse({**head, "choices": [], "usage": gen.usage()})
        yield DONE

    # -- chat completions ------------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        return await self._observed(request, "POST /v1/chat/completions", self._chat_completions)

    async def _chat_completions(self, request: Request, obs: Observation) -> Response:
        started = obs.started
        req = await self._parse(request, ChatCompletionRequest)
        mv = self._version(request, req)
        obs.routed(mv)
        engine: AsyncEngine = mv.engine  # type: ignore[assignment]  # the host holds AsyncEngines
        deadline_at = deadline(request, req.timeout, engine.config, started)
        check_fan_out(engine.config, 1, req.n, "messages")
        engine.precheck(req.n)  # under overload, refuse before rendering the template
        tokenizing = time.monotonic()
        ids = await chat_prompt(engine, req)
        obs.tokenized(tokenizing, len(ids))
        max_tokens = req.requested_max_tokens or max(engine.info.max_model_len - len(ids), 1)
        engine.check_length(len(ids), max_tokens, "messages")
        params = req.sampling_params(max_tokens, req.logprobs_k)
        obs.gen = gen = await Generation.start(engine, [ids], params, await matcher(engine, req), deadline_at,
                                               "messages", is_batch(request))
        model = req.model or engine.info.name
        shadow = shadow_copier(self.host, mv, req, params, gen, started, lambda e: _chat_prompts(e, req), "messages")
        if req.stream:
            return _EventStream(self._chat_chunks(gen, req, model), gen, shadow)
        await _run_unless_disconnected(request, gen)
        shadow()
        choices = [self._chat_choice(gen, req, c) for c in gen.choices]
        return _json({"id": f"chatcmpl-{gen.id}", "object": "chat.completion", "created": gen.created,
                      "model": model, "choices": choices, "usage": gen.usage()})

    def _chat_choice(self, gen: Generation, req: ChatCompletionRequest, c: Choice) -> dict[str, Any]:
        logprobs = chat_logprobs(gen.engine.tokenizer, c.token_ids, c.logprobs) if req.logprobs else None
        return {"index": c.index, "message": {"role": "assistant", "content": c.text}, "logprobs": logprobs,
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}

    async def _chat_chunks(self, gen: Generation, req: ChatCompletionRequest, model: str) -> AsyncIterator[bytes]:
        head = {"id": f"chatcmpl-{gen.id}", "object": "chat.completion.chunk", "created": gen.created, "model": model}
        if req.include_usage:
            head["usage"] = None
        for choice in gen.choices:
            yield sse({**head, "choices": [{"index": choice.index, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]})
        async for choice, delta in gen.deltas():
            if not delta.text and not delta.finished:
                continue
            logprobs = chat_logprobs(gen.engine.tokenizer, delta.token_ids, delta.logprobs) if req.logprobs else None
            content = {"content": delta.text} if delta.text else {}
            yield sse({**head, "choices": [{"index": choice.index, "delta": content, "logprobs": logprobs,
                                            "finish_reason": delta.finish_reason,
                                            "stop_reason": delta.stop_reason}]})
        if req.include_usage:
            yield sse({**head, "choices": [], "usage": gen.usage()})
        yield DONE

    # -- shared ------------------------------------------------------------------------------------
    async def _observed(
        self, request: Request, name: str, handler: Callable[[Request, Observation], Awaitable[Response]]
    ) -> Response:
        """Run a generation handler under its Observation (trace span, statistics): a stream finishes it when it
        ends, anything else when the handler returns or raises."""
        obs = Observation(tracing.start_span(name, request.headers))
        try:
            response = await handler(request, obs)
        except BaseException as exc:
            obs.finish(exc)
            raise
        if isinstance(response, _EventStream):
            response.observation = obs
        else:
            obs.finish()
        return response

    async def _parse(self, request: Request, schema: type[Schema]) -> Schema:
        return await parse_body(await read_body(request, self.max_request_bytes), schema)

    def _version(self, request: Request, req: CompletionRequest | ChatCompletionRequest) -> ModelVersion:
        """The LLM version this request goes to: the model's split, by its sticky key (`user` or a header)."""
        model = req.model
        if model is None:  # OpenAI clients may leave `model` out when the server has one
            served = self._served()
            model = next(iter(served)) if len(served) == 1 else None
        # the version this request goes to (traffic split), or the model's own state: not ready, unloading, ...
        mv = None if model is None else self.host.llm_version(model, lambda key: _sticky(request, req, key))
        if mv is not None:
            return mv
        names = ", ".join(sorted(self._served())) or "none"
        raise NotFound(f"the model '{model}' does not exist; served models: {names}", param="model")


def _sticky(request: Request, req: CompletionRequest | ChatCompletionRequest, key: str) -> str | None:
    """A request's sticky key: the OpenAI `user` field for `sticky_key: user`, else the header of that name."""
    return req.user if key == "user" else request.headers.get(key)


async def _chat_prompts(engine: AsyncEngine, req: ChatCompletionRequest) -> list[list[int]]:
    return [await chat_prompt(engine, req)]


class _EventStream(StreamingResponse):
    """Server-sent events of an admitted generation: however the response ends (done, error, client gone,
    or never started), its engine requests are closed."""

    def __init__(self, chunks: AsyncIterator[bytes], gen: Generation, finished: Callable[[], None]) -> None:
        super().__init__(_with_errors(chunks), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.generation = gen
        self.finished = finished  # called when every choice finished (the shadow copy)
        self.observation: Observation | None = None  # the call's trace and statistics, finished with the stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.close()
            if self.observation is not None:
                self.observation.finish_stream()
        self.finished()


async def _with_errors(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Once streaming has begun the status is sent; a failure becomes an error event, then [DONE]."""
    try:
        async for chunk in chunks:
            yield chunk
    except LadleError as exc:
        yield sse(openai_error_body(public_message(exc), exc.status, exc.param))  # internal detail: logged only
        yield DONE


async def _run_unless_disconnected(request: Request, gen: Generation) -> None:
    task: asyncio.Future = asyncio.ensure_future(gen.run())
    try:
        await until_disconnect(request, task)
    except ClientDisconnected:
        task.cancel()  # closes the engine streams, which aborts the requests and frees their blocks
        raise
    finally:
        gen.close()  # whatever ended it (done, error, deadline, client gone): nothing keeps generating
