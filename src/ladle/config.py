"""Server configuration: frozen dataclasses, one per concern. Each field's `help` is its CLI help.

The CLI builds its flags from these fields (cli.py), so adding a field here adds the option.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


def option(default, help: str, **extra):
    """A dataclass field carrying its CLI help (and optional argparse extras like `choices`)."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class HTTPConfig:
    host: str = option("127.0.0.1", "address to listen on (0.0.0.0 for all interfaces)")
    port: int = option(8000, "TCP port to listen on")
    max_request_bytes: int = option(
        64 * 1024 * 1024, "largest request body accepted, in bytes; larger bodies get HTTP 413"
    )
    log_level: str = option(
        "info", "logging level", choices=("debug", "info", "warning", "error")
    )
    log_format: str = option("text", "log line format", choices=("text", "json"))


@dataclass(frozen=True)
class RepositoryConfig:
    repository: Path | None = option(
        None, "model repository directory: <repo>/<model>/config.yaml and <repo>/<model>/<version>/",
        positional=True,
    )
    load_model: tuple[str, ...] = option(
        (), "load only these models at start-up (repeatable); default: every model in the repository"
    )
    strict_readiness: bool = option(
        True, "report ready only when every model the repository asks for is loaded"
    )


@dataclass(frozen=True)
class ServerConfig:
    http: HTTPConfig = field(default_factory=HTTPConfig)
    repository: RepositoryConfig = field(default_factory=RepositoryConfig)
