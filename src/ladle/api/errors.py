"""Error responses in each protocol's own shape, chosen by route prefix.

KServe v2 answers `{"error": "..."}`; the OpenAI API answers
`{"error": {"message", "type", "param", "code"}}`. Every handled failure goes through here.
"""

from __future__ import annotations

import logging

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from ladle.api.body import ClientDisconnected
from ladle.errors import LadleError

log = logging.getLogger(__name__)

_OPENAI_TYPES = {
    400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
    422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable", 500: "internal_error",
    401: "authentication_error", 403: "permission_error", 504: "timeout",
}


def _headers(retry_after_s: int | None) -> dict[str, str] | None:
    return None if retry_after_s is None else {"Retry-After": str(retry_after_s)}


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


async def ladle_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, LadleError)
    if exc.status >= 500:
        log.warning("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message)
    return error_response(request, exc.message, exc.status, param=exc.param, retry_after_s=exc.retry_after_s)


async def http_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = exc.detail if exc.status_code != 404 else f"no route {request.method} {request.url.path}"
    return error_response(request, str(message), exc.status_code)


async def unexpected_error_handler(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(request, f"internal server error: {type(exc).__name__}: {exc}", 500)


async def disconnect_handler(request: Request, exc: Exception) -> Response:
    # nobody is listening; 499 (nginx's "client closed request") keeps access logs honest
    return Response(status_code=499)


EXCEPTION_HANDLERS = {
    ClientDisconnected: disconnect_handler,
    LadleError: ladle_error_handler,
    HTTPException: http_error_handler,
    Exception: unexpected_error_handler,
}
