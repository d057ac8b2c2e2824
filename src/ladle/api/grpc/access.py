"""Who may call which RPC: the `authorization` metadata (`Bearer KEY`) checked with REST's key ring, policy and
rate limiter (api/auth.py), so a key means the same on both ports.

Invariants: ServerLive and ServerReady are always open (as /v2/health/*); repository load/unload are admin calls,
off without --admin-key unless --allow-admin-without-key; keys are never logged or echoed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from prometheus_client import Counter

from ladle.api.auth import ADMIN_OFF, Access, KeyRing, Policy, RateLimiter, bearer_token
from ladle.config import SecurityConfig
from ladle.errors import Forbidden, LadleError, TooManyRequests

_REFUSED = ((401, "unauthorized"), (403, "forbidden"), (429, "rate_limited"))


class GrpcAccess:
    def __init__(self, config: SecurityConfig, refused: Counter | None = None) -> None:
        self.admin_off = not config.admin_key and not config.allow_admin_without_key
        self.enforced = bool(config.api_key or config.admin_key or config.rate_limit > 0)
        self.policy = Policy(KeyRing(config.api_key, config.admin_key), api_needs_key=bool(config.api_key),
                             admin_needs_admin_key=bool(config.admin_key), metrics_needs_key=config.protect_metrics)
        self.limiter = None
        if config.rate_limit > 0:
            burst = config.rate_limit_burst or max(1.0, 2.0 * config.rate_limit)
            self.limiter = RateLimiter(config.rate_limit, float(burst))
        self._refused = {} if refused is None else {s: refused.labels(r) for s, r in _REFUSED}

    def deny(self, access: Access, metadata: Iterable[tuple[str, str | bytes]] | None, peer: str) -> LadleError | None:
        """Why this call is refused, or None; `metadata` is the call's invocation metadata."""
        if access is Access.OPEN:
            return None
        denied = None
        if self.enforced:  # keys and rate limits first, as REST's middleware runs before its routes
            token = bearer_token([(k.encode(), v if isinstance(v, bytes) else v.encode())
                                  for k, v in metadata or () if k == "authorization"])
            role, index = self.policy.keys.match(token)
            denied = self.policy.deny(access, role, token)
            if denied is None and self.limiter is not None:
                denied = self._limit(index if index >= 0 else _peer_ip(peer))
        if denied is None and access is Access.ADMIN and self.admin_off:
            denied = Forbidden(ADMIN_OFF)
        if denied is not None and (counter := self._refused.get(denied.status)) is not None:
            counter.inc()
        return denied

    def _limit(self, identity: int | str) -> TooManyRequests | None:
        assert self.limiter is not None
        wait = self.limiter.wait(identity)
        if wait <= 0.0:
            return None
        return TooManyRequests(f"rate limit of {self.limiter.rate:g} requests/s (burst {self.limiter.burst:g}) "
                               f"exceeded for this client; retry in {max(1, math.ceil(wait))} s")


def _peer_ip(peer: str) -> str:
    # grpc peers look like ipv4:127.0.0.1:5555 or ipv6:[::1]:5555
    return peer.rpartition(":")[0] or peer
