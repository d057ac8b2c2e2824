"""A local two-node Ray cluster for the cluster benchmarks: a head and one more node on 127.0.0.1, one CPU each
(replicas of one core, as on the 2-core dev box), in a private temp dir, stopped with the block.

Ray's `ray stop` stops every Ray process on the machine (another session's clusters too), so the nodes are started
by Ray's own cluster utility (`ray.cluster_utils.Cluster`) in a helper process of ours: stopping that process stops
exactly the nodes it started (and Ray's reaper kills them if the helper dies). RAY_TMPDIR points Ray's temp dir and
its `ray_current_cluster` file at the private dir, so `ray.init("auto")` elsewhere never finds this cluster.

    .venv/bin/python benchmarks/cluster/local_cluster.py --port P --temp-dir DIR   # prints the address, runs until
                                                                                   # stdin closes or SIGTERM
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: spawn.py
from spawn import stop

READY_TIMEOUT_S = 120.0


@contextmanager
def local_cluster(port: int, temp_dir: Path, log: Path, nodes: int = 2, cpus_per_node: float = 1.0) -> Iterator[str]:
    """Start the cluster in a helper process; yield its address (127.0.0.1:port); stop it afterwards, always."""
    temp_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "RAY_TMPDIR": str(temp_dir), "RAY_USAGE_STATS_ENABLED": "0"}
    with log.open("ab") as sink:
        helper = subprocess.Popen(
            [sys.executable, __file__, "--port", str(port), "--temp-dir", str(temp_dir), "--nodes", str(nodes),
             "--cpus-per-node", str(cpus_per_node)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=sink, env=env)
    try:
        address = _read_address(helper, log)
        yield address
    finally:
        _stop(helper)


def _read_address(helper: subprocess.Popen, log: Path) -> str:
    assert helper.stdout is not None
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        line = helper.stdout.readline()
        if not line:
            break
        if line.startswith(b"{"):
            return json.loads(line)["address"]
    raise RuntimeError(f"the local Ray cluster did not start (exit {helper.poll()}); see {log}")


def _stop(helper: subprocess.Popen) -> None:
    if helper.poll() is None:
        try:
            assert helper.stdin is not None
            helper.stdin.close()  # the helper shuts its nodes down and exits
        except OSError:
            pass
        try:
            helper.wait(timeout=60)
        except subprocess.TimeoutExpired:
            stop(helper, 30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True, help="the head's GCS port")
    ap.add_argument("--temp-dir", type=Path, required=True)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--cpus-per-node", type=float, default=1.0)
    args = ap.parse_args()
    os.environ["RAY_TMPDIR"] = str(args.temp_dir)
    from ray.cluster_utils import Cluster

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    common = {"num_cpus": args.cpus_per_node, "temp_dir": str(args.temp_dir / "ray"),
              "object_store_memory": 256 * 1024 * 1024}
    cluster = Cluster(initialize_head=True, head_node_args={**common, "gcs_server_port": args.port,
                                                            "include_dashboard": False})
    try:
        for _ in range(args.nodes - 1):
            cluster.add_node(**common)
        cluster.wait_for_nodes()
        print(json.dumps({"address": cluster.address}), flush=True)
        threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
        stop.wait()
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
