"""Ladle's request router, plugged into Ray Serve's request-router API: it runs inside every deployment handle
(the front end's), and picks among a model's running replicas for each call.

Policy, in order: a call pinned to one replica (the metrics scrape) goes there; a session key goes to the replica its
key hashes to (rendezvous hashing: stable while replicas come and go, no per-session state to grow); an LLM prompt goes
to the replica whose prefix cache holds the longest head of it, unless that replica is `imbalance` requests busier
than the least loaded one (a new prefix goes to the replica holding the least); every rank falls back to power of two
choices on queue length. Ray then takes, within a rank, the replica with the shortest queue that accepts the call.
"""

from __future__ import annotations

import hashlib
import logging
import random

from ray.serve._private.common import ReplicaID
from ray.serve._private.replica_result import ReplicaResult
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from ladle.cluster.hints import RouteHint
from ladle.cluster.prefix_index import PrefixIndex

log = logging.getLogger(__name__)

#: replica labels known to the routers of this process, by deployment: what the front end scrapes for /metrics
KNOWN_REPLICAS: dict[str, tuple[str, ...]] = {}


def replica_label(replica_id: ReplicaID) -> str:
    return f"{replica_id.deployment_id.name}#{replica_id.unique_id}"


class LadleRouter(RequestRouter):
    def initialize_state(self, prefix_aware: bool = False, imbalance: int = 8) -> None:
        self.prefix_aware = prefix_aware
        self.imbalance = imbalance
        self.index = PrefixIndex()

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        fallback = _two_choices(candidate_replicas)
        if pending_request is None:
            return [fallback]
        pending_request.routing_context.should_backoff = True  # no locality pass: back off once all are full
        hint = _hint_of(pending_request)
        first = self._preferred(hint, candidate_replicas) if hint is not None else None
        return [first, fallback] if first else [fallback]

    def _preferred(self, hint: RouteHint, replicas: list[RunningReplica]) -> list[RunningReplica] | None:
        if hint.replica is not None:
            return [r for r in replicas if replica_label(r.replica_id) == hint.replica] or None
        if hint.session is not None:
            return [max(replicas, key=lambda r: _score(hint.session, r))]
        if self.prefix_aware and hint.prefix:
            return self._by_prefix(hint.prefix, replicas)
        return None

    def _by_prefix(self, prefix: str, replicas: list[RunningReplica]) -> list[RunningReplica]:
        by_label = {replica_label(r.replica_id): r for r in replicas}
        matched, holders = self.index.match(prefix, by_label)
        loads = {label: self._queue_len(r) for label, r in by_label.items()}
        least = min(loads.values())
        if matched:
            near = [by_label[h] for h in holders if loads[h] - least <= self.imbalance]
            if near:
                return near
            return [by_label[label] for label, load in loads.items() if load == least]
        # a prefix nobody holds: the replica holding the least, so prefix groups spread over the replicas
        smallest = min(self.index.chars(label) for label in by_label)
        return [r for label, r in by_label.items() if self.index.chars(label) == smallest]

    def _queue_len(self, replica: RunningReplica) -> int:
        return self._replica_queue_len_cache.get(replica.replica_id) or 0

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult) -> None:
        hint = _hint_of(pending_request)
        if self.prefix_aware and hint is not None and hint.prefix and hint.replica is None:
            self.index.insert(hint.prefix, replica_label(replica_id))

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        gone = {replica_label(r) for r in self._replica_id_set} - {replica_label(r.replica_id) for r in replicas}
        super().update_replicas(replicas)
        for label in gone:
            self.index.remove_replica(label)
        self._publish()

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.index.remove_replica(replica_label(replica_id))
        self._publish()

    def _publish(self) -> None:
        # Serve ships this class to the handle by value (cloudpickle): its module globals here are a copy, so the
        # registry is reached through the imported module, the one the front end reads
        import ladle.cluster.routing as shared

        if self._deployment_id is not None:
            labels = tuple(sorted(replica_label(r) for r in self._replica_id_set))
            shared.KNOWN_REPLICAS[self._deployment_id.name] = labels


def _hint_of(pending_request: PendingRequest) -> RouteHint | None:
    for arg in pending_request.args:
        if isinstance(arg, RouteHint):
            return arg
    return None


def _two_choices(replicas: list[RunningReplica]) -> list[RunningReplica]:
    """Two random replicas, in random order: Ray takes the first of equal queue lengths."""
    return random.sample(replicas, min(2, len(replicas)))


def _score(session: str, replica: RunningReplica) -> bytes:
    """Rendezvous hashing: each (session, replica) pair a stable pseudo-random score; the highest wins."""
    return hashlib.blake2b(f"{session}\0{replica.replica_id.unique_id}".encode(), digest_size=8).digest()
