"""KServe v2 / Open Inference Protocol over REST, with Triton's binary tensor and repository extensions.

A thin adapter: decode (kserve_codec) -> check against the signature -> batcher -> encode. Every
failure answers `{"error": "..."}` with the status its LadleError carries.
"""

from __future__ import annotations

import asyncio
import logging
import time

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ladle import __version__
from ladle.api import kserve_codec as codec
from ladle.api.body import ClientDisconnected, header_values, read_body, until_disconnect
from ladle.errors import InvalidInput, LadleError
from ladle.metrics import Metrics
from ladle.repository.layout import parse_version
from ladle.repository.registry import ModelRegistry, ModelVersion
from ladle.repository.signature import check_inputs, check_outputs, served_shape

log = logging.getLogger(__name__)

EXTENSIONS = ["binary_tensor_data", "model_repository", "model_configuration", "schedule_policy"]
HEADER_LENGTH = b"inference-header-content-length"
_INFER_HEADERS = (b"content-length", b"content-encoding", HEADER_LENGTH, b"accept-encoding")
#: bodies (and results) larger than this are decoded (encoded) on a worker thread: parsing a 64 MiB JSON body
#: takes hundreds of ms, which on the event loop would stall every other request; small ones stay inline,
#: where the thread hand-off would cost more than the work
OFFLOAD_BYTES = 256 * 1024


def _json(payload: object, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


class KServeAPI:
    def __init__(self, registry: ModelRegistry, metrics: Metrics, max_request_bytes: int) -> None:
        self.registry = registry
        self.metrics = metrics
        self.max_request_bytes = max_request_bytes

    def routes(self) -> list[Route]:
        model = "/v2/models/{model}"
        version = model + "/versions/{version}"
        return [  # the hot route first: Starlette tries routes in order
            *(Route(p + "/infer", self.infer, methods=["POST"]) for p in (model, version)),
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
        # the app's Readiness: models, LLM engines (--model ones too) and SIGTERM draining
        return Response(status_code=200 if request.app.state.readiness() else 503)

    def _lookup(self, request: Request) -> ModelVersion:
        raw = request.path_params.get("version")
        version = None if raw in (None, "") else parse_version(raw)
        return self.registry.get(request.path_params["model"], version)

    async def model_metadata(self, request: Request) -> Response:
        mv = self._lookup(request)
        record = self.registry.models[mv.name]
        return _json({
            "name": mv.name,
            "versions": [str(v) for v in sorted(record.ready)],
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
        batching = None if c.dynamic_batching is None else vars(c.dynamic_batching)
        return _json({
            "name": c.name, "backend": c.backend, "platform": c.platform, "max_batch_size": c.max_batch_size,
            "input": [{"name": s.name, "data_type": f"TYPE_{s.datatype}", "dims": list(s.shape)} for s in mv.inputs],
            "output": [{"name": s.name, "data_type": f"TYPE_{s.datatype}", "dims": list(s.shape)} for s in mv.outputs],
            "dynamic_batching": batching,
            "instance_group": [{"count": c.instance_count, "kind": c.instance_kind}],
            "execution_timeout_ms": c.execution_timeout_ms,
            "version_policy": {c.version_policy.kind: vars(c.version_policy)},
            "parameters": dict(c.parameters),
        })

    # -- inference ------------------------------------------------------------------------------
    async def infer(self, request: Request) -> Response:
        started = time.monotonic()
        mv = self._lookup(request)  # an unknown model is refused before its body is read
        try:
            headers = header_values(request, *_INFER_HEADERS)
            body = await read_body(request, self.max_request_bytes, headers.get(b"content-length"))
            if mv.batcher is None:
                raise InvalidInput(f"model '{mv.name}' is an LLM: use the OpenAI API (POST /v1/completions)")
            req = await self._decode(headers, body)
            # again, now that no await separates it from submit: a reload may have retired that
            # version while the body arrived, and its successor must take the request
            mv = self._lookup(request)
            response = await self._infer(request, mv, headers, req)
        except ClientDisconnected:
            mv.metrics.outcome("cancelled")
            log.debug("infer %s:%d cancelled: client disconnected", mv.name, mv.version)
            return Response(status_code=499)
        except LadleError as exc:
            mv.metrics.outcome("error" if exc.status >= 500 else "rejected")
            raise
        elapsed = time.monotonic() - started
        mv.metrics.outcome("success")
        mv.metrics.request_duration.observe(elapsed)
        return response

    async def _decode(self, headers: dict[bytes, str], body: bytes) -> codec.InferRequest:
        encoding = headers.get(b"content-encoding")
        header_length = _header_length(headers.get(HEADER_LENGTH))

        def decode() -> codec.InferRequest:
            raw = codec.decode_content(body, encoding, self.max_request_bytes)
            return codec.decode_infer_request(raw, header_length)

        # a compressed body may inflate to the full body limit: decompressing is large work too
        if len(body) > OFFLOAD_BYTES or encoding not in (None, "", "identity"):
            return await asyncio.to_thread(decode)
        return decode()

    async def _infer(
        self, request: Request, mv: ModelVersion, headers: dict[bytes, str], req: codec.InferRequest
    ) -> Response:
        if mv.batcher is None:  # the version that took over during decoding may be an LLM
            raise InvalidInput(f"model '{mv.name}' is an LLM: use the OpenAI API (POST /v1/completions)")
        inputs = {t.name: t.data for t in req.inputs}
        label = f"{mv.name}:{mv.version}"
        rows = check_inputs(label, mv.config, mv.inputs, {t.name: (t.datatype, t.data) for t in req.inputs})
        if req.outputs is not None:
            check_outputs(label, mv.outputs, (o.name for o in req.outputs))
        priority, timeout_s = _schedule_parameters(req.parameters)
        pending = mv.batcher.submit(inputs, rows, priority, timeout_s)
        try:
            result = await until_disconnect(request, pending.future)
        except ClientDisconnected:
            mv.batcher.cancel(pending)
            raise
        mv.metrics.queue_duration.observe(result.queue_s)
        log.debug(
            "infer %s rows=%d queue=%.2fms compute=%.2fms batch=%d",
            label, rows, result.queue_s * 1e3, result.compute_s * 1e3, result.batch_rows,
        )
        accept = headers.get(b"accept-encoding")
        if sum(getattr(a, "nbytes", 0) for a in result.outputs.values()) > OFFLOAD_BYTES:
            return await asyncio.to_thread(self._encode, accept, req, mv, result.outputs)
        return self._encode(accept, req, mv, result.outputs)

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
        options = _json_object(body)
        return _json(self.registry.index(ready_only=bool(options.get("ready", False))))

    async def load(self, request: Request) -> Response:
        _json_object(await read_body(request, self.max_request_bytes))
        name = request.path_params["model"]
        await self.registry.load(name)
        record = self.registry.models[name]
        if not record.ready:
            reasons = [f"version {v}: {s.reason}" for v, s in sorted(record.status.items()) if s.reason]
            detail = "; ".join(reasons) or record.reason
            return codec_error(f"failed to load model '{name}': {detail}", 400)
        return _json({})

    async def unload(self, request: Request) -> Response:
        _json_object(await read_body(request, self.max_request_bytes))
        await self.registry.unload(request.path_params["model"])
        return _json({})


def codec_error(message: str, status: int) -> Response:
    return Response(codec.encode_error(message), status_code=status, media_type="application/json")


def _tensor_meta(mv: ModelVersion, spec) -> dict:
    return {"name": spec.name, "datatype": spec.datatype, "shape": served_shape(mv.config, spec)}


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


def _json_object(body: bytes) -> dict:
    if not body.strip():
        return {}
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidInput("request body must be a JSON object")
    return value
