"""KServe v2 over gRPC vs REST on one `ladle serve examples/models` (iris version 2 ONNX and minilm): req/s and
p50/p99 at concurrency 1 and 64, each cell a fresh `ladle bench infer` run in this process. REST is measured with
JSON tensors (tritonclient.http's default) and with the binary extension; gRPC sends raw tensor contents.

Run: HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/classic/grpc_vs_rest.py [--duration 5]
Writes benchmarks/classic/out/grpc_vs_rest.{json,md}; progress on stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import orjson
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # benchmarks/spawn.py
sys.path.insert(0, str(HERE))  # run.py (machine, build_demo)
from run import DEMO, build_demo, machine  # noqa: E402
from spawn import free_port, spawned_server  # noqa: E402

from ladle.bench import InferBenchConfig  # noqa: E402
from ladle.bench.infer import run as run_bench  # noqa: E402

PROTOCOLS = ("REST JSON", "REST binary", "gRPC")


def measure(url: str, grpc_address: str, protocol: str, model: str, concurrency: int, duration: float) -> dict:
    config = InferBenchConfig(url=url, model=model, concurrency=concurrency, duration=duration,
                              warmup=max(20, 2 * concurrency), progress=False, seed=0,
                              protocol="grpc" if protocol == "gRPC" else "http", grpc_address=grpc_address,
                              binary=protocol == "REST binary", model_version=2 if model == "iris" else None)
    result = run_bench(config)
    summary = result.summary()
    return {"rps": summary["throughput_rps"], "p50_ms": summary["latency_ms"]["p50"],
            "p99_ms": summary["latency_ms"]["p99"], "requests": summary["requests"], "errors": summary["errors"]}


def table(rows: list[dict]) -> str:
    lines = ["| model | concurrency | protocol | req/s | p50 ms | p99 ms | errors |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        errors = sum(r["errors"].values())
        lines.append(f"| {r['model']} | {r['concurrency']} | {r['protocol']} | {r['rps']:.0f} | "
                     f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {errors} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per cell")
    parser.add_argument("--models", nargs="+", default=["iris", "minilm"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 64])
    args = parser.parse_args()
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    build_demo()
    grpc_port = free_port()
    command = [sys.executable, "-m", "ladle", "serve", str(DEMO), "--log-level", "warning", "--grpc-port",
               str(grpc_port), *(a for m in args.models for a in ("--load-model", m))]
    rows = []
    cells = len(args.models) * len(args.concurrency) * len(PROTOCOLS)
    with spawned_server(command, out / "grpc_vs_rest.log") as spawned, \
            tqdm(total=cells, unit="run", desc="grpc vs rest", file=sys.stderr) as bar:
        for model in args.models:
            for concurrency in args.concurrency:
                for protocol in PROTOCOLS:
                    bar.set_postfix_str(f"{model} c={concurrency} {protocol}")
                    cell = measure(spawned.url, f"127.0.0.1:{grpc_port}", protocol, model, concurrency, args.duration)
                    rows.append({"model": model, "concurrency": concurrency, "protocol": protocol, **cell})
                    bar.update()
    document = {"machine": machine(), "duration_s": args.duration, "rows": rows}
    (out / "grpc_vs_rest.json").write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))
    m = document["machine"]
    report = (f"{table(rows)}\n\nMachine: {m['cpu']}, {m['cores']} cores, load average before the run "
              f"{m['load_average'][0]:.2f}; {args.duration:g} s per cell; server and load generator share the cores.\n")
    (out / "grpc_vs_rest.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
