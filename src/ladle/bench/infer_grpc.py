"""`ladle bench infer --protocol grpc`: the same load loops and records as over REST (infer.py), sent as
ModelInferRequest messages with raw tensor contents over one grpc.aio channel (tritonclient's generated stubs).

Invariant: a record's status is 200 for an OK call, else the gRPC status code's number (14: UNAVAILABLE, ...), so
the REST summaries and reports apply unchanged.
"""

from __future__ import annotations

import time
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from ladle.bench import InferBenchConfig
from ladle.bench.aio import run_interruptible
from ladle.bench.infer import (
    BenchError,
    BenchResult,
    LoadGenerator,
    Record,
    generate_requests,
    grpc_address,
    load_requests,
    tensor_bytes,
)

OK = 200


def infer_message(config: InferBenchConfig, request: dict) -> Any:
    """A v2 request dict (JSON `data`) as a ModelInferRequest with raw_input_contents."""
    message = pb.ModelInferRequest(model_name=config.model or "", model_version=str(config.model_version or ""))
    for entry in request["inputs"]:
        message.inputs.add(name=entry["name"], datatype=entry["datatype"], shape=entry["shape"])
        message.raw_input_contents.append(tensor_bytes(entry["datatype"], entry["data"]))
    for output in request.get("outputs") or ():
        message.outputs.add(name=output["name"])
    return message


class GrpcLoadGenerator(LoadGenerator):
    """LoadGenerator with `send` as one ModelInfer call (the session is the stub)."""

    async def send(self, payload: Any) -> Record:
        started = time.perf_counter()
        try:
            await self.session.ModelInfer(payload, timeout=self.config.timeout)
            status = OK
        except grpc.aio.AioRpcError as exc:
            status = exc.code().value[0]
            if status not in self.result.error_samples:
                self.result.error_samples[status] = f"{exc.code().name}: {exc.details()}"[:400]
        return started - self._t0, time.perf_counter() - started, status


async def _metadata(stub: Any, config: InferBenchConfig) -> dict:
    try:
        meta = await stub.ModelMetadata(pb.ModelMetadataRequest(
            name=config.model or "", version=str(config.model_version or "")), timeout=10)
    except grpc.aio.AioRpcError as exc:
        raise BenchError(f"ModelMetadata({config.model}) at {grpc_address(config)} failed: "
                         f"{exc.code().name}: {exc.details()}") from None
    return {"inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in meta.inputs]}


async def run_grpc(config: InferBenchConfig) -> BenchResult:
    """One bench run over gRPC; the first Ctrl-C stops it and returns what was measured so far."""
    result = BenchResult(config)
    options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    async with grpc.aio.insecure_channel(grpc_address(config), options=options) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        if config.input is not None:
            requests = load_requests(config.input)
        else:
            requests = generate_requests(await _metadata(stub, config), np.random.default_rng(config.seed))
        try:
            messages = [infer_message(config, request) for request in requests]
        except (KeyError, TypeError, ValueError) as exc:
            raise BenchError(f"cannot encode the request: {type(exc).__name__}: {exc}") from None
        generator = GrpcLoadGenerator(config, stub, grpc_address(config), messages, result)
        await run_interruptible(generator.run(), result)
    return result
