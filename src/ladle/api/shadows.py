"""GET /v2/models/{model}/shadow: a model's shadow traffic — its settings, counts (compared, mismatches, failed,
dropped) and the newest comparisons, newest first. Read-only; the config file's `shadow:` block is the switch."""

from __future__ import annotations

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ladle.errors import NotFound
from ladle.serving.host import ModelHost


class ShadowAPI:
    def __init__(self, host: ModelHost) -> None:
        self.host = host

    def routes(self) -> list[Route]:
        return [Route("/v2/models/{model}/shadow", self.status, methods=["GET"])]

    async def status(self, request: Request) -> Response:
        name = request.path_params["model"]
        self.host.get(name)  # 404 for an unknown model, 503 for one not ready
        shadow = self.host.shadows.get(name)
        if shadow is None:
            raise NotFound(f"model '{name}' has no shadow traffic: add `shadow: {{version: N, fraction: 0.1}}` to its "
                           "config.yaml (version N loaded through version_policy) and reload it")
        ready = self.host.version(name, shadow.options.version) is not None
        return Response(orjson.dumps(shadow.status(ready)), media_type="application/json")
