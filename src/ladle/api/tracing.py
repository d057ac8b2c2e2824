"""OpenTelemetry spans of requests: one SERVER span per request (parented by the W3C `traceparent` it carries) and
children placed after the fact from times the server measured anyway (queue wait, batch compute, tokenize, ...).

Invariant: off unless `configure` installed a tracer provider (--otlp-traces-endpoint, or a test); while off, no
OpenTelemetry module is imported and `request_span` hands back one shared no-op context (a global read per request).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from ladle.errors import LadleError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span

_tracer: Any = None  # an opentelemetry Tracer once configured; None: tracing is off
#: read by hot paths as `tracing.active` (one module attribute load) to skip even the no-op span while off
active = False
_propagator: Any = None
_OFF = contextlib.nullcontext(None)
# monotonic -> epoch ns: the server measures with time.monotonic(); spans want wall-clock ns
_EPOCH_OFFSET_NS = 0


def configure(provider: TracerProvider | None) -> None:
    """Turn tracing on with `provider` (its processors decide where spans go), or off with None."""
    global _tracer, _propagator, _EPOCH_OFFSET_NS, active
    if provider is None:
        _tracer = _propagator = None
        active = False
        return
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    _EPOCH_OFFSET_NS = time.time_ns() - time.monotonic_ns()
    _propagator = TraceContextTextMapPropagator()
    _tracer = provider.get_tracer("ladle")
    active = True


def setup(endpoint: str) -> TracerProvider:
    """The server's provider: service.name "ladle", a BatchSpanProcessor (export off the request path) to an OTLP
    exporter — OTLP/HTTP (protobuf) when `endpoint` is a URL with a path (http://collector:4318/v1/traces), OTLP/gRPC
    otherwise (collector:4317, http://collector:4317)."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": "ladle"}))
    provider.add_span_processor(BatchSpanProcessor(_exporter(endpoint)))
    configure(provider)
    return provider


def _exporter(endpoint: str) -> Any:
    parsed = urlparse(endpoint)
    if parsed.scheme in ("http", "https") and parsed.path not in ("", "/"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=endpoint)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GRPCSpanExporter

    insecure = parsed.scheme != "https"
    return GRPCSpanExporter(endpoint=endpoint, insecure=insecure)


def enabled() -> bool:
    return _tracer is not None


def request_span(
    name: str, headers: Mapping[str, str] | None, attributes: Mapping[str, Any] | None = None
) -> contextlib.AbstractContextManager[Span | None]:
    """`with request_span("POST /v2/models/{model}/infer", request.headers, {...}) as span:` — the request's SERVER
    span (None while tracing is off), a child of the `traceparent` in `headers` (HTTP headers or gRPC metadata as a
    mapping). Its `ladle.outcome` is "success" unless the body raised (then "rejected" for a 4xx LadleError, else
    "error") or set another with `set_outcome`."""
    if _tracer is None:
        return _OFF
    return _server_span(name, headers, attributes)


@contextlib.contextmanager
def _server_span(name: str, headers: Mapping[str, str] | None, attributes: Mapping[str, Any] | None) -> Iterator[Span]:
    span = start_span(name, headers, attributes)
    try:
        yield span
    except BaseException as exc:
        end_span(span, exc)
        raise
    end_span(span)


def start_span(
    name: str, headers: Mapping[str, str] | None, attributes: Mapping[str, Any] | None = None
) -> Span | None:
    """A request's SERVER span, started and not current (children are placed explicitly); None while off. For a
    request whose span outlives its handler (a stream): end it with `end_span`."""
    if _tracer is None:
        return None
    from opentelemetry.trace import SpanKind

    parent = _propagator.extract(headers) if headers else None
    return _tracer.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes)


def end_span(span: Span | None, exc: BaseException | None = None) -> None:
    """End a request's span: `exc` (what the request raised, if it did) decides its outcome and status."""
    if span is None:
        return
    if exc is not None:
        from opentelemetry.trace import Status, StatusCode

        status = exc.status if isinstance(exc, LadleError) else 500
        span.set_attribute("http.response.status_code", status)
        set_outcome(span, "rejected" if status < 500 else "error")
        span.set_status(Status(StatusCode.ERROR, str(exc)[:200]))
    elif "ladle.outcome" not in (span.attributes or {}):
        set_outcome(span, "success")
    span.end()


def set_outcome(span: Span | None, outcome: str) -> None:
    if span is not None:
        span.set_attribute("ladle.outcome", outcome)


def child(span: Span, name: str, start: float, end: float, attributes: Mapping[str, Any] | None = None) -> None:
    """A finished child of `span` from `start` to `end` (time.monotonic() readings)."""
    from opentelemetry import trace

    context = trace.set_span_in_context(span)
    started = _tracer.start_span(name, context=context, start_time=_epoch_ns(start), attributes=attributes)
    started.end(end_time=_epoch_ns(end))


def batch_spans(span: Span, batch_started: float, queue_s: float, compute_s: float, batch_rows: int) -> None:
    """`queue` (enqueued -> its batch started) and `compute` (the batch it ran in: gather, model call, split), recorded
    in each request's own trace — a batch shared by several requests appears once in each of their traces."""
    child(span, "queue", batch_started - queue_s, batch_started)
    child(span, "compute", batch_started, batch_started + compute_s, {"ladle.batch_size": batch_rows})


def _epoch_ns(monotonic_s: float) -> int:
    return int(monotonic_s * 1e9) + _EPOCH_OFFSET_NS
