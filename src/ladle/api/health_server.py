"""The health probes on a port of their own (`--health-port`), served by a thread outside the event loop.

Invariant: a probe here never waits for the main port's event loop, so it answers in milliseconds even while that
loop is saturated by an overload; it reports the same readiness as `/v2/health/ready` on the main port.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger(__name__)

LIVE_PATHS = frozenset({"/v2/health/live"})
READY_PATHS = frozenset({"/v2/health/ready", "/health"})


class HealthServer:
    def __init__(self, host: str, port: int, ready: Callable[[], bool]) -> None:
        self._server = ThreadingHTTPServer((host, port), _handler(ready))  # binds now: a taken port fails start-up
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="ladle-health", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> None:
        self._thread.start()
        log.info("health probes also on port %d", self.port)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(ready: Callable[[], bool]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = 5  # a client that stalls mid-request holds only its own thread, and not for long
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # http.server calls do_<METHOD>
            path = self.path.split("?", 1)[0]
            if path in LIVE_PATHS:
                status = 200
            elif path in READY_PATHS:
                status = 200 if ready() else 503
            else:
                status = 404
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:  # probes come every few seconds: no log lines
            pass

    return Handler
