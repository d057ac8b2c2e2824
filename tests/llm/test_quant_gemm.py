"""ladle's int8 and int4 GEMMs (kernels/gemm.c gemm_q8 / gemm_q4 through `ladle::tiled_linear_q8` / `_q4`; quant.py's
int8-weight-only and int4 where they run) against the exact arithmetic they promise — x rounded to int16 per row
(s = max|x| / 32767), int8 codes times float32 column scales, int4 codes (q - 8) * scale + zero per group with
bfloat16 scales and zeros — for every epilogue, row blocking (0-7 rows and past it), odd K, part tiles, K long enough
to flush the int32 sums (Q8_FLUSH_PAIRS), groups of 32-128, float32 and bfloat16 x, extreme and zero rows; traced by
torch.compile as the op itself; and QuantizedLinear calls them directly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ladle.llm.kernels.ops import gemm_q8_available, gemm_tile
from ladle.llm.models.linear import tile_columns, tiles_of
from ladle.llm.models.quant import QuantizedGateUpLinear, QuantizedLinear, QuantScheme, quantize_weight

pytestmark = pytest.mark.skipif(not gemm_q8_available(), reason="ladle's int8 GEMM runs on AVX2 builds only")


def int16_rows(x: torch.Tensor) -> torch.Tensor:
    """x as the kernel sees it: each row's round(x * (32767 / max|row|)) in float32 (half to even), in steps of
    max|row| / 32767, as float64."""
    x = x.float()
    amax = x.abs().amax(dim=1, keepdim=True)
    inv = torch.where(amax > 0, 32767 / amax, torch.ones_like(amax))
    step = torch.where(amax > 0, amax / 32767, torch.ones_like(amax))
    return torch.round(x * inv).double() * step.double()


def packed(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, swiglu: bool = False):
    tiles = tiles_of(q, swiglu)
    scales = tile_columns(scale.float(), swiglu).contiguous()
    return tiles, scales, None if bias is None else tile_columns(bias.float(), swiglu).contiguous()


def codes(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8), torch.rand(n, generator=g) * 1e-2 + 1e-4


def want(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = int16_rows(x.float()) @ (q.double() * scale.double()[:, None]).t()
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [0, 1, 2, 3, 4, 5, 6, 7, 33])
@pytest.mark.parametrize(("n", "k", "bias"), [(200, 96, False), (64, 576, True), (40, 131, True), (24, 1537, False)])
def test_plain_and_residual_match_the_int16_arithmetic(dtype, rows, n, k, bias) -> None:
    q, scale = codes(n, k, rows * 31 + n)
    b = torch.randn(n) if bias else None
    x, other = torch.randn(rows, k).to(dtype), torch.randn(rows, n).to(dtype)
    tiles, scales, tb = packed(q, scale, b)
    exact = want(x, q, scale, b)
    # float32: the kernel's 32767 / max|x| may differ from torch's by an ulp (-ffast-math's reciprocal), so an x
    # exactly between two int16 steps can round the other way: a step (max|x| / 32767 ~ 1e-4) times a weight (~1)
    tol = dict(atol=5e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=1e-2)  # bf16: its rounding
    got = torch.ops.ladle.tiled_linear_q8(x, tiles, scales, tb, None, n, 0)
    assert got.dtype == dtype and got.shape == (rows, n)
    torch.testing.assert_close(got.double(), exact, **tol)
    added = torch.ops.ladle.tiled_linear_q8(x, tiles, scales, tb, other, n, 1)
    torch.testing.assert_close(added.double(), exact + other.double(), **tol)


def test_swiglu_of_gate_and_up_columns() -> None:
    inter, k = 76, 130  # 76: a part tile
    q, scale = codes(2 * inter, k, 5)
    torch.manual_seed(5)
    b = torch.randn(2 * inter)
    x = torch.randn(3, k)
    tiles, scales, tb = packed(q, scale, b, swiglu=True)
    gate, up = want(x, q, scale, b).chunk(2, dim=-1)
    got = torch.ops.ladle.tiled_linear_q8(x, tiles, scales, tb, None, inter, 2)
    torch.testing.assert_close(got.double(), F.silu(gate) * up, atol=5e-4, rtol=1e-4)  # see the tolerance above


def test_extreme_rows_neither_overflow_nor_lose_small_rows() -> None:
    # |x| at its int16 maximum against |w| = 127 over 4099 k (16 flushes of the int32 sums), next to a tiny row and
    # a zero row: each row has its own scale
    k = 4099
    q = torch.full((16, k), 127, dtype=torch.int8)
    q[1::2] = -127
    scale = torch.ones(16)
    x = torch.stack([torch.full((k,), 3e4), torch.full((k,), 1e-6), torch.zeros(k)])
    tiles, scales, _ = packed(q, scale, None)
    got = torch.ops.ladle.tiled_linear_q8(x, tiles, scales, None, None, 16, 0).double()
    exact = x.double() @ (q.double() * scale.double()[:, None]).t()
    torch.testing.assert_close(got, exact, atol=0, rtol=1e-6)


def test_quantized_linear_calls_the_op_and_compiles_to_it() -> None:
    torch.manual_seed(0)
    w = torch.randn(96, 64) * 0.1
    layer = quantize_weight(w, QuantScheme("int8-weight-only"))
    x = torch.randn(4, 64)
    assert layer.traceable(x) and not layer.traceable(x.half())
    direct = torch.ops.ladle.tiled_linear_q8(x, layer.tiles, layer.tile_scales, layer.tile_bias, None, 96, 0)
    assert torch.equal(layer(x), direct)
    half = torch.ops.ladle.tiled_linear_q8(x.half().float(), layer.tiles, layer.tile_scales, None, None, 96, 0)
    assert torch.equal(layer(x.half()), half.half())  # float16 x: the kernel wrapper converts
    compiled = torch.compile(lambda t: layer(t) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(x), direct * 2)


def test_a_gate_up_layer_is_direct_for_swiglu_and_reorders_for_forward() -> None:
    torch.manual_seed(1)
    w = torch.randn(80, 64) * 0.1
    layer = QuantizedGateUpLinear(64, 80, QuantScheme("int8-weight-only"), None, name="mlp.gate_up")
    layer.weight.write(None, w)
    layer.finalize()
    x = torch.randn(3, 64)
    y = layer(x)  # [gate; up] in the checkpoint's order
    torch.testing.assert_close(y.double(), int16_rows(x) @ layer_weight(layer, w).t(), atol=1e-4, rtol=1e-4)
    assert layer.traceable(x, "swiglu") and not layer.traceable(x)
    torch.testing.assert_close(layer.swiglu(x), F.silu(y[:, :40]) * y[:, 40:], atol=1e-5, rtol=1e-5)


def layer_weight(layer, w: torch.Tensor) -> torch.Tensor:
    """The dequantized weight the layer computes with (per-row symmetric int8 of w)."""
    scale = w.abs().amax(dim=1) / 127
    return (torch.round(w / scale[:, None]).clamp(-127, 127) * scale[:, None]).double()


# --- int4 ---------------------------------------------------------------------------------------------------------


def packed_q4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None,
              swiglu: bool = False):
    """gemm_q4's layout, built independently of quant.py, byte by byte: per tile and four k, 32 bytes; byte b is in
    128-bit lane b // 16, its low nibble unpacked by vpunpcklbw (b % 16 < 8) or vpunpckhbw into int16 lane b % 8,
    i.e. column (b % 16 // 8) * 8 + lane * 4 + (b % 8) // 2 at k = 4j + b % 2 (low nibble) and 4j + 2 + b % 2 (high);
    scales and zeros bf16 [tiles, G, T]."""
    width = gemm_tile()
    q, scale, zero = (tile_columns(t, swiglu) for t in (q, scale, zero))
    tiles, k = q.shape[0] // width, q.shape[1]
    blocks = torch.empty(tiles, k // 4, 32, dtype=torch.uint8)
    for b in range(32):
        column = (b % 16 // 8) * 8 + (b // 16) * 4 + (b % 8) // 2
        cols = q.view(tiles, width, k)[:, column]  # [tiles, k]
        blocks[:, :, b] = cols[:, b % 2 :: 4] | (cols[:, 2 + b % 2 :: 4] << 4)
    groups = [t.bfloat16().view(tiles, width, -1).permute(0, 2, 1).contiguous() for t in (scale, zero)]
    b = None if bias is None else tile_columns(bias.float(), swiglu).contiguous()
    return blocks.view(tiles, k // 2, width), *groups, b


def int4_weight(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    s, z = (t.bfloat16().double().repeat_interleave(group, 1) for t in (scale, zero))
    return (q.double() - 8) * s + z


@pytest.mark.parametrize("rows", [0, 1, 2, 3, 4, 33])
@pytest.mark.parametrize(("n", "k", "group", "bias"), [(64, 128, 32, False), (40, 576, 64, True), (24, 512, 128, True)])
def test_int4_plain_and_residual_match_the_int16_arithmetic(rows, n, k, group, bias) -> None:
    g = torch.Generator().manual_seed(rows + n)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scale, zero = torch.rand(n, k // group, generator=g) * 1e-2, torch.randn(n, k // group, generator=g) * 1e-2
    b = torch.randn(n, generator=g) if bias else None
    x, other = torch.randn(rows, k, generator=g), torch.randn(rows, n, generator=g)
    w, s, z, tb = packed_q4(q, scale, zero, b)
    exact = int16_rows(x) @ int4_weight(q, scale, zero, group).t() + (0 if b is None else b.double())
    got = torch.ops.ladle.tiled_linear_q4(x, w, s, z, group, tb, None, n, 0)
    assert got.shape == (rows, n)
    torch.testing.assert_close(got.double(), exact, atol=5e-4, rtol=1e-4)  # (int16 rounding: see above)
    added = torch.ops.ladle.tiled_linear_q4(x, w, s, z, group, tb, other, n, 1)
    torch.testing.assert_close(added.double(), exact + other.double(), atol=5e-4, rtol=1e-4)
    bf16 = torch.ops.ladle.tiled_linear_q4(x.bfloat16(), w, s, z, group, tb, None, n, 0)
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.double(), int16_rows(x.bfloat16()) @ int4_weight(q, scale, zero, group).t()
                               + (0 if b is None else b.double()), atol=3e-2, rtol=1e-2)


def test_int4_layers_run_on_it_directly_with_swiglu_fused() -> None:
    torch.manual_seed(2)
    w = torch.randn(96, 64) * 0.1
    layer = QuantizedLinear(64, 96, QuantScheme("int4"), None, name="proj")
    layer.weight.write(None, w)
    layer.finalize()
    x = torch.randn(3, 64)
    assert layer.traceable(x)
    sink_w = int4_weight(*quant_params(w, 32), 32)
    torch.testing.assert_close(layer(x).double(), int16_rows(x) @ sink_w.t(), atol=5e-4, rtol=1e-4)
    gate_up = QuantizedGateUpLinear(64, 96, QuantScheme("int4"), None, name="mlp.gate_up")
    gate_up.weight.write(None, w)
    gate_up.finalize()
    y = gate_up(x)  # the SwiGLU-packed weight, columns put back in order
    torch.testing.assert_close(y, layer(x), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gate_up.swiglu(x), F.silu(y[:, :48]) * y[:, 48:], atol=1e-5, rtol=1e-5)


def quant_params(w: torch.Tensor, group: int):
    from ladle.llm.models.quant import quantize_int4

    return quantize_int4(w, group)
