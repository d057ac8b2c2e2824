"""The `ladle` command line: `main` and the command handlers. Flags are built from the config dataclasses
(config.py) by options.py, so every option has exactly one definition: its field, default and help live there.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from ladle import __version__
from ladle.bench import add_bench_parser
from ladle.config import (
    ClusterConfig,
    HTTPConfig,
    JobsConfig,
    LLMConfig,
    RepositoryConfig,
    SecurityConfig,
    ServerConfig,
)
from ladle.jobs.cli import add_jobs_parser
from ladle.options import add_dataclass_options, build_dataclass
from ladle.rollout_cli import add_rollout_parser

log = logging.getLogger("ladle")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ladle", description="ladle: serve classic models (KServe v2) and LLMs (OpenAI API) fast."
    )
    parser.add_argument("--version", action="version", version=f"ladle {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve", help="serve a model repository over HTTP",
        description="Serve a model repository over the KServe v2 REST protocol and LLMs (--model, or "
        "`backend: llm` in the repository) over an OpenAI-compatible API.",
    )
    add_dataclass_options(serve, RepositoryConfig, "model repository")
    add_dataclass_options(serve, LLMConfig, "LLM engine")
    add_dataclass_options(serve, HTTPConfig, "HTTP server")
    add_dataclass_options(serve, SecurityConfig, "security")
    add_dataclass_options(serve, JobsConfig, "batch jobs (OpenAI Batches API, /v2/jobs)")
    add_dataclass_options(serve, ClusterConfig, "scaling out on Ray (--ray)")
    serve.set_defaults(handler=run_serve)
    schema = commands.add_parser(
        "config-schema", help="print the JSON schema of a model's config.yaml",
        description="Print the JSON schema of a model repository's config.yaml (for editors and CI checks).",
    )
    schema.set_defaults(handler=run_config_schema)
    add_bench_parser(commands)
    add_jobs_parser(commands)
    add_rollout_parser(commands)
    return parser


def build_server_config(args: argparse.Namespace) -> ServerConfig:
    """The ServerConfig of parsed `ladle serve` flags; ValueError for unusable keys."""
    from ladle.api.auth import resolve_keys

    # keys from the flags, LADLE_API_KEY / LADLE_ADMIN_KEY and --api-key-file; never echoed
    security = resolve_keys(build_dataclass(SecurityConfig, args), os.environ)
    return ServerConfig(
        http=build_dataclass(HTTPConfig, args),
        repository=build_dataclass(RepositoryConfig, args),
        llm=build_dataclass(LLMConfig, args),
        security=security,
        jobs=build_dataclass(JobsConfig, args),
        cluster=build_dataclass(ClusterConfig, args),
    )


def run_serve(args: argparse.Namespace) -> int:
    from ladle.server import serve

    try:
        config = build_server_config(args)
    except ValueError as exc:
        print(f"ladle serve: {exc}", file=sys.stderr)
        return 2
    if problem := cluster_problem(config.cluster, on_ray=config.cluster.ray is not None):
        print(f"ladle serve: {problem}", file=sys.stderr)
        return 2
    if config.repository.repository is not None and not Path(config.repository.repository).is_dir():
        print(f"ladle serve: model repository {config.repository.repository} is not a directory", file=sys.stderr)
        return 2
    if config.repository.repository is None and config.llm.model is None:
        print("ladle serve: give a model repository directory, --model CHECKPOINT, or both", file=sys.stderr)
        return 2
    return serve(config)


def cluster_problem(cluster: ClusterConfig, on_ray: bool) -> str | None:
    """What is wrong with the --ray flags, if anything (checked before anything starts)."""
    low, high = cluster.min_replicas, cluster.max_replicas
    if cluster.replicas < 1 or any(n is not None and n < 1 for n in (low, high)):
        return "--replicas, --min-replicas and --max-replicas must be at least 1"
    if cluster.upscale_delay < 0 or cluster.downscale_delay < 0 or cluster.target_ongoing_requests <= 0:
        return "--upscale-delay and --downscale-delay must be >= 0, --target-ongoing-requests > 0"
    if cluster.ray is not None and cluster.ray.startswith("ray://"):
        return ("--ray takes the cluster's GCS address (host:6379), not a Ray Client address: run ladle on a node "
                "of the cluster (Serve's deployment handles need a real driver)")
    if cluster.ray is not None and Path(cluster.ray).is_dir():
        return (f"--ray takes a Ray address (or nothing), not the directory {cluster.ray}: put the repository "
                "first, `ladle serve REPOSITORY --ray`, or write `--ray auto`")
    if low is not None and high is not None and high < low:
        return f"--max-replicas ({high}) is below --min-replicas ({low})"
    if not on_ray and (cluster.autoscaling or cluster.replicas != 1):
        return "--replicas, --min-replicas and --max-replicas need --ray (replicas run on a Ray cluster)"
    return None


def run_config_schema(args: argparse.Namespace) -> int:
    from ladle.repository.model_config import config_schema

    print(json.dumps(config_schema(), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)
