"""Gated rollouts over HTTP: `POST|GET|DELETE /v2/models/{model}/rollout` (start one, see its progress, abort or
forget it), a thin adapter over serving/rollout.py's RolloutManager. POST and DELETE are admin endpoints (api/auth.py).

Invariant: a request body is bounded by --max-request-bytes and checked field by field here; the manager only ever
sees a valid RolloutPlan, and every answer is the rollout's status object (errors in the KServe shape).
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ladle.api.body import read_body
from ladle.api.kserve import optional_json_object
from ladle.errors import InvalidInput
from ladle.repository.layout import check_model_name
from ladle.serving.rollout import RolloutManager
from ladle.serving.rollout_plan import DEFAULT_MIN_REQUESTS, RolloutPlan, parse_duration

FIELDS = ("to", "steps", "every", "max_error_rate", "max_p99_ms", "min_requests")
PATH = "/v2/models/{model}/rollout"


def _json(payload: object) -> Response:
    return Response(orjson.dumps(payload), media_type="application/json")


class RolloutsAPI:
    def __init__(self, manager: RolloutManager, max_request_bytes: int) -> None:
        self.manager = manager
        self.max_request_bytes = max_request_bytes

    def routes(self) -> list[Route]:
        # one route per method: the admin switch (api/auth.py) turns off POST and DELETE, never GET
        return [Route(PATH, self.begin, methods=["POST"]), Route(PATH, self.status, methods=["GET"]),
                Route(PATH, self.abort, methods=["DELETE"])]

    async def begin(self, request: Request) -> Response:
        model = check_model_name(request.path_params["model"])
        body = optional_json_object(await read_body(request, self.max_request_bytes))
        return _json(await self.manager.begin(parse_plan(model, body)))

    async def status(self, request: Request) -> Response:
        return _json(self.manager.status(check_model_name(request.path_params["model"])))

    async def abort(self, request: Request) -> Response:
        return _json(await self.manager.abort(check_model_name(request.path_params["model"])))


def parse_plan(model: str, body: dict[str, Any]) -> RolloutPlan:
    """The plan a POST body asks for; InvalidInput naming the field at fault."""
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise InvalidInput(f"unknown field(s) {', '.join(unknown)}; a rollout takes {', '.join(FIELDS)}",
                           param=unknown[0])
    for field in ("to", "steps", "every"):
        if body.get(field) is None:
            raise InvalidInput(f"{field}: required (e.g. {{\"to\": 2, \"steps\": [5, 25, 50, 100], "
                               "\"every\": \"5m\", \"max_error_rate\": 0.01, \"max_p99_ms\": 200})", param=field)
    try:
        every_s = parse_duration(body["every"])
    except ValueError as exc:
        raise InvalidInput(f"every: {exc}", param="every") from None
    to = body["to"]
    if isinstance(to, str) and to.isascii() and to.isdigit():
        to = int(to)  # KServe spells versions as strings
    try:
        return RolloutPlan(model, to, body["steps"], every_s,
                           body.get("max_error_rate"), body.get("max_p99_ms"),
                           body.get("min_requests", DEFAULT_MIN_REQUESTS))
    except ValueError as exc:
        raise InvalidInput(str(exc), param=str(exc).partition(":")[0]) from None
