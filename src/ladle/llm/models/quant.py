"""Weight-quantized linear layers for CPU decode, which is bound by the weight bytes read per token.

Three kernels, chosen once at load time (resolve_scheme):
- int8-dynamic: W8A8. int8 weights, symmetric per output channel; each call quantizes its activations to uint8
  with one scale per token and runs fbgemm's int8 GEMM (torch.ops.quantized.linear_dynamic). Fastest at every M
  on the AVX-512 host measured (on AVX2, ladle's int8-weight-only beats it at few rows), but the least accurate: on
  SmolLM2-135M prefill, KL from full width 0.03-0.05 against 0.004 for int8-weight-only (per-token scales are
  dominated by LLMs' outlier channels).
- int8-weight-only: int8 weights as above. Where ladle's int8 GEMM runs (kernels/gemm.c gemm_q8: AVX2 builds), x is
  rounded to int16 per row and multiplied in integer multiply-adds, float32 scales, fused bias/residual/SwiGLU
  (_Int8Tiled; a 2-core AVX2 EPYC: 1.5x int8-dynamic and 1.6x ladle's bfloat16 GEMM at M=1, about bfloat16's speed
  at M=32). Elsewhere activations stay bfloat16 (aten._weight_int8pack_mm); from _W8_DEQUANT_MIN_ROWS rows on
  (prefill) the weight is widened per call and run as a plain GEMM, which scales better.
- int4: asymmetric per group of `group_size` inputs, w = (q - 8) * scale + zero with q in 0..15, scale and zero in
  bfloat16: ladle's gemm_q4 where it runs (AVX2 builds: _Int4Tiled, the int8 kernel's arithmetic on codes unpacked
  in registers), else aten._weight_int4pack_mm_for_cpu (llama.cpp-like "tinygemm" format). Layers the kernel cannot take
  (out_features not a multiple of 16, in_features not a multiple of 32) use the scheme's int8 method instead; a
  group size that does not divide in_features shrinks to the largest of 32/64/128 below it that does.
Speed (benchmarks/micro/quant_linear.py, 2-core AVX-512 host, cold weights, vs oneDNN-prepacked bfloat16): int4
is the fastest at M=1 on small shapes (2.6x; int8-dynamic 1.8x) but its kernel's cost is linear in M: about even
at M=8, 0.4-0.5x at M=32, ~0.35x for prefill; int8-dynamic stays ahead at every M (1.2-1.7x at M=8-32, and it beats
int4 at M=1 on 4096-wide shapes); int8-weight-only helps only at M=1 (1.3-1.6x).
torch's weight-only kernels compute in bfloat16 whatever the model dtype (their float32 paths are 10-25x slower);
ladle's take float32 or bfloat16 x; the dynamic kernel computes in float32 (fbgemm's only input type). Outputs come
back in the input's dtype.

Lifecycle (the invariant): swap_linears() replaces Linear/GateUpLinear with quantized twins in *staging* state
while the model is still on the meta device. A staging layer's `.weight` is a WeightSink holding compact CPU
memory outside the module's parameters and buffers (so `model.to(dtype).to_empty(device)` leaves it alone): int8
values (int4 codes one per byte) plus float32 scales (and zeros), never a float copy of the weight. Every row is
written exactly once (a second write raises at once, a missing row at finalize_quantized, naming the layer).
finalize_quantized() packs each layer into its kernel's format and frees the staging; only then may it run.

GGML blocks written to an int4 layer of group 32 are repacked without requantizing when they are Q4_0, Q4_1 or
Q4_K: the codes are kept and only the per-32 scale and zero are rounded to bfloat16, the kernel's type: at most
2^-8 (8 |scale| + |zero|) per weight. Measured on gguf-quantized Gaussian rows and random Q4_K blocks: at most
0.44% of the group's largest |w|, 0.17% relative in Frobenius norm (the 4-bit rounding itself is ~10%).
Every other combination dequantizes the blocks and quantizes again, adding this scheme's own rounding error on top
of the checkpoint's (e.g. Q8_0's per-32 scales become one scale per row: up to +1/2 int8 step of the row's max).
That costs: SmolLM2-135M's Q4_1 file repacked at group 32 is KL 0.002 from its own weights, requantized at group
64 KL 0.31; keep group 32 for Q4 GGUFs.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ladle.errors import LadleError
from ladle.llm.compiled import opaque_method, register
from ladle.llm.kernels.ops import gemm_q8_available, gemm_tile
from ladle.llm.models.linear import GateUpLinear, Linear, tile_columns, tiles_of
from ladle.llm.models.qtensor import Q4_0, Q4_1, Q4_K, GGMLBlocks

logger = logging.getLogger(__name__)

QUANTIZATION_CHOICES = ("int8", "int8-dynamic", "int8-weight-only", "int4")
Method = Literal["int8-dynamic", "int8-weight-only", "int4"]
Int8Method = Literal["int8-dynamic", "int8-weight-only"]
INT8_METHODS: tuple[Int8Method, ...] = ("int8-dynamic", "int8-weight-only")
INT4_GROUP_SIZES = (32, 64, 128)
# Kernels are chosen by rules measured on real hosts (benchmarks/micro/quant_linear.py, RESULTS.md), not by timing
# at start-up: "int8" is int8-dynamic wherever fbgemm runs (fastest int8 at every batch size on the AVX2 and AVX-512
# hosts measured) and "int4" needs AVX-512 (on an AVX2-only EPYC its kernel ran at 0.1-0.3x of float32 while int8
# ran 2.2-5.8x). A start-up probe was tried first: on a box busy loading other models it timed int4 10x slower than
# int8 (stragglers in its thread pool), so the demo's format flipped between restarts. LADLE_QUANT_PROBE=1 still
# lets a timing probe overrule the rules on an unfamiliar host (only where a kernel is clearly slower, 1.5x).
PROBE_ENV = "LADLE_QUANT_PROBE"
INT4_CPU_CAPABILITIES = ("AVX512", "AMX", "NEON", "SVE")  # torch.backends.cpu.get_cpu_capability() prefixes

_COMPUTE = torch.bfloat16  # the weight-only kernels' activation dtype (see the module docstring)
# _weight_int8pack_mm's cost is linear in M: from ~16 rows on, widening the weight to bfloat16 (in slabs of
# _WIDEN_ELEMENTS, 8 MB: under glibc's tuned mmap threshold, so no page faults) and running a GEMM is faster
# (measured cold, 3072x576 and 4096x4096: equal at 8-16 rows, 1.5-1.9x faster at 32, 2.5x at 128).
_W8_DEQUANT_MIN_ROWS = 16
_WIDEN_ELEMENTS = 1 << 22
_STAGE_ELEMENTS = 1 << 22  # rows are quantized in chunks of about this many values, bounding float temporaries
_PACK_ROWS = 1024  # int4 packing chunk: a multiple of the kernel's 64-row blocks, so chunks pack like the whole


class QuantizationError(LadleError):
    """A quantization the host cannot run (or would run slower than the alternative), or a layer filled wrongly."""


@dataclass(frozen=True)
class QuantScheme:
    """How the linear layers are stored. `group_size`: int4's group along the input dim (32, 64 or 128).
    `int8_method`: what an int4 scheme uses for layers the int4 kernel cannot take."""

    method: Method
    group_size: int = 32
    int8_method: Int8Method = "int8-dynamic"

    def __post_init__(self) -> None:
        if self.method not in QUANTIZATION_CHOICES[1:]:
            raise QuantizationError(f"unknown quantization method {self.method!r}")
        if self.group_size not in INT4_GROUP_SIZES:
            raise QuantizationError(f"int4 group size must be one of {INT4_GROUP_SIZES}, not {self.group_size}")
        if self.int8_method not in INT8_METHODS:
            raise QuantizationError(f"int8_method must be int8-dynamic or int8-weight-only, not {self.int8_method!r}")


def describe(scheme: QuantScheme) -> str:
    """One line for logs."""
    if scheme.method == "int8-dynamic":
        return "int8-dynamic (W8A8: int8 weights per output channel, activations per token; fbgemm)"
    compute = "ladle's GEMM, activations int16 per row" if gemm_q8_available() else "bfloat16 compute"
    if scheme.method == "int8-weight-only":
        return f"int8-weight-only (int8 weights per output channel, {compute})"
    return (
        f"int4 (asymmetric, groups of {scheme.group_size} inputs, {compute}; "
        f"{scheme.int8_method} where a layer's shape does not fit int4)"
    )


# --- quantizers: float or GGML blocks -> compact codes + float32 scales ------------------------------------------


def quantize_int8(w: torch.Tensor, bf16_scales: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per output channel: (int8 [n, k] in -127..127, float32 scale [n]). `bf16_scales`: round the scales
    to bfloat16 first (the weight-only kernel takes them so) so that the codes are chosen for the scale used."""
    w = w.float()
    scale = w.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale, codes 0
    if bf16_scales:
        scale = scale.to(torch.bfloat16).float()
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric per group (min/max): (codes uint8 [n, k] in 0..15, scale [n, k/g], zero [n, k/g]) with
    w ~ (q - 8) * scale + zero. Scale and zero are rounded to bfloat16 (the kernel's) before the codes are chosen."""
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(dim=2), g.amax(dim=2)
    scale = (hi - lo) / 15
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(torch.bfloat16).float()
    zero = (lo + 8 * scale).to(torch.bfloat16).float()
    q = torch.round((g - zero[..., None]) / scale[..., None] + 8).clamp_(0, 15).to(torch.uint8)
    return q.reshape(n, k), scale, zero


def _half(data: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 at byte `start` of each block (blocks: uint8 [..., bytes]) as float32."""
    return data[..., start : start + 2].contiguous().view(torch.float16).squeeze(-1).float()


def _nibbles(qs: torch.Tensor, width: int) -> torch.Tensor:
    """ggml's 4-bit layout: each run of `width` bytes holds `width` values in its low nibbles, then `width` more in
    its high nibbles. qs: uint8 [..., bytes] -> [..., 2 * bytes]."""
    runs = qs.reshape(*qs.shape[:-1], -1, 1, width)
    return torch.cat([runs & 0xF, runs >> 4], dim=-2).reshape(*qs.shape[:-1], -1)


def _k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K's 12 bytes of 6-bit (scale, min) pairs for its 8 sub-blocks (ggml's get_scale_min_k4)."""
    sc = torch.cat([scales[..., 0:4] & 63, (scales[..., 8:12] & 0xF) | ((scales[..., 0:4] >> 6) << 4)], dim=-1)
    mn = torch.cat([scales[..., 4:8] & 63, (scales[..., 8:12] >> 4) | ((scales[..., 4:8] >> 6) << 4)], dim=-1)
    return sc.float(), mn.float()


def repack_q4(blocks: GGMLBlocks) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_0 / Q4_1 / Q4_K blocks as int4 codes with per-32 (scale, zero), keeping the blocks' own codes:
    Q4_0 w = d*(q-8); Q4_1 w = d*q + m; Q4_K w = (d*sc)*q - dmin*m per 32-value sub-block. float32 scale/zero."""
    rows, cols = blocks.shape
    data = blocks.data.reshape(rows, -1, {Q4_0: 18, Q4_1: 20, Q4_K: 144}[blocks.ggml_type])
    if blocks.ggml_type == Q4_0:
        d = _half(data, 0)
        q, scale, zero = _nibbles(data[..., 2:18], 16), d, torch.zeros_like(d)
    elif blocks.ggml_type == Q4_1:
        d, m = _half(data, 0), _half(data, 2)
        q, scale, zero = _nibbles(data[..., 4:20], 16), d, m + 8 * d
    elif blocks.ggml_type == Q4_K:
        d, dmin = _half(data, 0)[..., None], _half(data, 2)[..., None]
        sc, mn = _k_scales(data[..., 4:16])
        scale = d * sc
        q, zero = _nibbles(data[..., 16:144], 32), 8 * scale - dmin * mn
    else:
        raise QuantizationError(f"{blocks.type_name} blocks cannot be repacked as int4 without loss")
    return q.reshape(rows, cols), scale.reshape(rows, -1), zero.reshape(rows, -1)


# --- staging ----------------------------------------------------------------------------------------------------


def _layer_format(scheme: QuantScheme, out_features: int, in_features: int) -> tuple[Method, int]:
    """(method, int4 group) for one layer: int4 needs out % 16 == 0 and a group of 32/64/128 dividing `in`."""
    if scheme.method != "int4":
        return scheme.method, 0
    groups = [g for g in INT4_GROUP_SIZES if g <= scheme.group_size and in_features % g == 0]
    if out_features % 16 or not groups:
        return scheme.int8_method, 0
    return "int4", max(groups)


class WeightSink:
    """A staging layer's `.weight`: takes the checkpoint's tensors (float or GGML blocks), row range by row range,
    and keeps them only as codes + float32 scales (+ zeros for int4) in plain CPU memory."""

    def __init__(self, layer: str, shape: tuple[int, int], method: Method, group: int) -> None:
        out_features, in_features = shape
        self.layer, self.shape, self.method, self.group = layer, (out_features, in_features), method, group
        int4 = method == "int4"
        # device="cpu" explicitly: the lead builds (and swaps) the model under `with torch.device("meta")`.
        self.codes = torch.empty(shape, dtype=torch.uint8 if int4 else torch.int8, device="cpu")
        ngroups = in_features // group if int4 else 1
        self.scales = torch.empty(out_features, ngroups, dtype=torch.float32, device="cpu")
        self.zeros = torch.empty(out_features, ngroups, dtype=torch.float32, device="cpu") if int4 else None
        self.written = torch.zeros(out_features, dtype=torch.bool, device="cpu")
        self.exact_rows = 0  # rows repacked from GGML blocks without requantizing (for the log)

    def write(self, rows: slice | None, value: torch.Tensor | GGMLBlocks) -> None:
        """Quantize `value` into rows `rows` (None: all). Each row may be written once."""
        start, stop = self._row_range(rows, value)
        if isinstance(value, GGMLBlocks) and self._repacks(value):
            q, scale, zero = repack_q4(value)
            self._store(start, q, scale, zero)
            self.exact_rows += stop - start
        else:
            step = max(1, _STAGE_ELEMENTS // self.shape[1])
            for i in range(0, stop - start, step):
                chunk = value.rows(slice(i, i + step)) if isinstance(value, GGMLBlocks) else value[i : i + step]
                self._quantize(start + i, chunk.dequantize() if isinstance(chunk, GGMLBlocks) else chunk)
        self.written[start:stop] = True

    def dequantize(self) -> torch.Tensor:
        """The float32 weight the packed kernel will compute with (scales rounded as the kernel takes them)."""
        if self.method == "int4":
            scale, zero = (t.to(torch.bfloat16).float().repeat_interleave(self.group, 1) for t in self.int4_params)
            return (self.codes.float() - 8) * scale + zero
        scale = self.scales.to(torch.bfloat16).float() if _bf16_scales(self.method) else self.scales
        return self.codes.float() * scale

    @property
    def int4_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.zeros is not None, "an int8 layer has no zeros"
        return self.scales, self.zeros

    def missing_rows(self) -> list[tuple[int, int]]:
        """[start, stop) ranges never written."""
        idle = (~self.written).nonzero().flatten().tolist()
        ranges: list[tuple[int, int]] = []
        for r in idle:
            if ranges and ranges[-1][1] == r:
                ranges[-1] = (ranges[-1][0], r + 1)
            else:
                ranges.append((r, r + 1))
        return ranges

    def _row_range(self, rows: slice | None, value: torch.Tensor | GGMLBlocks) -> tuple[int, int]:
        start, stop, stride = (rows or slice(None)).indices(self.shape[0])
        if stride != 1:
            raise QuantizationError(f"{self.layer}: row slices must be contiguous, got {rows}")
        expected = (max(0, stop - start), self.shape[1])
        if tuple(value.shape) != expected:
            got = tuple(value.shape)
            raise QuantizationError(f"{self.layer}: rows {start}:{stop} take a {expected} weight, got {got}")
        if self.written[start:stop].any():
            raise QuantizationError(f"{self.layer}: rows {start}:{stop} written twice")
        return start, stop

    def _repacks(self, blocks: GGMLBlocks) -> bool:
        return self.method == "int4" and self.group == 32 and blocks.ggml_type in (Q4_0, Q4_1, Q4_K)

    def _quantize(self, start: int, w: torch.Tensor) -> None:
        if self.method == "int4":
            self._store(start, *quantize_int4(w, self.group))
        else:
            q, scale = quantize_int8(w, bf16_scales=_bf16_scales(self.method))
            self._store(start, q, scale[:, None], None)

    def _store(self, start: int, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> None:
        stop = start + q.shape[0]
        self.codes[start:stop] = q
        self.scales[start:stop] = scale
        if self.zeros is not None and zero is not None:
            self.zeros[start:stop] = zero


# --- kernels ----------------------------------------------------------------------------------------------------


@contextmanager
def _quantized_tensors_ok() -> Iterator[None]:
    """fbgemm's prepack takes a (deprecated) quantized tensor; no other route reaches its dynamic int8 GEMM
    (torch.ao's dynamic Linear builds the same tensor; onednn.qlinear_pointwise takes plain int8 but needs the
    activations quantized by separate torch ops, measured ~1.7x slower at M=1). Silence only that warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel")
        yield


@functools.cache
def has_vnni() -> bool:
    """Whether the CPU has an int8 dot product (AVX512-VNNI, AVX-VNNI or AMX-INT8)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags or "amx_int8" in flags


class _Kernel:
    """A packed weight: `__call__(x [M, in]) -> [M, out]` in x's dtype, bias included."""

    nbytes: int

    def __init__(self, bias: torch.Tensor | None) -> None:
        self._bias = None if bias is None else bias.detach().float()
        self._bias_as: dict[torch.dtype, torch.Tensor] = {}

    def bias_as(self, dtype: torch.dtype) -> torch.Tensor | None:
        if self._bias is None:
            return None
        if dtype not in self._bias_as:
            self._bias_as[dtype] = self._bias.to(dtype)
        return self._bias_as[dtype]

    def _with_bias(self, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        y = y if y.dtype == dtype else y.to(dtype)
        bias = self.bias_as(dtype)
        return y if bias is None else y.add_(bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def add(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """self(x) + other (x, other 2-D)."""
        return self(x).add_(other)

    def swiglu(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of a [gate; up] stacked weight."""
        gate_up = self(x)
        half = gate_up.shape[-1] // 2
        return F.silu(gate_up[..., :half]).mul_(gate_up[..., half:])


class _Int8Dynamic(_Kernel):
    """fbgemm quantizes the whole [M, in] input with one scale; a token with huge activations (LLMs' first token,
    some delimiters) would then crush every other row's precision (SmolLM2-135M prefill: KL 0.40 from full width).
    Rows are therefore scaled to max |x| = 1 first and the outputs scaled back (the matmul is linear): one call,
    per-token activation scales (KL 0.03)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__(bias)  # added after the row rescaling, so not inside fbgemm
        out_features = q.shape[0]
        zero_points = torch.zeros(out_features, dtype=torch.long)
        with _quantized_tensors_ok():
            qw = torch._make_per_channel_quantized_tensor(q.contiguous(), scale.double(), zero_points, 0)
            self.packed = torch.ops.quantized.linear_prepack(qw, None)
        # Without VNNI, fbgemm's u8 x s8 pairs are summed in int16 and can saturate: 7-bit activations avoid it.
        self.reduce_range = not has_vnni()
        self.nbytes = q.numel() + 8 * out_features + (0 if bias is None else 4 * out_features)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if xf.shape[0] == 1:  # one row: per-tensor is per-token already
            y = torch.ops.quantized.linear_dynamic(xf.contiguous(), self.packed, self.reduce_range)
        else:
            row_max = xf.abs().amax(dim=1, keepdim=True).clamp_(min=1e-30)
            y = torch.ops.quantized.linear_dynamic(xf / row_max, self.packed, self.reduce_range).mul_(row_max)
        return self._with_bias(y, x.dtype)


class _Int8WeightOnly(_Kernel):
    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__(bias)
        self.q = q.contiguous()
        self.scale = scale.to(_COMPUTE)
        self.nbytes = q.numel() + 2 * q.shape[0] + (0 if bias is None else 4 * q.shape[0])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xc = x.to(_COMPUTE).contiguous()
        if xc.shape[0] < _W8_DEQUANT_MIN_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(xc, self.q, self.scale)
        else:  # prefill: widen the weight slab by slab (cache-sized, no fresh mmap) for a GEMM that scales with M
            step = max(16, _WIDEN_ELEMENTS // self.q.shape[1])
            parts = [F.linear(xc, self.q[i : i + step].to(_COMPUTE)) for i in range(0, self.q.shape[0], step)]
            y = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)).mul_(self.scale)
        return self._with_bias(y, x.dtype)


def _tiled_op(x: torch.Tensor, tiles: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group: int,
              bias: torch.Tensor | None, other: torch.Tensor | None, n_out: int, kind: int) -> torch.Tensor:
    """ladle's int4 GEMM where there are zeros, else its int8 one (kind 0 plain, 1 + other, 2 SwiGLU)."""
    if zeros is not None:
        return torch.ops.ladle.tiled_linear_q4(x, tiles, scales, zeros, group, bias, other, n_out, kind)
    return torch.ops.ladle.tiled_linear_q8(x, tiles, scales, bias, other, n_out, kind)


class _TiledKernel(_Kernel):
    """A weight on ladle's tiled GEMM (AVX2 builds: kernels/gemm.c gemm_q8 / gemm_q4), one C++ op per call (`run`):
    x rounded to int16 per row, integer multiply-adds, float32 scales, then bias, residual add or SwiGLU fused as for
    full width. A SwiGLU layer (`swiglu`) packs gate and up columns tile by tile."""

    bias: torch.Tensor | None
    n_out: int
    swiglu_packed: bool
    tile_count: int
    tiles: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None = None  # int4's
    group: int = 0

    def run(self, x: torch.Tensor, other: torch.Tensor | None, n_out: int, kind: int) -> torch.Tensor:
        return _tiled_op(x, self.tiles, self.scales, self.zeros, self.group, self.bias, other, n_out, kind)

    def _run(self, x: torch.Tensor, other: torch.Tensor | None, n_out: int, kind: int) -> torch.Tensor:
        dtype = x.dtype
        if dtype not in (torch.float32, torch.bfloat16):  # e.g. float16: the kernels take float32 or bfloat16 x
            x, other = x.float(), None if other is None else other.float()
        y = self.run(x, other, n_out, kind)
        return y if y.dtype == dtype else y.to(dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.swiglu_packed:
            return self._run(x, None, self.n_out, 0)
        # tiles of [gate half | up half]: every packed column, then back to [gate; up]
        columns = self._run(x, None, self.tile_count * gemm_tile(), 0)
        halves = columns.view(x.shape[0], self.tile_count, 2, -1).transpose(1, 2).reshape(x.shape[0], 2, -1)
        return halves[:, :, : self.n_out].reshape(x.shape[0], 2 * self.n_out)

    def add(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        if self.swiglu_packed:
            return super().add(x, other)
        return self._run(x, other, self.n_out, 1)

    def swiglu(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, None, self.n_out, 2) if self.swiglu_packed else super().swiglu(x)


class _Int8Tiled(_TiledKernel):
    """int8-weight-only on gemm_q8: codes in k-pair tiles like bfloat16's, float32 column scales."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, swiglu: bool = False) -> None:
        super().__init__(None)  # the bias goes into the kernel's epilogue
        n, k = q.shape
        self.swiglu_packed, self.n_out = swiglu, n // 2 if swiglu else n
        self.tiles = tiles_of(q, swiglu)
        self.tile_count = self.tiles.shape[0]
        self.scales = tile_columns(scale.float(), swiglu).contiguous()
        self.bias = None if bias is None else tile_columns(bias.detach().float(), swiglu).contiguous()
        self.nbytes = n * k + 4 * n + (0 if bias is None else 4 * n)


class _Int4(_Kernel):
    def __init__(
        self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int, bias: torch.Tensor | None
    ) -> None:
        super().__init__(bias)
        n, k = q.shape
        self.group = group
        self.packed = torch.cat([
            torch.ops.aten._convert_weight_to_int4pack_for_cpu(q[i : i + _PACK_ROWS].to(torch.int32), 1)
            for i in range(0, n, _PACK_ROWS)
        ])
        self.scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(_COMPUTE)
        self.nbytes = n * k // 2 + self.scales_and_zeros.numel() * 2 + (0 if bias is None else 4 * n)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xc = x.to(_COMPUTE).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xc, self.packed, self.group, self.scales_and_zeros)
        return self._with_bias(y, x.dtype)


class _Int4Tiled(_TiledKernel):
    """int4 on gemm_q4: codes two to a byte in k-pair tiles, bfloat16 scales and zeros per group and column (as
    torch's int4 kernel takes them, so the GGUF repack's error bound is unchanged)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int,
                 bias: torch.Tensor | None, swiglu: bool = False) -> None:
        super().__init__(None)
        n, k = q.shape
        self.group, self.n_out, self.swiglu_packed = group, n // 2 if swiglu else n, swiglu
        width = gemm_tile()
        codes = tile_columns(q, swiglu)
        tiles = codes.shape[0] // width
        self.tiles = _int4_blocks(codes.view(tiles, width, k))
        self.tile_count = tiles
        self.scales, self.zeros = (
            tile_columns(t.to(torch.bfloat16), swiglu).view(tiles, width, -1).permute(0, 2, 1).contiguous()
            for t in (scale, zero)
        )
        self.bias = None if bias is None else tile_columns(bias.detach().float(), swiglu).contiguous()
        self.nbytes = n * k // 2 + 4 * scale.numel() + (0 if bias is None else 4 * n)


def _int4_blocks(codes: torch.Tensor) -> torch.Tensor:
    """gemm_q4's tiles from codes [tiles, 16, K] (0..15): per four k, 32 bytes, byte lane * 16 + half * 8 + 2 * c + p
    holding column half * 8 + lane * 4 + c's code for k = 4j + p in its low nibble and k = 4j + 2 + p in its high one
    (gemm_avx2.h tile_q4: unpacking each nibble half with vpunpck[lh]bw gives a k-pair row of tile_q8's layout).
    Returned as [tiles, K / 2, 16] uint8."""
    tiles, width, k = codes.shape
    if width != 16 or k % 4:
        raise ValueError(f"int4 tiles need 16 columns and K divisible by 4, got {width} and {k}")
    # columns (half, lane, c), k (j, nibble, p) -> (j, lane, half, c, p, nibble)
    v = codes.view(tiles, 2, 2, 4, k // 4, 2, 2).permute(0, 4, 2, 1, 3, 6, 5)
    return (v[..., 0] | (v[..., 1] << 4)).reshape(tiles, k // 2, width).contiguous()


def _bf16_scales(method: str) -> bool:
    """Whether `method`'s kernel takes its scales in bfloat16 (torch's weight-only kernel; ladle's takes float32)."""
    return method == "int8-weight-only" and not gemm_q8_available()


def _pack(sink: WeightSink, bias: torch.Tensor | None, swiglu: bool) -> _Kernel:
    if sink.method == "int4":
        if gemm_q8_available():
            return _Int4Tiled(sink.codes, *sink.int4_params, sink.group, bias, swiglu)
        return _Int4(sink.codes, *sink.int4_params, sink.group, bias)
    if sink.method == "int8-dynamic":
        return _Int8Dynamic(sink.codes, sink.scales[:, 0], bias)
    if gemm_q8_available():
        return _Int8Tiled(sink.codes, sink.scales[:, 0], bias, swiglu)
    return _Int8WeightOnly(sink.codes, sink.scales[:, 0], bias)


# --- modules ----------------------------------------------------------------------------------------------------


class QuantizedLinear(nn.Module):
    """Linear's interface (forward, add, gelu) over a quantized weight. Staging until finalize(), then packed."""

    def __init__(
        self, in_features: int, out_features: int, scheme: QuantScheme, bias: nn.Parameter | None = None,
        name: str = "linear",
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.name = in_features, out_features, name
        self.method, self.group_size = _layer_format(scheme, out_features, in_features)
        self.bias = bias  # a Parameter the loader fills like any other; None registers "no bias"
        self._sink: WeightSink | None = WeightSink(name, (out_features, in_features), self.method, self.group_size)
        self._kernel: _Kernel | None = None
        self._tiled = False  # finalized onto ladle's int8 / int4 GEMM: its buffers, called directly
        self.handle = register(self)  # a compiled decoder calls it through `ladle::linear` (compiled.py)

    def traceable(self, x: torch.Tensor, method: str = "forward") -> bool:
        """Whether `method` on x goes straight to `ladle::tiled_linear_q8` / `_q4`, one C++ op that torch.compile
        traces as it is (compiled.py: no `ladle::linear` round trip through Python); eager calls skip the kernel
        wrapper too.
        A SwiGLU-packed weight is direct for swiglu() only (its forward reorders columns in Python)."""
        swiglu_packed = isinstance(self, QuantizedGateUpLinear)
        return self._tiled and x.dtype in (torch.float32, torch.bfloat16) and swiglu_packed == (method == "swiglu")

    def _direct(self, x: torch.Tensor, other: torch.Tensor | None, kind: int) -> torch.Tensor:
        """ladle's int8 or int4 GEMM on the layer's buffers (the kernel's tensors, registered so that a compiled
        graph takes them as inputs)."""
        n_out = self.out_features // 2 if kind == 2 else self.out_features
        return _tiled_op(x, self.tiles, self.tile_scales, self.tile_zeros, self.group_size, self.tile_bias, other,
                         n_out, kind)

    def out_width(self, method: str) -> int:
        return self.out_features // 2 if method == "swiglu" else self.out_features

    @classmethod
    def of(cls, linear: Linear, scheme: QuantScheme, name: str) -> QuantizedLinear:
        out_features, in_features = linear.weight.shape
        return cls(in_features, out_features, scheme, linear.bias, name)

    @property
    def weight(self) -> WeightSink:
        if self._sink is None:
            raise AttributeError(f"{self.name} is finalized: its weight lives packed for {self.method}")
        return self._sink

    @property
    def finalized(self) -> bool:
        return self._kernel is not None

    @property
    def nbytes(self) -> int:
        """Weight (+ bias) bytes one forward reads, once finalized."""
        return 0 if self._kernel is None else self._kernel.nbytes

    def finalize(self) -> None:
        """Pack the staged weight for the kernel and free the staging. Every row must have been written."""
        if self._sink is None:
            return
        missing = self._sink.missing_rows()
        if missing:
            shown = ", ".join(f"{a}:{b}" for a, b in missing[:4]) + (" ..." if len(missing) > 4 else "")
            raise QuantizationError(f"{self.name}: weight rows {shown} of {self.out_features} were never written")
        self._kernel = _pack(self._sink, self.bias, swiglu=isinstance(self, QuantizedGateUpLinear))
        self._sink = None
        if isinstance(self._kernel, _TiledKernel):  # buffers, so that a compiled graph takes them as inputs
            self.register_buffer("tiles", self._kernel.tiles, persistent=False)
            self.register_buffer("tile_scales", self._kernel.scales, persistent=False)
            self.register_buffer("tile_zeros", self._kernel.zeros, persistent=False)
            self.register_buffer("tile_bias", self._kernel.bias, persistent=False)
            self._tiled = True

    def _packed(self) -> _Kernel:
        if self._kernel is None:
            raise QuantizationError(f"{self.name} ran before finalize_quantized()")
        return self._kernel

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        y = self._packed()(x.reshape(-1, self.in_features))
        return y.reshape(*x.shape[:-1], self.out_features)

    @opaque_method
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._direct(x, None, 0) if self.traceable(x) else self._matmul(x)

    @opaque_method
    def add(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        if self.traceable(x, "add"):
            return self._direct(x, other, 1)
        y = self._packed().add(x.reshape(-1, self.in_features), other.reshape(-1, self.out_features))
        return y.reshape(*x.shape[:-1], self.out_features)

    @opaque_method
    def gelu(self, x: torch.Tensor, approximate: str) -> torch.Tensor:
        return F.gelu(self.forward(x), approximate=approximate)

    def extra_repr(self) -> str:
        group = f", group={self.group_size}" if self.method == "int4" else ""
        return f"in={self.in_features}, out={self.out_features}, {self.method}{group}, bias={self.bias is not None}"


class QuantizedGateUpLinear(QuantizedLinear):
    """GateUpLinear's swiglu over [gate; up] stacked rows."""

    @opaque_method
    def swiglu(self, x: torch.Tensor) -> torch.Tensor:
        if self.traceable(x, "swiglu"):
            return self._direct(x, None, 2)
        y = self._packed().swiglu(x.reshape(-1, self.in_features))
        return y.reshape(*x.shape[:-1], self.out_features // 2)


def swap_linears(model: nn.Module, scheme: QuantScheme) -> int:
    """Replace every Linear / GateUpLinear child with a staging quantized twin (keeping its bias Parameter).
    Embeddings and other parameters are untouched. Returns how many were swapped."""
    swapped = 0
    for prefix, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, Linear):
                continue
            cls = QuantizedGateUpLinear if isinstance(child, GateUpLinear) else QuantizedLinear
            setattr(module, child_name, cls.of(child, scheme, f"{prefix}.{child_name}" if prefix else child_name))
            swapped += 1
    logger.info("quantizing %d linear layers: %s", swapped, describe(scheme))
    return swapped


def finalize_quantized(model: nn.Module) -> None:
    """Pack every staging layer (raising QuantizationError for one with unwritten rows) and free the staging."""
    started = time.perf_counter()
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    exact = sum(m._sink.exact_rows for m in layers if m._sink is not None)
    for layer in layers:
        layer.finalize()
    methods: dict[str, int] = {}
    for layer in layers:
        key = layer.method + (f" g{layer.group_size}" if layer.method == "int4" else "")
        methods[key] = methods.get(key, 0) + 1
    logger.info(
        "packed %d quantized layers (%s; %d rows repacked from GGML Q4 blocks as they were), %.1f MB, in %.2f s",
        len(layers), ", ".join(f"{n} {k}" for k, n in methods.items()), exact, quantized_bytes(model) / 1e6,
        time.perf_counter() - started,
    )


def quantize_weight(weight: torch.Tensor, scheme: QuantScheme, name: str = "output head") -> QuantizedLinear:
    """A finalized QuantizedLinear (no bias) for a float weight [out, in], e.g. the output head."""
    out_features, in_features = weight.shape
    layer = QuantizedLinear(in_features, out_features, scheme, None, name)
    layer.weight.write(None, weight.detach())
    layer.finalize()
    return layer


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of quantized weights (+ their scales and biases) read per token: the decode cost they bound."""
    return sum(m.nbytes for m in model.modules() if isinstance(m, QuantizedLinear))


# --- choosing a scheme ------------------------------------------------------------------------------------------

# A kernel is refused / passed over only when the probe finds it this much slower: on the hosts that motivated the
# probe (AVX2 only) int4 runs ~10x slower than int8, while on AVX-512 hosts the two are within noise of each other
# at the probe's shape (int4 wins by 1.5x over a whole model's weights), and a choice that flipped between restarts
# with the load of the box would make a server's numbers unreproducible.
CLEARLY_SLOWER = 1.5
_PROBE_SHAPE = (2048, 1024)  # [out, in]; 6 of them: 12 MB of int8 / 6 MB of int4, well past L2, cycled
_PROBE_WEIGHTS = 6
_PROBE_ROUNDS = 7


def _probe_kernel(method: str, out_features: int, in_features: int, group: int) -> _Kernel:
    """A packed kernel over random codes (what is timed does not depend on the values)."""
    n, k = out_features, in_features
    scale = torch.rand(n) * 1e-3 + 1e-3
    if method == "int4":
        groups = torch.rand(n, k // group) * 1e-3 + 1e-3
        q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
        return (_Int4Tiled if gemm_q8_available() else _Int4)(q, groups, groups, group, None)
    codes = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    if method == "int8-dynamic":
        return _Int8Dynamic(codes, scale, None)
    return (_Int8Tiled if gemm_q8_available() else _Int8WeightOnly)(codes, scale, None)


@functools.cache
def kernel_available(method: str, dtype: torch.dtype) -> str | None:
    """None if `method`'s kernel runs here on `dtype` activations, else why not (a tiny call, no timing)."""
    try:
        with torch.device("cpu"):  # a caller inside `with torch.device("meta")` would otherwise probe nothing
            kernel = _probe_kernel(method, 64, 128, 32)
            y = kernel(torch.randn(2, 128).to(dtype))
        if y.shape != (2, 64) or y.dtype != dtype:
            return f"its kernel returned {tuple(y.shape)} {y.dtype}"
    except (RuntimeError, AttributeError, NotImplementedError) as e:
        return f"its kernel is missing or failed here ({str(e).splitlines()[0][:200]})"
    return None


@functools.cache
def probe_times(dtype: torch.dtype, group_size: int) -> dict[str, float]:
    """Milliseconds per decode matmul (M=1) of each available kernel on a cycled set of weights bigger than L2,
    plus the plain `dtype` F.linear for reference. Rounds interleave the candidates, so noise from neighbours hits
    them alike; the fastest round counts. Cached per process: it is a property of the host, not of the model."""
    with torch.device("cpu"), torch.inference_mode():
        return _probe_times(dtype, group_size)


def _probe_times(dtype: torch.dtype, group_size: int) -> dict[str, float]:
    started = time.perf_counter()
    n, k = _PROBE_SHAPE
    methods = [m for m in ("int8-dynamic", "int8-weight-only", "int4") if kernel_available(m, dtype) is None]
    runs: dict[str, list[Callable[[torch.Tensor], torch.Tensor]]] = {
        m: [_probe_kernel(m, n, k, group_size) for _ in range(_PROBE_WEIGHTS)] for m in methods
    }
    plain = [torch.randn(n, k).to(dtype) for _ in range(_PROBE_WEIGHTS)]
    runs[str(dtype).removeprefix("torch.")] = [functools.partial(_plain, w) for w in plain]
    x = torch.randn(1, k).to(dtype)
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for fns in runs.values():
        fns[0](x)  # first-call setup (thread pools, lazy init) is not what we measure
    for _ in range(_PROBE_ROUNDS):
        for name, fns in runs.items():
            t0 = time.perf_counter()
            for fn in fns:
                fn(x)
            samples[name].append((time.perf_counter() - t0) / len(fns) * 1e3)
    # The fastest round: with shared cores a preempted thread stalls a whole GEMM (~ms), which is not the kernel.
    times = {name: min(s) for name, s in samples.items()}
    logger.info(
        "quantization probe (%s, M=1, %d x %dx%d weights, %s threads): %s per matmul; took %.0f ms",
        str(dtype).removeprefix("torch."), _PROBE_WEIGHTS, n, k, torch.get_num_threads(),
        ", ".join(f"{name} {ms:.3f} ms" for name, ms in times.items()), (time.perf_counter() - started) * 1e3,
    )
    return times


def _plain(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w)


def _probing() -> bool:
    return os.environ.get(PROBE_ENV, "0").strip().lower() in ("1", "true", "yes", "on")


def int4_capable_cpu() -> str | None:
    """None where an int4 kernel is fast (ladle's on AVX2 builds; torch's on AVX-512/AMX x86 and ARM), else why int4
    is refused."""
    if gemm_q8_available():
        return None  # ladle's W4A16 GEMM: 1.5x its int8 at one row on a 2-core AVX2 EPYC (RESULTS.md)
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.upper().startswith(INT4_CPU_CAPABILITIES):
        return None
    return (
        f"this CPU's best vector ISA is {capability}: the int4 kernel needs AVX-512 to beat int8 (measured on an "
        "AVX2-only EPYC: int4 at 0.1-0.3x of float32, int8 at 2.2-5.8x)"
    )


def _pick_int8(dtype: torch.dtype, group_size: int) -> tuple[Int8Method, str]:
    """The faster int8 kernel here, and why (for the log)."""
    usable: list[Int8Method] = [m for m in INT8_METHODS if kernel_available(m, dtype) is None]
    if not usable:
        raise QuantizationError(f"no int8 kernel runs on this host: {kernel_available('int8-dynamic', dtype)}")
    if "int8-weight-only" in usable and gemm_q8_available() and not _probing():
        # ladle's W8A16 GEMM (AVX2 builds): through the server on a 2-core AVX2 EPYC 1.64x int8-dynamic's tok/s at
        # 1 stream, 1.10x at 8, 0.90x at 32, and far closer to full width (no activation quantization to 8 bits)
        return "int8-weight-only", "ladle's int8 GEMM runs here: fastest at low concurrency, and the more accurate"
    if not _probing():
        return usable[0], "the fastest int8 kernel on every host measured"
    times = probe_times(dtype, group_size)
    # Dynamic unless weight-only is clearly faster at batch 1: dynamic also wins every batch size above 1 on both
    # hosts measured (RESULTS.md), and a margin keeps a noisy probe from flipping the choice between restarts.
    best = usable[0]
    if len(usable) > 1 and times[usable[0]] > CLEARLY_SLOWER * times[usable[1]]:
        best = usable[1]
    return best, "probe: " + ", ".join(f"{m} {times[m]:.3f} ms" for m in usable)


def resolve_scheme(name: str, dtype: torch.dtype, device: torch.device | str, group_size: int = 32) -> QuantScheme:
    """--quantization for this host: "int8" is the faster int8 kernel; "int4" is refused where its kernel is missing
    or would be slower than int8 (see PROBE_ENV); anything on CUDA is refused."""
    device = torch.device(device)
    if name not in QUANTIZATION_CHOICES:
        raise QuantizationError(f"unknown quantization {name!r}; choose from {', '.join(QUANTIZATION_CHOICES)}")
    if device.type != "cpu":
        raise QuantizationError(
            f"weight quantization ({name}) runs on CPU only: ladle has no {device.type} int8/int4 kernels wired in "
            "(none could be verified without a GPU); serve this model full width there (--quantization none)"
        )
    if group_size not in INT4_GROUP_SIZES:
        raise QuantizationError(f"int4 group size must be one of {INT4_GROUP_SIZES}, not {group_size}")
    for method in INT8_METHODS:
        if name == method:
            reason = kernel_available(method, dtype)
            if reason is not None:
                raise QuantizationError(f"{method} cannot run on this host: {reason}")
            return QuantScheme(method, group_size)
    int8, why = _pick_int8(dtype, group_size)
    if name == "int8":
        logger.info("quantization int8 -> %s (%s)", int8, why)
        return QuantScheme(int8, group_size)
    reason = kernel_available("int4", dtype)
    if reason is not None:
        raise QuantizationError(f"int4 cannot run on this host: {reason}; use --quantization int8")
    if not _probing() and (slow := int4_capable_cpu()) is not None:
        raise QuantizationError(f"int4 would be slower than int8 here: {slow}; use --quantization int8")
    if _probing():
        times = probe_times(dtype, group_size)
        if times["int4"] > CLEARLY_SLOWER * times[int8]:
            raise QuantizationError(
                f"int4 would be slower than int8 on this host (decode matmul: int4 {times['int4']:.3f} ms, "
                f"{int8} {times[int8]:.3f} ms); use --quantization int8"
            )
        why = f"probe: int4 {times['int4']:.3f} ms, " + why.removeprefix("probe: ")
    logger.info("quantization int4 (group %d; %s where int4 does not fit; %s)", group_size, int8, why)
    return QuantScheme("int4", group_size, int8)
