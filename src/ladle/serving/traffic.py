"""Which version a request that names none goes to: a weighted draw over the traffic split's READY versions, or —
when the request carries a sticky key — weighted rendezvous hashing, so one key always lands on the same version.

Invariant (sticky keys): a key's version depends only on the key and the weights, never on the process or on
other requests; raising one version's weight only moves keys *to* that version (weighted rendezvous hashing:
version v scores w_v / -ln(u(key, v)) and the highest score wins, so a key changes version only when the ratio of
weights it compares changes in the new version's favour). Pure Python, no I/O.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Collection, Sequence

Split = tuple[tuple[int, float], ...]  # ((version, weight), ...): relative weights, ascending versions

_SCALE = float(1 << 64)
#: characters of a sticky key that count: a longer key is cut (keys are hashed on the event loop)
MAX_KEY_CHARS = 256


def choose(split: Split, ready: Collection[int], key: str | None = None, spare: int | None = None) -> int:
    """The version for one request: drawn from `split` among its `ready` versions with weight > 0 (by `key` when
    given), else the newest ready version but `spare` (a shadow candidate takes no traffic the split does not give
    it) unless it is the only one. `ready` must not be empty."""
    arms = [(version, weight) for version, weight in split if weight > 0 and version in ready]
    if not arms:
        return max((v for v in ready if v != spare), default=max(ready))
    if len(arms) == 1:
        return arms[0][0]
    if key is None:
        versions, weights = zip(*arms, strict=True)
        return random.choices(versions, weights)[0]
    return max(arms, key=lambda arm: _score(key, arm[0], arm[1]))[0]


def _score(key: str, version: int, weight: float) -> float:
    # blake2b, not hash(): Python salts str hashes per process, and a key must keep its version across restarts
    # (and across replicas of a cluster). u is in (0, 1): never 0 or 1, so the logarithm is finite and negative.
    digest = hashlib.blake2b(f"{version}\x00{key}".encode(errors="surrogatepass"), digest_size=8).digest()
    u = (int.from_bytes(digest, "little") + 0.5) / _SCALE
    return weight / -math.log(u)


def normalized(split: Split) -> Split:
    """Weights as percentages summing to 100 (what status pages show); an empty split stays empty."""
    total = sum(weight for _, weight in split)
    return tuple((version, 100.0 * weight / total) for version, weight in split) if total > 0 else ()


def step_split(baseline: Split, candidate: int, percent: float) -> Split:
    """The split that gives `candidate` `percent` of the traffic and shares the rest among `baseline`'s other
    versions in their own proportions (a rollout step)."""
    rest = [(version, weight) for version, weight in baseline if version != candidate and weight > 0]
    total = sum(weight for _, weight in rest)
    if percent >= 100 or total <= 0:
        return ((candidate, 100.0),)
    shares = {version: (100.0 - percent) * weight / total for version, weight in rest}
    if percent > 0:
        shares[candidate] = percent
    return tuple(sorted(shares.items()))


def versions_of(split: Sequence[tuple[int, float]]) -> list[int]:
    return [version for version, weight in split if weight > 0]
