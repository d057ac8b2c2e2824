"""uvicorn's httptools protocol with a bound on a request's head (request line + headers) and on open connections.

Invariants: no connection buffers more than MAX_HEAD_BYTES (plus one socket read) of an unfinished head: httptools
itself keeps a header of any size (a 200 MB header was measured growing RSS by 290 MB), so a larger head gets 431
and the connection is closed. Bodies are bounded separately (--max-request-bytes, api/body.py). Past
`max_connections` open connections a new one gets 503 and is closed at once.

Why not uvicorn's `limit_concurrency`: it answers every request beyond it with 503 — health probes included, so a
connection flood made probes fail (119 of 2,186 in benchmarks/overload) — and logs a warning per refusal. Requests
in flight are bounded by the admission middleware (api/admission.py, health exempt); this bounds only connections.
"""

from __future__ import annotations

import time

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

#: request line plus headers; nginx's default allows 32 KiB, bearer keys and cookies fit many times over
MAX_HEAD_BYTES = 64 * 1024
_MESSAGE = b"request line and headers exceed 65536 bytes"
_FULL = b"too many open connections; retry later"
_FULL_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\nretry-after: 1\r\n"
                  b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_FULL), _FULL))
_RESPONSE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; charset=utf-8\r\n"
             b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_MESSAGE), _MESSAGE))


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """Counts the bytes received since the current message began until its headers are complete."""

    max_connections: int | None = None  # set per server by bounded_protocol()
    _warned_at = 0.0  # one warning per 10 s at most: a flood must not also flood the log

    def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
        super().connection_made(transport)
        # answered once its first bytes arrive: closing with the request still unread would reset the connection
        # and the client would never see the 503
        self._over_cap = self.max_connections is not None and len(self.connections) > self.max_connections

    def _refuse_over_cap(self) -> None:
        now = time.monotonic()
        if now - BoundedHttpToolsProtocol._warned_at > 10:
            BoundedHttpToolsProtocol._warned_at = now
            self.logger.warning("over %d open connections: refusing new ones with 503", self.max_connections)
        self._refused = True
        self.transport.write(_FULL_RESPONSE)
        self.transport.close()

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._in_head = True  # a connection starts with a request's head
        self._refused = False
        self._over_cap = False

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._over_cap:
            self._refuse_over_cap()
            return
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        # checked after parsing: a read that completes the head and carries body bytes is not a long head
        if self._in_head and self._head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
            self._refused = True
            self.logger.warning("refused a request whose head exceeds %d bytes (431)", MAX_HEAD_BYTES)
            self.transport.write(_RESPONSE)
            self.transport.close()

    def on_message_begin(self) -> None:
        # the rest of the read that began this message is not counted: the bound is approximate by one read
        self._head_bytes, self._in_head = 0, True
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()


def bounded_protocol(max_connections: int | None) -> type[BoundedHttpToolsProtocol]:
    """The protocol class for one server, with its connection cap (None: no cap)."""
    return type("BoundedHttpToolsProtocol", (BoundedHttpToolsProtocol,), {"max_connections": max_connections})
