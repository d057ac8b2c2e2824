"""The `inference.GRPCInferenceService` servicer: a thin adapter over the model host, as api/kserve.py is for REST.

Every RPC is checked by GrpcAccess before it touches the host; a LadleError ends the call with its gRPC status
(errors.py). Inference goes decode -> serving.submit (check, batcher, outcome) -> encode; a cancelled RPC cancels its
handler task, and submit then drops the queued request before it runs. RPCs not listed answer UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from ladle import __version__
from ladle.api import stats, tracing
from ladle.api.auth import Access
from ladle.api.grpc import codec, messages
from ladle.api.grpc.access import GrpcAccess
from ladle.api.grpc.errors import grpc_error
from ladle.api.grpc.generated import grpc_service_pb2 as pb
from ladle.api.grpc.generated import grpc_service_pb2_grpc as pb_grpc
from ladle.api.kserve import EXTENSIONS, OFFLOAD_BYTES, _schedule_parameters
from ladle.errors import InvalidInput, LadleError, ModelError
from ladle.repository.layout import parse_version
from ladle.serving.host import ModelHost
from ladle.serving.submit import Outcome, submit
from ladle.serving.versions import ModelVersion

if TYPE_CHECKING:  # OpenTelemetry is imported only when tracing is on
    from opentelemetry.trace import Span

log = logging.getLogger(__name__)

INFER_SPAN = "/inference.GRPCInferenceService/ModelInfer"


def rpc(access: Access) -> Callable:
    """Checks the caller's access, then runs the RPC; a LadleError aborts it with the mapped status."""
    def wrap(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(method)
        async def handler(self: InferenceService, request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                self.check(access, context)
                return await method(self, request, context)
            except LadleError as exc:
                await context.abort(*grpc_error(exc))
            except Exception as exc:  # never grpc's UNKNOWN with the exception's text: INTERNAL, detail logged only
                log.exception("gRPC %s failed", method.__name__)
                await context.abort(*grpc_error(ModelError(f"{type(exc).__name__}: {exc}")))
        return handler
    return wrap


async def _wait(future: asyncio.Future) -> Any:
    # grpc.aio cancels the handler task when the client cancels: the CancelledError raised here makes submit drop
    # the queued request (REST needs a disconnect watcher for the same, api/body.until_disconnect)
    return await future


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, host: ModelHost, access: GrpcAccess) -> None:
        self.host = host
        self.access = access

    def check(self, access: Access, context: grpc.aio.ServicerContext) -> None:
        denied = self.access.deny(access, context.invocation_metadata(), context.peer())
        if denied is not None:
            raise denied

    # -- health and metadata ----------------------------------------------------------------------
    @rpc(Access.OPEN)
    async def ServerLive(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    @rpc(Access.OPEN)
    async def ServerReady(self, request: Any, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=self.host.is_ready())

    @rpc(Access.API)
    async def ModelReady(self, request: Any, context: Any) -> Any:
        try:
            self.lookup(request.name, request.version)
        except LadleError:  # unknown, not ready or a bad version: not ready (tritonclient's is_model_ready -> False)
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    @rpc(Access.API)
    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        extensions = list(dict.fromkeys([*EXTENSIONS, "statistics"]))  # ModelStatistics is served here either way
        return pb.ServerMetadataResponse(name="ladle", version=__version__, extensions=extensions)

    @rpc(Access.API)
    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        return messages.model_metadata(self.host, self.lookup(request.name, request.version))

    @rpc(Access.API)
    async def ModelConfig(self, request: Any, context: Any) -> Any:
        return messages.model_config(self.lookup(request.name, request.version))

    @rpc(Access.API)
    async def ModelStatistics(self, request: Any, context: Any) -> Any:
        version = parse_version(request.version) if request.version else None
        return messages.statistics(stats.statistics(self.host, request.name or None, version))

    # -- repository extension ---------------------------------------------------------------------
    @rpc(Access.API)
    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        return messages.repository_index(self.host.index(ready_only=request.ready))

    @rpc(Access.ADMIN)
    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        failure = await self.host.load(request.model_name)
        if failure is not None:
            raise InvalidInput(f"failed to load model '{request.model_name}': {failure}")
        return pb.RepositoryModelLoadResponse()

    @rpc(Access.ADMIN)
    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        await self.host.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # -- inference --------------------------------------------------------------------------------
    def lookup(self, name: str, version: str, parameters: dict | None = None,
               metadata: Any = None) -> ModelVersion:
        """The version a request goes to: the one it names, else the model's split's (by its sticky key)."""
        return self.host.lookup(name, parse_version(version) if version else None,
                                lambda key: sticky_value(key, parameters, metadata))

    @rpc(Access.API)
    async def ModelInfer(self, request: Any, context: Any) -> Any:
        return await self.infer(request, context)

    async def ModelStreamInfer(self, requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        """Each request answered in order on the stream; a failed one answers `error_message`, the stream goes on."""
        try:
            self.check(Access.API, context)
        except LadleError as exc:
            await context.abort(*grpc_error(exc))
        async for request in requests:
            try:
                yield pb.ModelStreamInferResponse(infer_response=await self.infer(request, context))
            except LadleError as exc:
                yield pb.ModelStreamInferResponse(error_message=grpc_error(exc)[1])

    async def infer(self, request: Any, context: Any) -> Any:
        if not tracing.active:  # off: not even a no-op span on the hot path
            return await self._infer(request, context, None)
        metadata = dict(context.invocation_metadata() or ())  # a traceparent entry parents the span
        with tracing.request_span(INFER_SPAN, metadata, {"ladle.model": request.model_name}) as span:
            return await self._infer(request, context, span)

    async def _infer(self, request: Any, context: Any, span: Span | None) -> Any:
        started = time.monotonic()
        metadata = context.invocation_metadata()
        mv = self.lookup(request.model_name, request.model_version, None, metadata)  # before any decode
        outcome = Outcome(mv, started, asyncio.CancelledError)
        with outcome:
            if mv.batcher is None:
                raise InvalidInput(f"model '{mv.name}' is an LLM: use the OpenAI API (POST /v1/completions)")
            # per-element work on big requests (BYTES items, typed contents) leaves the event loop (codec.py measured)
            off = codec.decode_off_loop(request)
            req = await asyncio.to_thread(codec.decode, request) if off else codec.decode(request)
            outcome.mv = mv = self.lookup(request.model_name, request.model_version, req.parameters, metadata)
            priority, timeout_s = _schedule_parameters(req.parameters)
            result = await submit(mv, req.inputs, _wait, priority, timeout_s, req.outputs)
            if span is not None:
                span.set_attribute("ladle.version", str(mv.version))
                tracing.batch_spans(span, result.batch_started, result.queue_s, result.compute_s, result.batch_rows)
            if not request.model_version and (copy := self.host.shadow_for(mv)):
                shadow, target = copy
                shadow.copy_tensors(target, mv, req.inputs, result.outputs, time.monotonic() - started)
            names = req.outputs if req.outputs is not None else [s.name for s in mv.outputs]
            chosen = [(name, result.outputs[name]) for name in names if name in result.outputs]
            if sum(getattr(a, "nbytes", 0) for _, a in chosen) > OFFLOAD_BYTES:
                return await asyncio.to_thread(_response, mv, req.id, chosen)
            return _response(mv, req.id, chosen)


def _response(mv: ModelVersion, request_id: str, chosen: list[tuple[str, Any]]) -> Any:
    response = pb.ModelInferResponse(model_name=mv.name, model_version=str(mv.version), id=request_id)
    codec.encode_outputs(response, chosen)
    return response


def sticky_value(name: str, parameters: dict | None, metadata: Any) -> str | None:
    """A request's sticky key: the metadata entry `name`, else its request parameter `name`."""
    value = next((v for k, v in metadata or () if k == name.lower() and isinstance(v, str)), None)
    if value is None and parameters is not None:
        found = parameters.get(name)
        value = None if found is None else str(found)
    return value
