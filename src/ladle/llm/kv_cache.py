"""Per-request block tables over the BlockPool, prefix-cache lookup and registration (pure Python).

Invariant: a block's ref count equals the number of tables holding it, and a request's table always
covers every token it has scheduled; at least one token of a request is always left to compute.
"""

from __future__ import annotations

from collections.abc import Sequence

from ladle.llm.block_pool import ROOT_UID, BlockKey, BlockPool
from ladle.llm.request import Request

__all__ = ["RESERVE_AHEAD", "ROOT_UID", "BlockKey", "BlockPool", "KVCacheManager"]

_NO_BLOCKS: tuple[int, ...] = ()
# blocks reserved past a request's newest ones (KVCacheManager reserve_ahead): runs of up to 32 blocks (512 tokens;
# 64 KB per KV head in bfloat16) read as fast as one sequential sweep here (benchmarks/micro/read_pattern.py)
RESERVE_AHEAD = 32


class KVCacheManager:
    """Owns request_id -> block table, and the uid chain of each request's registered full blocks."""

    def __init__(self, pool: BlockPool, max_model_len: int, reserve_ahead: int = 0) -> None:
        """`reserve_ahead`: up to that many blocks past a request's newest ones are reserved for it (BlockPool.take),
        as many as its max_tokens can still fill, so that its table stays one consecutive run (0: none)."""
        if pool.num_blocks * pool.block_size < max_model_len:
            raise ValueError(
                f"the KV cache holds {pool.num_blocks} blocks x {pool.block_size} = "
                f"{pool.num_blocks * pool.block_size} tokens, fewer than max_model_len={max_model_len}; "
                "give the cache more memory or lower max_model_len"
            )
        self.pool = pool
        self.block_size = pool.block_size
        self.max_model_len = max_model_len
        self.reserve_ahead = reserve_ahead
        self._tables: dict[str, list[int]] = {}
        # uids of the request's leading full blocks already registered in (or found in) the cache,
        # so registering the next block needs only the last uid and the new block's tokens.
        self._chains: dict[str, list[int]] = {}
        self.prefix_cache_queries = 0  # tokens looked up, once per admission (including resumptions)
        self.prefix_cache_hits = 0  # of those, tokens served from the cache

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (ref > 0); free blocks that still hold cached content count as free."""
        return 1.0 - self.pool.num_free_blocks / self.pool.num_blocks

    def block_table(self, request_id: str) -> list[int]:
        """The request's block table (the live list: read it, don't change it); [] when it holds none."""
        return self._tables.get(request_id, [])

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """Longest chain of cached full blocks matching the request's token prefix, and its token count.

        The count stays < request.num_tokens: the last token must be fed to the model to get logits,
        so a fully cached sequence backs off one block. A request still owed prompt logprobs gets no hits:
        its prompt positions' logits must be computed.
        """
        pool = self.pool
        if not pool.enable_prefix_caching or request.needs_prompt_logprobs:
            return [], 0
        bs = self.block_size
        ids = request.all_token_ids
        blocks: list[int] = []
        parent = ROOT_UID
        for start in range(0, (len(ids) - 1) // bs * bs, bs):
            block_id = pool.lookup((parent, tuple(ids[start : start + bs])))
            if block_id is None:
                break
            blocks.append(block_id)
            parent = pool.block_uid[block_id]
        return blocks, len(blocks) * bs

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: Sequence[int] = _NO_BLOCKS,
        num_new_computed_tokens: int = 0,
    ) -> bool:
        """Grow the request's table to cover num_computed + num_new_computed + num_new tokens.

        `new_computed_blocks` (prefix-cache hits from get_computed_blocks, only for a request holding
        no blocks) are referenced first. All or nothing: False, and nothing changed, when the free
        blocks can't cover the new blocks plus the hits that are themselves sitting in the free queue.
        """
        rid = request.request_id
        table = self._tables.get(rid)
        total = request.num_computed_tokens + num_new_computed_tokens + num_new_tokens
        assert total <= self.max_model_len, f"{rid}: {total} tokens exceed max_model_len={self.max_model_len}"
        held = len(table) if table is not None else 0
        num_new_blocks = -(-total // self.block_size) - held - len(new_computed_blocks)
        if num_new_blocks <= 0 and not new_computed_blocks:
            return True  # the common decode step: the last block still has room
        pool = self.pool
        ref_cnt = pool.ref_cnt
        num_revived = sum(1 for b in new_computed_blocks if ref_cnt[b] == 0)
        if max(num_new_blocks, 0) + num_revived > pool.num_free_blocks:
            return False
        if table is None:
            table = self._tables[rid] = []
            self._count_prefix_query(request, num_new_computed_tokens)
        if new_computed_blocks:
            assert held == 0, f"{rid}: prefix-cache hits are only for a request that holds no blocks"
            pool.touch(new_computed_blocks)
            table.extend(new_computed_blocks)
            self._chains[rid] = [pool.block_uid[b] for b in new_computed_blocks]
        if num_new_blocks > 0:
            table.extend(pool.take(num_new_blocks, rid, self._blocks_ahead(request, len(table) + num_new_blocks)))
        return True

    def _blocks_ahead(self, request: Request, held: int) -> int:
        """Blocks worth reserving past `held` ones: as many as the request can still fill, up to reserve_ahead."""
        if not self.reserve_ahead:
            return 0
        final = min(request.num_prompt_tokens + request.sampling_params.max_tokens, self.max_model_len)
        return max(0, min(self.reserve_ahead, -(-final // self.block_size) - held))

    def _count_prefix_query(self, request: Request, num_hit_tokens: int) -> None:
        if self.pool.enable_prefix_caching:
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += num_hit_tokens

    def cache_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Register the request's blocks that are full and computed within num_computed_tokens."""
        pool = self.pool
        if not pool.enable_prefix_caching:
            return
        bs = self.block_size
        rid = request.request_id
        chain = self._chains.get(rid)
        if chain is None:
            chain = self._chains[rid] = []
        num_full = num_computed_tokens // bs
        if num_full <= len(chain):
            return  # most decode steps: no block became full
        assert num_computed_tokens <= request.num_tokens, f"{rid}: more tokens computed than known"
        table = self._tables[rid]
        ids = request.all_token_ids
        parent = chain[-1] if chain else ROOT_UID
        for i in range(len(chain), num_full):
            parent = pool.cache_block(table[i], (parent, tuple(ids[i * bs : (i + 1) * bs])))
            chain.append(parent)

    def truncate(self, request_id: str, num_tokens: int) -> None:
        """Release the request's blocks past those holding its first num_tokens tokens (speculative decoding: the
        blocks only rejected draft tokens were written to). They were never registered: a block is cached only
        once full of computed tokens, and computed tokens stay within num_tokens."""
        table = self._tables.get(request_id)
        keep = -(-num_tokens // self.block_size)
        if table is None or len(table) <= keep:
            return
        assert len(self._chains.get(request_id, ())) <= keep, f"{request_id}: truncating registered blocks"
        surplus = table[keep:]
        del table[keep:]
        self.pool.release(reversed(surplus))
        if self.reserve_ahead:  # still this request's next blocks: its run goes on through them
            self.pool.reserve_back(request_id, surplus)

    def free(self, request_id: str) -> None:
        """Drop the request's blocks. Released tail first, so that among its cached blocks the tail
        ones reach the free queue first and are evicted before its (more shareable) prefix."""
        self._chains.pop(request_id, None)
        self.pool.unreserve(request_id)
        table = self._tables.pop(request_id, None)
        if table:
            self.pool.release(reversed(table))

    def reset_prefix_cache(self) -> bool:
        """Forget all cached content; False (and no change) while any request holds blocks."""
        return self.pool.reset_prefix_cache()

    def check_invariants(self) -> None:
        """Assert pool and table bookkeeping agree (O(blocks); for tests)."""
        self.pool.check_invariants()
        refs = [0] * self.pool.num_blocks
        for rid, table in self._tables.items():
            assert len(set(table)) == len(table), f"{rid}: a block appears twice in one table"
            assert len(self._chains.get(rid, ())) <= len(table), f"{rid}: chain longer than table"
            for block_id in table:
                refs[block_id] += 1
        assert refs == self.pool.ref_cnt, "ref counts differ from the number of tables holding each block"
        assert set(self._chains) <= set(self._tables), "a chain without a table"
