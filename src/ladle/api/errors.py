"""Error responses in each protocol's own shape, chosen by route prefix.

KServe v2 answers `{"error": "..."}`; the OpenAI API answers
`{"error": {"message", "type", "param", "code"}}`. Every handled failure goes through here.
Invariant: an internal failure (an unexpected exception, a model's own error) reaches the client only as
`internal error; request id ID` (also the X-Request-ID header); its detail goes to the log under that id.
"""

from __future__ import annotations

import logging
import re
import uuid

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from ladle.api.body import ClientDisconnected
from ladle.errors import DeadlineExceeded, LadleError, NotSupported, Unavailable

log = logging.getLogger(__name__)

_OPENAI_TYPES = {
    400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
    422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable", 500: "internal_error",
    401: "authentication_error", 403: "permission_error", 504: "timeout",
}


# a client's own X-Request-ID is echoed (and logged) only when it is a short token that is safe in a log line
_SAFE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,64}")


def _headers(retry_after_s: int | None) -> dict[str, str] | None:
    return None if retry_after_s is None else {"Retry-After": str(retry_after_s)}


def request_id(request: Request | None = None) -> str:
    """The client's X-Request-ID when it is a short safe token, else a fresh random id."""
    if request is not None:
        for key, value in request.scope.get("headers", ()):
            if key == b"x-request-id" and _SAFE_REQUEST_ID.fullmatch(value):
                return value.decode()
    return uuid.uuid4().hex


def is_internal(exc: LadleError) -> bool:
    """A 5xx whose message may carry internal detail: everything but ladle's own 501s (not in this mode), 503s (not
    ready, queue full, draining) and 504s (deadline), which are written by ladle and say only what the client can act
    on."""
    return exc.status >= 500 and not isinstance(exc, (NotSupported, Unavailable, DeadlineExceeded))


def public_message(exc: LadleError, rid: str | None = None) -> str:
    """What a client may see of `exc`: its message, or for an internal failure a generic one with a request id
    (the detail is logged under that id). For error events in streams as well as for error responses."""
    if not is_internal(exc):
        return exc.message
    rid = rid or request_id()
    log.error("request %s failed (%d): %s", rid, exc.status, exc.message)
    return _generic(rid)


def _generic(rid: str) -> str:
    return f"internal error; request id {rid}"


def kserve_error(message: str, status: int, retry_after_s: int | None = None) -> Response:
    return Response(orjson.dumps({"error": message}), status_code=status, media_type="application/json",
                    headers=_headers(retry_after_s))


def openai_error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _OPENAI_TYPES.get(status, "error"), "param": param, "code": code}}


def openai_error(message: str, status: int, param: str | None = None, code: str | None = None,
                 retry_after_s: int | None = None) -> Response:
    body = openai_error_body(message, status, param, code)
    return Response(orjson.dumps(body), status_code=status, media_type="application/json",
                    headers=_headers(retry_after_s))


def is_openai_path(path: str) -> bool:
    return path.startswith("/v1/")


def error_response(request: Request, message: str, status: int, param: str | None = None,
                   retry_after_s: int | None = None) -> Response:
    if is_openai_path(request.url.path):
        return openai_error(message, status, param=param, retry_after_s=retry_after_s)
    return kserve_error(message, status, retry_after_s)


def _with_request_id(response: Response, rid: str) -> Response:
    response.headers["X-Request-ID"] = rid
    return response


async def ladle_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, LadleError)
    if not is_internal(exc):
        if exc.status >= 500:
            log.warning("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message)
        return error_response(request, exc.message, exc.status, param=exc.param, retry_after_s=exc.retry_after_s)
    rid = request_id(request)
    log.error("request %s: %s %s -> %d: %s", rid, request.method, request.url.path, exc.status, exc.message)
    return _with_request_id(error_response(request, _generic(rid), exc.status), rid)


async def http_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = exc.detail if exc.status_code != 404 else f"no route {request.method} {request.url.path}"
    return error_response(request, str(message), exc.status_code)


async def unexpected_error_handler(request: Request, exc: Exception) -> Response:
    rid = request_id(request)
    log.error("request %s: unhandled error on %s %s", rid, request.method, request.url.path, exc_info=exc)
    return _with_request_id(error_response(request, _generic(rid), 500), rid)


async def disconnect_handler(request: Request, exc: Exception) -> Response:
    # nobody is listening; 499 (nginx's "client closed request") keeps access logs honest
    return Response(status_code=499)


EXCEPTION_HANDLERS = {
    ClientDisconnected: disconnect_handler,
    LadleError: ladle_error_handler,
    HTTPException: http_error_handler,
    Exception: unexpected_error_handler,
}
