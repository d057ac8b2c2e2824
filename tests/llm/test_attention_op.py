"""The C++ attention operator (kernels/ops.cpp, `ladle::paged_attention`): a mixed step — decodes, a prompt from
position 0, later chunks over consecutive and scattered blocks, GQA and MHA, float32 and bfloat16, and float32 over a
16-bit cache (--kv-cache-dtype) — gives the torch path's output and leaves the same K/V in the cache; a malformed step
description is refused with an error, not a crash; a traced call sees its shape function."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ladle.llm.attention import AttentionMetadata, build_attention_metadata, paged_attention
from ladle.llm.kernels.paged import paged_attention_op

CPU = torch.device("cpu")
BLOCK = 16


def mixed_step(num_blocks: int, generator: torch.Generator):
    """(positions, token_seq, num_tokens, block_table, num_decodes): three decodes, then a prompt from 0, a chunk at
    position 33 over consecutive blocks and a 5-token span at position 50 over scattered blocks."""
    spans = [(39, 1), (2, 1), (76, 1), (0, 20), (33, 10), (50, 5)]  # (start position, tokens)
    order = [b for b in torch.randperm(num_blocks, generator=generator).tolist() if not 20 <= b < 24]
    table = np.zeros((len(spans), 6), np.int64)
    for seq, (start, n) in enumerate(spans):
        blocks = -(-(start + n) // BLOCK)
        table[seq, :blocks] = np.arange(20, 20 + blocks) if seq == 4 else [order.pop() for _ in range(blocks)]
    positions = np.concatenate([np.arange(start, start + n) for start, n in spans])
    token_seq = np.repeat(np.arange(len(spans)), [n for _, n in spans])
    num_tokens = np.array([n for _, n in spans], np.int64)
    return positions, token_seq, num_tokens, table, 3


@pytest.fixture(scope="module")
def op():
    found = paged_attention_op(torch.float32, CPU, 8, 2, 64)
    if found is None:
        pytest.skip("no C++ compiler or torch headers here: the operator is not built (the torch path serves)")
    return found


@pytest.mark.parametrize(("dtype", "cache_dtype"), [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                    (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                                    (torch.float32, torch.float8_e4m3fn),
                                                    (torch.bfloat16, torch.float8_e5m2),
                                                    (torch.float16, torch.float8_e4m3fn)])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(9, 3, 64), (4, 4, 32)])
def test_a_mixed_step_matches_the_torch_path(op, dtype, cache_dtype, heads, kv_heads, head_dim) -> None:
    generator = torch.Generator().manual_seed(heads + head_dim)
    num_blocks = 48
    positions, token_seq, num_tokens, table, decodes = mixed_step(num_blocks, generator)
    args = (positions, token_seq, num_tokens, table, decodes, (kv_heads, num_blocks, BLOCK), dtype, CPU)
    meta, step = build_attention_metadata(*args), build_attention_metadata(*args, operator=True).packed
    tokens = len(positions)
    caches = [torch.randn(kv_heads, num_blocks, BLOCK, head_dim, generator=generator).to(cache_dtype)
              for _ in range(2)]
    qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim, generator=generator).to(dtype)
    q, k, v = qkv[:, :heads], qkv[:, heads : heads + kv_heads], qkv[:, heads + kv_heads :]  # strided, like the models
    expected_caches = [c.clone() for c in caches]
    expected = paged_attention(q, k, v, *expected_caches, meta, head_dim**-0.5)
    out = op(q, k, v, *caches, step, head_dim**-0.5)
    assert out.shape == (tokens, heads * head_dim) and out.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), expected.float(), atol=tolerance, rtol=tolerance)
    for got, want in zip(caches, expected_caches, strict=True):  # (compared as bytes: 8-bit floats have no eq)
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))  # every new token's K/V at its slot only


def test_only_decodes_and_only_one_prompt(op) -> None:
    generator = torch.Generator().manual_seed(3)
    positions, token_seq, num_tokens, table, _ = mixed_step(48, generator)
    for rows in ([0, 1, 2], [3]):  # the op's two short cuts: all decodes, a single prompt
        seqs = np.array(rows)
        keep = np.isin(token_seq, seqs)
        remap = {s: i for i, s in enumerate(rows)}
        args = (positions[keep], np.vectorize(remap.get)(token_seq[keep]), num_tokens[seqs], table[seqs],
                int((num_tokens[seqs] == 1).sum()), (2, 48, BLOCK), torch.float32, CPU)
        caches = [torch.randn(2, 48, BLOCK, 64, generator=generator) for _ in range(2)]
        q, k, v = (torch.randn(int(keep.sum()), h, 64, generator=generator) for h in (8, 2, 2))
        expected = paged_attention(q, k, v, *[c.clone() for c in caches], build_attention_metadata(*args), 0.125)
        step = build_attention_metadata(*args, operator=True).packed
        torch.testing.assert_close(op(q, k, v, *caches, step, 0.125), expected, atol=1e-5, rtol=1e-5)


def small_step(seed: int) -> tuple[torch.Tensor, list[torch.Tensor], tuple[torch.Tensor, ...]]:
    """The mixed step for the operator, 8 query / 2 KV heads of 64: (packed step, [k_cache, v_cache], (q, k, v))."""
    positions, token_seq, num_tokens, table, decodes = mixed_step(48, torch.Generator().manual_seed(seed))
    meta = build_attention_metadata(positions, token_seq, num_tokens, table, decodes, (2, 48, BLOCK), torch.float32,
                                    CPU, operator=True)
    caches = [torch.zeros(2, 48, BLOCK, 64) for _ in range(2)]
    return meta.packed, caches, tuple(torch.randn(len(positions), h, 64) for h in (8, 2, 2))


def test_a_malformed_step_is_an_error_not_a_crash(op) -> None:
    step, caches, (q, k, v) = small_step(4)
    with pytest.raises(RuntimeError, match="meta length"):
        op(q, k, v, *caches, step[:-1], 0.125)
    with pytest.raises(RuntimeError, match="tokens"):
        op(q[:-1], k[:-1], v[:-1], *caches, step, 0.125)
    bad = step.clone()
    bad[-1] = 48 * BLOCK  # the last token's slot, one past the cache
    with pytest.raises(RuntimeError, match="outside the cache"):
        op(q, k, v, *caches, bad, 0.125)
    with pytest.raises(RuntimeError, match="contiguous int64"):
        op(q, k, v, *caches, step.int(), 0.125)
    with pytest.raises(RuntimeError, match="heads or head size"):
        op(q, k[:, :1], v[:, :1], *caches, step, 0.125)
    header = 5 + 7 + 6  # header, query_start[7], context[6]: then the block table of 6 x 6
    bad = step.clone()
    bad[header] = 48  # the first sequence's first block, one past the cache
    with pytest.raises(RuntimeError, match="block 48 outside the cache"):
        op(q, k, v, *caches, bad, 0.125)
    bad = step.clone()
    bad[5 + 7] = 10_000  # the first sequence's context, past its block table
    with pytest.raises(RuntimeError, match="context of 10000"):
        op(q, k, v, *caches, bad, 0.125)


def test_operator_metadata_is_refused_by_the_torch_path() -> None:
    step, caches, (q, k, v) = small_step(6)
    meta = AttentionMetadata.for_operator(step, 3)
    with pytest.raises(RuntimeError, match="C\\+\\+ operator"):
        paged_attention(q, k, v, *caches, meta, 0.125)


def test_tracing_uses_its_shape_function(op) -> None:
    step, caches, (q, k, v) = small_step(5)
    compiled = torch.compile(lambda *a: op(*a, 0.125) * 2, fullgraph=True, dynamic=True)
    torch.testing.assert_close(compiled(q, k, v, *caches, step), op(q, k, v, *caches, step, 0.125) * 2)


@pytest.mark.parametrize(("cache_dtype", "most"), [(torch.float8_e4m3fn, 448.0), (torch.float8_e5m2, 57344.0)])
def test_keys_and_values_beyond_an_8_bit_cache_saturate(op, cache_dtype, most) -> None:
    """torch's own conversion makes e4m3's out-of-range values NaN and e5m2's infinite; the cache stores the largest
    finite value instead (as vLLM's saturating conversion does), in both the operator and the torch path."""
    heads = kv_heads = 2
    positions, token_seq, num_tokens, table, decodes = np.array([0]), np.array([0]), np.array([1]), np.array([[0]]), 1
    args = (positions, token_seq, num_tokens, table, decodes, (kv_heads, 4, BLOCK), torch.float32, CPU)
    q = torch.ones(1, heads, 64)
    k = torch.full((1, kv_heads, 64), 1e6)
    v = torch.full((1, kv_heads, 64), -1e6)
    for attend, meta in ((op, build_attention_metadata(*args, operator=True).packed),
                         (paged_attention, build_attention_metadata(*args))):
        caches = [torch.zeros(kv_heads, 4, BLOCK, 64).to(cache_dtype) for _ in range(2)]
        out = attend(q, k, v, *caches, meta, 0.125)
        assert caches[0][:, 0, 0].float().eq(most).all() and caches[1][:, 0, 0].float().eq(-most).all()
        torch.testing.assert_close(out, torch.full((1, heads * 64), -most))


@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_rows_round_into_an_8_bit_cache_as_torch_rounds_them(op, cache_dtype) -> None:
    """The operator converts rows itself (round to nearest even, saturating): byte for byte what the torch path's clamp
    and conversion store, over every code's value, the midpoints between neighbours (ties go to even), just beside
    them, subnormals, zeros of both signs and magnitudes from 1e-9 to 1e9."""
    codes = torch.arange(256, dtype=torch.uint8).view(cache_dtype).float()
    codes = codes[codes.isfinite()].unique()
    mids = (codes[1:] + codes[:-1]) / 2
    generator = torch.Generator().manual_seed(3)
    spread = torch.logspace(-9, 9, 2000) * torch.randint(0, 2, (2000,), generator=generator).mul(2).sub(1)
    values = torch.cat([codes, mids, mids.nextafter(codes[1:]), mids.nextafter(codes[:-1]), spread,
                        torch.tensor([0.0, -0.0, 1e-45, -3e-40])])
    tokens, kv_heads, head_dim = 64, 2, 64
    rows = torch.zeros(tokens * kv_heads * head_dim)
    rows[: len(values)] = values
    k = rows.view(tokens, kv_heads, head_dim)
    for dtype in (torch.float32, torch.bfloat16):
        args = (np.arange(tokens), np.zeros(tokens, np.int64), np.array([tokens]), np.array([[0, 1, 2, 3]]), 0,
                (kv_heads, 4, BLOCK), dtype, CPU)
        q = torch.zeros(tokens, kv_heads, head_dim, dtype=dtype)
        caches = {}
        for name, attend, meta in (("op", op, build_attention_metadata(*args, operator=True).packed),
                                   ("torch", paged_attention, build_attention_metadata(*args))):
            caches[name] = [torch.zeros(kv_heads, 4, BLOCK, head_dim).to(cache_dtype) for _ in range(2)]
            attend(q, k.to(dtype), k.to(dtype), *caches[name], meta, 0.125)
        for got, want in zip(caches["op"], caches["torch"], strict=True):
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), dtype


def test_subnormal_keys_and_values_are_flushed_in_the_kernel_only(op) -> None:
    """Subnormal floats take a microcode assist per operation on x86 (a cache of them ran the decode kernel ~50x
    slower): the kernel's threads flush them to zero (FTZ | DAZ) while they run, and restore their mode after."""
    tiny = 1e-39  # below float32's (and bfloat16's) smallest normal, 1.18e-38
    positions = np.array([40, 70]), np.array([0, 1])
    table = np.arange(12, dtype=np.int64).reshape(2, 6)
    for dtype in (torch.float32, torch.bfloat16):
        step = build_attention_metadata(positions[0], positions[1], np.ones(2, np.int64), table, 2, (2, 12, BLOCK),
                                        dtype, CPU, operator=True).packed
        q = torch.randn(2, 8, 64).to(dtype)
        k, v = (torch.full((2, 2, 64), tiny).to(dtype) for _ in range(2))
        caches = [torch.full((2, 12, BLOCK, 64), tiny).to(dtype) for _ in range(2)]
        assert (caches[0] != 0).all()  # subnormal, not zero, in the cache
        out = op(q, k, v, *caches, step, 0.125)
        # treated as zeros: uniform scores and a weighted sum of zero values; not the ~1e-39 an unflushed sum gives
        assert torch.equal(out, torch.zeros_like(out))
    assert (torch.tensor([tiny]) * 1.0).item() != 0.0  # the calling thread still keeps subnormals
