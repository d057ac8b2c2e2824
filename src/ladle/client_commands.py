"""What ladle's client commands (`ladle jobs`, `ladle rollout`) share: the default server, the exit statuses, and the
error a command reports as `ladle <command>: MESSAGE` before exiting with its status. A leaf: stdlib only."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

DEFAULT_URL = "http://127.0.0.1:8000"

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class CommandError(Exception):
    """A failure to report as `ladle <command>: MESSAGE` with an exit status."""

    def __init__(self, message: str, status: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@contextmanager
def reaching(url: str) -> Iterator[None]:
    """The client's connection failures as CommandErrors naming the server (exit status 2). httpx is imported here,
    when a command runs, so that importing a command module stays light."""
    import httpx

    try:
        yield
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise CommandError(f"cannot reach the server at {url}: {exc}", EXIT_USAGE) from None
    except httpx.TransportError as exc:
        raise CommandError(f"lost the server at {url}: {type(exc).__name__}: {exc}", EXIT_USAGE) from None

