"""What ladle's client commands (`ladle jobs`, `ladle rollout`) share: the default server, the exit statuses, and the
error a command reports as `ladle <command>: MESSAGE` before exiting with its status. A leaf: stdlib only."""

from __future__ import annotations

DEFAULT_URL = "http://127.0.0.1:8000"

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class CommandError(Exception):
    """A failure to report as `ladle <command>: MESSAGE` with an exit status."""

    def __init__(self, message: str, status: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
