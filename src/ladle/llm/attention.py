"""Paged attention over a block-structured KV cache: write the step's K/V by slot, attend through block tables.

Cache layout per layer: [num_kv_heads, num_blocks, block_size, head_dim] (head-major, so gathered blocks are
already the [heads, tokens, head_dim] operands attention multiplies: no transposing copies); slot = block_id *
block_size + offset.
Flat batch rows: all single-token (decode) sequences first, rows [0, num_decodes), then each multi-token span.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ladle.llm.dtypes import FP8_MAX

if TYPE_CHECKING:
    from ladle.llm.kernels.paged import PagedDecode

# Up to this many decode sequences SDPA's fused kernel wins (B=1: 41 vs 100 us per layer); beyond, its
# per-(sequence, head) overhead with only `group` query rows loses to baddbmm + softmax + bmm (B=8: 231 vs 133 us).
_SDPA_MAX_DECODES = 3


@dataclass(frozen=True)
class PrefillSpan:
    """One multi-token sequence: rows [start, end) of the flat batch at positions start_pos, start_pos+1, ...

    When start_pos > 0 (a later chunk or a prefix-cache hit) earlier context is read back from the cache through
    `block_ids` (flat rows of the [kv_heads * num_blocks] cache view, head-major), and `bias` ([n, blocks *
    block_size], 0 or -inf) is the causal mask offset by start_pos.
    """

    start: int
    end: int
    start_pos: int
    block_ids: torch.Tensor | None
    bias: torch.Tensor | None
    run: tuple[int, int] | None = None  # consecutive blocks (first, count): read as a view of the cache, no gather


@dataclass(frozen=True)
class AttentionMetadata:
    """Built once per step by the runner and shared by every layer."""

    slot_mapping: torch.Tensor  # [T] int64: cache slot each new token's K/V goes to
    num_decodes: int  # rows [0, num_decodes) are one-token sequences, attended as one batch
    # flat rows of the [kv_heads * num_blocks] cache view to gather: [kv_heads * num_decodes * max_blocks] int64,
    # padded block tables, head-major so the gathered K/V is [kv_heads * num_decodes, context, head_dim] as is
    decode_block_ids: torch.Tensor | None
    decode_bias: torch.Tensor | None  # [kv_heads * num_decodes, 1, max_blocks * block_size]: 0 context, -inf padding
    prefills: tuple[PrefillSpan, ...]
    # a lone decode whose blocks are consecutive (common: the pool hands out blocks in order) reads them as a
    # view of the cache instead of gathering a copy: (first block, number of blocks)
    decode_run: tuple[int, int] | None = None
    # the compiled in-place kernel (kernels/paged.py), when the runner has one: decodes then read K/V through
    # decode_tables ([num_decodes, max_blocks] int64) and decode_lens ([num_decodes] int64), and the gather
    # fields above are left unset
    kernel: PagedDecode | None = None
    decode_tables: torch.Tensor | None = None
    decode_lens: torch.Tensor | None = None
    decode_max_len: int = 0
    # the whole step as one int64 tensor for the C++ operator (kernels/ops.cpp): a graph input of the compiled decoder.
    # Set only in metadata built for the operator (for_operator), whose torch-path fields above are left empty.
    packed: torch.Tensor | None = None

    @classmethod
    def for_operator(cls, packed: torch.Tensor, num_decodes: int) -> AttentionMetadata:
        """What kernels/ops.cpp reads, and nothing else: the torch path refuses this metadata."""
        return cls(packed.new_empty(0), num_decodes, None, None, (), packed=packed)


def build_attention_metadata(
    positions: np.ndarray,
    token_seq: np.ndarray,
    num_tokens: np.ndarray,
    block_table: np.ndarray,
    num_decodes: int,
    cache_shape: tuple[int, int, int],
    dtype: torch.dtype,
    device: torch.device,
    kernel: PagedDecode | None = None,
    operator: bool = False,
) -> AttentionMetadata:
    """Precompute slot mapping, gather indices and masks for a batch ordered decodes-first.

    positions/token_seq: per token (position, sequence index); num_tokens: per sequence; block_table: [S, max_blocks]
    int64, padded with block 0 (its contents are finite, and padded keys are masked out); cache_shape: (kv_heads,
    num_blocks, block_size) of one layer's cache. `kernel`: decodes read the cache in place through it. `operator`:
    only the packed step the C++ operator reads (kernels/ops.cpp), none of the torch path's tensors.
    """
    kv_heads, num_cache_blocks, block_size = cache_shape
    slots = block_table[token_seq, positions // block_size] * block_size + positions % block_size
    context = positions[np.cumsum(num_tokens) - 1] + 1  # tokens in the cache after this step, per sequence
    if operator:
        return AttentionMetadata.for_operator(_to(pack_step(num_tokens, context, block_table, slots, num_decodes),
                                                  device), num_decodes)
    heads = np.arange(kv_heads)[:, None] * num_cache_blocks  # row offset of each head's blocks in the flat view
    dec_ids = dec_bias = decode_run = None
    in_place: dict = {}
    if num_decodes and kernel is not None:
        max_len = int(context[:num_decodes].max())
        tables = block_table[:num_decodes, : -(-max_len // block_size)]
        in_place = {"kernel": kernel, "decode_tables": _to(tables, device), "decode_max_len": max_len,
                    "decode_lens": _to(context[:num_decodes], device)}
    elif num_decodes:
        max_blocks = int(-(-context[:num_decodes].max() // block_size))
        dec_ids = _to((heads + block_table[:num_decodes, :max_blocks].reshape(1, -1)).reshape(-1), device)
        allowed = np.arange(max_blocks * block_size)[None, :] < context[:num_decodes, None]
        per_head = np.broadcast_to(allowed[None], (kv_heads, *allowed.shape)).reshape(-1, 1, allowed.shape[1])
        dec_bias = _bias(per_head, dtype, device)
        decode_run = _consecutive(block_table[0, :max_blocks]) if num_decodes == 1 else None
    spans, row = [], int(num_tokens[:num_decodes].sum())
    for seq in range(num_decodes, len(num_tokens)):
        n, start_pos = int(num_tokens[seq]), int(positions[row])
        ids = bias = run = None
        if start_pos > 0:
            num_blocks = -(-(start_pos + n) // block_size)
            ids = _to((heads + block_table[seq, :num_blocks][None, :]).reshape(-1), device)
            allowed = np.arange(num_blocks * block_size)[None, :] <= (start_pos + np.arange(n))[:, None]
            bias = _bias(allowed, dtype, device)
            run = _consecutive(block_table[seq, :num_blocks])
        spans.append(PrefillSpan(row, row + n, start_pos, ids, bias, run))
        row += n
    return AttentionMetadata(_to(slots, device), num_decodes, dec_ids, dec_bias, tuple(spans), decode_run,
                             **in_place)


def pack_step(num_tokens: np.ndarray, context: np.ndarray, block_table: np.ndarray, slots: np.ndarray,
              num_decodes: int) -> np.ndarray:
    """The step as kernels/ops.cpp reads it: [seqs, decodes, max_blocks, max_decode_len, tokens, query_start[seqs + 1],
    context[seqs], block_table[seqs * max_blocks], slots[tokens]] (int64; context = cached tokens after the step)."""
    seqs, max_blocks = block_table.shape
    max_decode_len = int(context[:num_decodes].max()) if num_decodes else 0
    header = np.array([seqs, num_decodes, max_blocks, max_decode_len, len(slots), 0], np.int64)
    return np.concatenate([header, np.cumsum(num_tokens), context, block_table.reshape(-1), slots]).astype(np.int64)


def _consecutive(block_ids: np.ndarray) -> tuple[int, int] | None:
    first = int(block_ids[0])
    return (first, len(block_ids)) if (block_ids == np.arange(first, first + len(block_ids))).all() else None


def _to(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64)).to(device, non_blocking=True)


def _bias(allowed: np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Additive masks (0 / -inf) serve both SDPA and the bmm path; built on the host once per step.
    bias = torch.from_numpy(np.where(allowed, np.float32(0.0), np.float32(-np.inf)))
    return bias.to(device=device, dtype=dtype, non_blocking=True)


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor
) -> None:
    """Store the step's keys/values ([T, kv_heads, head_dim]) at their cache slots (rounded to the cache's dtype where
    it is narrower than the model's: --kv-cache-dtype; an 8-bit float saturates, as vLLM's conversion does)."""
    kv_heads, _, _, head_dim = k_cache.shape
    for rows, cache in ((k, k_cache), (v, v_cache)):
        rows = rows.transpose(0, 1)
        most = FP8_MAX.get(cache.dtype)
        if most is None:
            rows = rows.to(cache.dtype)
        else:  # torch has no index_copy_ of 8-bit floats: their bytes are copied
            rows, cache = rows.clamp(-most, most).to(cache.dtype).view(torch.uint8), cache.view(torch.uint8)
        cache.view(kv_heads, -1, head_dim).index_copy_(1, slots, rows)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Causal attention of q [T, heads, head_dim] over each sequence's cached context plus the new k/v
    ([T, kv_heads, head_dim], written to the cache first). Returns [T, heads * head_dim]."""
    if meta.packed is not None:
        raise RuntimeError("attention metadata built for the C++ operator reached the torch path")
    write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    num_tokens, num_heads, head_dim = q.shape
    if not meta.prefills:
        return _decode(q, k_cache, v_cache, meta, scale)
    if meta.num_decodes == 0 and len(meta.prefills) == 1:
        return _prefill(q, k, v, k_cache, v_cache, meta.prefills[0], scale)
    out = q.new_empty(num_tokens, num_heads * head_dim)
    if meta.num_decodes:
        out[: meta.num_decodes] = _decode(q[: meta.num_decodes], k_cache, v_cache, meta, scale)
    for span in meta.prefills:
        out[span.start : span.end] = _prefill(q, k, v, k_cache, v_cache, span, scale)
    return out


def _gather(cache: torch.Tensor, flat_block_ids: torch.Tensor) -> torch.Tensor:
    """Copy whole blocks out of the cache by flat (head-major) row ids: [kv_heads, tokens, head_dim].
    One index_select along dim 0 of the contiguous [kv_heads * num_blocks, ...] view is the fast gather."""
    kv_heads, num_blocks, _, head_dim = cache.shape
    rows = cache.view(kv_heads * num_blocks, -1).index_select(0, flat_block_ids)
    return rows.view(kv_heads, -1, head_dim)


def _decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """One query per sequence. Queries are grouped per KV head ([kv_heads * B, group, D]) so GQA needs no
    repeated K/V, and the gathered cache blocks are used as they come ([kv_heads * B, context, D])."""
    if meta.kernel is not None:  # in place through the block tables (kernels/paged_decode.c)
        return meta.kernel(q, k_cache, v_cache, meta.decode_tables, meta.decode_lens, meta.decode_max_len, scale)
    batch, num_heads, head_dim = q.shape
    kv_heads = k_cache.shape[0]
    group = num_heads // kv_heads
    q = q.view(batch, kv_heads, group, head_dim).transpose(0, 1).reshape(kv_heads * batch, group, head_dim)
    if meta.decode_run is not None:
        first, count = meta.decode_run
        k = k_cache[:, first : first + count].view(kv_heads, -1, head_dim)  # a view: nothing copied
        v = v_cache[:, first : first + count].view(kv_heads, -1, head_dim)
    else:
        k = _gather(k_cache, meta.decode_block_ids).view(kv_heads * batch, -1, head_dim)
        v = _gather(v_cache, meta.decode_block_ids).view(kv_heads * batch, -1, head_dim)
    k, v = k.to(q.dtype), v.to(q.dtype)  # a no-op unless the cache is narrower than the model
    if batch <= _SDPA_MAX_DECODES:  # 4-D, so SDPA takes its fused kernel: (kv_heads, B) act as (batch, heads)
        shape = (kv_heads, batch, -1, head_dim)
        bias = meta.decode_bias.view(kv_heads, batch, 1, -1)
        out = F.scaled_dot_product_attention(q.view(shape), k.view(shape), v.view(shape), attn_mask=bias, scale=scale)
    else:
        scores = torch.baddbmm(meta.decode_bias, q, k.transpose(1, 2), alpha=scale)
        out = torch.bmm(torch.softmax(scores, dim=-1), v)
    return out.view(kv_heads, batch, group, head_dim).transpose(0, 1).reshape(batch, num_heads * head_dim)


def _prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    span: PrefillSpan,
    scale: float,
) -> torch.Tensor:
    """A multi-token sequence. From position 0 its own k/v are the whole context (top-left causal = SDPA's
    is_causal); later chunks read the context back from the cache with a start_pos-offset mask. Tensors are
    4-D [1, heads, tokens, D]: SDPA's fused CPU kernel refuses 3-D inputs and falls back to slow math."""
    q_seq = q[span.start : span.end].transpose(0, 1).unsqueeze(0)
    gqa = q.shape[1] != k.shape[1]
    if span.block_ids is None:
        k_seq = k[span.start : span.end].transpose(0, 1).unsqueeze(0)
        v_seq = v[span.start : span.end].transpose(0, 1).unsqueeze(0)
        out = F.scaled_dot_product_attention(q_seq, k_seq, v_seq, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        k_seq, v_seq = _context(k_cache, span).to(q.dtype), _context(v_cache, span).to(q.dtype)
        out = F.scaled_dot_product_attention(q_seq, k_seq, v_seq, attn_mask=span.bias, scale=scale, enable_gqa=gqa)
    return out[0].transpose(0, 1).reshape(span.end - span.start, -1)


def _context(cache: torch.Tensor, span: PrefillSpan) -> torch.Tensor:
    """The span's cached context as [1, kv_heads, tokens, head_dim]: a view when its blocks are consecutive (the pool
    hands them out in order; a short span, e.g. verifying draft tokens, then reads no copy), else a gather."""
    if span.run is not None:
        first, count = span.run
        kv_heads, _, _, head_dim = cache.shape
        return cache[:, first : first + count].reshape(kv_heads, -1, head_dim).unsqueeze(0)
    assert span.block_ids is not None
    return _gather(cache, span.block_ids).unsqueeze(0)
