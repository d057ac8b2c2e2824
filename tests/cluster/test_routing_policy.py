"""LadleRouter's policy (cluster/routing.py) without a cluster: a router built around Ray's own queue-length cache and
replica ids, with fake running replicas. Pinned replicas, session stickiness (rendezvous hashing), prefix affinity
within the imbalance bound, the least-holding replica for new prefixes, and the power-of-two fallback rank."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pytest

pytest.importorskip("ray.serve", reason="the ray extra is not installed: pip install 'ladle[ray]'")

from ray.serve._private.common import DeploymentID, ReplicaID, RequestMetadata
from ray.serve._private.request_router.common import ReplicaQueueLengthCache
from ray.serve.request_router import PendingRequest, RequestRouter

from ladle.cluster import routing
from ladle.cluster.forwarding import Forwarded
from ladle.cluster.hints import RouteHint
from ladle.cluster.routing import LadleRouter, replica_label

DEPLOYMENT = DeploymentID(name="LadleReplica", app_name="ladle-m")
PROMPT = "system: you are a careful assistant who answers in one line.\n" * 4  # several 64-char chunks
OTHER = "system: you translate English into French, nothing more, ever.\n" * 4


@dataclass
class FakeReplica:
    replica_id: ReplicaID
    max_ongoing_requests: int = 16


def replicas(*ids: str) -> list[FakeReplica]:
    return [FakeReplica(ReplicaID(unique_id, DEPLOYMENT)) for unique_id in ids]


def router(prefix_aware: bool = True, imbalance: int = 2, pool: list[FakeReplica] | None = None) -> LadleRouter:
    r = LadleRouter.__new__(LadleRouter)  # no Ray constructor: only what the policy reads
    r._replica_queue_len_cache = ReplicaQueueLengthCache()
    r._deployment_id = DEPLOYMENT
    pool = pool or []
    r._replica_id_set = {p.replica_id for p in pool}
    r._replicas = {p.replica_id: p for p in pool}
    r.initialize_state(prefix_aware=prefix_aware, imbalance=imbalance)
    return r


def pending(hint: RouteHint | None) -> PendingRequest:
    """A call as the front end makes it: handle.forward.remote(forwarded, hint). Build inside a running loop."""
    args: list[Any] = [Forwarded("POST", "/v1/completions", b"", (), b"{}")]
    if hint is not None:
        args.append(hint)
    metadata = RequestMetadata(request_id="r", internal_request_id="i", call_method="forward", app_name="ladle-m")
    return PendingRequest(args=args, kwargs={}, metadata=metadata)


def choose(r: LadleRouter, pool: list[FakeReplica], hint: RouteHint | None) -> tuple[list[list[FakeReplica]], bool]:
    """(ranks, should_backoff) of one routing decision."""
    async def main() -> tuple[list[list[FakeReplica]], bool]:
        request = pending(hint)
        ranks = await r.choose_replicas(pool, request)  # type: ignore[arg-type]
        return ranks, request.routing_context.should_backoff

    return asyncio.run(main())


def routed(r: LadleRouter, hint: RouteHint, to: FakeReplica) -> None:
    async def main() -> None:
        r.on_request_routed(pending(hint), to.replica_id, None)  # type: ignore[arg-type]

    asyncio.run(main())


def ids(ranked: list[FakeReplica]) -> list[str]:
    return [p.replica_id.unique_id for p in ranked]


def by_session(r: LadleRouter, pool: list[FakeReplica], key: str) -> str:
    first = r._preferred(RouteHint("m", session=key), pool)  # type: ignore[arg-type]
    assert first is not None and len(first) == 1
    return first[0].replica_id.unique_id


# -- ranks and the fallback ----------------------------------------------------------------------------------------


def test_no_candidates_no_ranks() -> None:
    assert choose(router(), [], RouteHint("m", session="s"))[0] == []


def test_without_a_hint_only_the_fallback_rank() -> None:
    pool = replicas("a", "b", "c")
    ranks, backoff = choose(router(pool=pool), pool, None)
    assert len(ranks) == 1 and len(ranks[0]) == 2 and set(ids(ranks[0])) < {"a", "b", "c"}
    assert backoff is True


def test_no_pending_request_is_the_fallback_rank() -> None:
    pool = replicas("a", "b", "c")
    ranks = asyncio.run(router(pool=pool).choose_replicas(pool))  # type: ignore[arg-type]
    assert len(ranks) == 1 and len(set(ids(ranks[0]))) == 2


def test_fallback_is_two_distinct_replicas_in_random_order() -> None:
    pool = replicas("a", "b")
    r = router(pool=pool)
    orders = Counter()
    for _ in range(200):
        ranks, backoff = choose(r, pool, RouteHint("m"))
        assert backoff is True
        assert len(ranks) == 1  # a bare hint prefers nobody
        orders[tuple(ids(ranks[0]))] += 1
    assert set(orders) == {("a", "b"), ("b", "a")}


def test_fallback_of_one_replica_is_that_replica() -> None:
    pool = replicas("a")
    ranks, _ = choose(router(pool=pool), pool, RouteHint("m", session="s"))
    assert [ids(rank) for rank in ranks] == [["a"], ["a"]]


def test_fallback_picks_at_most_two_of_many() -> None:
    pool = replicas(*"abcdef")
    r = router(pool=pool)
    picked = Counter()
    for _ in range(300):
        ranks, _ = choose(r, pool, RouteHint("m", session="s"))
        assert len(ranks) == 2 and len(ranks[0]) == 1
        fallback = ids(ranks[-1])
        assert len(fallback) == 2 and len(set(fallback)) == 2
        picked.update(fallback)
    assert set(picked) == set("abcdef")  # every replica gets its chance


# -- pinned replica ------------------------------------------------------------------------------------------------


def test_a_pinned_replica_comes_first() -> None:
    pool = replicas("a", "b", "c")
    label = replica_label(pool[2].replica_id)
    ranks, _ = choose(router(pool=pool), pool, RouteHint("m", session="s", prefix=PROMPT, replica=label))
    assert ids(ranks[0]) == ["c"] and len(ranks) == 2


def test_a_pinned_replica_that_is_gone_is_no_preference() -> None:
    pool = replicas("a", "b")
    gone = replica_label(ReplicaID("zz", DEPLOYMENT))
    ranks, _ = choose(router(pool=pool), pool, RouteHint("m", replica=gone))
    assert len(ranks) == 1


def test_replica_labels_tell_replicas_apart() -> None:
    a, b = replicas("a", "b")
    assert replica_label(a.replica_id) != replica_label(b.replica_id)
    assert replica_label(a.replica_id) == replica_label(ReplicaID("a", DEPLOYMENT))


# -- sessions ------------------------------------------------------------------------------------------------------


def test_a_session_sticks_to_one_replica() -> None:
    pool = replicas("a", "b", "c")
    r = router(pool=pool)
    first = {key: by_session(r, pool, key) for key in ("alice", "bob", "carol")}
    for _ in range(5):
        assert {key: by_session(r, pool, key) for key in first} == first
    assert by_session(r, list(reversed(pool)), "alice") == first["alice"]  # whatever the candidates' order
    ranks, _ = choose(r, pool, RouteHint("m", session="alice"))
    assert ids(ranks[0]) == [first["alice"]]


def test_sessions_spread_over_replicas() -> None:
    pool = replicas("a", "b")
    r = router(pool=pool)
    counts = Counter(by_session(r, pool, f"user-{i}") for i in range(200))
    assert counts["a"] > 50 and counts["b"] > 50


def test_a_session_wins_over_a_prefix() -> None:
    pool = replicas("a", "b")
    r = router(pool=pool)
    home = by_session(r, pool, "s")
    away = next(p for p in pool if p.replica_id.unique_id != home)
    routed(r, RouteHint("m", prefix=PROMPT), away)
    assert ids(r._preferred(RouteHint("m", session="s", prefix=PROMPT), pool)) == [home]  # type: ignore[arg-type]


def test_rendezvous_removing_a_replica_moves_only_its_sessions() -> None:
    pool = replicas("a", "b", "c", "d")
    r = router(pool=pool)
    keys = [f"k{i}" for i in range(400)]
    before = {key: by_session(r, pool, key) for key in keys}
    smaller = [p for p in pool if p.replica_id.unique_id != "c"]
    after = {key: by_session(r, smaller, key) for key in keys}
    moved = {key for key in keys if before[key] != after[key]}
    assert moved == {key for key in keys if before[key] == "c"}
    assert moved  # c held some


def test_rendezvous_adding_a_replica_moves_keys_only_to_it() -> None:
    pool = replicas("a", "b", "c")
    r = router(pool=pool)
    keys = [f"k{i}" for i in range(400)]
    before = {key: by_session(r, pool, key) for key in keys}
    after = {key: by_session(r, [*pool, *replicas("d")], key) for key in keys}
    moved = {key for key in keys if before[key] != after[key]}
    assert moved and all(after[key] == "d" for key in moved)


# -- prefixes ------------------------------------------------------------------------------------------------------


def test_the_replica_holding_a_prefix_ranks_first() -> None:
    pool = replicas("a", "b", "c")
    r = router(pool=pool)
    routed(r, RouteHint("m", prefix=PROMPT), pool[1])
    for _ in range(20):
        ranks, _ = choose(r, pool, RouteHint("m", prefix=PROMPT + "user: and the next question?"))
        assert ids(ranks[0]) == ["b"] and len(ranks) == 2


def test_holders_come_most_recent_first() -> None:
    pool = replicas("a", "b", "c")
    r = router(pool=pool)
    routed(r, RouteHint("m", prefix=PROMPT), pool[0])
    routed(r, RouteHint("m", prefix=PROMPT), pool[2])
    assert ids(r._preferred(RouteHint("m", prefix=PROMPT), pool)) == ["c", "a"]  # type: ignore[arg-type]


def test_a_busy_holder_within_the_imbalance_still_wins() -> None:
    pool = replicas("a", "b")
    r = router(pool=pool, imbalance=2)
    routed(r, RouteHint("m", prefix=PROMPT), pool[0])
    r._replica_queue_len_cache.update(pool[0].replica_id, 5)
    r._replica_queue_len_cache.update(pool[1].replica_id, 3)  # a is exactly `imbalance` busier
    assert ids(r._preferred(RouteHint("m", prefix=PROMPT), pool)) == ["a"]  # type: ignore[arg-type]


def test_a_holder_beyond_the_imbalance_yields_to_the_least_loaded() -> None:
    pool = replicas("a", "b", "c")
    r = router(pool=pool, imbalance=2)
    routed(r, RouteHint("m", prefix=PROMPT), pool[0])
    r._replica_queue_len_cache.update(pool[0].replica_id, 6)
    r._replica_queue_len_cache.update(pool[1].replica_id, 3)
    r._replica_queue_len_cache.update(pool[2].replica_id, 5)
    ranks, _ = choose(r, pool, RouteHint("m", prefix=PROMPT))
    assert ids(ranks[0]) == ["b"]


def test_unknown_queue_lengths_count_as_idle() -> None:
    pool = replicas("a", "b")
    r = router(pool=pool, imbalance=2)
    routed(r, RouteHint("m", prefix=PROMPT), pool[0])
    r._replica_queue_len_cache.update(pool[0].replica_id, 3)  # b: nothing cached, so 0
    assert ids(r._preferred(RouteHint("m", prefix=PROMPT), pool)) == ["b"]  # type: ignore[arg-type]


def test_a_new_prefix_goes_to_the_replica_holding_the_fewest_chars() -> None:
    pool = replicas("a", "b", "c")
    r = router(pool=pool)
    routed(r, RouteHint("m", prefix=PROMPT), pool[0])
    routed(r, RouteHint("m", prefix=PROMPT[:128]), pool[1])
    first = r._preferred(RouteHint("m", prefix=OTHER), pool)  # type: ignore[arg-type]
    assert ids(first) == ["c"]  # type: ignore[arg-type]
    routed(r, RouteHint("m", prefix=OTHER), pool[2])  # c now holds 3 chunks, b 2
    assert ids(r._preferred(RouteHint("m", prefix="another " * 20), pool)) == ["b"]  # type: ignore[arg-type]


def test_a_new_prefix_with_nothing_recorded_prefers_every_replica() -> None:
    pool = replicas("a", "b")
    assert ids(router(pool=pool)._preferred(RouteHint("m", prefix=PROMPT), pool)) == ["a", "b"]  # type: ignore[arg-type]


def test_routed_calls_record_their_prefix_for_that_replica() -> None:
    pool = replicas("a", "b")
    r = router(pool=pool)
    routed(r, RouteHint("m", prefix=PROMPT), pool[1])
    assert r.index.chars(replica_label(pool[1].replica_id)) == len(PROMPT) // 64 * 64
    assert r.index.chars(replica_label(pool[0].replica_id)) == 0


def test_pinned_and_prefixless_calls_record_nothing() -> None:
    pool = replicas("a", "b")
    r = router(pool=pool)
    routed(r, RouteHint("m", prefix=PROMPT, replica=replica_label(pool[0].replica_id)), pool[0])
    routed(r, RouteHint("m"), pool[0])
    assert r.index.entries() == 0


def test_without_prefix_awareness_prefixes_are_ignored() -> None:
    pool = replicas("a", "b")
    r = router(prefix_aware=False, pool=pool)
    routed(r, RouteHint("m", prefix=PROMPT), pool[0])
    assert r.index.entries() == 0
    ranks, backoff = choose(r, pool, RouteHint("m", prefix=PROMPT))
    assert len(ranks) == 1 and backoff  # only the fallback


def test_a_short_prompt_shares_no_chunk() -> None:
    pool = replicas("a", "b")
    r = router(pool=pool)
    routed(r, RouteHint("m", prefix="hi"), pool[0])  # under one 64-char chunk: nothing to record
    assert r.index.entries() == 0
    assert ids(r._preferred(RouteHint("m", prefix="hi"), pool)) == ["a", "b"]  # type: ignore[arg-type]


# -- replicas coming and going -------------------------------------------------------------------------------------


@pytest.fixture
def ray_bookkeeping(monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple[str, ...]]:
    """Ray's own replica bookkeeping reduced to the replica-id set LadleRouter reads; a fresh KNOWN_REPLICAS."""

    def update_replicas(self: RequestRouter, pool: list[FakeReplica]) -> None:
        self._replica_id_set = {p.replica_id for p in pool}
        self._replicas = {p.replica_id: p for p in pool}

    def on_replica_actor_died(self: RequestRouter, replica_id: ReplicaID) -> None:
        self._replica_id_set.discard(replica_id)
        self._replicas.pop(replica_id, None)

    monkeypatch.setattr(RequestRouter, "update_replicas", update_replicas)
    monkeypatch.setattr(RequestRouter, "on_replica_actor_died", on_replica_actor_died)
    known: dict[str, tuple[str, ...]] = {}
    monkeypatch.setattr(routing, "KNOWN_REPLICAS", known)
    return known


def test_replicas_gone_from_an_update_lose_their_prefixes(ray_bookkeeping: dict[str, tuple[str, ...]]) -> None:
    pool = replicas("a", "b", "c")
    r = router()
    r.update_replicas(pool)  # type: ignore[arg-type]
    assert list(ray_bookkeeping.values()) == [tuple(sorted(replica_label(p.replica_id) for p in pool))]
    for p in pool:
        routed(r, RouteHint("m", prefix=PROMPT), p)
    r.update_replicas(pool[:1])  # type: ignore[arg-type]
    assert r.index.chars(replica_label(pool[0].replica_id)) > 0
    assert r.index.chars(replica_label(pool[1].replica_id)) == 0
    assert r.index.chars(replica_label(pool[2].replica_id)) == 0
    assert list(ray_bookkeeping.values()) == [(replica_label(pool[0].replica_id),)]


def test_a_dead_replica_loses_its_prefixes(ray_bookkeeping: dict[str, tuple[str, ...]]) -> None:
    pool = replicas("a", "b")
    r = router()
    r.update_replicas(pool)  # type: ignore[arg-type]
    routed(r, RouteHint("m", prefix=PROMPT), pool[0])
    routed(r, RouteHint("m", prefix=OTHER), pool[1])
    r.on_replica_actor_died(pool[0].replica_id)
    assert r.index.chars(replica_label(pool[0].replica_id)) == 0
    assert r.index.chars(replica_label(pool[1].replica_id)) > 0
    assert list(ray_bookkeeping.values()) == [(replica_label(pool[1].replica_id),)]
    assert ids(r._preferred(RouteHint("m", prefix=PROMPT), pool[1:])) == ["b"]  # type: ignore[arg-type]
