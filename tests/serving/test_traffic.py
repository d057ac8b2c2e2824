"""Traffic splits: weighted draws, sticky keys by weighted rendezvous hashing (stable, proportional, minimal moves)."""

from __future__ import annotations

import collections
import math
import subprocess
import sys

import pytest

from ladle.serving import traffic

KEYS = [f"user-{i}" for i in range(20000)]


def shares(split: traffic.Split, keys: list[str], ready=(1, 2, 3)) -> collections.Counter:
    return collections.Counter(traffic.choose(split, ready, key) for key in keys)


def test_sticky_key_always_lands_on_the_same_version() -> None:
    split = ((1, 70.0), (2, 30.0))
    assert all(traffic.choose(split, (1, 2), k) == traffic.choose(split, (1, 2), k) for k in KEYS[:2000])


def test_sticky_shares_follow_the_weights_within_binomial_tolerance() -> None:
    split = ((1, 60.0), (2, 30.0), (3, 10.0))
    counts = shares(split, KEYS)
    n = len(KEYS)
    for version, weight in split:
        p = weight / 100
        # 4.5 standard deviations: a false alarm about once in 150,000 runs
        assert abs(counts[version] - n * p) < 4.5 * math.sqrt(n * p * (1 - p)), counts


def test_moving_10_to_20_percent_moves_only_the_keys_that_must_move() -> None:
    before = {k: traffic.choose(((1, 90.0), (2, 10.0)), (1, 2), k) for k in KEYS}
    after = {k: traffic.choose(((1, 80.0), (2, 20.0)), (1, 2), k) for k in KEYS}
    moved = [k for k in KEYS if before[k] != after[k]]
    assert all(before[k] == 1 and after[k] == 2 for k in moved)  # nobody leaves the growing arm
    # the minimum is 10% of the keys (the arm doubles); rendezvous hashing moves exactly that many, +- noise
    assert abs(len(moved) / len(KEYS) - 0.10) < 0.01, len(moved)


def test_keys_keep_their_version_across_processes() -> None:
    """blake2b, not the per-process salted hash(): a restart (or another replica) routes a key the same way."""
    code = ("from ladle.serving import traffic; "
            "print(''.join(str(traffic.choose(((1, 50.0), (2, 50.0)), (1, 2), f'k{i}')) for i in range(64)))")
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)}
    here = "".join(str(traffic.choose(((1, 50.0), (2, 50.0)), (1, 2), f"k{i}")) for i in range(64))
    assert runs == {here + "\n"}


def test_an_arm_that_is_not_ready_gives_its_keys_to_the_others_only() -> None:
    split = ((1, 50.0), (2, 50.0), (3, 0.0))
    with_two = {k: traffic.choose(split, (1, 2), k) for k in KEYS[:4000]}
    only_one = {k: traffic.choose(split, (1,), k) for k in KEYS[:4000]}
    assert set(only_one.values()) == {1}
    assert 3 not in set(with_two.values())  # weight 0 never draws


def test_random_draw_without_key_follows_weights() -> None:
    counts = collections.Counter(traffic.choose(((1, 75.0), (2, 25.0)), (1, 2)) for _ in range(8000))
    assert abs(counts[2] - 2000) < 4.5 * math.sqrt(8000 * 0.25 * 0.75)


@pytest.mark.parametrize(("split", "ready", "spare", "expected"), [
    ((), (1, 2, 3), None, 3),  # no split: the newest
    ((), (1, 2, 3), 3, 2),  # ... but not the shadow candidate
    ((), (3,), 3, 3),  # ... unless it is the only version
    (((5, 1.0),), (1, 2), None, 2),  # no arm of the split is ready: the newest
    (((1, 1.0),), (1, 2), None, 1),  # one arm: no draw
])
def test_fallbacks(split, ready, spare, expected) -> None:
    assert traffic.choose(split, ready, "k", spare) == expected
    assert traffic.choose(split, ready, None, spare) == expected


def test_step_split_shares_the_rest_in_baseline_proportions() -> None:
    assert traffic.step_split(((1, 100.0),), 2, 25) == ((1, 75.0), (2, 25.0))
    assert traffic.step_split(((1, 3.0), (3, 1.0)), 2, 20) == ((1, 60.0), (2, 20.0), (3, 20.0))
    assert traffic.step_split(((1, 100.0),), 2, 100) == ((2, 100.0),)
    assert traffic.step_split((), 2, 50) == ((2, 100.0),)  # nothing to share with


def test_normalized_is_percent() -> None:
    assert traffic.normalized(((1, 1.0), (2, 3.0))) == ((1, 25.0), (2, 75.0))
    assert traffic.normalized(()) == ()
