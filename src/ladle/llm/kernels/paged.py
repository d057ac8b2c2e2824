"""Paged decode attention in place (kernels/paged_decode.c): each decoding sequence's keys and values are read through
its block table where they lie in the cache; nothing is gathered into a contiguous copy. Two ways in: the C++ operator
`ladle::paged_attention` (kernels/ops.cpp: a whole layer's attention, K/V write and prefill spans included, one
dispatch) where torch's headers and a C++ compiler are at hand, else the C kernel alone through ctypes (decodes only;
attention.py does the rest in torch).

Invariant: called only with the layout attention.py keeps (per layer [kv_heads, num_blocks, block_size, head_dim],
contiguous, float32, bfloat16 or float16, on the CPU); any other case is the caller's torch path.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch

from ladle.llm.kernels.build import load
from ladle.llm.kernels.ops import operators

_P = ctypes.c_void_p
_I = ctypes.c_int
_L = ctypes.c_int64
_ARGS = [_P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _L, _I, _I, ctypes.c_float, _I, _P, _L]
SUPPORTED = (torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2)  # cache dtypes
MAX_GROUP, MAX_HEAD_DIM = 64, 256  # paged_decode.c's stack buffers


class PagedDecode:
    """out[b, h] = softmax(q[b, h] . K[b]^T * scale) V[b], K/V[b] the first lens[b] cached tokens of sequence b."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._kernels = {torch.float32: library.paged_decode_f32, torch.bfloat16: library.paged_decode_bf16,
                         torch.float16: library.paged_decode_f16, torch.float8_e4m3fn: library.paged_decode_e4m3,
                         torch.float8_e5m2: library.paged_decode_e5m2}
        for kernel in self._kernels.values():
            kernel.argtypes = _ARGS
            kernel.restype = ctypes.c_int

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                 lens: torch.Tensor, max_len: int, scale: float) -> torch.Tensor:
        """q [B, heads, head_dim]; tables [B, max_blocks] int64; lens [B] int64. Returns [B, heads * head_dim] in
        q's dtype."""
        batch, heads, head_dim = q.shape
        kv_heads, num_blocks, block_size, _ = k_cache.shape
        q32 = q.to(torch.float32).contiguous()
        out = torch.empty_like(q32)
        threads = torch.get_num_threads()
        scratch = torch.empty(threads * (heads // kv_heads) * max_len, dtype=torch.float32)
        failed = self._kernels[k_cache.dtype](
            q32.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(), lens.data_ptr(),
            out.data_ptr(), batch, heads, kv_heads, head_dim, num_blocks, block_size, tables.shape[1], scale,
            threads, scratch.data_ptr(), max_len)
        if failed:
            raise ValueError(f"paged decode kernel: unsupported shape (heads {heads}, kv heads {kv_heads}, "
                             f"head_dim {head_dim})")
        return out.view(batch, heads * head_dim).to(q.dtype)


def paged_decode(dtype: torch.dtype, device: torch.device, heads: int, kv_heads: int, head_dim: int
                 ) -> PagedDecode | None:
    """The kernel for a cache of `dtype`, or None where it does not apply (not CPU, another dtype, a shape beyond its
    buffers, no compiler)."""
    shape_ok = heads > 0 and kv_heads > 0 and heads % kv_heads == 0 and heads // kv_heads <= MAX_GROUP
    if device.type != "cpu" or dtype not in SUPPORTED or not shape_ok or head_dim > MAX_HEAD_DIM:
        return None
    library = load("paged_decode")
    return PagedDecode(library) if library is not None else None


def paged_attention_op(dtype: torch.dtype, device: torch.device, heads: int, kv_heads: int, head_dim: int
                       ) -> Callable[..., torch.Tensor] | None:
    """`ladle::paged_attention(q, k, v, k_cache, v_cache, meta.packed, scale) -> out` for this cache, or None where
    it does not apply (the same limits as the C kernel, or the operators did not build)."""
    if paged_decode(dtype, device, heads, kv_heads, head_dim) is None or not operators():
        return None
    return torch.ops.ladle.paged_attention.default
