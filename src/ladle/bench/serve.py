"""`ladle bench serve`: its config (flags named as `vllm bench serve`'s), its command line and its Python API.

Importing this stays light (no aiohttp, numpy or transformers): `ladle serve` builds the same parser, so the load
engine (serve_runner.py, serve_client.py) loads only when a bench runs. `run(config)` is the entry point for scripts.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ladle.config import option
from ladle.options import add_dataclass_options

if TYPE_CHECKING:
    from ladle.bench.serve_runner import ServeBenchResult

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
DATASETS = ("random", "sharegpt", "prefix", "custom")


@dataclass(frozen=True)
class ServeBenchConfig:
    """One `ladle bench serve` run against any OpenAI-compatible server (ladle, vLLM, llama.cpp, TGI, ...)."""

    base_url: str = option("http://127.0.0.1:8000", "server base URL (without /v1)")
    endpoint: str = option("/v1/completions", "API to load", choices=ENDPOINTS)
    model: str | None = option(None, "model name sent in requests (default: the first of GET /v1/models)")
    tokenizer: Path | None = option(  # noqa: RUF009 (option() returns a dataclasses.field)
        None, "local Hugging Face tokenizer directory for prompt lengths (default: --model when it is a directory)"
    )
    dataset_name: str = option("random", "workload", choices=DATASETS)
    dataset_path: Path | None = option(  # noqa: RUF009
        None, "sharegpt: JSON list of {'conversations': [...]}; custom: JSONL of {'prompt': ...} lines"
    )
    num_prompts: int = option(1000, "measured requests to send")
    random_input_len: int = option(1024, "random: mean prompt tokens (the server's special tokens included)")
    random_output_len: int = option(128, "random: mean max_tokens")
    random_range_ratio: float = option(0.0, "random: lengths uniform in [mean*(1-r), mean*(1+r)], 0 <= r < 1")
    random_prefix_len: int = option(0, "random: tokens of one fixed random prefix before every prompt")
    prefix_repetition_prefix_len: int = option(256, "prefix: tokens of each shared system prompt")
    prefix_repetition_suffix_len: int = option(256, "prefix: tokens of each request's own part")
    prefix_repetition_num_prefixes: int = option(10, "prefix: number of groups sharing a system prompt")
    prefix_repetition_output_len: int = option(128, "prefix: max_tokens")
    sharegpt_output_len: int | None = option(None, "sharegpt: max_tokens (default: each reply's own length)")
    custom_output_len: int = option(256, "custom: max_tokens")
    request_rate: float = option(math.inf, "requests/s, Poisson arrivals (gamma with --burstiness); inf: all at once")
    burstiness: float = option(1.0, "gamma shape of inter-arrival times: 1 is Poisson, < 1 burstier, > 1 steadier")
    max_concurrency: int | None = option(None, "most requests in flight (a closed loop when --request-rate is inf)")
    num_warmups: int = option(0, "unmeasured requests sent first (at the same concurrency, prompts of their own: "
                                 "none is measured again, so none primes the prefix cache for a measured one)")
    ignore_eos: bool = option(False, "send ignore_eos so every request generates exactly max_tokens tokens")
    temperature: float = option(0.0, "sampling temperature (0: greedy, as vLLM's bench)")
    extra_body: str | None = option(None, "JSON object merged into every request body")
    seed: int = option(0, "seed for the datasets and the arrival times")
    slo: str | None = option(None, "goodput SLOs in ms, e.g. ttft=200,tpot=50 (names: ttft, tpot, e2el)")
    percentile_metrics: str = option("ttft,tpot,itl,e2el", "metrics whose percentiles are printed")
    metric_percentiles: str = option("90,99", "percentiles printed for each metric (mean and median always are)")
    result_json: Path | None = option(None, "write config, per-request records and the summary here")  # noqa: RUF009
    timeout: float = option(3600.0, "per-request timeout in seconds (a timed-out request counts as failed)")
    disable_tqdm: bool = option(False, "hide the progress bar")

    def __post_init__(self) -> None:
        positive = {"num_prompts": self.num_prompts, "request_rate": self.request_rate, "timeout": self.timeout,
                    "burstiness": self.burstiness, "max_concurrency": self.max_concurrency or 1}
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if self.num_warmups < 0:
            raise ValueError(f"--num-warmups must be 0 or more, got {self.num_warmups}")
        if self.dataset_name in ("sharegpt", "custom") and self.dataset_path is None:
            raise ValueError(f"--dataset-name {self.dataset_name} needs --dataset-path FILE")
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"--endpoint must be one of {', '.join(ENDPOINTS)}, got {self.endpoint}")
        bad = set(self.metrics) - {"ttft", "tpot", "itl", "e2el"}
        if bad:
            raise ValueError(f"--percentile-metrics: unknown {', '.join(sorted(bad))}; use ttft, tpot, itl, e2el")
        if any(not 0 <= q <= 100 for q in self.percentiles):
            raise ValueError("--metric-percentiles must be between 0 and 100")
        from ladle.bench.serve_metrics import parse_slo

        parse_slo(self.slo)  # raises on a malformed SLO before any request is sent
        if self.extra_body is not None and not isinstance(_json_or_none(self.extra_body), dict):
            raise ValueError(f"--extra-body must be a JSON object, got {self.extra_body!r}")

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(m.strip() for m in self.percentile_metrics.split(",") if m.strip())

    @property
    def percentiles(self) -> tuple[float, ...]:
        try:
            return tuple(float(q) for q in self.metric_percentiles.split(",") if q.strip())
        except ValueError:
            raise ValueError(f"--metric-percentiles: cannot read {self.metric_percentiles!r}; e.g. 50,90,99") from None

    @property
    def is_chat(self) -> bool:
        return self.endpoint.endswith("chat/completions")


def _json_or_none(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return None


def run(config: ServeBenchConfig) -> ServeBenchResult:
    """Blocking: sample the workload, warm up, send the measured requests, return the records and summary."""
    from ladle.bench.serve_runner import run as run_load

    return run_load(config)


def add_serve_parser(tools: argparse._SubParsersAction) -> None:
    """Add `serve` to the `ladle bench` tools."""
    parser = tools.add_parser(
        "serve", help="OpenAI-API LLM serving load (TTFT, TPOT, ITL, goodput), as `vllm bench serve`",
        description="Stream completions from any OpenAI-compatible server and report throughput and latency with "
        "vLLM's definitions, so ladle, vLLM, llama.cpp or TGI compare one to one.",
    )
    add_dataclass_options(parser, ServeBenchConfig, "bench serve")
    parser.set_defaults(handler=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from ladle.bench import bench_extra_missing, run_tool

    if bench_extra_missing("serve"):
        return 2
    from ladle.bench.serve_runner import main as run_main

    return run_tool("serve", ServeBenchConfig, args, run_main)


def main(argv: list[str] | None = None) -> int:
    """`python -m ladle.bench.serve ...` until `ladle bench serve` is wired into the CLI."""
    parser = argparse.ArgumentParser(prog="ladle bench")
    add_serve_parser(parser.add_subparsers(dest="tool", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    return args.handler(args)


if __name__ == "__main__":
    from ladle.bench.serve import main as _main  # the package's module, not __main__: one ServeBenchConfig class

    sys.exit(_main())
