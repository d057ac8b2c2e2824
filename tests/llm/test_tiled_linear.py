"""ladle's tiled GEMM (kernels/gemm.c through `ladle::tiled_linear`, models/linear.py: TiledLinear) against torch's
linear algebra: every epilogue (plain, + bias, + residual, SwiGLU, GELU), widths that are not whole tiles, batches
from 0 rows to past the kernel's row blocking, float32 and bfloat16; traced by torch.compile; and the choice at load."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from ladle.llm.dtypes import cpu_flags
from ladle.llm.kernels.ops import gemm_amx, gemm_available, use_amx
from ladle.llm.models.linear import GateUpLinear, Linear, PackedLinear, TiledLinear, packed_linear

CPU = torch.device("cpu")
TOLERANCE = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=2e-2)}


def needs(dtype: torch.dtype) -> None:
    if not gemm_available(dtype, CPU):
        pytest.skip(f"ladle's GEMM does not run {dtype} here (no AVX-512 or AVX2 + FMA, or no C++ compiler)")


def linear(n: int, k: int, dtype: torch.dtype, bias: bool, cls: type[Linear] = Linear) -> Linear:
    layer = cls(k, n, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(n, k) * k**-0.5)
        if bias:
            layer.bias.copy_(torch.randn(n))
    return layer.to(dtype)


def reference(x: torch.Tensor, layer: Linear) -> torch.Tensor:
    b = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [0, 1, 2, 3, 4, 5, 6, 8, 13, 33])  # each row blocking of gemm_avx512.h/gemm_avx2.h;
# 8, 13, 33: several row chunks per tile, the later ones sharing the rest evenly (13: 6 + 4 + 3)
@pytest.mark.parametrize(("n", "k", "bias"), [(200, 96, False), (64, 576, True), (1000, 130, True), (40, 131, False)])
def test_plain_and_residual_epilogues_match_torch(dtype, rows, n, k, bias) -> None:
    needs(dtype)
    if dtype == torch.bfloat16 and k % 2:
        pytest.skip("bfloat16 multiplies k in pairs: an odd K is never packed (packed_linear)")
    torch.manual_seed(rows * 7 + n)
    layer = linear(n, k, dtype, bias)
    tiled = TiledLinear.of(layer)
    x, other = torch.randn(rows, k).to(dtype), torch.randn(rows, n).to(dtype)
    want = reference(x, layer)
    torch.testing.assert_close(tiled(x).float(), want, **TOLERANCE[dtype])
    torch.testing.assert_close(tiled.add(x, other).float(), want + other.float(), **TOLERANCE[dtype])
    assert tiled(x).dtype == dtype and tiled(x).shape == (rows, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("inter", "bias"), [(1536, False), (76, True)])  # 76: a part tile on AVX-512 and AVX2
def test_swiglu_matches_silu_gate_times_up(dtype, inter, bias) -> None:
    needs(dtype)
    torch.manual_seed(inter)
    layer = linear(2 * inter, 128, dtype, bias, GateUpLinear)
    x = torch.randn(2, 3, 128).to(dtype)  # any leading shape
    gate, up = reference(x, layer).chunk(2, dim=-1)
    got = TiledLinear.of(layer).swiglu(x)
    assert got.shape == (2, 3, inter)
    torch.testing.assert_close(got.float(), F.silu(gate) * up, **TOLERANCE[dtype])


# AMX: 15 rows: tiles configured with 15 rows; 16: one full block; 31, 127, 161: a padded last block; 128+: 32-row pairs
@pytest.mark.parametrize("rows", [15, 16, 31, 127, 128, 161])
@pytest.mark.parametrize(("k", "swiglu"), [(96, False), (576, True), (1536, False)])
@pytest.mark.parametrize("n", [200, 560])  # 560: 9 tiles (an odd count, as o_proj's), the last one part-filled
def test_bfloat16_row_blocks_of_the_amx_path_match_torch(rows, k, swiglu, n) -> None:
    """Where the CPU has AMX, bfloat16 runs on tile registers (kernels/gemm_amx.h): under 16 rows in tiles of M rows,
    above in blocks of 16 (32 from 128 rows on) with a partial last block read from a zero-padded copy; elsewhere these
    rows take the vdpbf16ps/AVX2 kernels."""
    needs(torch.bfloat16)
    torch.manual_seed(rows + k)
    layer = linear(2 * n if swiglu else n, k, torch.bfloat16, True, GateUpLinear if swiglu else Linear)
    tiled = TiledLinear.of(layer)
    x = torch.randn(rows, k + 32).to(torch.bfloat16)[:, :k]  # rows k + 32 apart: tile loads take x's own stride
    want = reference(x, layer)
    if swiglu:
        gate, up = want.chunk(2, dim=-1)
        torch.testing.assert_close(tiled.swiglu(x).float(), F.silu(gate) * up, **TOLERANCE[torch.bfloat16])
    else:
        other = torch.randn(rows, n).to(torch.bfloat16)
        torch.testing.assert_close(tiled.add(x, other).float(), want + other.float(), **TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("threads", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 33])
@pytest.mark.parametrize(("n", "k", "swiglu"), [(64, 576, False), (64, 64, False), (560, 576, False),
                                                (960, 1536, False), (200, 576, True)])
def test_tiles_that_do_not_divide_over_the_threads_match_torch(threads, dtype, rows, n, k, swiglu) -> None:
    """Where a layer's tiles do not divide over the threads, gemm.c deals them as slices of 32 k values and a tile cut
    between threads is summed from its pieces (run_share): one tile over up to four threads (middle pieces), one tile
    of two slices over three or four (threads with no share between a tile's pieces), 9 and 15 tiles (o and qkv of
    SmolLM), SwiGLU's halves meeting in a summed tile; with AMX on and off."""
    needs(dtype)
    torch.manual_seed(rows + n + threads)
    layer = linear(2 * n if swiglu else n, k, dtype, True, GateUpLinear if swiglu else Linear)
    tiled = TiledLinear.of(layer)
    x, other = torch.randn(rows, k).to(dtype), torch.randn(rows, n).to(dtype)
    want = reference(x, layer)
    if swiglu:
        gate, up = want.chunk(2, dim=-1)
        want = F.silu(gate) * up
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for amx in ([True, False] if dtype == torch.bfloat16 and gemm_amx() else [None]):
            if amx is not None:
                use_amx(amx)
            got = tiled.swiglu(x) if swiglu else tiled.add(x, other)
            torch.testing.assert_close(got.float(), want if swiglu else want + other.float(), **TOLERANCE[dtype])
    finally:
        torch.set_num_threads(before)
        use_amx(True)


def test_amx_is_used_where_the_cpu_has_it() -> None:
    needs(torch.bfloat16)
    if "amx_bf16" not in cpu_flags():
        assert not gemm_amx()
        pytest.skip("no AMX on this CPU: bfloat16 runs on vdpbf16ps (AVX-512-BF16) or AVX2")
    assert gemm_amx()  # Linux >= 5.16 grants the tile registers on request
    torch.manual_seed(5)
    tiled = TiledLinear.of(linear(128, 64, torch.bfloat16, True))
    x = torch.randn(40, 64).to(torch.bfloat16)
    on = tiled(x)
    try:
        assert not use_amx(False) and not gemm_amx()
        off = tiled(x)  # vdpbf16ps: the same weights, another summation order
    finally:
        assert use_amx(True)
    torch.testing.assert_close(on.float(), off.float(), **TOLERANCE[torch.bfloat16])
    code = "from ladle.llm.kernels.ops import gemm_amx; print(gemm_amx())"
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "LADLE_AMX": "0"}, capture_output=True,
                          text=True, timeout=120, check=True)
    assert done.stdout.strip() == "False"


def test_amx_calls_leave_torchs_own_amx_kernels_intact() -> None:
    """The tile registers are per thread and shared with oneDNN's AMX GEMMs and torch's bfloat16 flash attention in
    the same OpenMP threads: ladle's kernel configures them on entry and releases them on exit, and torch's must keep
    giving the same results around it (a stale configuration would fault or compute garbage)."""
    needs(torch.bfloat16)
    if not gemm_amx():
        pytest.skip("bfloat16 does not run on AMX tiles here")
    torch.manual_seed(9)
    q, k, v = (torch.randn(1, 8, 256, 64).to(torch.bfloat16) for _ in range(3))
    attention = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    weight = (torch.randn(512, 256) * 0.05).to(torch.bfloat16)
    onednn, tiled = PackedLinear(weight), TiledLinear(weight)
    x = torch.randn(48, 256).to(torch.bfloat16)
    by_onednn, by_tiled = onednn(x), tiled(x)
    for _ in range(3):
        assert torch.equal(tiled(x), by_tiled)
        assert torch.equal(F.scaled_dot_product_attention(q, k, v, is_causal=True), attention)
        assert torch.equal(tiled(x), by_tiled)
        assert torch.equal(onednn(x), by_onednn)


def test_gelu_and_a_strided_input() -> None:
    needs(torch.float32)
    layer = linear(96, 64, torch.float32, True)
    x = torch.randn(5, 128)[:, ::2]  # rows not contiguous in their last dim
    got = TiledLinear.of(layer).gelu(x, "tanh")
    torch.testing.assert_close(got, F.gelu(reference(x, layer), approximate="tanh"), atol=1e-4, rtol=1e-4)


def test_compiled_calls_match_eager() -> None:
    needs(torch.float32)
    torch.manual_seed(0)
    tiled = TiledLinear.of(linear(300, 64, torch.float32, True))
    compiled = torch.compile(lambda x, r: tiled.add(torch.relu(x), r) * 2, fullgraph=True, dynamic=True)
    for rows in (1, 7):
        x, r = torch.randn(rows, 64), torch.randn(rows, 300)
        torch.testing.assert_close(compiled(x, r), tiled.add(torch.relu(x), r) * 2)


def test_malformed_calls_raise() -> None:
    needs(torch.float32)
    tiled = TiledLinear.of(linear(100, 64, torch.float32, False))
    with pytest.raises(RuntimeError, match="packed"):
        torch.ops.ladle.tiled_linear(torch.randn(2, 32), tiled.tiles, None, None, 100, 0)  # wrong K
    with pytest.raises(RuntimeError, match="kind"):
        torch.ops.ladle.tiled_linear(torch.randn(2, 64), tiled.tiles, None, None, 100, 7)
    with pytest.raises(RuntimeError, match="other"):
        torch.ops.ladle.tiled_linear(torch.randn(2, 64), tiled.tiles, None, None, 100, 1)


def test_the_fastest_packing_is_chosen_at_load() -> None:
    weight = torch.randn(64, 32)
    chosen = packed_linear(weight)
    assert isinstance(chosen, TiledLinear if gemm_available(torch.float32, CPU) else PackedLinear)
    # bfloat16 pairs k: an odd K stays on oneDNN, or unpacked where oneDNN has no bfloat16 either
    odd = packed_linear(torch.randn(64, 33).to(torch.bfloat16))
    assert isinstance(odd, PackedLinear) if torch.ops.mkldnn._is_mkldnn_bf16_supported() else odd is None


def test_subnormal_activations_are_flushed_in_the_kernel_only() -> None:
    """Subnormal floats take a microcode assist per operation on x86 (float32 activations of them ran the GEMM ~60x
    slower): its threads flush them to zero (FTZ | DAZ) while they run, and restore their mode after."""
    needs(torch.float32)
    torch.manual_seed(4)
    tiled = TiledLinear.of(linear(200, 96, torch.float32, False))
    tiny = torch.full((5, 96), 1e-39)  # below float32's smallest normal, 1.18e-38
    assert (tiny != 0).all()
    # treated as zeros: exact zeros out, not the ~1e-39 sums an unflushed kernel computes
    assert torch.equal(tiled(tiny), torch.zeros(5, 200))
    assert (torch.tensor([1e-39]) * 1.0).item() != 0.0  # the calling thread still keeps subnormals
