"""The OpenAI-compatible API: /v1/models, /v1/completions, /v1/chat/completions, streaming over SSE.

A thin adapter: pydantic validation at the edge, prompts to token ids, one engine request per
(prompt, choice), then JSON or server-sent events. A client that disconnects aborts its requests.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from ladle.api.body import ClientDisconnected, read_body, until_disconnect
from ladle.api.openai_format import Choice, chat_logprobs, completion_logprobs, echo_logprobs, usage
from ladle.api.openai_protocol import ChatCompletionRequest, CompletionRequest, Schema, parse_request
from ladle.api.sse import DONE, merge, sse
from ladle.errors import InvalidInput, LadleError, ModelError, NotFound
from ladle.llm.output_processor import StreamDelta
from ladle.llm.sampling_params import SamplingParams
from ladle.repository.registry import ModelRegistry

if TYPE_CHECKING:  # the engine pulls in torch; a server without LLMs never imports it
    from ladle.llm.async_engine import AsyncEngine


def _json(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


class Generation:
    """The engine requests behind one API call: choice i of prompt p is stream p * n + i."""

    def __init__(
        self, engine: AsyncEngine, prompts: list[list[int]], params: SamplingParams, matcher: Any = None
    ) -> None:
        engine.check_token_ids(params)
        self.engine, self.prompts, self.n = engine, prompts, params.n
        self.id = uuid.uuid4().hex
        self.created = int(time.time())
        self.streams = [
            # each stream walks the grammar on its own copy of the compiled matcher
            engine.generate(ids, params.child(i), f"{self.id}-{p}-{i}",
                            None if matcher is None else matcher.deep_copy())
            for p, ids in enumerate(prompts) for i in range(params.n)
        ]
        self.choices = [Choice(index) for index in range(len(self.streams))]
        self.cached_tokens = 0

    async def deltas(self) -> AsyncIterator[tuple[Choice, StreamDelta]]:
        async for index, delta in merge(self.streams):
            if delta.error is not None:
                raise ModelError(f"generation failed: {delta.error}")
            choice = self.choices[index]
            choice.add(delta)
            if delta.finished and index % self.n == 0:
                self.cached_tokens += delta.num_cached_tokens
            yield choice, delta

    async def run(self) -> None:
        async for _ in self.deltas():
            pass

    def usage(self) -> dict[str, Any]:
        completion = sum(c.num_output_tokens for c in self.choices)
        return usage(sum(len(p) for p in self.prompts), completion, self.cached_tokens)

    def prompt_of(self, choice: Choice) -> list[int]:
        return self.prompts[choice.index // self.n]


class OpenAIAPI:
    """Serves the engines given at start-up (--model) and the repository's `backend: llm` models."""

    def __init__(self, engines: dict[str, AsyncEngine], registry: ModelRegistry, max_request_bytes: int) -> None:
        self.engines = engines
        self.registry = registry
        self.max_request_bytes = max_request_bytes

    def routes(self) -> list[Route]:
        return [
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
        ]

    def _served(self) -> dict[str, AsyncEngine]:
        """Every servable LLM by name (a repository model by its newest version: what /v1/models describes)."""
        served = dict(self.engines)
        for name, record in self.registry.models.items():
            if record.ready:
                newest = record.ready[max(record.ready)]
                if newest.engine is not None:
                    served.setdefault(name, newest.engine)
        return served

    async def models(self, request: Request) -> Response:
        data = [
            {"id": name, "object": "model", "created": e.info.created, "owned_by": "ladle", "root": name,
             "max_model_len": e.info.max_model_len}
            for name, e in sorted(self._served().items())
        ]
        return _json({"object": "list", "data": data})

    # -- completions ------------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        req = await self._parse(request, CompletionRequest)
        engine = self._engine(req.model)
        prompts = self._completion_prompts(engine, req.prompt)
        max_tokens = req.max_tokens or 16
        for ids in prompts:
            engine.check_length(len(ids), max_tokens, "prompt")
        # echo + logprobs scores the prompt too, as OpenAI's legacy completions do
        params = req.sampling_params(max_tokens, req.logprobs, req.logprobs if req.echo else None)
        gen = Generation(engine, prompts, params, await _matcher(engine, req))
        model = req.model or engine.info.name
        if req.stream:
            return _event_stream(self._completion_chunks(gen, req, model))
        await _run_unless_disconnected(request, gen)
        choices = [self._completion_choice(gen, req, c) for c in gen.choices]
        return _json({"id": f"cmpl-{gen.id}", "object": "text_completion", "created": gen.created, "model": model,
                      "choices": choices, "usage": gen.usage()})

    def _completion_prompts(self, engine: AsyncEngine, prompt: Any) -> list[list[int]]:
        if isinstance(prompt, str) or isinstance(prompt[0], int):
            prompt = [prompt]
        prompts = []
        for item in prompt:
            ids = engine.tokenizer.encode(item) if isinstance(item, str) else list(item)
            if not ids:
                raise InvalidInput("the prompt encodes to no tokens", param="prompt")
            if min(ids) < 0 or max(ids) >= engine.info.vocab_size:
                raise InvalidInput(f"prompt token ids must be in [0, {engine.info.vocab_size})", param="prompt")
            prompts.append(ids)
        return prompts

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
        req = await self._parse(request, ChatCompletionRequest)
        engine = self._engine(req.model)
        messages = [m.as_template_dict() for m in req.messages]
        kwargs = dict(req.chat_template_kwargs or {})
        if req.continue_final_message:
            kwargs["continue_final_message"] = True
        ids = engine.tokenizer.apply_chat_template(
            messages, add_generation_prompt=req.add_generation_prompt and not req.continue_final_message, **kwargs
        )
        max_tokens = req.requested_max_tokens or max(engine.info.max_model_len - len(ids), 1)
        engine.check_length(len(ids), max_tokens, "messages")
        params = req.sampling_params(max_tokens, req.logprobs_k)
        gen = Generation(engine, [ids], params, await _matcher(engine, req))
        model = req.model or engine.info.name
        if req.stream:
            return _event_stream(self._chat_chunks(gen, req, model))
        await _run_unless_disconnected(request, gen)
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
    async def _parse(self, request: Request, schema: type[Schema]) -> Schema:
        return parse_request(await read_body(request, self.max_request_bytes), schema)

    def _engine(self, model: str | None) -> AsyncEngine:
        engine = self.engines.get(model or "")
        if engine is not None:
            return engine
        served = self._served()
        if model is None and len(served) == 1:
            model = next(iter(served))
        if model in self.engines:
            return self.engines[model]
        record = self.registry.models.get(model or "")
        if record is not None and record.config is not None:
            # the version this request goes to (traffic_split), or the model's own state: not ready, unloading, ...
            routed = self.registry.get(model)
            if routed.engine is not None:
                return routed.engine
        names = ", ".join(sorted(served)) or "none"
        raise NotFound(f"the model '{model}' does not exist; served models: {names}", param="model")


async def _matcher(engine: AsyncEngine, req: CompletionRequest | ChatCompletionRequest) -> Any:
    """The compiled output constraint of a request, if it has one (a 400 when it does not compile)."""
    found = req.structured()
    return None if found is None else await engine.compile_structured(*found)


def _event_stream(chunks: AsyncIterator[bytes]) -> StreamingResponse:
    headers = {"Cache-Control": "no-cache"}
    return StreamingResponse(_with_errors(chunks), media_type="text/event-stream", headers=headers)


async def _with_errors(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Once streaming has begun the status is sent; a failure becomes an error event, then [DONE]."""
    try:
        async for chunk in chunks:
            yield chunk
    except LadleError as exc:
        yield sse({"error": {"message": exc.message, "type": "internal_error", "param": exc.param, "code": None}})
        yield DONE


async def _run_unless_disconnected(request: Request, gen: Generation) -> None:
    task: asyncio.Future = asyncio.ensure_future(gen.run())
    try:
        await until_disconnect(request, task)
    except ClientDisconnected:
        task.cancel()  # closes the engine streams, which aborts the requests and frees their blocks
        raise

