"""Errors a request or a model can raise, each with the HTTP status it maps to.

The core raises these; the API adapters turn them into their protocol's error shape. A message
says what was wrong and how to fix it.
"""

from __future__ import annotations


class LadleError(Exception):
    """Base class: `status` is the HTTP status the API layer answers with."""

    status: int = 500
    #: seconds a client should wait before retrying (the Retry-After header); None: no header
    retry_after_s: int | None = None

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param  # the request field at fault, where one is (OpenAI's error "param")


class InvalidInput(LadleError):
    """The request is malformed or does not fit the model's inputs."""

    status = 400


class NotFound(LadleError):
    """No such model, version or route."""

    status = 404


class Conflict(LadleError):
    """The request clashes with the current state (e.g. a rollout of that model is already running)."""

    status = 409


class PayloadTooLarge(LadleError):
    """The request body is over the configured limit."""

    status = 413


class Unprocessable(LadleError):
    """The request is well-formed but cannot be processed (e.g. a model rejected the values)."""

    status = 422


class Unauthorized(LadleError):
    """No valid API key was presented."""

    status = 401


class Forbidden(LadleError):
    """The key is valid but not allowed here (an inference key on an admin endpoint)."""

    status = 403


class TooManyRequests(LadleError):
    """A per-key rate limit is exceeded; retry after `retry_after_s`."""

    status = 429
    retry_after_s = 1


class Unavailable(LadleError):
    """The model exists but cannot take this request now (not ready, queue full, unloading)."""

    status = 503
    retry_after_s = 1


class DeadlineExceeded(LadleError):
    """The request's deadline (its `timeout`) passed before it finished; it was stopped and its resources freed."""

    status = 504


class QueueFull(Unavailable):
    """The model's bounded queue is full; the client should retry later."""


class QueueTimeout(Unavailable):
    """The request waited in the queue past its timeout and was not run."""


class ModelError(LadleError):
    """The model itself raised while running a batch."""

    status = 500


class NotSupported(LadleError):
    """The feature exists, but not in the mode this server runs in (e.g. rollouts under --ray)."""

    status = 501
