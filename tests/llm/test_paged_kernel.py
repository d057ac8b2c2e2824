"""The compiled paged decode kernel (llm/kernels/): exact against a reference softmax attention over gathered K/V for
scattered block tables, GQA groups, head sizes, context lengths (1, block boundaries, long), float32 and bfloat16
models, and float32 queries over 16-bit caches (--kv-cache-dtype bfloat16 / float16) and either model over 8-bit
ones (fp8_e4m3 / fp8_e5m2: the same attention over the cache's own values, subnormals included); the engine's greedy
tokens are the same with the kernel and with the torch (gather) path; a kernel that cannot be built leaves the torch
path in place."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from ladle.llm.attention import _decode, build_attention_metadata
from ladle.llm.kernels import build
from ladle.llm.kernels.paged import paged_decode

CPU = torch.device("cpu")


def reference(q, k_cache, v_cache, tables, lens, scale):
    kv_heads, _, block_size, head_dim = k_cache.shape
    group = q.shape[1] // kv_heads
    rows = []
    for b, length in enumerate(lens.tolist()):
        blocks = tables[b, : -(-length // block_size)]
        k = k_cache[:, blocks].reshape(kv_heads, -1, head_dim)[:, :length].float().repeat_interleave(group, 0)
        v = v_cache[:, blocks].reshape(kv_heads, -1, head_dim)[:, :length].float().repeat_interleave(group, 0)
        scores = (q[b].float()[:, None, :] @ k.transpose(1, 2)) * scale
        rows.append((scores.softmax(-1) @ v).reshape(-1))
    return torch.stack(rows)


@pytest.fixture(scope="module")
def kernels():
    dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2)
    found = {dtype: paged_decode(dtype, CPU, 8, 1, 128) for dtype in dtypes}
    if any(k is None for k in found.values()):
        pytest.skip("no C compiler here: the kernel is not built (the torch path serves)")
    return found


# (queries, cache): a float32 or bfloat16 model with its own cache, or over a 16-bit or an 8-bit cache
@pytest.mark.parametrize(("dtype", "cache_dtype"), [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                    (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                                    (torch.float32, torch.float8_e4m3fn),
                                                    (torch.bfloat16, torch.float8_e4m3fn),
                                                    (torch.float32, torch.float8_e5m2)])
# head_dim 80: the vector path's last chunk of V is narrower than the others; 20: not a multiple of 8, the plain loops;
# 24: three 8-lane vectors a row; 256: V in several chunks at one head;
# group 7 and 8: heads register-blocked three at a time, with a remainder of 1 and 2
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"),
                         [(9, 3, 64), (4, 4, 32), (14, 2, 64), (8, 1, 128), (6, 2, 80), (4, 2, 20), (4, 2, 24),
                          (2, 2, 256)])
@pytest.mark.parametrize("block_size", [16, 5])  # 5: blocks end inside a group of eight rows
def test_the_kernel_matches_attention_over_gathered_blocks(kernels, dtype, cache_dtype, heads, kv_heads, head_dim,
                                                           block_size) -> None:
    generator = torch.Generator().manual_seed(heads * 100 + head_dim + block_size)
    num_blocks = 96 * 16 // block_size
    k_cache = torch.randn(kv_heads, num_blocks, block_size, head_dim, generator=generator).to(cache_dtype)
    v_cache = torch.randn(kv_heads, num_blocks, block_size, head_dim, generator=generator).to(cache_dtype)
    lens = torch.tensor([1, 15, 16, 17, 200, 33], dtype=torch.int64)
    max_blocks = int(-(-lens.max() // block_size))
    # scattered, non-consecutive blocks (as after preemption and prefix-cache reuse), padded with block 0
    tables = torch.randperm(num_blocks, generator=generator)[: len(lens) * max_blocks].view(len(lens), max_blocks)
    for b, length in enumerate(lens.tolist()):
        tables[b, -(-length // block_size):] = 0
    q = torch.randn(len(lens), heads, head_dim, generator=generator).to(dtype)
    out = kernels[cache_dtype](q, k_cache, v_cache, tables.contiguous(), lens, int(lens.max()), head_dim**-0.5)
    assert out.shape == (len(lens), heads * head_dim) and out.dtype == dtype
    expected = reference(q, k_cache, v_cache, tables, lens, head_dim**-0.5)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the output's own rounding (the cache's is in both)
    torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)


# few items for the threads: each sequence's context is cut into block-aligned spans, merged by their softmax maxima
# (paged_decode.c splits_for); a 1-token sequence beside a long one leaves one of its spans empty
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize(("lens", "kv_heads", "cache_dtype"),
                         [([300], 3, torch.float32), ([129], 1, torch.float32), ([1, 250, 64], 1, torch.float32),
                          ([257, 7], 1, torch.float16), ([190], 3, torch.bfloat16),
                          ([70, 190], 3, torch.float8_e4m3fn)])
def test_contexts_split_over_the_threads_match_the_reference(kernels, threads, lens, kv_heads, cache_dtype) -> None:
    heads, head_dim, block_size, num_blocks = 3 * kv_heads, 64, 16, 64
    generator = torch.Generator().manual_seed(sum(lens) + threads)
    k_cache = torch.randn(kv_heads, num_blocks, block_size, head_dim, generator=generator).to(cache_dtype)
    v_cache = torch.randn(kv_heads, num_blocks, block_size, head_dim, generator=generator).to(cache_dtype)
    lengths = torch.tensor(lens, dtype=torch.int64)
    max_blocks = int(-(-lengths.max() // block_size))
    tables = torch.randperm(num_blocks, generator=generator)[: len(lens) * max_blocks].view(len(lens), max_blocks)
    q = torch.randn(len(lens), heads, head_dim, generator=generator)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = kernels[cache_dtype](q, k_cache, v_cache, tables.contiguous(), lengths, int(lengths.max()), 0.125)
    finally:
        torch.set_num_threads(before)
    expected = reference(q, k_cache, v_cache, tables, lengths, 0.125)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch", [1, 5])
def test_the_kernel_and_the_torch_path_agree_in_the_attention_layer(kernels, batch) -> None:
    kv_heads, num_blocks, block_size, head_dim, heads = 3, 64, 16, 64, 9
    generator = torch.Generator().manual_seed(batch)
    k_cache = torch.randn(kv_heads, num_blocks, block_size, head_dim, generator=generator)
    v_cache = torch.randn(kv_heads, num_blocks, block_size, head_dim, generator=generator)
    context = np.array([40, 3, 77, 16, 100][:batch])
    table = np.zeros((batch, 7), np.int64)
    for b in range(batch):
        table[b, : -(-context[b] // block_size)] = np.arange(b * 7, b * 7 + -(-context[b] // block_size))[::-1]
    q = torch.randn(batch, heads, head_dim, generator=generator)
    args = (context - 1, np.arange(batch), np.ones(batch, np.int64), table, batch, (kv_heads, num_blocks, block_size),
            torch.float32, CPU)
    gathered = _decode(q, k_cache, v_cache, build_attention_metadata(*args), 0.125)
    in_place = _decode(q, k_cache, v_cache, build_attention_metadata(*args, kernels[torch.float32]), 0.125)
    torch.testing.assert_close(in_place, gathered, atol=1e-5, rtol=1e-5)


def test_shapes_beyond_the_kernels_buffers_keep_the_torch_path() -> None:
    assert paged_decode(torch.float32, CPU, 130, 2, 64) is None  # 65 query heads per KV head
    assert paged_decode(torch.float32, CPU, 8, 8, 512) is None  # head_dim 512
    assert paged_decode(torch.float32, CPU, 9, 2, 64) is None  # heads not a multiple of KV heads
    assert paged_decode(torch.float32, CPU, 0, 2, 64) is None  # unknown head count
    assert paged_decode(torch.float64, CPU, 8, 2, 64) is None


def test_a_kernel_that_does_not_build_leaves_the_torch_path(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("LADLE_CACHE", str(tmp_path))
    monkeypatch.setattr(build, "FLAGS", (*build.FLAGS, "-fno-such-flag-for-ladle"))
    build.load.cache_clear()
    try:
        assert build.load("paged_decode") is None
    finally:
        build.load.cache_clear()
    assert "did not build" in caplog.text and not list(tmp_path.rglob("*.so"))  # no half-written library left


def test_the_build_is_cached_by_source_flags_and_cpu(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LADLE_CACHE", str(tmp_path))
    build.load.cache_clear()
    calls = []
    real = subprocess.run
    monkeypatch.setattr(build.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or real(cmd, **kw))
    try:
        if build.load("paged_decode") is None:
            pytest.skip("no C compiler here")
        built = [c for c in calls if "-c" in c]
        build.load.cache_clear()
        assert build.load("paged_decode") is not None
        assert len([c for c in calls if "-c" in c]) == len(built) == 1  # the second load reused the library
    finally:
        build.load.cache_clear()
    assert len(list((tmp_path / "kernels").glob("paged_decode-*.so"))) == 1


def test_loading_the_kernels_keeps_subnormal_floats() -> None:
    """Built with -ffast-math but linked without it: a library linked with it carries crtfastmath.o, which sets
    flush-to-zero for the whole process when it loads (every float op of the server would lose subnormals). In a
    process of its own: this one may have loaded them already."""
    probe = ("import numpy as np, torch\n"
             "from ladle.llm.kernels.build import load, load_torch_ops\n"
             "print(load('paged_decode') is not None and load_torch_ops('ops'))\n"
             "print(np.float32(1e-40) != 0, torch.tensor(1e-40).item() != 0)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    built, subnormals = done.stdout.strip().splitlines()[-2:]
    if built != "True":
        pytest.skip("the kernels are not built here")
    assert subnormals == "True True"


def test_python_m_ladle_llm_kernels_builds_them_ahead() -> None:
    """What `make kernels` (part of `make install`) runs: both kernels reported ready (cached by now: quick)."""
    done = subprocess.run([sys.executable, "-m", "ladle.llm.kernels"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    if any("NOT built" in line for line in lines):
        pytest.skip(f"a kernel does not build here: {done.stdout}")
    assert [line.split(":")[0].strip() for line in lines[1:]] == ["paged_decode.c", "ops.cpp"]
    assert all(": ready (" in line for line in lines[1:])
