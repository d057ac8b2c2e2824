"""paged_attention against a naive reference: per-sequence full causal attention over un-paged K/V; over a cache
narrower than the model (--kv-cache-dtype) the same, up to the cache's rounding of K/V."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from ladle.llm.attention import build_attention_metadata, paged_attention

HEAD_DIM = 8
SCALE = HEAD_DIM**-0.5


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int, scale: float) -> torch.Tensor:
    """q [n, H, D] at positions start_pos..; k/v [start_pos + n, Hkv, D] the whole context."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    n, ctx = q.shape[0], k.shape[0]
    allowed = torch.arange(ctx)[None, :] <= (start_pos + torch.arange(n))[:, None]
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v).reshape(n, -1)


@dataclass
class Problem:
    """Random sequences with their full (un-paged) K/V, the new tokens' queries, and shuffled block tables."""

    seqs: list[tuple[int, int]]  # (start_pos, num_new); decodes (num_new == 1) first, as the runner orders them
    q: list[torch.Tensor]
    k: list[torch.Tensor]
    v: list[torch.Tensor]
    tables: list[np.ndarray]
    num_blocks: int


def make_problem(
    seqs: list[tuple[int, int]], heads: int, kv_heads: int, block_size: int, dtype: torch.dtype, seed: int = 0
) -> Problem:
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    needed = [-(-(s + n) // block_size) for s, n in seqs]
    num_blocks = sum(needed) + 3
    ids = np.random.default_rng(seed).permutation(num_blocks)[: sum(needed)]  # shuffled, non-contiguous
    return Problem(
        seqs,
        q=[rand(n, heads, HEAD_DIM) for _, n in seqs],
        k=[rand(s + n, kv_heads, HEAD_DIM) for s, n in seqs],
        v=[rand(s + n, kv_heads, HEAD_DIM) for s, n in seqs],
        tables=np.split(ids, np.cumsum(needed)[:-1]),
        num_blocks=num_blocks,
    )


def paged_cache(p: Problem, block_size: int, upto: str, dtype: torch.dtype | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V caches (of `dtype`, default the problem's) holding each sequence's tokens before start_pos
    (upto="context") or all of them ("all")."""
    kv_heads, dtype = p.k[0].shape[1], dtype or p.k[0].dtype
    k_cache = torch.zeros(kv_heads, p.num_blocks, block_size, HEAD_DIM, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    for (start, _), k, v, table in zip(p.seqs, p.k, p.v, p.tables, strict=True):
        for pos in range(start if upto == "context" else k.shape[0]):
            k_cache[:, table[pos // block_size], pos % block_size] = k[pos]
            v_cache[:, table[pos // block_size], pos % block_size] = v[pos]
    return k_cache, v_cache


def run_paged(p: Problem, block_size: int, cache_dtype: torch.dtype | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """paged_attention over the problem as the runner would call it: (output, k_cache afterwards)."""
    k_cache, v_cache = paged_cache(p, block_size, "context", cache_dtype)
    num_tokens = np.array([n for _, n in p.seqs])
    positions = np.concatenate([np.arange(s, s + n) for s, n in p.seqs])
    width = max(map(len, p.tables))
    table = np.stack([np.pad(t, (0, width - len(t))) for t in p.tables]).astype(np.int64)
    meta = build_attention_metadata(
        positions, np.repeat(np.arange(len(p.seqs)), num_tokens), num_tokens, table, int((num_tokens == 1).sum()),
        (k_cache.shape[0], p.num_blocks, block_size), p.q[0].dtype, torch.device("cpu"),
    )
    new_k = torch.cat([k[s:] for k, (s, _) in zip(p.k, p.seqs, strict=True)])
    new_v = torch.cat([v[s:] for v, (s, _) in zip(p.v, p.seqs, strict=True)])
    return paged_attention(torch.cat(p.q), new_k, new_v, k_cache, v_cache, meta, SCALE), k_cache


def run_reference(p: Problem) -> torch.Tensor:
    parts = zip(p.q, p.k, p.v, p.seqs, strict=True)
    return torch.cat([reference(q.float(), k.float(), v.float(), s, SCALE) for q, k, v, (s, _) in parts])


CASES = {
    "decode_few": [(5, 1), (17, 1)],
    "decode_many": [(0, 1), (3, 1), (15, 1), (16, 1), (31, 1), (40, 1), (7, 1)],  # > the SDPA path's batch cutoff
    "prefill_only": [(0, 9)],
    "chunk_only": [(21, 6)],
    "mixed": [(4, 1), (33, 1), (0, 12), (10, 5), (16, 16), (0, 2)],
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (8, 2), (6, 1)])
@pytest.mark.parametrize("block_size", [16, 4])
def test_matches_naive_reference(case: str, heads: int, kv_heads: int, block_size: int) -> None:
    problem = make_problem(CASES[case], heads, kv_heads, block_size, torch.float32)
    out, k_cache = run_paged(problem, block_size)
    torch.testing.assert_close(out, run_reference(problem), atol=1e-5, rtol=1e-5)
    # every new key landed in its slot and nothing else was touched
    torch.testing.assert_close(k_cache, paged_cache(problem, block_size, "all")[0])


@pytest.mark.parametrize("contiguous", [True, False])
def test_lone_decode_reads_consecutive_blocks_in_place(contiguous: bool) -> None:
    problem = make_problem([(37, 1)], 8, 2, 4, torch.float32)
    if contiguous:
        problem.tables = [np.arange(3, 3 + len(problem.tables[0]))]  # the pool's usual, in-order hand-out
        problem.num_blocks = 3 + len(problem.tables[0])
    out, k_cache = run_paged(problem, 4)
    torch.testing.assert_close(out, run_reference(problem), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_cache, paged_cache(problem, 4, "all")[0])


def test_bfloat16_within_rounding_of_float32_reference() -> None:
    problem = make_problem(CASES["mixed"], 8, 2, 16, torch.bfloat16)
    out, _ = run_paged(problem, 16)
    assert out.dtype == torch.bfloat16
    # the reference runs in float32 on the same bf16-rounded inputs; bf16 keeps ~3 significant digits
    torch.testing.assert_close(out.float(), run_reference(problem), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2])
def test_a_float32_model_over_a_16_bit_cache(cache_dtype: torch.dtype) -> None:
    problem = make_problem(CASES["mixed"], 8, 2, 16, torch.float32)
    # K/V already on the cache's grid: what the cache stores is then exactly what the reference attends over
    problem.k = [k.to(cache_dtype).float() for k in problem.k]
    problem.v = [v.to(cache_dtype).float() for v in problem.v]
    out, k_cache = run_paged(problem, 16, cache_dtype)
    assert out.dtype == torch.float32 and k_cache.dtype == cache_dtype
    torch.testing.assert_close(out, run_reference(problem), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_cache.float(), paged_cache(problem, 16, "all", cache_dtype)[0].float())
