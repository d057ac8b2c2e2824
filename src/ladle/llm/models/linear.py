"""Linear layers with fused epilogues (`+ residual`, SwiGLU, GELU), in three variants chosen once at load time:
plain torch ops (any device/dtype); weights packed in tiles for ladle's own GEMM (kernels/gemm.c through
`ladle::tiled_linear`: float32 and bfloat16 on AVX-512 (bfloat16: AVX-512-BF16) or on AVX2 + FMA), which streams a
decode step's weights near the memory bandwidth; or oneDNN-prepacked weights (float32, and bfloat16 on CPUs with native
bf16, where ladle's GEMM does not run). The packed variants fuse the epilogue into the GEMM. All compute the same
function of the same weights.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from ladle.llm.kernels.ops import gemm_available, gemm_tile

logger = logging.getLogger(__name__)


class Linear(nn.Module):
    """y = x W^T (+ b). `weight` [out, in] is filled by the checkpoint loader (possibly slice by slice)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def add(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """linear(x) + other: the residual add folded into the matmul where the backend allows."""
        if self.bias is None:
            return torch.addmm(other, x, self.weight.t())
        return F.linear(x, self.weight, self.bias).add_(other)

    def gelu(self, x: torch.Tensor, approximate: str) -> torch.Tensor:
        return F.gelu(F.linear(x, self.weight, self.bias), approximate=approximate)


class GateUpLinear(Linear):
    """gate_proj and up_proj stacked into one weight [2 * inter, in]; `swiglu(x) = silu(x Wg^T) * (x Wu^T)`."""

    def swiglu(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = F.linear(x, self.weight, self.bias)
        half = gate_up.shape[-1] // 2
        return F.silu(gate_up[..., :half]).mul_(gate_up[..., half:])


def _packed(weight: torch.Tensor) -> torch.Tensor:
    # batch_size=1 picks the layout tuned for decode; it stays correct (and still faster than plain) at larger M.
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)


class PackedLinear(nn.Module):
    """oneDNN-prepacked copy of a Linear (CPU, float32 or bfloat16). The packed weight is an opaque tensor, not a
    Parameter; a compiled decoder calls the same oneDNN ops (compiled.py lets inductor call them as they are)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        # buffers, not plain attributes, so that a compiled graph takes them as inputs (compiled.py)
        self.register_buffer("packed", _packed(weight), persistent=False)
        self.bias = None if bias is None else bias.detach()

    @classmethod
    def of(cls, linear: Linear) -> PackedLinear:
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def add(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise.binary(x, other, self.packed, self.bias, "add")

    def gelu(self, x: torch.Tensor, approximate: str) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "gelu", [], approximate)


def tiles_of(weight: torch.Tensor, swiglu: bool) -> torch.Tensor:
    """[N, K] (float32, bfloat16 or int8 codes) in gemm.c's layout: tiles of T = gemm_tile() output columns (64 on
    AVX-512, 16 on AVX2), each one contiguous stream ([tiles, K, T]; bfloat16 [tiles, K/2, T, 2], the k-pairs
    vdpbf16ps multiplies; int8 the same pairs, K padded to even, for vpmaddwd). SwiGLU: T/2 gate then the same T/2 up
    columns per tile."""
    rows, width = tile_columns(weight.detach(), swiglu), gemm_tile()
    if rows.dtype == torch.int8 and rows.shape[1] % 2:  # int8 multiplies k in pairs too: a zero k pads an odd K
        rows = F.pad(rows, (0, 1))
    tiles, k = rows.shape[0] // width, rows.shape[1]
    if rows.dtype in (torch.bfloat16, torch.int8):
        return rows.view(tiles, width, k // 2, 2).permute(0, 2, 1, 3).contiguous()
    return rows.view(tiles, width, k).permute(0, 2, 1).contiguous()


def tile_columns(rows: torch.Tensor, swiglu: bool) -> torch.Tensor:
    """Rows (weight rows, or bias entries) in packed column order, padded with zeros to whole tiles."""
    width = gemm_tile()
    if swiglu:
        gate, up = rows.chunk(2)
        half = width // 2
        pad = (0, 0) * (rows.dim() - 1) + (0, -gate.shape[0] % half)
        gate, up = F.pad(gate, pad), F.pad(up, pad)
        tiles = gate.shape[0] // half
        rows = torch.stack((gate.view(tiles, half, *gate.shape[1:]), up.view(tiles, half, *up.shape[1:])), 1)
        return rows.reshape(tiles * width, *gate.shape[1:])
    return F.pad(rows, (0, 0) * (rows.dim() - 1) + (0, -rows.shape[0] % width))


class TiledLinear(nn.Module):
    """A Linear (or GateUpLinear: `swiglu`) on ladle's tiled GEMM (kernels/gemm.c): the weight packed once at load,
    every call one `ladle::tiled_linear` dispatch with its epilogue fused (+ bias, + residual, SwiGLU)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, swiglu: bool = False) -> None:
        super().__init__()
        # a buffer, so that a compiled graph takes it as an input (compiled.py)
        self.register_buffer("tiles", tiles_of(weight, swiglu), persistent=False)
        self.bias = None if bias is None else tile_columns(bias.detach().float(), swiglu).contiguous()
        self.n_out = weight.shape[0] // 2 if swiglu else weight.shape[0]

    @classmethod
    def of(cls, linear: Linear) -> TiledLinear:
        return cls(linear.weight, linear.bias, swiglu=isinstance(linear, GateUpLinear))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.ladle.tiled_linear(x, self.tiles, self.bias, None, self.n_out, 0)

    def add(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        return torch.ops.ladle.tiled_linear(x, self.tiles, self.bias, other, self.n_out, 1)

    def gelu(self, x: torch.Tensor, approximate: str) -> torch.Tensor:
        return F.gelu(self(x), approximate=approximate)

    def swiglu(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.ladle.tiled_linear(x, self.tiles, self.bias, None, self.n_out, 2)


class PackedGateUpLinear(nn.Module):
    """SwiGLU as two GEMMs with fused epilogues: silu on the gate, then `* gate` on the up projection."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """`weight`: gate and up stacked [2 * inter, in] (GateUpLinear's)."""
        super().__init__()
        gate, up = weight.detach().chunk(2)
        bias = (None, None) if bias is None else bias.detach().chunk(2)
        self.register_buffer("gate", _packed(gate), persistent=False)
        self.register_buffer("up", _packed(up), persistent=False)
        self.gate_bias, self.up_bias = bias

    def swiglu(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.ops.mkldnn._linear_pointwise(x, self.gate, self.gate_bias, "swish", [], "")
        return torch.ops.mkldnn._linear_pointwise.binary(x, gate, self.up, self.up_bias, "mul")


def can_prepack(dtype: torch.dtype, device: torch.device) -> bool:
    """Packing pays off on x86 CPUs: ladle's tiled GEMM where it runs (AVX-512 or AVX2; benchmarks/RESULTS.md,
    issue 16); else oneDNN's (float32 on any x86 CPU: the output head and MLP GEMMs ran 1.4-2.4x faster than
    F.linear's; bfloat16 on CPUs with native bf16)."""
    return tiled_gemm_runs(dtype, device) or onednn_packs(dtype, device)


def onednn_packs(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether oneDNN prepacks this dtype here: float32 on x86 CPUs, bfloat16 where the CPU has native bf16."""
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def packed_linear(weight: torch.Tensor, bias: torch.Tensor | None = None, swiglu: bool = False) -> nn.Module | None:
    """The fastest packed form of y = x W^T (+ b) here (`swiglu`: of a GateUpLinear's stacked weight): ladle's tiled
    GEMM where it takes the weight, else oneDNN's prepacked GEMMs where they run; None where neither does (a
    bfloat16 weight of odd K on a CPU without native bf16), and the layer stays as it is."""
    if tiled(weight):
        return TiledLinear(weight, bias, swiglu)
    if not onednn_packs(weight.dtype, weight.device):
        return None
    return PackedGateUpLinear(weight, bias) if swiglu else PackedLinear(weight, bias)


def tiled(weight: torch.Tensor) -> bool:
    """Whether ladle's GEMM takes this weight (its dtype runs here; bfloat16 multiplies k in pairs).
    LADLE_GEMM=onednn keeps oneDNN's (for comparison, and to test that path on hosts that would not take it)."""
    even = weight.dtype != torch.bfloat16 or weight.shape[-1] % 2 == 0
    return even and tiled_gemm_runs(weight.dtype, weight.device)


def tiled_gemm_runs(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether full-width layers of this dtype go to ladle's tiled GEMM here (LADLE_GEMM=onednn says no)."""
    return os.environ.get("LADLE_GEMM") != "onednn" and gemm_available(dtype, device)


def prepack_linears(model: nn.Module) -> int:
    """Swap every Linear in `model` for its packed twin (dropping the plain weight). Returns how many."""
    swapped, kinds = 0, set()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if not isinstance(child, Linear):
                continue
            packed = packed_linear(child.weight, child.bias, isinstance(child, GateUpLinear))
            if packed is None:
                continue
            setattr(module, name, packed)
            kinds.add("ladle's tiled GEMM" if isinstance(packed, TiledLinear) else "oneDNN")
            swapped += 1
    logger.info("prepacked %d linear layers for %s", swapped, " and ".join(sorted(kinds)) or "nothing")
    return swapped
