"""`ladle bench`: the load generators' command line — one frozen config dataclass per tool, whose fields
are its flags (as for `ladle serve`). Importing this stays light (no HTTP client, numpy or tqdm):
`ladle serve` builds the same parser, so the engines (infer.py, ...) load only when a bench runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ladle.config import option
from ladle.extras import MissingExtra, require_extra
from ladle.options import add_dataclass_options, build_dataclass


@dataclass(frozen=True)
class InferBenchConfig:
    """One `ladle bench infer` run. Unset load/stop options resolve to concurrency 1 and 100 requests."""

    url: str = option("http://127.0.0.1:8000", "base URL of the KServe v2 server (with --protocol grpc: its host, "
                      "unless --grpc-address is given)")
    protocol: str = option("http", "http (KServe v2 REST) or grpc (inference.GRPCInferenceService, raw tensors)")
    grpc_address: str | None = option(None, "host:port of the gRPC endpoint (default: --url's host, port 8001)")
    model: str | None = option(None, "model to load-test (required)")
    model_version: int | None = option(None, "model version (default: the server's choice, usually the newest)")
    input: Path | None = option(  # noqa: RUF009 (option() returns a dataclasses.field)
        None, "JSON file holding a v2 inference request (or a list of them, sent in turn); "
        "default: random batch-1 data generated from the model's metadata"
    )
    binary: bool = option(False, "send inputs with Triton's binary tensor extension instead of JSON data")
    concurrency: int | None = option(None, "closed loop: this many requests in flight at all times (default 1)")
    request_rate: float | None = option(None, "open loop: Poisson arrivals at this many requests/s")
    num_requests: int | None = option(None, "measured requests to send (default 100 unless --duration)")
    duration: float | None = option(None, "send requests for this many seconds instead of a fixed count")
    warmup: int = option(10, "unmeasured requests sent first")
    result_json: Path | None = option(  # noqa: RUF009
        None, "write config, per-request records and the summary to this file"
    )
    seed: int = option(0, "random seed for generated inputs and Poisson arrivals")
    timeout: float = option(60.0, "per-request timeout in seconds (a timed-out request counts as an error)")
    progress: bool = option(True, "show a progress bar on stderr")

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("--model is required")
        if self.concurrency is not None and self.request_rate is not None:
            raise ValueError("--concurrency and --request-rate are exclusive: pick a closed or an open loop")
        if self.num_requests is not None and self.duration is not None:
            raise ValueError("--num-requests and --duration are exclusive: stop after a count or after a time")
        # Frozen: resolving the defaults here means every later reader sees one settled config.
        if self.request_rate is None and self.concurrency is None:
            object.__setattr__(self, "concurrency", 1)
        if self.duration is None and self.num_requests is None:
            object.__setattr__(self, "num_requests", 100)
        _check_positive(concurrency=self.concurrency, request_rate=self.request_rate,
                        num_requests=self.num_requests, duration=self.duration, timeout=self.timeout)
        if self.warmup < 0:
            raise ValueError(f"--warmup must be 0 or more, got {self.warmup}")
        if self.protocol not in ("http", "grpc"):
            raise ValueError(f"--protocol must be http or grpc, got {self.protocol!r}")


def _check_positive(**values: float | None) -> None:
    for name, value in values.items():
        if value is not None and value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")


def add_bench_parser(commands: argparse._SubParsersAction) -> None:
    """Add `bench` and its tools to the `ladle` command's subparsers."""
    bench = commands.add_parser("bench", help="load-test a running server",
                                description="Load generators for a running ladle (or any compatible) server.")
    tools = bench.add_subparsers(dest="tool", required=True, metavar="TOOL")
    infer = tools.add_parser(
        "infer", help="KServe v2 inference load (closed or open loop)",
        description="Send KServe v2 inference requests to one model and report throughput and latency.",
    )
    add_dataclass_options(infer, InferBenchConfig, "bench infer")
    infer.set_defaults(handler=_run_infer)
    from ladle.bench.serve import add_serve_parser

    add_serve_parser(tools)


def run_tool(tool: str, config_class: type, args: argparse.Namespace, entry: Callable[[Any], int]) -> int:
    """Build a tool's config from parsed options (a bad value: message and exit status 2), then run it."""
    try:
        config = build_dataclass(config_class, args)
    except ValueError as exc:
        print(f"ladle bench {tool}: {exc}", file=sys.stderr)
        return 2
    return entry(config)


def bench_extra_missing(tool: str) -> bool:
    """True, after saying which extra to install, when the load generators' client packages are missing."""
    try:
        require_extra("bench", f"ladle bench {tool}")
    except MissingExtra as exc:
        print(exc, file=sys.stderr)
        return True
    return False


def _run_infer(args: argparse.Namespace) -> int:
    if bench_extra_missing("infer"):
        return 2
    from ladle.bench.infer import main

    return run_tool("infer", InferBenchConfig, args, main)


def grpc_client_missing() -> bool:
    """True, after saying what to install, when `--protocol grpc` cannot run (it uses tritonclient's gRPC stubs)."""
    try:
        import tritonclient.grpc.service_pb2_grpc  # noqa: F401
    except ImportError:
        print("ladle bench infer --protocol grpc needs tritonclient's gRPC stubs: pip install 'ladle[bench]' "
              "(tritonclient[grpc])", file=sys.stderr)
        return True
    return False
