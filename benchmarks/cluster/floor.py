"""Where the per-request cost of `ladle serve --ray` goes, for ray_scaling.py: calls through a Serve deployment handle
from an asyncio driver (as ladle's front end makes them), one at a time and `--concurrency` at a time, to
- `noop`: a deployment that does nothing (one replica of one CPU, `async def __call__` returning a few bytes) with
  Serve's default router — Ray Serve's own floor;
- `noop-ladle-router`: the same with ladle's LadleRouter plugged in (a RouteHint passed as ladle's front end does);
- `ladle-iris`: ladle's own iris replica (LadleReplica, deployed by ladle.cluster's Cluster as `ladle serve --ray`
  does) called through Cluster.call with the README's KServe body — everything of (A) but the front end's HTTP.
Run with ladle's Serve settings (ladle.cluster.plans.SERVE_ENV, as its front end and replicas run) or with
`--serve-defaults`; the settings are read when ray.serve is imported, so each variant is its own process.

    RAY_ADDRESS=127.0.0.1:P .venv/bin/python benchmarks/cluster/floor.py [--target noop] [--serve-defaults]
        [--calls 1000] [--concurrency 8] [--seconds 5]     # prints one JSON line
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time

APP = "ladle-bench-floor"
#: Ray Serve 2.60's own defaults of the settings ladle sets (ray/serve/_private/constants.py)
SERVE_DEFAULTS = {"RAY_SERVE_USE_GRPC_BY_DEFAULT": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1",
                  "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "1"}


def ladle_serve_env() -> dict[str, str]:
    from ladle.cluster.plans import SERVE_ENV

    return SERVE_ENV


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


async def sequential(call, calls: int) -> list[float]:
    for _ in range(50):
        await call()
    out = []
    for _ in range(calls):
        started = time.perf_counter()
        await call()
        out.append((time.perf_counter() - started) * 1e3)
    return out


async def closed_loop(call, concurrency: int, seconds: float) -> float:
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await call()
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - started)


def noop_call(target: str, env: dict[str, str]):
    """Deploy the no-op deployment (Serve's router, or ladle's); return an async call and a cleanup."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from ladle.cluster.hints import RouteHint
    from ladle.cluster.plans import ROUTER

    options: dict = {"ray_actor_options": {"num_cpus": 1, "runtime_env": {"env_vars": env}},
                     "max_ongoing_requests": 256}
    if target == "noop-ladle-router":
        options["request_router_config"] = RequestRouterConfig(
            request_router_class=ROUTER, request_router_kwargs={"prefix_aware": False, "imbalance": 8})

    class Noop:
        async def __call__(self, body: bytes, hint: object = None) -> bytes:
            return b"ok"

    serve.start(proxy_location="Disabled")
    handle = serve.run(serve.deployment(Noop, name="Noop").options(**options).bind(), name=APP, route_prefix=None)
    hint = RouteHint("noop")

    async def call() -> None:
        await handle.remote(b"x", hint)

    return call, lambda: serve.delete(APP)


def ladle_iris_call(address: str):
    """iris on Ray as `ladle serve --ray --replicas 1 --num-cpus 1 --load-model iris` deploys it (ladle's Cluster);
    the call is the front end's Cluster.call with the README's body. Returns an async call and a cleanup."""
    from pathlib import Path

    from ladle.cluster.cluster import Cluster
    from ladle.cluster.forwarding import Forwarded
    from ladle.cluster.hints import RouteHint
    from ladle.cluster.repository import discover
    from ladle.config import ClusterConfig, RepositoryConfig, ServerConfig

    repository = Path(__file__).resolve().parents[2] / "examples" / "models"
    config = ServerConfig(repository=RepositoryConfig(repository=repository, load_model=("iris",)),
                          cluster=ClusterConfig(ray=address, replicas=1, num_cpus=1.0))
    cluster = Cluster(config)
    cluster.connect()
    cluster.add(discover(config, "iris"))
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
                                   "data": [5.1, 3.5, 1.4, 0.2]}]}).encode()
    request = Forwarded("POST", "/v2/models/iris/infer", b"", ((b"content-type", b"application/json"),), body)
    hint = RouteHint("iris")
    deployed = False

    async def call() -> None:
        nonlocal deployed
        if not deployed:
            failures = await cluster.deploy(["iris"])
            if failures.get("iris"):
                raise RuntimeError(f"iris did not deploy: {failures['iris']}")
            deployed = True
        reply = await cluster.call("iris", request, hint)
        if reply.status != 200:
            raise RuntimeError(f"iris answered {reply.status}: {reply.body[:200]!r}")

    async def close() -> None:
        await cluster.close()

    return call, close


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", choices=("noop", "noop-ladle-router", "ladle-iris"), default="noop")
    ap.add_argument("--serve-defaults", action="store_true")
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "auto"))
    args = ap.parse_args()
    # Before ray.serve (and ladle.cluster, whose import sets SERVE_ENV where unset) is imported: Serve reads them once
    env = dict(SERVE_DEFAULTS) if args.serve_defaults else dict(ladle_serve_env())
    os.environ.update(env)
    import ray

    async def measure(call) -> dict:
        ms = await sequential(call, args.calls)
        rate = await closed_loop(call, args.concurrency, args.seconds)
        return {"target": args.target, "settings": "Serve defaults" if args.serve_defaults else "ladle's SERVE_ENV",
                "calls": len(ms), "p50_ms": statistics.median(ms), "p99_ms": percentile(ms, 99),
                "concurrency": args.concurrency, "calls_s": rate}

    if args.target == "ladle-iris":
        call, close = ladle_iris_call(args.address)

        async def run() -> dict:
            try:
                return await measure(call)
            finally:
                await close()

        print(json.dumps(asyncio.run(run())), flush=True)
        return
    ray.init(address=args.address, runtime_env={"env_vars": env}, log_to_driver=False)
    try:
        call, close = noop_call(args.target, env)
        try:
            print(json.dumps(asyncio.run(measure(call))), flush=True)
        finally:
            close()
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
