"""uvicorn's httptools protocol with a bound on a request's head (request line + headers).

Invariant: no connection buffers more than MAX_HEAD_BYTES (plus one socket read) of an unfinished head: httptools
itself keeps a header of any size (a 200 MB header was measured growing RSS by 290 MB), so a larger head gets 431
and the connection is closed. Bodies are bounded separately (--max-request-bytes, api/body.py).
"""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

#: request line plus headers; nginx's default allows 32 KiB, bearer keys and cookies fit many times over
MAX_HEAD_BYTES = 64 * 1024
_MESSAGE = b"request line and headers exceed 65536 bytes"
_RESPONSE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; charset=utf-8\r\n"
             b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_MESSAGE), _MESSAGE))


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """Counts the bytes received since the current message began until its headers are complete."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._in_head = True  # a connection starts with a request's head
        self._refused = False

    def data_received(self, data: bytes) -> None:
        if self._refused:
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
