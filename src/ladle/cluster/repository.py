"""The repository API of `ladle serve --ray`: the index, load and unload, where a model's Serve application is what
loads — load (re)deploys it with fresh replicas that read the repository again, unload deletes it.

Invariant: the same answers as a single ladle (200 `{}`, 400 with the reason a load failed, 404 for a model that is
not in the repository, 400 for the --model LLM); a model's versions are listed as its replicas report them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ladle.api.body import read_body
from ladle.api.kserve import codec_error, optional_json_object
from ladle.cluster.cluster import Cluster
from ladle.cluster.forwarding import Forwarded, Reply
from ladle.cluster.hints import RouteHint
from ladle.cluster.models import ServedModel, state_of
from ladle.cluster.shared_answer import SharedAnswer
from ladle.config import ServerConfig
from ladle.errors import InvalidInput, NotFound
from ladle.repository.layout import check_model_name, model_dir, model_names
from ladle.repository.model_config import ConfigError, load_model_config


def discover(config: ServerConfig, name: str) -> ServedModel:
    """A repository model as its config.yaml describes it (a bad config: no config, and the reason)."""
    root = config.repository.repository
    try:
        return ServedModel(name, load_model_config(root / name))
    except ConfigError as exc:
        return ServedModel(name, None, reason=str(exc))


class RepositoryControl:
    def __init__(self, config: ServerConfig, cluster: Cluster, limit: int, ttl: float,
                 on_change: Callable[[], None]) -> None:
        """`ttl`: how old an index answer may be (SharedAnswer); `on_change`: called after each load and unload,
        with the index's own refresh (answers elsewhere that a load or unload changes)."""
        self.config = config
        self.cluster = cluster
        self.limit = limit
        self._index = SharedAnswer(ttl, self._all_rows)
        self._on_change = on_change

    def routes(self) -> list[Route]:
        return [
            Route("/v2/repository/index", self.index, methods=["POST"]),
            Route("/v2/repository/models/{model}/load", self.load, methods=["POST"]),
            Route("/v2/repository/models/{model}/unload", self.unload, methods=["POST"]),
        ]

    def on_disk(self) -> list[str]:
        root = self.config.repository.repository
        try:
            return model_names(root) if root is not None else []
        except FileNotFoundError:
            return []

    async def index(self, request: Request) -> Response:
        options = optional_json_object(await read_body(request, self.limit))
        flat = await self._index.get()
        if options.get("ready", False):
            flat = [row for row in flat if row["state"] == "READY"]
        return _json(flat)

    async def _all_rows(self) -> list[dict[str, Any]]:
        names = sorted(set(self.cluster.models) | set(await asyncio.to_thread(self.on_disk)))
        rows = await asyncio.gather(*(self._rows(name) for name in names))
        return [row for group in rows for row in group]

    def _changed(self) -> None:
        self._index.invalidate()
        self._on_change()

    async def _rows(self, name: str) -> list[dict[str, Any]]:
        model = self.cluster.models.get(name)
        if model is None:
            return [{"name": name, "state": "UNAVAILABLE", "reason": "not loaded"}]
        if self.cluster.running(name) > 0:  # its versions, as a replica reports them
            try:
                reply = await self.cluster.call(name, Forwarded("POST", "/v2/repository/index", b"", (), b"{}"),
                                                RouteHint(name))
                if isinstance(reply, Reply) and reply.status == 200:
                    return [r for r in orjson.loads(reply.body) if r.get("name") == name]
            except Exception:  # the replica went away meanwhile: its state below says so
                pass
        state, reason = state_of(model, self.cluster.states.get(name), name in self.cluster.wanted)
        return [{"name": name, "state": state, "reason": reason}]

    async def load(self, request: Request) -> Response:
        optional_json_object(await read_body(request, self.limit))
        name = self._existing(request.path_params["model"], "loaded or reloaded")
        self.cluster.check_managed("loaded")
        model = discover(self.config, name)
        old = self.cluster.models.get(name)
        model.generation = old.generation if old is not None else 0
        self.cluster.add(model)
        try:
            failure = (await self.cluster.deploy([name]))[name]
        finally:
            self._changed()
        if failure is not None:
            return codec_error(f"failed to load model '{name}': {failure}", 400)
        return _json({})

    async def unload(self, request: Request) -> Response:
        optional_json_object(await read_body(request, self.limit))
        name = request.path_params["model"]
        model = self.cluster.models.get(check_model_name(name))
        if model is None:
            raise NotFound(f"unknown model '{name}'")
        self._existing(name, "unloaded")
        self.cluster.check_managed("unloaded")
        try:
            await self.cluster.undeploy(name)
        finally:
            self._changed()
        return _json({})

    def _existing(self, name: str, what: str) -> str:
        model = self.cluster.models.get(name)
        if model is not None and model.pinned:
            raise InvalidInput(f"model '{name}' was given with --model: it is served for the life of the process "
                               f"and cannot be {what} through the repository API; restart ladle to change it")
        root = self.config.repository.repository
        if root is None or model_dir(root, check_model_name(name)) is None:
            raise NotFound(f"no model '{name}' in the repository")
        return name


def _json(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")
