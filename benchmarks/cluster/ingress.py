"""Way (B) of putting ladle on Ray, for ray_scaling.py to measure against way (A), `ladle serve --ray`: ladle's own
ASGI app (`ladle.api.app.create_app`, one model) as the ingress of a Ray Serve deployment, behind Ray Serve's own
HTTP proxy — the pattern Serve documents (`serve.deployment(serve.ingress(builder)(Class))`), nothing of
ladle.cluster in it.

Serve evaluates the builder on the replica and runs the app's ASGI lifespan itself (ASGIAppReplicaWrapper drives
uvicorn's LifespanOn before the replica reports ready), so the model is loaded before traffic arrives. The replica
gets the Serve settings ladle's own replicas get (ladle.cluster.plans.SERVE_ENV), so the two ways differ in their
front end only. Any Serve instance already on the cluster is shut down first: a running Serve (ladle's front ends
start theirs without a proxy) would ignore these HTTP options.

    RAY_ADDRESS=127.0.0.1:P .venv/bin/python benchmarks/cluster/ingress.py REPOSITORY --model iris --port 8011
        [--replicas 1] [--num-cpus 1]      # serves until SIGTERM, then deletes the app and Serve
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from pathlib import Path

APP = "ladle-ingress"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("repository", type=Path)
    ap.add_argument("--model", required=True, help="the one model the ingress app serves")
    ap.add_argument("--port", type=int, required=True, help="Serve's HTTP proxy port (on 127.0.0.1)")
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--num-cpus", type=float, default=1.0)
    ap.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "auto"))
    ap.add_argument("--serve-defaults", action="store_true",
                    help="Ray Serve's own default settings instead of ladle's SERVE_ENV")
    args = ap.parse_args()

    from floor import SERVE_DEFAULTS  # benchmarks/cluster/floor.py, beside this script

    if args.serve_defaults:  # before ladle.cluster (its import sets ladle's where unset) and ray.serve read them
        os.environ.update(SERVE_DEFAULTS)
    from ladle.cluster.plans import serve_env

    env = serve_env()  # the settings in force in this process, for the replica too
    os.environ.update({k: v for k, v in env.items() if k not in os.environ})
    import ray
    from ray import serve
    repository, model = str(args.repository.resolve()), args.model

    def build_app():  # evaluated on the replica (cloudpickled by value with this closure)
        from ladle.api.app import create_app
        from ladle.config import RepositoryConfig, ServerConfig
        from ladle.logs import setup_logging
        from ladle.process import configure_process

        setup_logging("warning")
        configure_process()
        config = ServerConfig(repository=RepositoryConfig(repository=Path(repository), load_model=(model,)))
        return create_app(config, with_jobs=False)

    class LadleIngress:
        pass

    ray.init(address=args.address, runtime_env={"env_vars": env}, log_to_driver=False)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        serve.shutdown()  # a Serve started without a proxy (by ladle serve --ray) would keep its options
        serve.start(http_options={"host": "127.0.0.1", "port": args.port}, proxy_location="HeadOnly")
        deployment = serve.deployment(serve.ingress(build_app)(LadleIngress), name="LadleIngress").options(
            num_replicas=args.replicas, max_ongoing_requests=256,
            ray_actor_options={"num_cpus": args.num_cpus, "runtime_env": {"env_vars": {**env, "HF_HUB_OFFLINE": "1"}}})
        serve.run(deployment.bind(), name=APP, route_prefix="/")
        print(f"ladle ingress on Serve's proxy: http://127.0.0.1:{args.port} ({args.replicas} replica(s))", flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        try:
            serve.delete(APP)
            serve.shutdown()
        finally:
            ray.shutdown()


if __name__ == "__main__":
    main()
