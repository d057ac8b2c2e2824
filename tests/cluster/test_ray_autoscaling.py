"""`ladle serve --ray --min-replicas 1 --max-replicas 2`: Ray Serve's autoscaler adds a replica under load and
removes it when idle."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import httpx
import pytest

from tests.cluster.ray_helpers import IRIS, PREFIX, replica_pids, running, wait_for
from tests.server import LadleServer

pytestmark = pytest.mark.timeout(600)


def test_autoscaling_goes_up_under_load_and_back_down(ray_address: str, demo_repository: Path) -> None:
    args = [demo_repository, "--load-model", "iris", "--ray", ray_address, "--min-replicas", "1",
            "--max-replicas", "2", "--target-ongoing-requests", "1", "--upscale-delay", "1",
            "--downscale-delay", "4", "--num-cpus", "1", "--ray-app-prefix", PREFIX]
    with LadleServer(args, ready_timeout=180) as server:
        url = server.url
        assert running(url, "iris") == 1
        # readiness follows the replicas: the only one killed, not ready until Serve has replaced it
        for pid in replica_pids(PREFIX + "iris"):
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: httpx.get(url + "/v2/health/ready").status_code == 503, 60, "not ready without a replica")
        wait_for(lambda: httpx.get(url + "/v2/health/ready").status_code == 200, 120, "ready again")
        stop = threading.Event()

        def load() -> None:
            with httpx.Client(timeout=60) as http:
                while not stop.is_set():
                    http.post(url + "/v2/models/iris/infer", json=IRIS)

        threads = [threading.Thread(target=load) for _ in range(6)]
        for t in threads:
            t.start()
        try:
            wait_for(lambda: running(url, "iris") == 2, 120, "a second replica under load")
        finally:
            stop.set()
            for t in threads:
                t.join()
        wait_for(lambda: running(url, "iris") == 1, 120, "back to one replica when idle")
