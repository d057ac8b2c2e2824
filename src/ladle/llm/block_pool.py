"""The paged KV cache's physical blocks: ref counts, an LRU free queue, reservations and the prefix-cache map.

Invariant: every block is either in use (ref > 0), in the free queue, or reserved for one owner (free, uncached,
out of the queue), never two of these; a free block keeps its prefix-cache key (still hittable) until it is taken
for reuse, when the key is evicted.

Reservations keep a growing sequence's blocks consecutive: the decode kernel reads each sequence's K/V block by block,
and consecutive blocks are one long run in memory (runner.py lays each layer's cache out [kv_heads, blocks, block,
head_dim]), which this host's memory reads ~1.2-1.3x faster than 2 KB blocks scattered over the cache
(benchmarks/RESULTS.md). Reserved blocks still count as free: any request takes them when the queue runs dry.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable
from itertools import islice

# A full block's prefix-cache key: (uid of the parent block's key, the block's token ids).
#
# Collision handling: the map is a dict, so two keys with the same Python hash are told apart by
# equality, and equality compares the tokens themselves, so a hash collision costs one tuple compare,
# never a false hit. The parent is named by a uid, not by its hash: uids are handed out once per
# registered key and never reused, so a uid names one exact token prefix, and by induction so does
# every key. (Python's int/tuple hashes are unsalted and easy to collide on purpose; with a chained
# hash alone, one tenant could craft a prompt that reads another tenant's KV.) The price is one tuple
# of block_size ints per cached block.
BlockKey = tuple[int, tuple[int, ...]]

ROOT_UID = 0  # the parent uid of a sequence's first block
RUN_SCAN = 32  # free-queue entries a new reservation's start is looked for among (BlockPool._take_run)
RUN_SCAN_STEPS = 1024  # blocks it looks at in all: a long prompt's search stays ~0.1 ms of Python per admission


class BlockPool:
    """Blocks 0..num_blocks-1. Free blocks are taken from the head of the free queue (least recently
    freed first); freed blocks holding cached content go to the tail, freed blocks holding nothing
    reusable go to the head, so they are reused before any cached block is evicted."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_cnt: list[int] = [0] * num_blocks
        self.block_key: list[BlockKey | None] = [None] * num_blocks
        self.block_uid: list[int] = [ROOT_UID] * num_blocks
        # OrderedDict: O(1) pop from the head, append at either end, and delete from the middle
        # (a cache hit on a free block) -- all in C.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._reserved: dict[str, deque[int]] = {}  # owner -> the consecutive free blocks kept for it, in order
        self._num_reserved = 0
        self._cached: dict[BlockKey, int] = {}
        self._next_uid = ROOT_UID + 1

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + self._num_reserved

    @property
    def num_reserved_blocks(self) -> int:
        return self._num_reserved

    def reserved_for(self, owner: str) -> list[int]:
        """The blocks reserved for `owner`, next-to-be-taken first (for tests and debugging)."""
        return list(self._reserved.get(owner, ()))

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def lookup(self, key: BlockKey) -> int | None:
        """The block holding exactly this content, if cached (in use or free)."""
        return self._cached.get(key)

    def free_queue(self) -> list[int]:
        """Free block ids from next-to-be-taken to last (for tests and debugging)."""
        return list(self._free)

    def take(self, n: int, owner: str | None = None, reserve: int = 0) -> list[int]:
        """Take n blocks with ref 1: `owner`'s reserved blocks first (with none and `reserve` > 0: from the start of
        a run of free blocks near the queue's head, _take_run), then the head of the free queue (evicting any cached
        content), then, when the queue is empty, other owners' reservations (the largest one's tail). When `owner`
        has no reservation left and `reserve` > 0, up to `reserve` free, uncached blocks right after the last one
        taken are reserved for it (stopping at the first block that is not)."""
        if n > self.num_free_blocks:
            raise ValueError(f"asked for {n} blocks but only {self.num_free_blocks} are free")
        taken = self._take_reserved(owner, n) if owner is not None else []
        if not taken and reserve > 0 and owner is not None:
            taken = self._take_run(n, n + reserve)
        free, ref_cnt, block_key = self._free, self.ref_cnt, self.block_key
        while len(taken) < n and free:
            block_id = free.popitem(last=False)[0]
            if block_key[block_id] is not None:
                self._evict(block_id)
            ref_cnt[block_id] = 1
            taken.append(block_id)
        if len(taken) < n:
            taken.extend(self._steal(n - len(taken)))
        if reserve > 0 and owner is not None and taken and owner not in self._reserved:
            self._reserve(owner, taken[-1] + 1, reserve)
        return taken

    def unreserve(self, owner: str) -> None:
        """Return `owner`'s reserved blocks to the head of the free queue, lowest id first (taken next, in order)."""
        run = self._reserved.pop(owner, None)
        if not run:
            return
        self._num_reserved -= len(run)
        free = self._free
        for block_id in reversed(run):
            free[block_id] = None
            free.move_to_end(block_id, last=False)

    def reserve_back(self, owner: str, block_ids: list[int]) -> None:
        """Keep `owner`'s just-released blocks (its table's old tail, in table order: rejected draft tokens) reserved
        for it again, ahead of its reservation, as far as they are free, uncached and run consecutively into it; the
        others stay in the free queue."""
        run = self._reserved.get(owner)
        after = run[0] if run else None
        free, block_key = self._free, self.block_key
        for block_id in reversed(block_ids):
            if (after is not None and block_id != after - 1) or block_id not in free or block_key[block_id] is not None:
                break
            del free[block_id]
            if run is None:
                run = self._reserved[owner] = deque()
            run.appendleft(block_id)
            self._num_reserved += 1
            after = block_id

    def _take_reserved(self, owner: str, n: int) -> list[int]:
        run = self._reserved.get(owner)
        if not run:
            return []
        taken = [run.popleft() for _ in range(min(n, len(run)))]
        self._num_reserved -= len(taken)
        if not run:
            del self._reserved[owner]
        for block_id in taken:
            self.ref_cnt[block_id] = 1
        return taken

    def _take_run(self, n: int, want: int) -> list[int]:
        """Up to n blocks from the start of the longest run of free, uncached blocks (up to `want` long) beginning
        among the first RUN_SCAN blocks of the free queue, so that a new table and its reservation start in one run
        rather than at the head wherever it is (a fragmented head would split them); [] when no run is longer than
        one block (the caller takes the head)."""
        best, best_len, budget = -1, 1, RUN_SCAN_STEPS
        for start in islice(self._free, RUN_SCAN):
            length = self._free_run(start, want)  # 0 for a cached block
            if length > best_len:
                best, best_len = start, length
            budget -= length
            if length == want or budget <= 0:
                break
        if best < 0:
            return []
        taken = list(range(best, best + min(n, best_len)))
        for block_id in taken:
            del self._free[block_id]
            self.ref_cnt[block_id] = 1
        return taken

    def _steal(self, n: int) -> list[int]:
        """n reserved blocks for whoever asks (the free queue is empty): from the tail of the largest reservation,
        then the next largest (one scan of the owners per reservation emptied, not per block)"""
        stolen: list[int] = []
        while len(stolen) < n:
            owner = max(self._reserved, key=lambda o: len(self._reserved[o]))
            run = self._reserved[owner]
            keep = max(len(run) - (n - len(stolen)), 0)
            while len(run) > keep:
                stolen.append(run.pop())
            if not run:
                del self._reserved[owner]
        self._num_reserved -= len(stolen)
        for block_id in stolen:
            self.ref_cnt[block_id] = 1
        return stolen

    def _free_run(self, first: int, limit: int) -> int:
        """How many blocks from `first` on (up to `limit`) are free in the queue and uncached: what a reservation may
        hold (reserving a cached block would evict its content out of LRU order)."""
        free, block_key, end = self._free, self.block_key, min(first + limit, self.num_blocks)
        block_id = first
        while block_id < end and block_id in free and block_key[block_id] is None:
            block_id += 1
        return block_id - first

    def _reserve(self, owner: str, first: int, count: int) -> None:
        length = self._free_run(first, count)
        if not length:
            return
        run = deque(range(first, first + length))
        for block_id in run:
            del self._free[block_id]
        self._reserved[owner] = run
        self._num_reserved += length

    def touch(self, block_ids: Iterable[int]) -> None:
        """Add a reference to each block (prefix-cache hits); a free one leaves the free queue."""
        ref_cnt, free = self.ref_cnt, self._free
        for block_id in block_ids:
            if ref_cnt[block_id] == 0:
                del free[block_id]
            ref_cnt[block_id] += 1

    def release(self, block_ids: Iterable[int]) -> None:
        """Drop a reference to each block, in the given order; blocks reaching 0 become free."""
        ref_cnt, block_key, free = self.ref_cnt, self.block_key, self._free
        for block_id in block_ids:
            ref_cnt[block_id] -= 1
            if ref_cnt[block_id] == 0:
                free[block_id] = None
                if block_key[block_id] is None:
                    free.move_to_end(block_id, last=False)

    def cache_block(self, block_id: int, key: BlockKey) -> int:
        """Register a full, computed block under key; returns the uid its children chain from.

        When the content is already cached in another block (two requests computed the same prefix
        at once), that block stays the cached one and this block stays unregistered.
        """
        if self.block_key[block_id] is not None:
            return self.block_uid[block_id]
        existing = self._cached.get(key)
        if existing is not None:
            return self.block_uid[existing]
        uid = self._next_uid
        self._next_uid += 1
        self._cached[key] = block_id
        self.block_key[block_id] = key
        self.block_uid[block_id] = uid
        return uid

    def reset_prefix_cache(self) -> bool:
        """Forget all cached content. Refused (False) while any block is in use, as in vLLM: a running
        request's blocks would otherwise be half in and half out of the cache."""
        if self.num_free_blocks != self.num_blocks:
            return False
        self._cached.clear()
        self.block_key = [None] * self.num_blocks
        self.block_uid = [ROOT_UID] * self.num_blocks
        return True

    def _evict(self, block_id: int) -> None:
        key = self.block_key[block_id]
        assert key is not None and self._cached.get(key) == block_id
        del self._cached[key]
        self.block_key[block_id] = None
        self.block_uid[block_id] = ROOT_UID

    def check_invariants(self) -> None:
        """Assert the pool's bookkeeping is consistent (O(num_blocks); for tests)."""
        assert all(r >= 0 for r in self.ref_cnt), "negative ref count"
        assert all(self.ref_cnt[b] == 0 for b in self._free), "a block in use is in the free queue"
        reserved = [b for run in self._reserved.values() for b in run]
        assert len(reserved) == self._num_reserved and all(self._reserved.values()), "reservation count is off"
        assert len(set(reserved)) == len(reserved), "a block is reserved twice"
        assert all(self.ref_cnt[b] == 0 and b not in self._free and self.block_key[b] is None for b in reserved), \
            "a reserved block is in use, queued or cached"
        for run in self._reserved.values():
            assert all(b == run[0] + i for i, b in enumerate(run)), "a reservation is not consecutive"
        assert len(self._free) + len(reserved) == self.ref_cnt.count(0), "a free block is neither queued nor reserved"
        for key, block_id in self._cached.items():
            assert self.block_key[block_id] == key, f"map key for block {block_id} is not its stored key"
        cached_ids = [b for b, k in enumerate(self.block_key) if k is not None]
        assert len(cached_ids) == len(self._cached), "a block holds a key that is not in the map"
        uids = [self.block_uid[b] for b in cached_ids]
        assert ROOT_UID not in uids and len(set(uids)) == len(uids), "cached uids are not unique"
        assert all(self.block_uid[b] == ROOT_UID for b, k in enumerate(self.block_key) if k is None)
