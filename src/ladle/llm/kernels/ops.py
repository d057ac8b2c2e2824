"""ladle's torch operators (kernels/ops.cpp), loaded once per process with the shape functions torch.compile needs
to trace through them: `ladle::paged_attention` (a layer's whole attention), `ladle::tiled_linear` (the tiled GEMM of
gemm.c) and `ladle::tiled_linear_q8` / `_q4` (the same over int8 / int4 weights). Without a C++ compiler or torch's
headers they are absent and callers keep their torch paths.
"""

from __future__ import annotations

import functools

import torch

from ladle.llm.kernels.build import load_torch_ops


def _attention_shape(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     meta: torch.Tensor, scale: float) -> torch.Tensor:
    return q.new_empty((q.shape[0], q.shape[1] * q.shape[2]))


def _linear_shape(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, other: torch.Tensor | None,
                  n_out: int, kind: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], n_out))


def _linear_q8_shape(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                     other: torch.Tensor | None, n_out: int, kind: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], n_out))


def _linear_q4_shape(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int,
                     bias: torch.Tensor | None, other: torch.Tensor | None, n_out: int, kind: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], n_out))


@functools.cache
def operators() -> bool:
    """Whether the operators are loaded (built first if needed)."""
    if not load_torch_ops("ops"):
        return False
    torch.library.register_fake("ladle::paged_attention")(_attention_shape)
    torch.library.register_fake("ladle::tiled_linear")(_linear_shape)
    torch.library.register_fake("ladle::tiled_linear_q8")(_linear_q8_shape)
    torch.library.register_fake("ladle::tiled_linear_q4")(_linear_q4_shape)
    return True


def gemm_available(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `ladle::tiled_linear` runs this dtype here (AVX-512 (bfloat16: AVX-512-BF16) or AVX2 + FMA)."""
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16) or not operators():
        return False
    return bool(torch.ops.ladle.gemm_available(dtype == torch.bfloat16))


@functools.cache
def gemm_q8_available() -> bool:
    """Whether `ladle::tiled_linear_q8` and `ladle::tiled_linear_q4` (int8 / int4 weights, float32 or bfloat16 x)
    run here: the AVX2 build's kernels."""
    return operators() and bool(torch.ops.ladle.gemm_q8_available())


def gemm_amx() -> bool:
    """Whether `ladle::tiled_linear` runs bfloat16 layers on AMX tiles here (kernels/gemm_amx.h; LADLE_AMX=0 says
    no)."""
    return operators() and bool(torch.ops.ladle.gemm_amx())


def use_amx(on: bool) -> bool:
    """AMX on or off for later bfloat16 calls (a benchmark's A/B in one process). Returns gemm_amx()."""
    return operators() and bool(torch.ops.ladle.gemm_use_amx(on))


@functools.cache
def gemm_tile() -> int:
    """Output columns per packed weight tile in this host's build of gemm.c (64 on AVX-512, 16 on AVX2)."""
    return int(torch.ops.ladle.gemm_tile()) if operators() else 64
