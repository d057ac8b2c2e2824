"""The front end's handle on Ray: it joins the cluster, deploys each model as a Serve application of LadleReplica
replicas, keeps a snapshot of their states (one thread polls `serve.status()`), and calls replicas through Serve
deployment handles — so every routing decision is made by LadleRouter, inside Ray's request-router API.

Invariants: the event loop never waits on Ray's control plane (deploys, deletes and status polls run on threads);
a model with no running replica is a 503 at once, never a request parked until one appears; a replica that dies
under a request turns it into a 503 (Ray re-routes what the replica had not yet accepted).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator

import ray
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.api import _run as serve_run  # serve.run without waiting: _wait follows every model at once
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import BackPressureError, RequestCancelledError

from ladle.cluster.forwarding import Forwarded, Reply
from ladle.cluster.hints import RouteHint
from ladle.cluster.models import AppState, ServedModel, replica_config
from ladle.cluster.plans import app_name, deployment_name, model_of, plan, serve_env
from ladle.cluster.replica import LadleReplica
from ladle.cluster.routing import KNOWN_REPLICAS
from ladle.config import ServerConfig
from ladle.errors import InvalidInput, LadleError, NotFound, Unavailable

log = logging.getLogger(__name__)

POLL_S = 1.0
#: deployment states that will not reach a running replica by themselves
FAILED = ("DEPLOY_FAILED", "UNHEALTHY", "DELETING")
SCRAPE_TIMEOUT_S = 5.0


class Cluster:
    def __init__(self, config: ServerConfig, managed: bool = True) -> None:
        """`managed`: this front end deploys and deletes the models' Serve applications (`ladle serve --ray`); else
        they are deployments of one Serve application it is part of (serve_app.py: RayService, `serve run`)."""
        self.config = config
        self.managed = managed
        self.prefix = config.cluster.ray_app_prefix
        self.models: dict[str, ServedModel] = {}
        self.wanted: set[str] = set()
        self.states: dict[str, AppState] = {}  # by model, replaced whole by the poller
        self._stop = threading.Event()

    # -- joining Ray ------------------------------------------------------------------------------
    def connect(self) -> None:
        """Join (or start) the Ray cluster and Serve, with no Serve HTTP proxy: ladle's front end is the ingress."""
        address = self.config.cluster.ray
        env = {"env_vars": serve_env()}
        if address in (None, "auto"):
            try:
                ray.init(address="auto", runtime_env=env, log_to_driver=False)
            except ConnectionError:
                log.info("no running Ray cluster found: starting a local one")
                ray.init(runtime_env=env, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, runtime_env=env, log_to_driver=False)
        serve.start(proxy_location="Disabled")
        self.start_polling()

    def start_polling(self) -> None:
        threading.Thread(target=self._poll, name="ladle-ray-status", daemon=True).start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                self.states = _snapshot(serve.status(), self.prefix)
            except Exception as exc:  # the controller restarting, the cluster going away: keep the last snapshot
                log.warning("cannot read the Serve status: %s", exc)
            self._stop.wait(POLL_S)

    # -- deploying ----------------------------------------------------------------------------------
    def add(self, model: ServedModel) -> None:
        self.models[model.name] = model

    async def deploy(self, names: list[str]) -> dict[str, str | None]:
        """(Re)deploy these models and wait until each one's update is done (its new replicas run) or failed:
        name -> the reason it failed, or None."""
        self.check_managed("loaded")
        for name in names:
            model = self.models[name]
            self.wanted.add(name)
            if model.config is None:
                continue
            model.generation += 1
            await asyncio.to_thread(self._run, model)
            _start_router(model.handle)
        return await self._wait(names)

    def _run(self, model: ServedModel) -> None:
        p = plan(model.name, model.config, self.config.cluster, self.config.llm, self.config.http.drain_timeout,
                 model.pinned)
        options = dict(p.options)
        options["request_router_config"] = RequestRouterConfig(**options["request_router_config"])
        deployment = serve.deployment(LadleReplica, name=deployment_name(model.name, self.prefix)).options(**options)
        app = deployment.bind(replica_config(self.config, model), model.name, model.generation)
        if model.handle is None and model.name in self.states:
            log.warning("replacing the Serve application %s already on the cluster (a previous ladle, or another "
                        "one with the same --ray-app-prefix)", app_name(model.name, self.prefix))
        model.handle = serve_run(app, name=app_name(model.name, self.prefix), route_prefix=None, _blocking=False)
        log.info("deploying model %s on Ray (%s)", model.name, _describe(options))

    async def _wait(self, names: list[str]) -> dict[str, str | None]:
        started, last_log = time.monotonic(), 0.0
        await asyncio.sleep(POLL_S * 1.5)  # the poller's snapshot must postdate the deploy
        while True:
            pending = [n for n in names if self.models[n].config is not None and self._settling(n)]
            if not pending:
                return {n: self.failure(n) for n in names}
            if time.monotonic() - last_log > 5.0:
                last_log = time.monotonic()
                log.info("waiting for replicas (%.0fs): %s", last_log - started,
                         ", ".join(f"{n} {self.progress(n)}" for n in pending))
            await asyncio.sleep(POLL_S / 2)

    def _settling(self, name: str) -> bool:
        """Still on its way: no state yet, an update under way (a reload keeps the old replicas running meanwhile),
        or no replica running and not failed."""
        state = self.states.get(name)
        return state is None or state.status == "UPDATING" or (state.running == 0 and state.status not in FAILED)

    def progress(self, name: str) -> str:
        app = self.states.get(name)
        return f"{app.status} {app.running}/{app.total} replicas" if app else "starting"

    def failure(self, name: str) -> str | None:
        model = self.models[name]
        if model.config is None:
            return model.reason
        app = self.states.get(name)
        if app is not None and app.running > 0 and app.status not in FAILED:
            return None
        return (app.message if app else "") or "no replica started"

    def check_managed(self, what: str) -> None:
        if not self.managed:
            raise InvalidInput(f"this ladle runs as one Ray Serve application (RayService / serve run): models are "
                               f"{what} by changing its Serve config, not through the repository API")

    async def undeploy(self, name: str) -> None:
        self.check_managed("unloaded")
        self.wanted.discard(name)
        self.models[name].handle = None
        await asyncio.to_thread(serve.delete, app_name(name, self.prefix), True)
        KNOWN_REPLICAS.pop(deployment_name(name, self.prefix), None)

    async def close(self) -> None:
        """Delete every application this front end deployed (its replicas drain first), then leave Ray."""
        self._stop.set()
        if not self.managed:
            return
        for name in [n for n in self.models if self.models[n].handle is not None]:
            try:
                await self.undeploy(name)
            except Exception as exc:  # the cluster may already be gone
                log.warning("could not delete model %s from Ray: %s", name, exc)
        await asyncio.to_thread(ray.shutdown)

    # -- state ----------------------------------------------------------------------------------------
    def running(self, name: str) -> int:
        app = self.states.get(name)
        return app.running if app is not None else 0

    def is_ready(self) -> bool:
        return all(self.running(name) > 0 for name in tuple(self.wanted))

    # -- calls ----------------------------------------------------------------------------------------
    def _handle(self, name: str):
        model = self.models.get(name)
        if model is None:
            raise NotFound(f"unknown model '{name}'; POST /v2/repository/index lists the models")
        if model.handle is None or name not in self.wanted:
            raise Unavailable(f"model '{name}' is not loaded")
        if self.running(name) == 0:
            raise Unavailable(f"model '{name}' has no running replica yet ({self.progress(name)})")
        return model.handle

    async def call(self, name: str, request: Forwarded, hint: RouteHint) -> Reply:
        handle = self._handle(name)
        try:
            return await handle.forward.remote(request, hint)
        except Exception as exc:
            raise _unavailable(name, exc) from exc

    async def stream(self, name: str, request: Forwarded, hint: RouteHint) -> AsyncIterator[Reply | bytes]:
        handle = self._handle(name).options(stream=True)
        responses = handle.forward_stream.remote(request, hint)
        try:
            async for item in responses:
                yield item
        except Exception as exc:
            raise _unavailable(name, exc) from exc
        finally:
            responses.cancel()  # a no-op once finished; else the client left: the replica aborts the request

    async def scrape(self) -> list[tuple[dict[str, str], bytes]]:
        """Every known replica's metrics, labelled with its replica id. One call at a time: inside a Serve replica
        (serve_app.py) every call a request makes shares its request id, and Ray's router tells pending calls to one
        deployment apart by that id. A replica that does not answer within the scrape's budget is left out."""
        deadline = time.monotonic() + SCRAPE_TIMEOUT_S
        seen: dict[str, bytes] = {}
        for name, model in tuple(self.models.items()):
            if model.handle is None or self.running(name) == 0:
                continue
            for label in KNOWN_REPLICAS.get(deployment_name(name, self.prefix), ()):
                left = deadline - time.monotonic()
                if left <= 0 or label in seen:
                    continue
                try:
                    got, text = await asyncio.wait_for(
                        _await(model.handle.metrics.remote(RouteHint(name, replica=label))), left)
                except Exception as exc:  # gone or stuck: the next scrape asks again
                    log.debug("no metrics from replica %s: %s", label, exc)
                    continue
                seen[got] = text
        return [({"replica": label}, text) for label, text in sorted(seen.items())]


def _start_router(handle) -> None:
    """Start the handle's router now, on this loop, rather than at its first request: /metrics then lists every
    replica (LadleRouter publishes the replicas it learns of) before any traffic. `_init` is Serve's own call for
    that; were it to go, the router would simply start with the first request."""
    try:
        handle._init()
    except Exception as exc:  # already started, or Serve's private API changed
        log.debug("router of %s starts with its first request: %s", handle, exc)


async def _await(response):
    return await response


def _unavailable(name: str, exc: Exception) -> Exception:
    if isinstance(exc, (LadleError, asyncio.CancelledError)):
        return exc
    if isinstance(exc, BackPressureError):
        return Unavailable(f"model '{name}': every replica is busy and the queue is full; retry later")
    if isinstance(exc, RequestCancelledError):
        return asyncio.CancelledError()
    if isinstance(exc, RayActorError):
        log.warning("a replica of model %s died under a request: %s", name, str(exc).splitlines()[0])
        return Unavailable(f"the replica of model '{name}' serving this request stopped; Ray is replacing it — "
                           "retry")
    if isinstance(exc, RayTaskError):
        log.error("model %s: a replica failed: %s", name, exc)
        return Unavailable(f"a replica of model '{name}' failed; retry")
    return exc


def _snapshot(status, prefix: str) -> dict[str, AppState]:
    """Each model's deployment, wherever it is: its own application, or one application of all models."""
    models = {}
    for app in status.applications.values():
        app_status = _text(app.status)
        for name, deployment in app.deployments.items():
            model = model_of(name, prefix)
            if model is None:
                continue
            counts = {_text(k): v for k, v in deployment.replica_states.items()}
            state = "DELETING" if app_status == "DELETING" else _text(deployment.status)
            message = deployment.message or app.message or ""
            models[model] = AppState(state, message, counts.get("RUNNING", 0), sum(counts.values()))
    return models


def _text(value: object) -> str:
    return str(getattr(value, "value", value))


def _describe(options: dict) -> str:
    scale = options.get("autoscaling_config")
    count = f"{scale['min_replicas']}-{scale['max_replicas']} replicas (autoscaling)" if scale else \
        f"{options['num_replicas']} replica(s)"
    resources = options["ray_actor_options"]
    return f"{count}, {resources['num_cpus']} CPU / {resources['num_gpus']} GPU each"
