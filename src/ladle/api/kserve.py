"""KServe v2 / Open Inference Protocol over REST, with Triton's binary tensor and repository extensions.

A thin adapter over the model host: decode (kserve_codec) -> serving.submit (check, batcher, outcome) -> encode.
Every failure answers `{"error": "..."}` with the status its LadleError carries.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import TYPE_CHECKING

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ladle import __version__
from ladle.api import kserve_codec as codec
from ladle.api import tracing
from ladle.api.body import ClientDisconnected, header_values, is_batch, read_body, until_disconnect
from ladle.api.offload import ProcessOffload
from ladle.api.stats import statistics
from ladle.errors import InvalidInput, LadleError
from ladle.repository.layout import parse_version
from ladle.repository.signature import served_shape
from ladle.serving.host import ModelHost
from ladle.serving.submit import Outcome, submit
from ladle.serving.versions import ModelVersion

if TYPE_CHECKING:  # OpenTelemetry is imported only when tracing is on
    from opentelemetry.trace import Span

log = logging.getLogger(__name__)

EXTENSIONS = ["binary_tensor_data", "model_repository", "model_configuration", "schedule_policy", "statistics"]
HEADER_LENGTH = b"inference-header-content-length"
_INFER_SPANS = {False: "POST /v2/models/{model}/infer", True: "POST /v2/models/{model}/versions/{version}/infer"}
_INFER_HEADERS = (b"content-length", b"content-encoding", HEADER_LENGTH, b"accept-encoding")
#: bodies larger than this are decoded in a helper process, results larger than this encoded on a worker thread
#: (encoding is mostly numpy tobytes/tolist, which copes with threads better than parsing); small ones stay inline,
#: where the hand-off would cost more than the work
OFFLOAD_BYTES = 256 * 1024


def _json(payload: object, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


class KServeAPI:
    def __init__(self, host: ModelHost, max_request_bytes: int, offload: ProcessOffload | None = None) -> None:
        self.host = host
        self.max_request_bytes = max_request_bytes
        self.offload = offload or ProcessOffload()

    def routes(self) -> list[Route]:
        model = "/v2/models/{model}"
        version = model + "/versions/{version}"
        return [  # the hot route first: Starlette tries routes in order
            *(Route(p + "/infer", self.infer, methods=["POST"]) for p in (model, version)),
            # before the metadata routes: /v2/models/stats is every model's statistics, as in Triton (a model named
            # "stats" has its statistics at /v2/models/stats/stats)
            *(Route(p + "/stats", self.stats, methods=["GET"]) for p in ("/v2/models", model, version)),
            Route("/v2", self.server_metadata, methods=["GET"]),
            Route("/v2/health/live", self.live, methods=["GET"]),
            Route("/v2/health/ready", self.ready, methods=["GET"]),
            *(Route(p, self.model_metadata, methods=["GET"]) for p in (model, version)),
            *(Route(p + "/ready", self.model_ready, methods=["GET"]) for p in (model, version)),
            *(Route(p + "/config", self.model_config, methods=["GET"]) for p in (model, version)),
            Route("/v2/repository/index", self.repository_index, methods=["POST"]),
            Route("/v2/repository/models/{model}/load", self.load, methods=["POST"]),
            Route("/v2/repository/models/{model}/unload", self.unload, methods=["POST"]),
        ]

    # -- server and model metadata ----------------------------------------------------------
    async def server_metadata(self, request: Request) -> Response:
        return _json({"name": "ladle", "version": __version__, "extensions": EXTENSIONS})

    async def live(self, request: Request) -> Response:
        return Response(status_code=200)

    async def ready(self, request: Request) -> Response:
        # the host's readiness rule: models, LLM engines (--model's too) and SIGTERM draining
        return Response(status_code=200 if self.host.is_ready() else 503)

    def _lookup(self, request: Request, parameters: dict | None = None) -> ModelVersion:
        """The version a request goes to: the one its path names, else the model's split's (by its sticky key)."""
        raw = request.path_params.get("version")
        version = None if raw in (None, "") else parse_version(raw)
        return self.host.lookup(request.path_params["model"], version,
                                lambda name: sticky_value(request, name, parameters))

    async def model_metadata(self, request: Request) -> Response:
        mv = self._lookup(request)
        return _json({
            "name": mv.name,
            "versions": [str(v) for v in self.host.ready_versions(mv.name)],
            "platform": mv.config.platform,
            "inputs": [_tensor_meta(mv, s) for s in mv.inputs],
            "outputs": [_tensor_meta(mv, s) for s in mv.outputs],
        })

    async def model_ready(self, request: Request) -> Response:
        try:
            self._lookup(request)
        except LadleError as exc:
            if exc.status == 404:
                raise
            return Response(status_code=503)
        return Response(status_code=200)

    async def model_config(self, request: Request) -> Response:
        mv = self._lookup(request)
        c = mv.config
        batching = None if c.dynamic_batching is None else c.dynamic_batching.model_dump()
        return _json({
            "name": c.name, "backend": c.backend, "platform": c.platform, "max_batch_size": c.max_batch_size,
            "input": [{"name": s.name, "data_type": f"TYPE_{s.datatype}", "dims": list(s.shape)} for s in mv.inputs],
            "output": [{"name": s.name, "data_type": f"TYPE_{s.datatype}", "dims": list(s.shape)} for s in mv.outputs],
            "dynamic_batching": batching,
            "instance_group": [{"count": c.instance_count, "kind": c.instance_kind}],
            "execution_timeout_ms": c.execution_timeout_ms,
            "version_policy": {c.version_policy.kind: c.version_policy.model_dump()},
            "parameters": dict(c.parameters),
        })

    async def stats(self, request: Request) -> Response:
        raw = request.path_params.get("version")
        version = None if raw in (None, "") else parse_version(raw)
        return _json(statistics(self.host, request.path_params.get("model"), version))

    # -- inference ------------------------------------------------------------------------------
    async def infer(self, request: Request) -> Response:
        if not tracing.active:  # off: not even a no-op span on the hot path
            return await self._infer(request, None)
        versioned = request.path_params.get("version") not in (None, "")
        attributes = {"ladle.model": request.path_params["model"]}
        with tracing.request_span(_INFER_SPANS[versioned], request.headers, attributes) as span:
            return await self._infer(request, span)

    async def _infer(self, request: Request, span: Span | None) -> Response:
        started = time.monotonic()
        mv = self._lookup(request)  # an unknown model is refused before its body is read
        outcome = Outcome(mv, started, ClientDisconnected)
        try:
            with outcome:
                headers = header_values(request, *_INFER_HEADERS)
                body = await read_body(request, self.max_request_bytes, headers.get(b"content-length"))
                if mv.batcher is None:
                    raise InvalidInput(f"model '{mv.name}' is an LLM: use the OpenAI API (POST /v1/completions)")
                req = await self._decode(headers, body)
                # again, now that no await separates it from submit: a reload may have retired that
                # version while the body arrived, and its successor must take the request (and a sticky key may
                # be a request parameter)
                outcome.mv = mv = self._lookup(request, req.parameters)
                priority, timeout_s = _schedule_parameters(req.parameters)
                inputs = {t.name: (t.datatype, t.data) for t in req.inputs}
                requested = None if req.outputs is None else [o.name for o in req.outputs]
                result = await submit(mv, inputs, functools.partial(until_disconnect, request), priority,
                                      timeout_s, requested, background=is_batch(request))
                if span is not None:
                    span.set_attribute("ladle.version", str(mv.version))
                    tracing.batch_spans(span, result.batch_started, result.queue_s, result.compute_s,
                                        result.batch_rows)
                if request.path_params.get("version") in (None, "") and (copy := self.host.shadow_for(mv)):
                    shadow, target = copy
                    shadow.copy_tensors(target, mv, inputs, result.outputs, time.monotonic() - started)
                accept = headers.get(b"accept-encoding")
                if sum(getattr(a, "nbytes", 0) for a in result.outputs.values()) > OFFLOAD_BYTES:
                    return await asyncio.to_thread(self._encode, accept, req, mv, result.outputs)
                return self._encode(accept, req, mv, result.outputs)
        except ClientDisconnected:
            log.debug("infer %s:%d cancelled: client disconnected", mv.name, mv.version)
            tracing.set_outcome(span, "cancelled")
            return Response(status_code=499)

    async def _decode(self, headers: dict[bytes, str], body: bytes) -> codec.InferRequest:
        encoding = headers.get(b"content-encoding")
        header_length = _header_length(headers.get(HEADER_LENGTH))
        args = (body, encoding, header_length, self.max_request_bytes)
        # a large or compressed body (which may inflate to the full limit) is parsed in a helper process: parsing
        # holds the GIL, so on a thread it would still stall the event loop (~170 ms for 16 MB of JSON, measured)
        if len(body) > OFFLOAD_BYTES or encoding not in (None, "", "identity"):
            return await self.offload.run(codec.decode_request, *args)
        return codec.decode_request(*args)

    def _encode(
        self, accept_encoding: str | None, req: codec.InferRequest, mv: ModelVersion, outputs: dict
    ) -> Response:
        if req.outputs is None:
            chosen = [(s.name, outputs[s.name], req.binary_output) for s in mv.outputs if s.name in outputs]
        else:
            chosen = [
                (o.name, outputs[o.name], req.binary_output if o.binary is None else o.binary) for o in req.outputs
            ]
        body, header_length = codec.encode_infer_response(mv.name, str(mv.version), req.id, chosen)
        # compressing a few hundred bytes costs more than sending them
        body, encoding = codec.encode_content(body, accept_encoding, min_size=1024)
        headers = {}
        media_type = "application/json"
        if header_length is not None:
            headers["Inference-Header-Content-Length"] = str(header_length)
            media_type = "application/octet-stream"
        if encoding is not None:
            headers["Content-Encoding"] = encoding
        return Response(body, media_type=media_type, headers=headers)

    # -- repository extension ---------------------------------------------------------------------
    async def repository_index(self, request: Request) -> Response:
        body = await read_body(request, self.max_request_bytes)
        options = optional_json_object(body)
        return _json(self.host.index(ready_only=bool(options.get("ready", False))))

    async def load(self, request: Request) -> Response:
        optional_json_object(await read_body(request, self.max_request_bytes))
        name = request.path_params["model"]
        failure = await self.host.load(name)
        if failure is not None:
            return codec_error(f"failed to load model '{name}': {failure}", 400)
        return _json({})

    async def unload(self, request: Request) -> Response:
        optional_json_object(await read_body(request, self.max_request_bytes))
        await self.host.unload(request.path_params["model"])
        return _json({})


def codec_error(message: str, status: int) -> Response:
    return Response(codec.encode_error(message), status_code=status, media_type="application/json")


def _tensor_meta(mv: ModelVersion, spec) -> dict:
    return {"name": spec.name, "datatype": spec.datatype, "shape": served_shape(mv.config, spec)}


def sticky_value(request: Request, name: str, parameters: dict | None = None) -> str | None:
    """A request's sticky key: the header `name`, else its KServe request parameter `name` (not an object or list)."""
    value = request.headers.get(name)
    if value is None and parameters is not None:
        found = parameters.get(name)
        value = None if found is None or isinstance(found, (dict, list)) else str(found)
    return value


def _header_length(raw: str | None) -> int | None:
    if raw is None:
        return None
    if not raw.isdigit():
        raise InvalidInput(f"Inference-Header-Content-Length must be a non-negative integer, got {raw!r}")
    return int(raw)


def _schedule_parameters(parameters: dict) -> tuple[int, float | None]:
    """Triton's per-request scheduling parameters: `priority` (level) and `timeout` (microseconds)."""
    priority = parameters.get("priority", 0)
    timeout = parameters.get("timeout")
    if isinstance(priority, bool) or not isinstance(priority, int) or priority < 0:
        raise InvalidInput(f"parameter 'priority' must be a non-negative integer, got {priority!r}")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int) or timeout < 0):
        raise InvalidInput(f"parameter 'timeout' must be a non-negative integer of microseconds, got {timeout!r}")
    return priority, None if not timeout else timeout / 1e6


def optional_json_object(body: bytes) -> dict:
    if not body.strip():
        return {}
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidInput("request body must be a JSON object")
    return value
