"""`POST /v1/embeddings`: the OpenAI embeddings API over the repository's sentence-transformers models.

The texts take the KServe path through the model host (serving.submit: the same input checks, batcher and
outcome metrics), so embedding requests batch dynamically with KServe requests to the same model; the API
reshapes input and output, and counts usage.prompt_tokens with the model's tokenizer off the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import time
from typing import Annotated, Literal

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ladle.api.body import ClientDisconnected, is_batch, read_body, until_disconnect
from ladle.api.openai_protocol import parse_body
from ladle.errors import InvalidInput, NotFound
from ladle.serving.host import ModelHost
from ladle.serving.submit import Outcome, submit
from ladle.serving.versions import ModelVersion


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    input: str | Annotated[list[str], Field(min_length=1)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class EmbeddingsAPI:
    def __init__(self, host: ModelHost, max_request_bytes: int) -> None:
        self.host = host
        self.max_request_bytes = max_request_bytes

    def routes(self) -> list[Route]:
        return [Route("/v1/embeddings", self.embeddings, methods=["POST"])]

    async def embeddings(self, request: Request) -> Response:
        started = time.monotonic()
        req = await parse_body(await read_body(request, self.max_request_bytes), EmbeddingRequest)
        mv = self._encoder(request, req)
        texts = [req.input] if isinstance(req.input, str) else req.input
        if req.dimensions is not None:
            raise InvalidInput("dimensions is not supported: the model's embedding size is fixed", param="dimensions")
        with Outcome(mv, started, ClientDisconnected):
            vectors, tokens = await self._embed(request, mv, texts)
        data = [
            {"object": "embedding", "index": i, "embedding": _encode(vector, req.encoding_format)}
            for i, vector in enumerate(vectors)
        ]
        body = {"object": "list", "data": data, "model": req.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")

    def _encoder(self, request: Request, req: EmbeddingRequest) -> ModelVersion:
        name = req.model
        # a sticky key keeps a client on one version of the split: `user`, or the header of that name
        mv = self.host.lookup(name, None, lambda key: req.user if key == "user" else request.headers.get(key))
        if mv.config.backend != "sentence_transformers":
            raise NotFound(f"model '{name}' is not an embedding model (backend {mv.config.backend})", param="model")
        return mv

    async def _embed(self, request: Request, mv: ModelVersion, texts: list[str]) -> tuple[np.ndarray, int]:
        """The embeddings and the prompt tokens; the tokens are counted on a worker thread while the model runs."""
        limit = mv.config.max_batch_size or 1
        if len(texts) > limit:
            raise InvalidInput(f"at most {limit} inputs per request for model '{mv.name}'", param="input")
        spec = mv.inputs[0]
        shape = (len(texts), *([1] * len(spec.shape))) if mv.config.batched else tuple(1 for _ in spec.shape)
        array = np.array([t.encode("utf-8") for t in texts], dtype=np.object_).reshape(shape)
        counting = None if mv.count_tokens is None else asyncio.ensure_future(asyncio.to_thread(mv.count_tokens, texts))
        try:
            result = await submit(mv, {spec.name: (spec.datatype, array)}, functools.partial(until_disconnect, request),
                                  background=is_batch(request))
        except BaseException:
            if counting is not None:
                counting.cancel()
            raise
        tokens = 0 if counting is None else await counting
        if (copy := self.host.shadow_for(mv)) is not None:
            shadow, target = copy
            shadow.copy_tensors(target, mv, {spec.name: (spec.datatype, array)}, result.outputs,
                               result.queue_s + result.compute_s)
        return result.outputs[mv.outputs[0].name], tokens


def _encode(vector: np.ndarray, encoding: str) -> list[float] | str:
    vector = np.asarray(vector, dtype=np.float32).reshape(-1)
    if encoding == "base64":
        return base64.b64encode(vector.tobytes()).decode("ascii")
    return vector
