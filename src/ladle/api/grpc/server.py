"""GrpcServer: the grpc.aio server on --grpc-port, started by the app's lifespan once the repository is loaded and
stopped first at shutdown.

Invariants: requests are bounded like REST's (max_receive_message_length = --max-request-bytes; calls in flight at
most --max-concurrent-requests, a budget of its own); missing generated
stubs are made on the fly when grpc_tools is importable, else start-up fails saying how to generate them; without
grpcio (a core install, no `grpc` extra) gRPC is off with a warning and REST serves alone.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter

from ladle.api.grpc import build
from ladle.config import ServerConfig
from ladle.extras import MissingExtra, require_extra
from ladle.serving.host import ModelHost

log = logging.getLogger(__name__)

#: a response may carry as much as a request (an echo model), and Triton's clients accept any size
_MAX_SEND = 2**31 - 1


class GrpcServer:
    def __init__(self, config: ServerConfig, host: ModelHost, refused: Counter | None = None) -> None:
        self.config = config
        self.host = host
        self.refused = refused
        self.port: int | None = None
        self._server = None

    async def start(self) -> None:
        try:
            require_extra("grpc", "--grpc-port")
        except MissingExtra as exc:  # a core install: REST still serves
            log.warning("KServe v2 over gRPC is off: %s (--grpc-port 0 silences this)", exc)
            return
        try:
            build.ensure()
        except RuntimeError as exc:
            raise RuntimeError(f"--grpc-port {self.config.http.grpc_port}: {exc}; or pass --grpc-port 0") from None
        import grpc  # the stubs (and grpc) only once gRPC is wanted

        from ladle.api.grpc.access import GrpcAccess
        from ladle.api.grpc.generated import grpc_service_pb2_grpc as pb_grpc
        from ladle.api.grpc.service import InferenceService

        http = self.config.http
        # --max-concurrent-requests bounds gRPC's calls in flight too (its own budget of that size): grpc answers
        # RESOURCE_EXHAUSTED beyond it, before the call reaches ladle
        self._server = server = grpc.aio.server(maximum_concurrent_rpcs=http.max_concurrent_requests or None, options=[
            ("grpc.max_receive_message_length", http.max_request_bytes),
            ("grpc.max_send_message_length", _MAX_SEND),
            ("grpc.so_reuseport", 0),  # a second ladle on a taken port must fail, not share it
        ])
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceService(self.host, GrpcAccess(self.config.security, self.refused)), server)
        address = f"[{http.host}]:{http.grpc_port}" if ":" in http.host else f"{http.host}:{http.grpc_port}"
        try:
            self.port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise RuntimeError(f"cannot serve gRPC on {address} (--grpc-port): {exc}") from None
        await server.start()
        log.info("KServe v2 gRPC on %s", address)

    async def stop(self, grace: float | None = 5.0) -> None:
        """Stops taking calls; calls in flight get `grace` seconds to finish."""
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
