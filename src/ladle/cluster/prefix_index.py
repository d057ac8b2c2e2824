"""Which replica has seen which prompt prefix: a bounded, in-process index for prefix-aware routing (pure Python).

Invariant: at most `max_entries` (chunk key, replica) entries, dropped least recently used first; a replica's entries
always form whole prefixes, because every touch refreshes a chunk's ancestors after the chunk itself.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator

# key_{-1}: the root of every hash chain, so the first chunk's key is a hash of (root, chunk) like every other
_ROOT = 0x6C61646C65  # "ladle"

_Entry = tuple[int, str]  # (chunk key, replica)


class PrefixIndex:
    """Chunk keys -> replicas holding them, with one LRU order over all (key, replica) entries.

    A key is a hash chain over a text's leading full chunks (like KV-cache block keys), so one key names a whole
    prefix. Python's salted `hash` keeps keys cheap; a collision (about 2**-64 a pair) only misroutes one request.
    """

    def __init__(self, chunk_chars: int = 64, max_entries: int = 100_000, max_chunks_per_text: int = 64) -> None:
        for name, value in (("chunk_chars", chunk_chars), ("max_entries", max_entries),
                            ("max_chunks_per_text", max_chunks_per_text)):
            if value < 1:
                raise ValueError(f"PrefixIndex: {name} must be at least 1, got {value}")
        self.chunk_chars = chunk_chars
        self.max_entries = max_entries
        self.max_chunks_per_text = max_chunks_per_text
        self._lru: OrderedDict[_Entry, None] = OrderedDict()  # least recently used first
        self._holders: dict[int, OrderedDict[str, None]] = {}  # key -> its replicas, least recently used first
        self._by_replica: dict[str, set[int]] = {}  # replica -> its keys: removal costs what the replica held

    def insert(self, text: str, replica: str) -> None:
        """Record that `replica` now holds every full chunk of text (up to max_chunks_per_text); refreshes their
        recency."""
        # deepest first, so each chunk is fresher than everything below it and eviction trims prefixes from the tail
        for key in reversed(list(self._keys(text))):
            self._touch(key, replica)
        self._evict()

    def match(self, text: str, replicas: Iterable[str]) -> tuple[int, list[str]]:
        """(matched_chars, holders): the longest prefix of text (in chars, a multiple of chunk_chars) that some
        replica among `replicas` holds, and every replica among `replicas` holding that whole prefix, most recently
        used first. (0, []) when none holds even the first chunk. Replicas not in `replicas` are ignored."""
        candidates = set(replicas)
        path: list[int] = []
        alive: set[str] = set()
        for key in self._keys(text):
            holders = self._holders.get(key)
            if holders is None:
                break
            # those holding every chunk so far; only they can hold the longer prefix
            survivors = {r for r in (alive if path else candidates) if r in holders}
            if not survivors:
                break
            path.append(key)
            alive = survivors
        if not path:
            return 0, []
        recent_last = [r for r in self._holders[path[-1]] if r in alive]
        for key in reversed(path):  # a hit refreshes the whole matched prefix, keeping the holders' relative order
            for replica in recent_last:
                self._touch(key, replica)
        return len(path) * self.chunk_chars, recent_last[::-1]

    def remove_replica(self, replica: str) -> None:
        """Forget everything recorded for replica (it died or was scaled away); cost proportional to what it held."""
        for key in self._by_replica.pop(replica, ()):
            del self._lru[(key, replica)]
            self._drop_holder(key, replica)

    def chars(self, replica: str) -> int:
        """Characters recorded for replica (number of its chunk entries x chunk_chars): the 'smallest tenant'
        measure."""
        return len(self._by_replica.get(replica, ())) * self.chunk_chars

    def __len__(self) -> int:
        """Number of distinct chunk keys held."""
        return len(self._holders)

    def entries(self) -> int:
        """Number of (key, replica) entries held: what max_entries bounds."""
        return len(self._lru)

    def _keys(self, text: str) -> Iterator[int]:
        """The chain keys of text's leading full chunks, at most max_chunks_per_text of them."""
        size = self.chunk_chars
        key = _ROOT
        for start in range(0, min(len(text) // size, self.max_chunks_per_text) * size, size):
            key = hash((key, text[start:start + size]))
            yield key

    def _touch(self, key: int, replica: str) -> None:
        entry = (key, replica)
        if entry in self._lru:
            self._lru.move_to_end(entry)
            self._holders[key].move_to_end(replica)
            return
        self._lru[entry] = None
        self._holders.setdefault(key, OrderedDict())[replica] = None
        self._by_replica.setdefault(replica, set()).add(key)

    def _evict(self) -> None:
        while len(self._lru) > self.max_entries:
            (key, replica), _ = self._lru.popitem(last=False)
            self._drop_holder(key, replica)
            keys = self._by_replica[replica]
            keys.discard(key)
            if not keys:
                del self._by_replica[replica]

    def _drop_holder(self, key: int, replica: str) -> None:
        holders = self._holders[key]
        del holders[replica]
        if not holders:
            del self._holders[key]
