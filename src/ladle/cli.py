"""The `ladle` command line. Flags are built from the config dataclasses (config.py), so every
option has exactly one definition: its field, default and help live there.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any

from ladle import __version__
from ladle.bench import add_bench_parser
from ladle.config import HTTPConfig, LLMConfig, RepositoryConfig, SecurityConfig, ServerConfig

log = logging.getLogger("ladle")


def add_dataclass_options(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    """One flag per field of `cls` (`max_request_bytes` -> `--max-request-bytes`)."""
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = _base_type(hints[f.name])
        meta = f.metadata
        kwargs: dict[str, Any] = {"help": meta.get("help", ""), "dest": f.name}
        default = f.default
        if meta.get("positional"):
            group.add_argument(f.name, nargs="?", type=kind, default=default, help=kwargs["help"],
                               metavar=f.name.upper())
            continue
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind is tuple:
            kwargs.update(action="append", metavar=f.name.upper())
            default = None
        else:
            kwargs.update(type=kind, choices=meta.get("choices"))
        if kind is not tuple and default is not None:
            kwargs["help"] += " (default: %(default)s)"
        group.add_argument(flag, default=default, **kwargs)


def _base_type(hint: Any) -> type:
    """int | None -> int; tuple[str, ...] -> tuple; Path -> Path."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def build_dataclass(cls: type, args: argparse.Namespace) -> Any:
    values = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name)
        if isinstance(f.default, tuple):
            value = tuple(value or ())
        values[f.name] = value
    return cls(**values)


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
    serve.set_defaults(handler=run_serve)
    add_bench_parser(commands)
    return parser


def run_serve(args: argparse.Namespace) -> int:
    from ladle.api.auth import resolve_keys
    from ladle.server import serve

    try:  # keys from the flags, LADLE_API_KEY / LADLE_ADMIN_KEY and --api-key-file; never echoed
        security = resolve_keys(build_dataclass(SecurityConfig, args), os.environ)
    except ValueError as exc:
        print(f"ladle serve: {exc}", file=sys.stderr)
        return 2
    config = ServerConfig(
        http=build_dataclass(HTTPConfig, args),
        repository=build_dataclass(RepositoryConfig, args),
        llm=build_dataclass(LLMConfig, args),
        security=security,
    )
    if config.repository.repository is not None and not Path(config.repository.repository).is_dir():
        print(f"ladle serve: model repository {config.repository.repository} is not a directory", file=sys.stderr)
        return 2
    if config.repository.repository is None and config.llm.model is None:
        print("ladle serve: give a model repository directory, --model CHECKPOINT, or both", file=sys.stderr)
        return 2
    return serve(config)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)
