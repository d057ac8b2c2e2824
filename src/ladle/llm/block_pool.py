"""The paged KV cache's physical blocks: ref counts, an LRU free queue and the prefix-cache map.

Invariant: every block is either in use (ref > 0) or in the free queue, never both; a free block keeps
its prefix-cache key (still hittable) until it is taken for reuse, when the key is evicted.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

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
        self._cached: dict[BlockKey, int] = {}
        self._next_uid = ROOT_UID + 1

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def lookup(self, key: BlockKey) -> int | None:
        """The block holding exactly this content, if cached (in use or free)."""
        return self._cached.get(key)

    def free_queue(self) -> list[int]:
        """Free block ids from next-to-be-taken to last (for tests and debugging)."""
        return list(self._free)

    def take(self, n: int) -> list[int]:
        """Take n blocks from the head of the free queue with ref 1, evicting any cached content."""
        free = self._free
        if n > len(free):
            raise ValueError(f"asked for {n} blocks but only {len(free)} are free")
        ref_cnt, block_key = self.ref_cnt, self.block_key
        taken = []
        for _ in range(n):
            block_id = free.popitem(last=False)[0]
            if block_key[block_id] is not None:
                self._evict(block_id)
            ref_cnt[block_id] = 1
            taken.append(block_id)
        return taken

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
        if len(self._free) != self.num_blocks:
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
        assert len(self._free) == self.ref_cnt.count(0), "a free block is missing from the free queue"
        for key, block_id in self._cached.items():
            assert self.block_key[block_id] == key, f"map key for block {block_id} is not its stored key"
        cached_ids = [b for b, k in enumerate(self.block_key) if k is not None]
        assert len(cached_ids) == len(self._cached), "a block holds a key that is not in the map"
        uids = [self.block_uid[b] for b in cached_ids]
        assert ROOT_UID not in uids and len(set(uids)) == len(uids), "cached uids are not unique"
        assert all(self.block_uid[b] == ROOT_UID for b, k in enumerate(self.block_key) if k is None)
