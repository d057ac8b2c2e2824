"""Quantized linear layers (quant.py): outputs against F.linear with the dequantized weights, staging rules, GGML
repacking, scheme resolution.

Bounds (per output element, S = sum_k |x_k| |w_jk| over the row, Δ = one activation quantization step):
- int8-weight-only / int4: |y - ref| <= 2^-7 S. torch's kernels compute in bfloat16: the activations (float32 in)
  and the output are each rounded once (2^-8 relative), accumulation is float32. ladle's int8 GEMM (AVX2 builds)
  rounds x to int16 per row (2^-16 of the row's max) and sums exactly in int32: far inside the bound.
- int8-dynamic (W8A8): |y - ref| <= Δ/2 ||w_j||_1 + 2^-7 S with Δ = 2 max|x_row| / 255 (x2 with reduce_range on
  hosts without VNNI): rows are scaled to max |x| = 1 before fbgemm's per-tensor uint8 quantization, so each token
  gets its own step (at worst twice a per-row asymmetric step), whatever the other rows hold.
- exact int4 repack of Q4_0/Q4_1/Q4_K: the codes are the blocks' own; only scale and zero are rounded to bfloat16,
  so |w - w_blocks| <= 2^-8 (8 |scale| + |zero|) per group (the float32 repack matches to float32 rounding).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from gguf.quants import quantize as gguf_quantize
from torch import nn

from ladle.llm.kernels.ops import gemm_q8_available
from ladle.llm.models import quant
from ladle.llm.models.linear import GateUpLinear, Linear
from ladle.llm.models.qtensor import BLOCK_LAYOUT, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, Q8_0, GGMLBlocks
from ladle.llm.models.quant import (
    QuantizationError,
    QuantizedGateUpLinear,
    QuantizedLinear,
    QuantScheme,
    finalize_quantized,
    quantize_weight,
    quantized_bytes,
    repack_q4,
    resolve_scheme,
    swap_linears,
)

METHODS = ("int8-dynamic", "int8-weight-only", "int4")
SHAPES = ((96, 64), (48, 160), (256, 96))  # (out, in): in 160/96 have no group of 64/128 and 32 only


def weights(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, in_features, generator=g) * 0.05


def staged(method: str, w: torch.Tensor | GGMLBlocks, bias: bool = False, group: int = 32) -> QuantizedLinear:
    out_features, in_features = w.shape
    b = nn.Parameter(torch.randn(out_features) * 0.1) if bias else None
    layer = QuantizedLinear(in_features, out_features, QuantScheme(method, group), b, name="test.proj")
    layer.weight.write(None, w)
    return layer


def check_output(layer: QuantizedLinear, ref_w: torch.Tensor, x: torch.Tensor) -> None:
    """layer(x) against float32 F.linear with the weights the layer quantized to, within the docstring's bounds."""
    bias = None if layer.bias is None else layer.bias.detach().float()
    y = layer(x)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], layer.out_features)
    xf = x.float().reshape(-1, x.shape[-1])
    ref = F.linear(xf, ref_w, bias)
    err = (y.float().reshape(ref.shape) - ref).abs()
    bound = 2**-7 * (xf.abs() @ ref_w.abs().t()) + 1e-6
    if layer.method == "int8-dynamic":
        row_max = xf.abs().amax(dim=1, keepdim=True)
        step = 2 * row_max / 255 * (2 if layer._kernel.reduce_range else 1)  # type: ignore[union-attr]
        bound = bound + step / 2 * ref_w.abs().sum(dim=1)
    assert (err <= bound).all(), f"{layer.method}: worst excess {(err - bound).max().item():.3g}"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_float_weights_match_dequantized_reference(method: str, shape: tuple[int, int], dtype: torch.dtype) -> None:
    layer = staged(method, weights(*shape), bias=True)
    ref_w = layer.weight.dequantize()
    layer.finalize()
    for rows in (1, 5, 40):  # 40: weight-only int8 takes its widened-GEMM path from 16 rows on
        check_output(layer, ref_w, (torch.randn(rows, shape[1]) * 2).to(dtype))


def test_dynamic_int8_quantizes_activations_per_token() -> None:
    layer = staged("int8-dynamic", weights(96, 64))
    ref_w = layer.weight.dequantize()
    layer.finalize()
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    x[0] *= 1000  # a massive-activation token must not cost the others their precision
    check_output(layer, ref_w, x)  # per-row bounds: the other rows' are 1000x tighter than row 0's


def test_dynamic_int8_without_vnni_uses_reduced_range(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quant, "has_vnni", lambda: False)  # as on AVX2-only hosts: 7-bit activations
    layer = staged("int8-dynamic", weights(96, 64), bias=True)
    ref_w = layer.weight.dequantize()
    layer.finalize()
    assert layer._kernel.reduce_range  # type: ignore[union-attr]
    check_output(layer, ref_w, torch.randn(4, 64))


@pytest.mark.parametrize("method", METHODS)
def test_quantization_error_of_float_weights_is_what_the_format_allows(method: str) -> None:
    w = weights(96, 128)
    layer = staged(method, w)
    err = (layer.weight.dequantize() - w).abs()
    if method == "int4":  # half a step of each group's (max - min) / 15, plus bf16 rounding of scale and zero
        groups = w.reshape(96, -1, 32)
        step = (groups.amax(2) - groups.amin(2)).repeat_interleave(32, 1) / 15
        assert (err <= step * 0.51 + 2**-8 * w.abs().amax()).all()
    else:  # half a step of each row's max / 127
        assert (err <= w.abs().amax(1, keepdim=True) / 127 * 0.51).all()


def test_three_dimensional_input_and_outputs_keep_the_dtype() -> None:
    layer = quantize_weight(weights(64, 64), QuantScheme("int4"))
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    assert layer(x).shape == (2, 3, 64) and layer(x).dtype == torch.bfloat16
    assert torch.equal(layer(x)[1], layer(x[1]))


@pytest.mark.parametrize("method", METHODS)
def test_row_slice_writes_equal_one_whole_write(method: str) -> None:
    w = weights(160, 64)
    whole = staged(method, w)
    parts = QuantizedLinear(64, 160, QuantScheme(method), None, name="test.qkv")
    for rows in (slice(0, 96), slice(96, 128), slice(128, 160)):  # q, k, v of a fused projection
        parts.weight.write(rows, w[rows])
    assert torch.equal(whole.weight.codes, parts.weight.codes)
    assert torch.equal(whole.weight.scales, parts.weight.scales)
    whole.finalize()
    parts.finalize()
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert torch.equal(whole(x), parts(x))


@pytest.mark.parametrize("method", METHODS)
def test_add_gelu_swiglu_are_the_compositions(method: str) -> None:
    w = weights(128, 64)
    layer = QuantizedGateUpLinear(64, 128, QuantScheme(method), nn.Parameter(torch.randn(128)), name="mlp.gate_up")
    layer.weight.write(slice(0, 64), w[:64])
    layer.weight.write(slice(64, 128), w[64:])
    layer.finalize()
    x, residual = torch.randn(4, 64, dtype=torch.bfloat16), torch.randn(4, 128, dtype=torch.bfloat16)
    y = layer(x)
    # ladle's int8 / int4 GEMM fuses add and SwiGLU into its float32 epilogue: one bfloat16 rounding instead of two
    fused = method in ("int8-weight-only", "int4") and gemm_q8_available()
    same = (lambda a, b: torch.testing.assert_close(a, b, rtol=2**-6, atol=2**-6) is None) if fused else torch.equal
    assert same(layer.add(x, residual), y + residual)
    assert torch.equal(layer.gelu(x, "tanh"), F.gelu(y, approximate="tanh"))
    assert same(layer.swiglu(x), F.silu(y[:, :64]) * y[:, 64:])


def test_missing_rows_double_writes_and_wrong_shapes_are_errors() -> None:
    layer = QuantizedLinear(64, 96, QuantScheme("int4"), None, name="layers.3.self_attn.qkv_proj")
    w = weights(96, 64)
    layer.weight.write(slice(0, 32), w[:32])
    layer.weight.write(slice(64, 96), w[64:])
    with pytest.raises(QuantizationError, match=r"written twice"):
        layer.weight.write(slice(16, 48), w[16:48])
    with pytest.raises(QuantizationError, match=r"take a \(32, 64\) weight"):
        layer.weight.write(slice(32, 64), w[:16])
    with pytest.raises(QuantizationError, match=r"layers\.3\.self_attn\.qkv_proj: weight rows 32:64 of 96"):
        layer.finalize()
    with pytest.raises(QuantizationError, match="before finalize"):
        layer(torch.randn(1, 64))


def test_int4_layers_that_do_not_fit_fall_back_as_documented() -> None:
    scheme = QuantScheme("int4", 128, "int8-weight-only")
    assert QuantizedLinear(576, 960, scheme).group_size == 64  # 128 does not divide 576: largest that does
    assert QuantizedLinear(1536, 576, scheme).group_size == 128
    assert QuantizedLinear(64, 96, QuantScheme("int4", 32)).group_size == 32  # never above the scheme's
    for in_features, out_features in ((48, 64), (64, 40)):  # no group divides 48; 40 rows are no multiple of 16
        layer = QuantizedLinear(in_features, out_features, scheme)
        assert layer.method == "int8-weight-only"
        w = weights(out_features, in_features)
        layer.weight.write(None, w)
        ref_w = layer.weight.dequantize()
        layer.finalize()
        check_output(layer, ref_w, torch.randn(3, in_features, dtype=torch.bfloat16))


# --- GGML blocks ------------------------------------------------------------------------------------------------


def gguf_blocks(ggml_type: int, w: torch.Tensor) -> GGMLBlocks:
    data = gguf_quantize(w.numpy().astype(np.float32), GGMLQuantizationType(ggml_type))
    return GGMLBlocks(ggml_type, tuple(w.shape), torch.from_numpy(np.ascontiguousarray(data)))


def random_k_blocks(ggml_type: int, rows: int, cols: int, seed: int = 0) -> GGMLBlocks:
    """gguf cannot quantize to K types: random bytes are valid K blocks once their float16 scales are sane."""
    per_block, size = BLOCK_LAYOUT[ggml_type]
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (rows, cols // per_block, size), dtype=torch.uint8, generator=g)
    scales = (torch.rand(rows, cols // per_block, 2, generator=g) * 0.002 + 0.0005).half().view(torch.uint8)
    if ggml_type == Q6_K:  # d is the last float16
        data[..., size - 2 :] = scales[..., :2]
    else:  # d, dmin first
        data[..., :4] = scales.reshape(rows, -1, 4)
    return GGMLBlocks(ggml_type, (rows, cols), data.reshape(rows, -1))


def blocks_of(ggml_type: int, rows: int = 64, cols: int = 256) -> GGMLBlocks:
    if ggml_type in (Q4_K, Q5_K, Q6_K):
        return random_k_blocks(ggml_type, rows, cols)
    return gguf_blocks(ggml_type, weights(rows, cols))


@pytest.mark.parametrize("ggml_type", [Q4_0, Q4_1, Q4_K])
def test_q4_repack_reads_the_blocks_exactly(ggml_type: int) -> None:
    blocks = blocks_of(ggml_type)
    q, scale, zero = repack_q4(blocks)
    w = (q.float() - 8) * scale.repeat_interleave(32, 1) + zero.repeat_interleave(32, 1)
    expected = blocks.dequantize()
    torch.testing.assert_close(w, expected, rtol=1e-6, atol=1e-7)
    layer = staged("int4", blocks)
    assert layer.weight.exact_rows == 64
    err = (layer.weight.dequantize() - expected).abs().reshape(64, -1, 32)
    bound = 2**-8 * (8 * scale.abs() + zero.abs())
    assert (err <= bound[..., None] * 1.0001 + 1e-9).all()
    ref_w = layer.weight.dequantize()
    layer.finalize()
    check_output(layer, ref_w, torch.randn(5, 256, dtype=torch.bfloat16))


@pytest.mark.parametrize("ggml_type", [Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K])
@pytest.mark.parametrize("method", ["int8-dynamic", "int8-weight-only", "int4 g64"])
def test_other_block_combinations_requantize(ggml_type: int, method: str) -> None:
    blocks = blocks_of(ggml_type)
    name, _, group = method.partition(" g")
    layer = staged(name, blocks, group=int(group or 32))
    assert layer.weight.exact_rows == 0
    expected = blocks.dequantize()
    ref_w = layer.weight.dequantize()
    # requantizing adds at most half a step of the new format (int8: a row's max / 127; int4: a group's range / 15)
    if name == "int4":
        groups = expected.reshape(64, -1, 64)
        allowed = ((groups.amax(2) - groups.amin(2)) / 15 * 0.51).repeat_interleave(64, 1)
        allowed = allowed + 2**-8 * expected.abs().amax()
    else:
        allowed = expected.abs().amax(1, keepdim=True) / 127 * 0.51
    assert ((ref_w - expected).abs() <= allowed).all()
    layer.finalize()
    check_output(layer, ref_w, torch.randn(3, 256, dtype=torch.bfloat16))


def test_block_row_slices_equal_one_whole_write() -> None:
    blocks = blocks_of(Q4_K, 96, 256)
    whole = staged("int4", blocks)
    parts = QuantizedLinear(256, 96, QuantScheme("int4"), None, name="test.qkv")
    parts.weight.write(slice(0, 64), blocks.rows(slice(0, 64)))
    parts.weight.write(slice(64, 96), blocks.rows(slice(64, 96)))
    assert torch.equal(whole.weight.dequantize(), parts.weight.dequantize())


# --- models -----------------------------------------------------------------------------------------------------


class TinyBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 64)
        self.qkv = Linear(64, 96, bias=True)
        self.mlp = nn.ModuleDict({"gate_up": GateUpLinear(64, 256), "down": Linear(128, 64)})


def test_swap_stage_load_finalize_like_the_loader() -> None:
    with torch.device("meta"):
        model = TinyBlock()
        assert swap_linears(model, QuantScheme("int4")) == 3
    assert isinstance(model.mlp["gate_up"], QuantizedGateUpLinear) and isinstance(model.embed, nn.Embedding)
    names = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    assert names == {"embed.weight", "qkv.bias"}  # staging lives outside parameters and buffers
    sink = model.qkv.weight
    assert sink.codes.device.type == "cpu" and sink.shape == (96, 64)
    model = model.to(torch.bfloat16).to_empty(device="cpu")
    assert model.qkv.weight is sink  # to()/to_empty() leave staging alone
    full = {"qkv": weights(96, 64, 1), "gate_up": weights(256, 64, 2), "down": weights(64, 128, 3)}
    model.qkv.weight.write(None, full["qkv"])
    model.qkv.bias.data.copy_(torch.randn(96))
    model.mlp["gate_up"].weight.write(slice(0, 128), full["gate_up"][:128])
    model.mlp["gate_up"].weight.write(slice(128, 256), full["gate_up"][128:])
    model.mlp["down"].weight.write(None, full["down"].bfloat16())
    deq = {name: model.mlp[name].weight.dequantize() for name in ("gate_up", "down")}
    finalize_quantized(model)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    y = model.mlp["down"](model.mlp["gate_up"].swiglu(x))
    gate, up = deq["gate_up"].chunk(2)
    ref = F.linear(F.silu(x.float() @ gate.t()) * (x.float() @ up.t()), deq["down"])
    assert (y.float() - ref).norm() / ref.norm() < 0.02  # bfloat16 activations between the two layers
    int4_bytes = 96 * 64 // 2 + 256 * 64 // 2 + 64 * 128 // 2
    assert int4_bytes < quantized_bytes(model) < int4_bytes * 1.4  # + scales, zeros, bias
    with pytest.raises(AttributeError):
        model.qkv.weight  # noqa: B018  (packed now: no staging to write to)


def test_swap_on_a_missing_write_names_the_layer() -> None:
    with torch.device("meta"):
        model = TinyBlock()
        swap_linears(model, QuantScheme("int8-dynamic"))
    model.to_empty(device="cpu")
    model.qkv.weight.write(None, weights(96, 64))
    model.mlp["gate_up"].weight.write(slice(0, 128), weights(128, 64))
    with pytest.raises(QuantizationError, match=r"mlp\.gate_up: weight rows 128:256"):
        finalize_quantized(model)


def test_quantize_weight_and_bytes_per_format() -> None:
    w = weights(512, 256)
    sizes = {m: quantize_weight(w, QuantScheme(m)).nbytes for m in METHODS}
    assert sizes["int4"] < sizes["int8-weight-only"] <= sizes["int8-dynamic"] < w.numel() * 2
    head = quantize_weight(w, QuantScheme("int8-dynamic"), name="output head")
    assert head.finalized and head.bias is None and head(torch.randn(1, 256)).shape == (1, 512)


# --- resolve_scheme ---------------------------------------------------------------------------------------------


@pytest.fixture
def no_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(quant.PROBE_ENV, "0")
    monkeypatch.setattr(quant, "probe_times", lambda *a: pytest.fail("probed despite LADLE_QUANT_PROBE=0"))


def test_refusals(no_probe: None, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(QuantizationError, match="CPU only"):
        resolve_scheme("int8", torch.bfloat16, "cuda")
    with pytest.raises(QuantizationError, match="unknown quantization"):
        resolve_scheme("int3", torch.bfloat16, "cpu")
    with pytest.raises(QuantizationError, match="group size"):
        resolve_scheme("int4", torch.bfloat16, "cpu", group_size=48)
    monkeypatch.setattr(quant, "kernel_available", lambda m, d: "missing" if m == "int4" else None)
    with pytest.raises(QuantizationError, match="int4 cannot run on this host: missing"):
        resolve_scheme("int4", torch.bfloat16, "cpu")


INT8_HERE = "int8-weight-only" if gemm_q8_available() else "int8-dynamic"  # what "int8" is on this host


def test_int4_needs_a_cpu_that_runs_it_fast(no_probe: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quant, "gemm_q8_available", lambda: False)  # torch's int4 kernel: slow without AVX-512
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    with pytest.raises(QuantizationError, match=r"int4 would be slower than int8 here: .*AVX2"):
        resolve_scheme("int4", torch.bfloat16, "cpu")
    assert resolve_scheme("int8", torch.bfloat16, "cpu") == QuantScheme("int8-dynamic")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert resolve_scheme("int4", torch.bfloat16, "cpu").method == "int4"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(quant, "gemm_q8_available", lambda: True)  # ladle's int4 GEMM runs on AVX2
    assert resolve_scheme("int4", torch.bfloat16, "cpu").method == "int4"


def test_defaults_without_probing(no_probe: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert resolve_scheme("int8", torch.bfloat16, "cpu") == QuantScheme(INT8_HERE)
    assert resolve_scheme("int4", torch.float32, "cpu", 64) == QuantScheme("int4", 64, INT8_HERE)
    assert resolve_scheme("int8-weight-only", torch.bfloat16, "cpu").method == "int8-weight-only"
    assert "groups of 64" in quant.describe(QuantScheme("int4", 64))


@pytest.mark.parametrize(("ladle_int8_gemm", "int8"), [(True, "int8-weight-only"), (False, "int8-dynamic")])
def test_int8_is_weight_only_where_ladles_int8_gemm_runs(no_probe: None, monkeypatch: pytest.MonkeyPatch,
                                                         ladle_int8_gemm: bool, int8: str) -> None:
    if ladle_int8_gemm and not quant.gemm_q8_available():
        # weight-only then runs on ladle's kernel, which this build lacks (AVX-512 hosts keep fbgemm and torch)
        pytest.skip("ladle's int8 GEMM is not built here (an AVX2 build's kernel)")
    monkeypatch.setattr(quant, "gemm_q8_available", lambda: ladle_int8_gemm)
    quant.kernel_available.cache_clear()
    try:
        assert resolve_scheme("int8", torch.float32, "cpu").method == int8
    finally:
        quant.kernel_available.cache_clear()


def test_probe_verdicts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(quant.PROBE_ENV, "1")
    # Within the noise margin (CLEARLY_SLOWER) the defaults hold: int8-dynamic, and int4 is accepted.
    times = {"int8-dynamic": 0.28, "int8-weight-only": 0.2, "int4": 0.4, "bfloat16": 0.5}
    monkeypatch.setattr(quant, "probe_times", lambda *a: times)
    assert resolve_scheme("int8", torch.bfloat16, "cpu").method == "int8-dynamic"
    assert resolve_scheme("int4", torch.bfloat16, "cpu") == QuantScheme("int4", 32, "int8-dynamic")
    # Clearly slower (an AVX2-only host's int4 runs ~10x slower than int8): passed over, refused.
    times.update({"int8-dynamic": 0.35, "int4": 2.0})
    assert resolve_scheme("int8", torch.bfloat16, "cpu").method == "int8-weight-only"
    with pytest.raises(QuantizationError, match="int4 would be slower than int8"):
        resolve_scheme("int4", torch.bfloat16, "cpu")
    times["int4"] = 0.1
    assert resolve_scheme("int4", torch.bfloat16, "cpu") == QuantScheme("int4", 32, "int8-weight-only")


def test_the_real_probe_times_every_kernel() -> None:
    times = quant.probe_times(torch.bfloat16, 32)
    assert set(times) == {"int8-dynamic", "int8-weight-only", "int4", "bfloat16"}
    assert all(0 < t < 100 for t in times.values())
