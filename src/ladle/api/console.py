"""The web console (issue 15): a single-page app shipped in the package (api/console_static/, no build step, no CDN)
at `/` and `/console`, and the two JSON views it reads: the models at a glance (`/console/api/models`) and their
live figures (`/console/api/live`, api/console_live.py). Everything else the page does goes through the public APIs
(repository load/unload, KServe v2 inference, OpenAI chat), with the same keys as any client.

Invariants: the page's files are read once at start-up and served from memory under fixed names (no path from a
request ever reaches the file system); the page and its files are open (it must load to ask for a key), the JSON
views need an API key like any endpoint; every page answer forbids framing and loading anything from elsewhere.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ladle.api.console_live import LiveSampler
from ladle.config import SecurityConfig
from ladle.errors import NotFound
from ladle.repository.signature import served_shape
from ladle.serving.host import ModelHost
from ladle.serving.rollout import RolloutManager
from ladle.serving.versions import ModelRecord, ModelVersion

STATIC_DIR = "console_static"  # beside this module, in the package
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
#: the page talks to this server only; inline script and style are refused (every node is built with textContent)
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def admin_mode(config: SecurityConfig) -> str:
    """What the console tells its user about load/unload: "key" (an admin key is needed), "open" or "off"."""
    if config.admin_key:
        return "key"
    return "open" if config.allow_admin_without_key else "off"


class ConsoleAPI:
    def __init__(self, host: ModelHost, rollouts: RolloutManager | None, live: LiveSampler,
                 security: SecurityConfig) -> None:
        self.host = host
        self.rollouts = rollouts
        self.live = live
        self.admin = admin_mode(security)
        self.files = load_static()

    def routes(self) -> list[Route]:
        return [
            Route("/", self.page, methods=["GET"]),
            Route("/console", self.page, methods=["GET"]),
            Route("/console/", self.page, methods=["GET"]),
            Route("/console/api/models", self.models, methods=["GET"]),
            Route("/console/api/live", self.live_view, methods=["GET"]),
            Route("/console/{name}", self.static, methods=["GET"]),
        ]

    async def page(self, request: Request) -> Response:
        return self._file("index.html")

    async def static(self, request: Request) -> Response:
        return self._file(request.path_params["name"])

    def _file(self, name: str) -> Response:
        found = self.files.get(name)
        if found is None:
            raise NotFound(f"the console has no file '{name[:64]}'")
        body, media_type = found
        # no-cache: a browser revalidates, so an upgraded server never runs a stale page against its new API
        headers = {**SECURITY_HEADERS, "Cache-Control": "no-cache"}
        return Response(body, media_type=media_type, headers=headers)

    async def models(self, request: Request) -> Response:
        payload = {"admin": self.admin, "rollouts": self.rollouts is not None, "models": self.summary()}
        return Response(orjson.dumps(payload), media_type="application/json", headers={"Cache-Control": "no-store"})

    async def live_view(self, request: Request) -> Response:
        return Response(orjson.dumps(self.live.view()), media_type="application/json",
                        headers={"Cache-Control": "no-store"})

    # -- the models view's data ---------------------------------------------------------------------------
    def summary(self) -> list[dict[str, Any]]:
        """Every model the repository index lists, its versions with their signatures, split and rollout."""
        models: dict[str, dict[str, Any]] = {}
        for row in self.host.index():
            name = row["name"]
            entry = models.get(name)
            if entry is None:
                entry = models[name] = self._model(name, row)
            if "version" in row:
                entry["versions"].append(self._version(name, row))
        return list(models.values())

    def _model(self, name: str, row: dict[str, Any]) -> dict[str, Any]:
        record = self.host.models.get(name)
        config = record.config if record is not None else None
        return {
            "name": name,
            "kind": "llm" if config is not None and config.backend == "llm" else "classic",
            "backend": config.backend if config is not None else None,
            "state": row["state"] if "version" not in row else _model_state(record),
            "reason": row["reason"] if "version" not in row else "",
            "pinned": bool(record is not None and record.pinned),
            "traffic_split": row.get("traffic_split"),
            "split_source": row.get("split_source"),
            "rollout": self._rollout(name),
            "versions": [],
        }

    def _version(self, name: str, row: dict[str, Any]) -> dict[str, Any]:
        entry: dict[str, Any] = {"version": row["version"], "state": row["state"], "reason": row["reason"]}
        mv = self.host.version(name, int(row["version"]))
        if mv is not None:
            entry.update(_signature(mv))
        return entry

    def _rollout(self, name: str) -> dict[str, Any] | None:
        if self.rollouts is None:
            return None
        try:
            status = self.rollouts.status(name)
        except NotFound:
            return None
        return {k: status[k] for k in ("to", "state", "step", "steps", "percent", "reason", "failed_gate")}


def _model_state(record: ModelRecord | None) -> str:
    return record.state if record is not None else "UNAVAILABLE"


def _signature(mv: ModelVersion) -> dict[str, Any]:
    def tensors(specs: tuple) -> list[dict[str, Any]]:
        return [{"name": s.name, "datatype": s.datatype, "shape": served_shape(mv.config, s)} for s in specs]

    found: dict[str, Any] = {"platform": mv.config.platform, "backend": mv.config.backend,
                             "inputs": tensors(mv.inputs), "outputs": tensors(mv.outputs)}
    if mv.engine is not None:
        found["max_model_len"] = mv.engine.info.max_model_len
    if mv.count_tokens is not None:
        found["embeddings"] = True  # also served by POST /v1/embeddings
    return found


def load_static() -> dict[str, tuple[bytes, str]]:
    """The console's files by name, with their media types (read once: a few tens of KiB)."""
    files = {}
    for item in (resources.files("ladle.api") / STATIC_DIR).iterdir():
        suffix = "." + item.name.rpartition(".")[2]
        if item.is_file() and suffix in _TYPES:
            files[item.name] = (item.read_bytes(), _TYPES[suffix])
    return files
