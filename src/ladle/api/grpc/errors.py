"""LadleError -> gRPC status: the same errors REST answers with HTTP statuses, in gRPC's own codes.

Invariant: an internal failure's detail never reaches the client (api/errors.public_message logs it under an id).
"""

from __future__ import annotations

import grpc

from ladle.api.errors import public_message
from ladle.errors import (
    DeadlineExceeded,
    Forbidden,
    InvalidInput,
    LadleError,
    NotFound,
    NotSupported,
    PayloadTooLarge,
    TooManyRequests,
    Unauthorized,
    Unavailable,
)

# most specific first: QueueFull and QueueTimeout are Unavailable
_CODES: tuple[tuple[type[LadleError], grpc.StatusCode], ...] = (
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (PayloadTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (TooManyRequests, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unauthorized, grpc.StatusCode.UNAUTHENTICATED),
    (Forbidden, grpc.StatusCode.PERMISSION_DENIED),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (NotSupported, grpc.StatusCode.UNIMPLEMENTED),
)


def status_of(exc: LadleError) -> grpc.StatusCode:
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code
    if 400 <= exc.status < 500:  # a client error without its own code (409, 422): the client must change the request
        return grpc.StatusCode.FAILED_PRECONDITION if exc.status == 409 else grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


def grpc_error(exc: LadleError) -> tuple[grpc.StatusCode, str]:
    """The status code and the message a client may see."""
    return status_of(exc), public_message(exc)
