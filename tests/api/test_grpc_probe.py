"""gRPC against purpose-built models: every datatype through an echo model (raw and typed contents), the
authorization metadata, message limits, and a cancelled RPC dropping its queued request before it runs."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from ladle.api.auth import ADMIN_OFF
from ladle.api.grpc.codec import CONTENTS_FIELD
from ladle.api.grpc.generated import grpc_service_pb2 as pb
from ladle.api.grpc.generated import grpc_service_pb2_grpc as pb_grpc
from tests.repos import write_model, write_probe
from tests.server import LadleServer, free_port

API, ADMIN = "api-key-0123456789", "admin-key-0123456789"
AUTH = {"authorization": f"Bearer {API}"}
NUMPY = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
         "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
         "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_}
ECHO_SOURCE = '''
class Echo:
    def load(self):
        pass

    def predict(self, batch):
        return {"out_" + name.removeprefix("in_"): value for name, value in batch.items()}
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[LadleServer]:
    repo = tmp_path_factory.mktemp("repo")
    log = repo / "probe.log"
    write_probe(repo, parameters={"log": str(log)})
    write_probe(repo, "split", versions=(1, 2), version_policy={"all": True}, traffic_split={1: 50, 2: 50},
                sticky_key="X-User-Id")
    tensors = [{"name": f"{{}}_{dt.lower()}", "datatype": dt, "shape": [-1]} for dt in NUMPY]
    for name, chosen in (("echo", tensors), ("echo_typed", [t for t in tensors if t["datatype"] != "FP16"])):
        write_model(repo, name, {
            "backend": "python", "max_batch_size": 0,
            "inputs": [{**t, "name": t["name"].format("in")} for t in chosen],
            "outputs": [{**t, "name": t["name"].format("out")} for t in chosen]}, {1: {"model.py": ECHO_SOURCE}})
    port = free_port()
    with LadleServer([repo, "--grpc-port", str(port), "--api-key", API, "--admin-key", ADMIN,
                      "--max-request-bytes", "1000000"]) as s:
        s.grpc_address, s.probe_log = f"127.0.0.1:{port}", log
        yield s


@pytest.fixture(scope="module")
def rpc(server) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(server.grpc_address)


def _examples() -> dict[str, np.ndarray]:
    out = {}
    for dt, kind in NUMPY.items():
        if dt == "BOOL":
            out[dt] = np.array([True, False, True])
        elif dt == "BYTES":
            out[dt] = np.array([b"", "ünï".encode(), b"\x00\xff"], dtype=np.object_)
        elif np.dtype(kind).kind in "iu":
            info = np.iinfo(kind)
            out[dt] = np.array([info.min, 0, info.max], dtype=kind)
        else:
            out[dt] = np.array([-1.5, 0.0, np.finfo(kind).max], dtype=kind)
    return out


def _inputs(examples: dict[str, np.ndarray]) -> list[grpcclient.InferInput]:
    inputs = []
    for dt, array in examples.items():
        inp = grpcclient.InferInput(f"in_{dt.lower()}", list(array.shape), dt)
        inp.set_data_from_numpy(array)
        inputs.append(inp)
    return inputs


def test_every_datatype_round_trips(rpc) -> None:
    examples = _examples()
    result = rpc.infer("echo", _inputs(examples), headers=AUTH)
    for dt, array in examples.items():
        got = result.as_numpy(f"out_{dt.lower()}")
        assert got.dtype == array.dtype and got.tolist() == array.tolist(), dt
    assert {o.name: o.datatype for o in result.get_response().outputs} == {f"out_{d.lower()}": d for d in NUMPY}


def test_large_bytes_tensor_decodes_off_the_loop(rpc) -> None:
    """Over codec.THREAD_DECODE_BYTES: decoded on a worker thread, same answer."""
    examples = {dt: array[:1] for dt, array in _examples().items()}
    examples["BYTES"] = np.array([f"item {i:06d} ünï".encode() for i in range(10_000)], dtype=np.object_)
    result = rpc.infer("echo", _inputs(examples), headers=AUTH)
    assert result.as_numpy("out_bytes").tolist() == examples["BYTES"].tolist()


def _contents_request(model: str, overrides: dict | None = None) -> pb.ModelInferRequest:
    """Every datatype in typed contents (FP16 has no contents field: left empty). tritonclient sends raw only."""
    request = pb.ModelInferRequest(model_name=model)
    for dt, array in _examples().items():
        if dt == "FP16" and model == "echo_typed":
            continue
        tensor = request.inputs.add(name=f"in_{dt.lower()}", datatype=dt, shape=[3])
        if dt != "FP16":
            getattr(tensor.contents, CONTENTS_FIELD[dt]).extend((overrides or {}).get(dt, array.tolist()))
    return request


def test_typed_contents_decode(server) -> None:
    metadata = tuple(AUTH.items())
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(_contents_request("echo_typed"), metadata=metadata)
        got = {o.name: (o.datatype, list(o.shape)) for o in response.outputs}
        assert got == {f"out_{dt.lower()}": (dt, [3]) for dt in NUMPY if dt != "FP16"}
        index = [o.name for o in response.outputs].index("out_int8")
        assert np.frombuffer(response.raw_output_contents[index], np.int8).tolist() == [-128, 0, 127]
        cases = [(_contents_request("echo"), "send it in raw_input_contents"),
                 (_contents_request("echo_typed", {"INT8": [1, 2, 300]}), "out of range for INT8"),
                 (_contents_request("echo_typed", {"INT32": [1, 2]}), "has 3 elements but contents.int_contents has 2")]
        for request, message in cases:
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(request, metadata=metadata)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in info.value.details()


def _expect(code: grpc.StatusCode, call, *args, **kwargs) -> str:
    with pytest.raises(InferenceServerException) as info:
        call(*args, **kwargs)
    assert info.value.status() == str(code), info.value.message()
    return info.value.message()


def _probe_input(value: float) -> list:
    inp = grpcclient.InferInput("x", [1, 1], "FP32")
    inp.set_data_from_numpy(np.array([[value]], np.float32))
    return [inp]


def test_authorization_metadata(rpc) -> None:
    assert rpc.is_server_live() and rpc.is_server_ready()  # health is open, as /v2/health/*
    assert "needs an API key" in _expect(grpc.StatusCode.UNAUTHENTICATED, rpc.infer, "probe", _probe_input(1))
    wrong = {"authorization": "Bearer nope"}
    assert "invalid API key" in _expect(grpc.StatusCode.UNAUTHENTICATED, rpc.get_model_metadata, "probe",
                                        headers=wrong)
    assert rpc.infer("probe", _probe_input(1.5), headers=AUTH).as_numpy("y").tolist() == [[3.0]]
    assert "admin key" in _expect(grpc.StatusCode.PERMISSION_DENIED, rpc.unload_model, "probe", headers=AUTH)
    _expect(grpc.StatusCode.UNAUTHENTICATED, rpc.load_model, "probe")
    admin = {"authorization": f"Bearer {ADMIN}"}
    rpc.load_model("probe", headers=admin)  # an admin key may do everything
    assert rpc.is_model_ready("probe", headers=admin)


def test_too_large_message_is_refused(rpc) -> None:
    inp = grpcclient.InferInput("x", [300_000, 1], "FP32")  # 1.2 MB > --max-request-bytes 1 MB
    inp.set_data_from_numpy(np.zeros((300_000, 1), np.float32))
    _expect(grpc.StatusCode.RESOURCE_EXHAUSTED, rpc.infer, "probe", [inp], headers=AUTH)
    assert rpc.infer("probe", _probe_input(2.0), headers=AUTH).as_numpy("y").tolist() == [[4.0]]


def test_cancelled_rpc_drops_its_queued_request(server, rpc) -> None:
    log: Path = server.probe_log
    done: list = []

    def record(result, error) -> None:
        done.append((result, error))

    rpc.async_infer("probe", _probe_input(-1500.0), record, headers=AUTH)  # runs 1.5 s
    time.sleep(0.4)  # it is running now: the next request waits in the queue
    queued = rpc.async_infer("probe", _probe_input(4242.0), record, headers=AUTH)
    time.sleep(0.2)
    queued.cancel()
    deadline = time.monotonic() + 10
    while len(done) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rpc.infer("probe", _probe_input(7.0), headers=AUTH).as_numpy("y").tolist() == [[14.0]]
    ran = log.read_text().split()
    assert "-1500.0" in ran and "7.0" in ran
    assert "4242.0" not in ran  # the cancelled request never reached the model
    cancelled = [e for _, e in done if e is not None]
    assert len(cancelled) == 1 and "CANCELLED" in cancelled[0].status()


def test_taken_grpc_port_fails_start_up_clearly(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        write_probe(tmp_path)
        with pytest.raises(RuntimeError) as info, LadleServer([tmp_path, "--grpc-port", str(port)], ready_timeout=60):
            pass
    assert f"cannot serve gRPC on 127.0.0.1:{port} (--grpc-port)" in str(info.value)


def test_admin_off_and_rate_limit_without_keys(tmp_path: Path) -> None:
    write_probe(tmp_path)
    port = free_port()
    with LadleServer([tmp_path, "--grpc-port", str(port), "--rate-limit", "0.5", "--rate-limit-burst", "2"]):
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        assert _expect(grpc.StatusCode.PERMISSION_DENIED, client.unload_model, "probe") == ADMIN_OFF  # as REST's 403
        client.get_model_metadata("probe")  # the second of the burst of 2 (the unload took the first)
        assert "rate limit" in _expect(grpc.StatusCode.RESOURCE_EXHAUSTED, client.get_model_metadata, "probe")
        assert client.is_server_live()  # health is never limited


def test_a_sticky_key_picks_the_same_version_over_grpc_and_rest(server, rpc) -> None:
    """The model's sticky_key as a metadata entry or a request parameter; REST agrees key for key (one hash)."""
    x = grpcclient.InferInput("x", [1, 1], "FP32")
    x.set_data_from_numpy(np.array([[1.0]], dtype=np.float32))
    keys = [f"user-{i}" for i in range(24)]
    by_metadata = {k: rpc.infer("split", [x], headers={**AUTH, "x-user-id": k}).get_response().model_version
                   for k in keys}
    by_parameter = {k: rpc.infer("split", [x], headers=AUTH, parameters={"X-User-Id": k}).get_response().model_version
                    for k in keys}
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [1.0]}]}
    by_rest = {k: httpx.post(server.url + "/v2/models/split/infer", json=body,
                             headers={"Authorization": f"Bearer {API}", "X-User-Id": k}).json()["model_version"]
               for k in keys}
    assert by_metadata == by_parameter == by_rest
    assert set(by_metadata.values()) == {"1", "2"}  # 24 keys at 50/50: both versions have some


def test_calls_in_flight_are_bounded_by_max_concurrent_requests(tmp_path) -> None:
    write_probe(tmp_path)
    port = free_port()
    with LadleServer([tmp_path, "--grpc-port", str(port), "--max-concurrent-requests", "1"]):
        slow = grpcclient.InferInput("x", [1, 1], "FP32")
        slow.set_data_from_numpy(np.array([[-800.0]], dtype=np.float32))  # the probe sleeps 0.8 s
        fast = grpcclient.InferInput("x", [1, 1], "FP32")
        fast.set_data_from_numpy(np.array([[1.0]], dtype=np.float32))
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        answers: list = []
        client.async_infer("probe", [slow], callback=lambda result, error: answers.append((result, error)))
        time.sleep(0.3)  # the slow call holds the one slot
        with pytest.raises(InferenceServerException) as refused:
            client.infer("probe", [fast])
        assert "RESOURCE_EXHAUSTED" in str(refused.value.status())
        deadline = time.monotonic() + 10
        while not answers and time.monotonic() < deadline:
            time.sleep(0.05)
        assert answers and answers[0][1] is None  # the call in flight was answered
        assert client.infer("probe", [fast]).as_numpy("y").tolist() == [[2.0]]  # and the slot is free again

