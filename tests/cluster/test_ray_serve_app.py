"""ladle as one declared Ray Serve application (what KubeRay's RayService runs): `serve run` of a Serve config whose
application is `ladle.cluster.serve_app:build`, behind Ray Serve's own HTTP proxy, on a fresh local Ray cluster."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.cluster.ray_helpers import IRIS, PREFIX, per_replica, settle_metrics
from tests.server import free_port

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def serve_app(demo_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pytest.importorskip("ray.serve", reason="the ray extra is not installed: pip install 'ladle[ray]'")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    port = free_port()
    config = tmp_path_factory.mktemp("serve") / "serve.yaml"
    config.write_text(yaml.safe_dump({
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{
            "name": "ladle", "route_prefix": "/", "import_path": "ladle.cluster.serve_app:build",
            "args": {"repository": str(demo_repository),
                     "flags": "--load-model iris --replicas 2 --num-cpus 1 --allow-admin-without-key "
                              f"--ray-app-prefix {PREFIX}"},
        }],
    }))
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    env = {**os.environ, "RAY_ADDRESS": cluster.address, "HF_HUB_OFFLINE": "1"}
    serve_cli = Path(sys.executable).with_name("serve")
    with open(log, "wb") as out:
        process = subprocess.Popen([str(serve_cli), "run", str(config)], stdout=out, stderr=subprocess.STDOUT,
                                   env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, process, log)
        yield url
    finally:
        process.send_signal(signal.SIGINT)  # serve run: shut the application down
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        cluster.shutdown()


def _wait_ready(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"serve run exited with {process.returncode}:\n{log.read_text()[-5000:]}")
        try:
            if httpx.get(url + "/v2/health/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"not ready within 180s:\n{log.read_text()[-5000:]}")


def test_ladle_behind_serve_proxy_answers_and_scales_like_ladle_serve_ray(serve_app: str) -> None:
    for _ in range(30):
        r = httpx.post(serve_app + "/v2/models/iris/infer", json=IRIS, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0]["data"] == [0]
    settle_metrics()
    served = per_replica(serve_app, "ladle_model_requests_total", model="iris", outcome="success")
    assert len(served) == 2 and sum(served.values()) == 30, served
    bad = httpx.post(serve_app + "/v2/models/iris/infer", json={"inputs": []})
    assert bad.status_code == 400 and isinstance(bad.json()["error"], str)
    assert httpx.post(serve_app + "/v2/models/nope/infer", json=IRIS).status_code == 404


def test_models_change_through_the_serve_config_not_the_repository_api(serve_app: str) -> None:
    index = httpx.post(serve_app + "/v2/repository/index", json={}).json()
    assert {r["version"] for r in index if r["name"] == "iris" and r["state"] == "READY"} == {"1", "2"}
    for action in ("unload", "load"):
        refused = httpx.post(serve_app + f"/v2/repository/models/iris/{action}")
        assert refused.status_code == 400 and "Serve config" in refused.json()["error"], refused.text
    assert httpx.post(serve_app + "/v2/repository/models/nope/load").status_code == 404
    assert httpx.post(serve_app + "/v2/models/iris/infer", json=IRIS).status_code == 200
