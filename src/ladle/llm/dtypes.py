"""Choosing the dtype an LLM computes in: `--dtype auto` picks what this machine runs natively.

Invariant: auto never picks a dtype the hardware only emulates where it counts. bfloat16 on a CPU without
avx512_bf16/AMX is emulated by torch's GEMMs (measured on an AVX2-only EPYC: 4.7x slower than float32 at batch 32),
so such CPUs get float32 — unless ladle's own GEMM runs the model's full-width linear layers in bfloat16 there
(kernels/gemm_avx2.h widens the weights in registers: on the same EPYC the server gave 1.3-1.6x float32's output
tok/s at 1-32 streams; benchmarks/RESULTS.md); then, as on CUDA and CPUs with native bf16, the checkpoint's own
dtype. The choice and its reason are logged by the caller.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: --kv-cache-dtype's names: the model dtypes and vLLM's 8-bit floats ("fp8" is e4m3, as in vLLM: a mantissa bit more
#: than e5m2, for the smaller range keys and values need)
KV_DTYPES: dict[str, torch.dtype] = {**DTYPES, "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
                                     "fp8_e5m2": torch.float8_e5m2}
#: The largest finite value of each 8-bit cache dtype: rows are clamped to it before they are rounded into the cache
#: (vLLM's conversion saturates; torch's turns e4m3's out-of-range values into NaN and e5m2's into infinities)
FP8_MAX: dict[torch.dtype, float] = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is no such file, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """x86 with avx512_bf16 or AMX; elsewhere torch's own capability string (e.g. an ARM CPU with bf16)."""
    flags = cpu_flags()
    if flags:
        return any(f in flags for f in NATIVE_BF16_FLAGS) or "bf16" in flags  # "bf16": aarch64's flag name
    return "AMX" in torch.backends.cpu.get_cpu_capability()


def checkpoint_dtype(config: dict) -> str | None:
    """The dtype a checkpoint was saved in: config.json's `dtype` (transformers 5) or `torch_dtype` (4.x)."""
    value = config.get("dtype") or config.get("torch_dtype")
    name = str(value).removeprefix("torch.") if value else None
    return name if name in DTYPES else None


def resolve_dtype(
    requested: str, config: dict, device: torch.device, quantized: bool = False, bf16_gemm: bool = False
) -> tuple[torch.dtype, str]:
    """(dtype, why) for `--dtype requested` on `device` with this checkpoint config. A quantized checkpoint (a GGUF
    of Q4/Q8 blocks) has no float dtype of its own: it counts as bfloat16, the narrowest that keeps the range.
    `bf16_gemm`: the model runs full width and ladle's tiled GEMM takes bfloat16 layers on this CPU."""
    if requested != "auto":
        return DTYPES[requested], "asked for with --dtype"
    saved = "bfloat16" if quantized else checkpoint_dtype(config) or "bfloat16"
    if device.type == "cuda":
        # float32 checkpoints run in bfloat16 on a GPU (vLLM does the same): full width buys nothing there.
        chosen = "bfloat16" if saved == "float32" else saved
        return DTYPES[chosen], f"auto: the checkpoint's {saved} on CUDA"
    native = cpu_has_native_bf16()
    if not native and not bf16_gemm:
        return torch.float32, "auto: this CPU has no native bfloat16 (no avx512_bf16/AMX), so float32 runs fastest"
    why = "this CPU has native bfloat16" if native else "ladle's GEMM runs bfloat16 layers on this CPU (no native bf16)"
    if saved == "float16":  # CPUs add float16 in software; bfloat16 keeps the range and runs at full speed
        return torch.bfloat16, f"auto: float16 checkpoint on a CPU (float16 is emulated); {why}"
    return DTYPES[saved], f"auto: the checkpoint's {saved}; {why}"


def resolve_kv_cache_dtype(
    requested: str, dtype: torch.dtype, quantized: bool, device: torch.device
) -> tuple[torch.dtype, str]:
    """(KV-cache dtype, why) for `--kv-cache-dtype requested` under a model computing in `dtype`. auto is the compute
    dtype, except float16 under int8/int4 weights computing in float32 on a CPU: llama.cpp's default cache width, for
    weights that are approximate already, and the decode kernel reads half the bytes (its attention is a larger share
    of a quantized step: benchmarks/RESULTS.md). Full-width models keep an exact cache (transformers parity)."""
    if requested != "auto":
        return KV_DTYPES[requested], "asked for with --kv-cache-dtype"
    if quantized and dtype == torch.float32 and device.type == "cpu":
        return torch.float16, "auto: float16 under quantized weights on a CPU (--kv-cache-dtype float32 for exact)"
    return dtype, "auto: the compute dtype"
