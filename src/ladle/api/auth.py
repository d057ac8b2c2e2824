"""Access control: bearer API/admin keys and per-key rate limits, checked by one pure ASGI middleware
before any handler runs (so a rejected request never reads its body nor reaches a model).

Invariants: keys are compared in constant time against every configured key and never logged or echoed;
health probes are always open and never limited; with no key and no rate limit the middleware is not
installed at all, and the admin endpoints are off unless an admin key or --allow-admin-without-key is set.
"""


from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

from prometheus_client import Counter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ladle.api.errors import is_openai_path, kserve_error, openai_error
from ladle.config import SecurityConfig
from ladle.errors import Forbidden, LadleError, TooManyRequests, Unauthorized

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready", "/health"})
#: rate-limit buckets kept at most; the least recently used is dropped (which only ever gives a client more)
MAX_BUCKETS = 10_000
SHORT_KEY = 16
ADMIN_OFF = ("the admin API (repository load/unload, rollouts) is off: start ladle with --admin-key KEY and send "
             "`Authorization: Bearer KEY`, or with --allow-admin-without-key")
_NEEDS_KEY = "this endpoint needs an API key: send the header `Authorization: Bearer <key>`"
_OPENAI_CODES = {401: "invalid_api_key", 429: "rate_limit_exceeded"}


class Access(enum.Enum):
    OPEN = "open"
    METRICS = "metrics"
    API = "api"
    ADMIN = "admin"


class Role(enum.IntEnum):
    NONE = 0
    INFERENCE = 1
    ADMIN = 2


#: methods that change a model's rollout (GET of it only reads: an API key is enough)
_ROLLOUT_ADMIN_METHODS = frozenset({"POST", "DELETE"})


def is_admin_path(path: str, method: str = "GET") -> bool:
    """The repository load/unload API, starting or aborting a rollout (POST/DELETE /v2/models/{m}/rollout), and
    any cache reset endpoint (vLLM's /reset_prefix_cache and kin)."""
    if path.startswith("/v2/repository/models/"):
        return path.endswith(("/load", "/unload"))
    if path.startswith("/v2/models/"):
        # exactly /v2/models/{model}/rollout: a model name cannot hold a '/'
        return method in _ROLLOUT_ADMIN_METHODS and path.count("/") == 4 and path.endswith("/rollout")
    return path.rpartition("/")[2].startswith("reset")


def is_console_page(path: str) -> bool:
    """The web console's page and static files (api/console.py): open, like a login page, so that it can load and
    ask for a key; the JSON views under /console/api/ are API endpoints."""
    return path in ("/", "/console", "/console/") or (path.startswith("/console/") and
                                                      not path.startswith("/console/api/"))


def classify(path: str, method: str) -> Access:
    if path in OPEN_PATHS or is_console_page(path):
        return Access.OPEN
    if path == "/metrics":
        return Access.METRICS
    return Access.ADMIN if is_admin_path(path, method) else Access.API


# -- keys: where they come from --------------------------------------------------------------------
def resolve_keys(config: SecurityConfig, environ: Mapping[str, str]) -> SecurityConfig:
    """`config` with LADLE_API_KEY, LADLE_ADMIN_KEY and --api-key-file merged in, every setting checked.
    ValueError says what is wrong without ever quoting a key."""
    api = _checked("--api-key", config.api_key) + _from_env(environ, "LADLE_API_KEY")
    if config.api_key_file is not None:
        api += _from_file(config.api_key_file)
    admin = _checked("--admin-key", config.admin_key) + _from_env(environ, "LADLE_ADMIN_KEY")
    if config.protect_metrics and not (api or admin):
        raise ValueError("--protect-metrics needs a key to protect with: set --api-key or --admin-key")
    if not math.isfinite(config.rate_limit) or config.rate_limit < 0:
        raise ValueError("--rate-limit must be a finite number of requests per second >= 0 (0: no limit)")
    if config.rate_limit_burst is not None and config.rate_limit_burst < 1:
        raise ValueError("--rate-limit-burst must be at least 1")
    return dataclasses.replace(config, api_key=tuple(dict.fromkeys(api)), admin_key=tuple(dict.fromkeys(admin)))


def _checked(source: str, keys: tuple[str, ...] | list[str]) -> list[str]:
    cleaned = [key.strip() for key in keys]
    for i, key in enumerate(cleaned, 1):
        if not key:
            raise ValueError(f"{source}: key {i} is empty; give a non-empty key (e.g. `openssl rand -hex 32`)")
        if not all("!" <= c <= "~" for c in key):
            raise ValueError(f"{source}: key {i} has a space or a character that is not printable ASCII; "
                             "keys must be printable ASCII without spaces")
    return cleaned


def _from_env(environ: Mapping[str, str], name: str) -> list[str]:
    value = environ.get(name)
    return [] if value is None else _checked(name, value.split(","))


def _from_file(path: Path) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--api-key-file {path}: cannot read it ({type(exc).__name__})") from None
    keys = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not keys:
        raise ValueError(f"--api-key-file {path} holds no key (one key per line; # starts a comment)")
    return _checked(f"--api-key-file {path}", keys)


# -- keys: matching ----------------------------------------------------------------------------------
class KeyRing:
    """Configured keys as SHA-256 digests: every comparison is between equal-length values, so neither a
    key's length nor which key matched shows in the timing."""

    def __init__(self, api_keys: tuple[str, ...], admin_keys: tuple[str, ...]) -> None:
        roles: dict[bytes, Role] = {}
        for keys, role in ((api_keys, Role.INFERENCE), (admin_keys, Role.ADMIN)):
            for key in keys:
                digest = _digest(key.encode())
                roles[digest] = max(role, roles.get(digest, Role.NONE))
        self._entries = tuple(roles.items())

    def match(self, token: bytes | None) -> tuple[Role, int]:
        """The role of `token` and the index of its key (-1: none). Every key is compared, no early exit."""
        if token is None:
            return Role.NONE, -1
        digest = _digest(token)
        found = -1
        for i, (key_digest, _role) in enumerate(self._entries):
            if hmac.compare_digest(key_digest, digest):
                found = i
        return (self._entries[found][1], found) if found >= 0 else (Role.NONE, -1)


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def bearer_token(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The token of the first `Authorization: Bearer ...` header, in one pass over the raw ASGI headers."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() != b"bearer":
                return None
            return token.strip() or None
    return None


# -- rate limits ----------------------------------------------------------------------------------------
class RateLimiter:
    """A token bucket per client identity (a key's index, or a client IP), `burst` deep and refilled at
    `rate` tokens a second. The table holds at most `max_buckets`; the least recently seen is dropped."""

    def __init__(self, rate: float, burst: float, max_buckets: int = MAX_BUCKETS) -> None:
        self.rate = rate
        self.burst = burst
        self.max_buckets = max_buckets
        self._buckets: OrderedDict[int | str, list[float]] = OrderedDict()  # identity -> [tokens, last refill]

    def wait(self, identity: int | str, now: float | None = None) -> float:
        """Take a token: 0.0 when one was there, else the seconds until one will be."""
        now = time.monotonic() if now is None else now
        bucket = self._buckets.get(identity)
        if bucket is None:
            if len(self._buckets) >= self.max_buckets:
                self._buckets.popitem(last=False)
            bucket = self._buckets[identity] = [self.burst, now]
        else:
            self._buckets.move_to_end(identity)
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return 0.0
        bucket[0] = tokens
        return (1.0 - tokens) / self.rate

    def __len__(self) -> int:
        return len(self._buckets)


# -- the middleware -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Policy:
    """What each kind of endpoint asks for, decided once at start-up."""

    keys: KeyRing
    api_needs_key: bool  # any --api-key: every API endpoint needs one (an admin key does too)
    admin_needs_admin_key: bool  # any --admin-key: load/unload and resets need exactly that
    metrics_needs_key: bool

    def deny(self, access: Access, role: Role, token: bytes | None) -> LadleError | None:
        if access is Access.ADMIN and self.admin_needs_admin_key:
            if role is Role.ADMIN:
                return None
            if role is Role.INFERENCE:
                return Forbidden("this endpoint needs an admin key (--admin-key); the key given is an API key")
            return _unauthorized(token)
        needs_key = self.metrics_needs_key if access is Access.METRICS else self.api_needs_key
        return _unauthorized(token) if needs_key and role is Role.NONE else None


def _unauthorized(token: bytes | None) -> Unauthorized:
    return Unauthorized(_NEEDS_KEY if token is None else "invalid API key")


class AccessControl:
    """Pure ASGI middleware: authenticate and rate-limit, then hand the request on untouched (streams
    included); a rejection is answered here in the route's protocol shape."""

    def __init__(
        self, app: ASGIApp, policy: Policy, limiter: RateLimiter | None, refused: Counter | None = None
    ) -> None:
        self.app = app
        self.policy = policy
        self.limiter = limiter
        # ladle_requests_refused_total by reason, children bound once (None: not counted)
        self._refused = {} if refused is None else {status: refused.labels(reason) for status, reason in
                                                    ((401, "unauthorized"), (403, "forbidden"), (429, "rate_limited"))}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        access = classify(scope["path"], scope["method"])
        if access is Access.OPEN:
            return await self.app(scope, receive, send)
        token = bearer_token(scope["headers"])
        role, index = self.policy.keys.match(token)
        denied = self.policy.deny(access, role, token)
        if denied is None and self.limiter is not None:
            denied = self._limit(index if index >= 0 else _client_ip(scope))
        if denied is None:
            return await self.app(scope, receive, send)
        log.debug("%s %s -> %d: %s", scope["method"], scope["path"], denied.status, denied.message)
        if (counter := self._refused.get(denied.status)) is not None:
            counter.inc()
        await _render(scope, denied)(scope, receive, send)

    def _limit(self, identity: int | str) -> TooManyRequests | None:
        assert self.limiter is not None
        wait = self.limiter.wait(identity)
        if wait <= 0.0:
            return None
        error = TooManyRequests(f"rate limit of {self.limiter.rate:g} requests/s (burst {self.limiter.burst:g}) "
                                "exceeded for this client; retry after the Retry-After header's seconds")
        error.retry_after_s = max(1, math.ceil(wait))
        return error


def _client_ip(scope: Scope) -> str:
    client = scope.get("client")
    return client[0] if client else "unknown"


def _render(scope: Scope, error: LadleError) -> Response:
    if is_openai_path(scope["path"]):
        response = openai_error(error.message, error.status, code=_OPENAI_CODES.get(error.status),
                                retry_after_s=error.retry_after_s)
    else:
        response = kserve_error(error.message, error.status, error.retry_after_s)
    if error.status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


# -- wiring ---------------------------------------------------------------------------------------------
def install_access_control(app: Starlette, config: SecurityConfig, host: str = "127.0.0.1",
                           refused: Counter | None = None) -> None:
    """Switch the admin endpoints off unless allowed, and add the middleware only when there is a key or a
    rate limit to enforce (otherwise requests pay nothing). Logs how many keys there are, never a key."""
    if not config.admin_key and not config.allow_admin_without_key:
        _switch_off_admin_routes(app)
    _log_settings(config, host)
    if not (config.api_key or config.admin_key or config.rate_limit > 0):
        return
    policy = Policy(KeyRing(config.api_key, config.admin_key), api_needs_key=bool(config.api_key),
                    admin_needs_admin_key=bool(config.admin_key), metrics_needs_key=config.protect_metrics)
    limiter = None
    if config.rate_limit > 0:
        burst = config.rate_limit_burst or max(1.0, 2.0 * config.rate_limit)
        limiter = RateLimiter(config.rate_limit, float(burst))
    app.add_middleware(AccessControl, policy=policy, limiter=limiter, refused=refused)


def _switch_off_admin_routes(app: Starlette) -> None:
    routes = app.router.routes
    for i, route in enumerate(routes):
        if isinstance(route, Route) and any(is_admin_path(route.path, m) for m in route.methods or ("GET",)):
            routes[i] = Route(route.path, _admin_off, methods=list(route.methods or ()), name=route.name)


async def _admin_off(request: Request) -> Response:
    raise Forbidden(ADMIN_OFF)


def _log_settings(config: SecurityConfig, host: str) -> None:
    admin = ("on, any client" if config.allow_admin_without_key and not config.admin_key
             else "on, admin key" if config.admin_key else "off")
    rate = f"{config.rate_limit:g}/s per {'key' if config.api_key else 'client IP'}" if config.rate_limit else "off"
    log.info("access control: %d API key(s), %d admin key(s); /metrics %s; admin API %s; rate limit %s",
             len(config.api_key), len(config.admin_key), "needs a key" if config.protect_metrics else "open",
             admin, rate)
    if any(len(key) < SHORT_KEY for key in (*config.api_key, *config.admin_key)):
        log.warning("some keys are shorter than %d characters; use long random keys (openssl rand -hex 32)",
                    SHORT_KEY)
    if not config.api_key and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s with no --api-key: anyone who can reach the port can use the API", host)
