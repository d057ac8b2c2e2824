"""A local two-node Ray cluster for the cluster tests: a head and one more node on loopback, one CPU each (replicas
of one core, as on the 2-core dev box), started once per session by Ray's own cluster utility."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def ray_address() -> Iterator[str]:
    pytest.importorskip("ray.serve", reason="the ray extra is not installed: pip install 'ladle[ray]'")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster.address
    finally:
        cluster.shutdown()
