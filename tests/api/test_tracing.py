"""OpenTelemetry tracing: the app in process under the SDK's in-memory exporter (span tree, names, attributes, the W3C
traceparent as the root's parent), off by default, and a real `ladle serve --otlp-traces-endpoint` exporting OTLP/HTTP
to a small receiver in the test."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from starlette.testclient import TestClient

from ladle.api import tracing
from ladle.api.app import create_app
from ladle.api.grpc.service import INFER_SPAN as GRPC_INFER
from ladle.config import RepositoryConfig, ServerConfig
from tests.repos import write_probe
from tests.server import LadleServer, free_port

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
BODY = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [-20.0]}]}  # the probe sleeps 20 ms


@pytest.fixture
def repo(tmp_path):
    write_probe(tmp_path, "probe", dynamic_batching={"max_queue_delay_ms": 1})
    return tmp_path


@pytest.fixture
def traced(repo):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.configure(provider)
    app = create_app(ServerConfig(repository=RepositoryConfig(repository=repo)), with_jobs=False)
    try:
        with TestClient(app) as client:
            yield client, exporter
    finally:
        tracing.configure(None)


def by_name(exporter: InMemorySpanExporter) -> dict:
    return {span.name: span for span in exporter.get_finished_spans()}


def test_infer_span_tree_follows_the_traceparent(traced) -> None:
    client, exporter = traced
    response = client.post("/v2/models/probe/infer", json=BODY,
                           headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
    assert response.status_code == 200
    spans = by_name(exporter)
    root = spans["POST /v2/models/{model}/infer"]
    assert root.kind == SpanKind.SERVER
    assert root.context.trace_id == int(TRACE_ID, 16) and root.parent.span_id == int(PARENT_ID, 16)
    assert dict(root.attributes) == {"ladle.model": "probe", "ladle.version": "1", "ladle.outcome": "success"}
    queue, compute = spans["queue"], spans["compute"]
    for child in (queue, compute):
        assert child.parent.span_id == root.context.span_id and child.context.trace_id == root.context.trace_id
    assert compute.attributes["ladle.batch_size"] == 1
    assert root.start_time <= queue.start_time <= queue.end_time == compute.start_time
    assert compute.end_time - compute.start_time >= 20_000_000  # the model's 20 ms sleep is inside `compute`
    assert compute.end_time <= root.end_time
    assert len(exporter.get_finished_spans()) == 3


def test_a_refused_request_is_a_root_span_with_its_outcome(traced) -> None:
    client, exporter = traced
    assert client.post("/v2/models/nope/infer", json=BODY).status_code == 404
    assert client.post("/v2/models/probe/versions/1/infer", json={"inputs": []}).status_code == 400
    missing, bad = exporter.get_finished_spans()
    assert missing.name == "POST /v2/models/{model}/infer" and missing.parent is None  # no traceparent: a new trace
    assert missing.attributes["ladle.outcome"] == "rejected"
    assert missing.attributes["http.response.status_code"] == 404
    assert bad.name == "POST /v2/models/{model}/versions/{version}/infer"
    assert bad.attributes["ladle.outcome"] == "rejected" and bad.attributes["http.response.status_code"] == 400


def test_a_malformed_traceparent_starts_a_new_trace(traced) -> None:
    client, exporter = traced
    assert client.post("/v2/models/probe/infer", json=BODY, headers={"traceparent": "00-zz-yy-01"}).status_code == 200
    root = by_name(exporter)["POST /v2/models/{model}/infer"]
    assert root.parent is None and root.context.trace_id != 0


def test_off_by_default_no_span_is_made(repo) -> None:
    assert not tracing.enabled()
    with tracing.request_span("x", {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}) as span:
        assert span is None
    app = create_app(ServerConfig(repository=RepositoryConfig(repository=repo)), with_jobs=False)
    with TestClient(app) as client:
        assert client.post("/v2/models/probe/infer", json=BODY).status_code == 200


class _Receiver(BaseHTTPRequestHandler):
    received: list[tuple[str, bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_a_real_server_exports_otlp_http_to_the_endpoint(repo) -> None:
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{receiver.server_address[1]}/v1/traces"
    grpc_port = free_port()
    try:
        with LadleServer([repo, "--otlp-traces-endpoint", endpoint, "--grpc-port", str(grpc_port)],
                         env={"OTEL_BSP_SCHEDULE_DELAY": "100"}) as server:
            headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
            assert httpx.post(server.url + "/v2/models/probe/infer", json=BODY, headers=headers).status_code == 200
            client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
            x = grpcclient.InferInput("x", [1, 1], "FP32")
            x.set_data_from_numpy(np.array([[2.0]], dtype=np.float32))
            assert client.infer("probe", [x], headers=headers).as_numpy("y").tolist() == [[4.0]]
            spans = _wait_for_spans(6)
    finally:
        receiver.shutdown()
    names = [s.name for s in spans]
    # one REST and one gRPC request, each a SERVER span with its queue and compute children
    assert names.count("POST /v2/models/{model}/infer") == 1 and names.count(GRPC_INFER) == 1
    assert names.count("queue") == 2 and names.count("compute") == 2
    assert all(s.trace_id.hex() == TRACE_ID for s in spans)  # the traceparent came through both doors


def _wait_for_spans(count: int, timeout: float = 10.0) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        spans = []
        for path, body in _Receiver.received:
            assert path == "/v1/traces"
            request = ExportTraceServiceRequest.FromString(body)
            for resource_spans in request.resource_spans:
                service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                assert service["service.name"] == "ladle"
                spans += [s for scope in resource_spans.scope_spans for s in scope.spans]
        if len(spans) >= count:
            return spans
        time.sleep(0.05)
    raise AssertionError(f"the receiver got {len(spans)} spans, not {count}")


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from ladle.config import LLMConfig
    from ladle.metrics import Metrics
    from ladle.serving.host import ModelHost
    from tests.fixtures.checkpoints import save_tiny_checkpoint

    checkpoint = save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llama", "llama")
    config = ServerConfig(llm=LLMConfig(model=str(checkpoint), served_model_name="tiny", dtype="float32",
                                        num_kv_blocks=64, max_model_len=256))
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.configure(provider)
    host = ModelHost(None, Metrics(), config.llm)
    host.pin_llm(config.llm)
    try:
        with TestClient(create_app(config, host, with_jobs=False)) as client:
            yield client, exporter
    finally:
        tracing.configure(None)


def _llm_tree(exporter: InMemorySpanExporter, root_name: str) -> tuple:
    spans = exporter.get_finished_spans()
    [root] = [s for s in spans if s.name == root_name]
    children = {s.name: s for s in spans if s.parent is not None and s.parent.span_id == root.context.span_id}
    return root, children


def test_chat_completion_spans(llm) -> None:
    client, exporter = llm
    exporter.clear()
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 5,
            "temperature": 0}
    response = client.post("/v1/chat/completions", json=body, headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
    assert response.status_code == 200
    usage = response.json()["usage"]
    root, children = _llm_tree(exporter, "POST /v1/chat/completions")
    assert root.parent.span_id == int(PARENT_ID, 16) and root.context.trace_id == int(TRACE_ID, 16)
    assert dict(root.attributes) == {"ladle.model": "tiny", "ladle.version": "1", "ladle.outcome": "success"}
    assert set(children) == {"tokenize", "queue", "first_token", "generation"}
    assert children["tokenize"].attributes["ladle.prompt_tokens"] == usage["prompt_tokens"]
    assert children["generation"].attributes["ladle.completion_tokens"] == usage["completion_tokens"]
    assert children["tokenize"].end_time <= children["queue"].start_time == children["first_token"].start_time
    assert children["queue"].end_time <= children["first_token"].end_time == children["generation"].start_time
    assert children["generation"].end_time <= root.end_time


def test_a_stream_span_ends_with_the_stream_and_llm_statistics_count_it(llm) -> None:
    client, exporter = llm
    exporter.clear()
    before = client.get("/v2/models/tiny/stats").json()["model_stats"][0]
    body = {"model": "tiny", "prompt": "once upon", "max_tokens": 4, "temperature": 0, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        events = [line for line in response.iter_lines() if line.startswith("data:")]
    assert events[-1] == "data: [DONE]"
    root, children = _llm_tree(exporter, "POST /v1/completions")
    assert root.attributes["ladle.outcome"] == "success" and root.parent is None
    assert children["generation"].end_time <= root.end_time
    assert client.post("/v1/completions", json={**body, "stream": False, "max_tokens": 1000}).status_code == 400
    after = client.get("/v2/models/tiny/stats").json()["model_stats"][0]
    assert (after["name"], after["version"]) == ("tiny", "1")
    success, fail = after["inference_stats"]["success"], after["inference_stats"]["fail"]
    assert success["count"] == before["inference_stats"]["success"]["count"] + 1 and success["ns"] > 0
    assert fail["count"] == before["inference_stats"]["fail"]["count"] + 1
    assert after["batch_stats"] == [] and after["last_inference"] >= before["last_inference"]
