"""Linear layers with fused epilogues (`+ residual`, SwiGLU, GELU), in two variants chosen once at load time:
plain torch ops (any device/dtype), or oneDNN-prepacked weights for float32 and bfloat16 on CPU, which run
decode-shaped matmuls faster and fuse the epilogue into the GEMM. Both compute the same function of the same weights.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

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


class PackedGateUpLinear(nn.Module):
    """SwiGLU as two GEMMs with fused epilogues: silu on the gate, then `* gate` on the up projection."""

    def __init__(self, linear: GateUpLinear) -> None:
        super().__init__()
        gate, up = linear.weight.detach().chunk(2)
        bias = (None, None) if linear.bias is None else linear.bias.detach().chunk(2)
        self.register_buffer("gate", _packed(gate), persistent=False)
        self.register_buffer("up", _packed(up), persistent=False)
        self.gate_bias, self.up_bias = bias

    def swiglu(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.ops.mkldnn._linear_pointwise(x, self.gate, self.gate_bias, "swish", [], "")
        return torch.ops.mkldnn._linear_pointwise.binary(x, gate, self.up, self.up_bias, "mul")


def can_prepack(dtype: torch.dtype, device: torch.device) -> bool:
    """oneDNN prepacking pays off for float32 on any x86 CPU (the output head and MLP GEMMs ran 1.4-2.4x faster than
    F.linear's, benchmarks/RESULTS.md, issue 16) and for bfloat16 on CPUs with native bf16 (avx512_bf16 / AMX)."""
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def prepack_linears(model: nn.Module) -> int:
    """Swap every Linear in `model` for its packed twin (dropping the plain weight). Returns how many."""
    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, GateUpLinear):
                setattr(module, name, PackedGateUpLinear(child))
            elif isinstance(child, Linear):
                setattr(module, name, PackedLinear.of(child))
            else:
                continue
            swapped += 1
    logger.info("prepacked %d linear layers for oneDNN", swapped)
    return swapped
