"""ladle's tiled GEMM (kernels/gemm.c, models/linear.py: TiledLinear) against oneDNN's prepacked GEMM (PackedLinear)
over one decode step's worth of SmolLM-135M-shaped layers, cold cache (issue 16). Where oneDNN has no bfloat16 (CPUs
without native bf16), bfloat16 is compared with what a model would otherwise run: torch's F.linear.

The workload walks 30 layers the way a step does — qkv (576->960), o (576->576, + residual), gate_up (576->2x1536,
SwiGLU), down (1536->576, + residual) — plus the 576->49152 output head: 121 calls over 249 MB (bfloat16) or 498 MB
(float32) of weights, far beyond the caches. Both run ladle's own modules with their fused epilogues. Configurations
alternate round by round (this box drifts 10-25% within minutes); the fastest round is reported, with the weight
bandwidth and GEMM throughput it implies. Where bfloat16 runs on AMX tiles (kernels/gemm_amx.h), the tiled GEMM is
also measured with AMX turned off (`vdpbf16ps`: the AVX-512-BF16 kernels), the same weights, alternating too.

    .venv/bin/python benchmarks/micro/tiled_gemm.py [--m 1,2,4,8,16,32,128,512] [--rounds 5] [--dtype bfloat16,float32]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ladle.llm.kernels.ops import gemm_amx, gemm_available, use_amx
from ladle.llm.models.linear import (
    GateUpLinear,
    Linear,
    PackedGateUpLinear,
    PackedLinear,
    TiledLinear,
    onednn_packs,
)
from ladle.process import tune_malloc_for_tensors

# (kind, out, in): "plain", "add" (+ residual), "swiglu" (out = 2 x intermediate)
LAYER = [("plain", 960, 576), ("add", 576, 576), ("swiglu", 3072, 576), ("add", 576, 1536)]
SMOL = LAYER * 30 + [("plain", 49152, 576)]
CPU = torch.device("cpu")
FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")

Call = Callable[[dict[int, torch.Tensor]], torch.Tensor]


def machine() -> str:
    text = Path("/proc/cpuinfo").read_text()
    flags = set(next((line for line in text.splitlines() if line.startswith("flags")), "").split())
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    shown = " ".join(f"{f}={'yes' if f in flags else 'no'}" for f in FLAGS)
    return f"cpu: {model}; {shown}; torch {torch.__version__}, {torch.get_num_threads()} threads"


def build(kind: str, n: int, k: int, dtype: torch.dtype, tiled: bool) -> Call:
    layer = (GateUpLinear if kind == "swiglu" else Linear)(k, n)
    with torch.no_grad():
        layer.weight.normal_(0, 0.02)
    layer = layer.to(dtype)
    if tiled:
        module = TiledLinear.of(layer)
    elif onednn_packs(dtype, CPU):
        module = PackedGateUpLinear(layer.weight) if kind == "swiglu" else PackedLinear.of(layer)
    else:
        module = layer
    if kind == "swiglu":
        return lambda xs: module.swiglu(xs[k])
    if kind == "add":
        return lambda xs: module.add(xs[k], xs[("out", n)])
    return lambda xs: module(xs[k])


def baseline(dtype: torch.dtype) -> str:
    return "oneDNN" if onednn_packs(dtype, CPU) else "F.linear"


def measure(dtype: torch.dtype, m_values: list[int], rounds: int) -> dict[tuple[str, int], float]:
    configs = {name: [build(kind, n, k, dtype, name == "tiled") for kind, n, k in SMOL] for name in ("base", "tiled")}
    if dtype == torch.bfloat16 and gemm_amx():
        configs["vdpbf16ps"] = configs["tiled"]  # the same modules with AMX off
    best: dict[tuple[str, int], float] = {}
    for m in m_values:
        xs = {k: torch.randn(m, k).to(dtype) for k in (576, 1536)} | {("out", 576): torch.randn(m, 576).to(dtype)}
        with torch.inference_mode():
            for r in range(rounds + 1):  # round 0 warms up
                for name, calls in configs.items():
                    use_amx(name != "vdpbf16ps")
                    started = time.perf_counter()
                    for call in calls:
                        call(xs)
                    if r:
                        elapsed = time.perf_counter() - started
                        best[name, m] = min(best.get((name, m), elapsed), elapsed)
        use_amx(True)
        shown = ", ".join(f"{baseline(dtype) if name == 'base' else name} {best[name, m] * 1e3:.2f} ms"
                          for name in configs)
        print(f"  {dtype} M={m}: {shown}", flush=True)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", default="1,2,4,8,16,32,128,512", help="rows per matmul (tokens in the step)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtype", default="bfloat16,float32")
    args = parser.parse_args()
    tune_malloc_for_tensors()
    print(machine(), flush=True)
    m_values = [int(v) for v in args.m.split(",")]
    weights = sum(n * k for _, n, k in SMOL)
    for dtype in (getattr(torch, name) for name in args.dtype.split(",")):
        if not gemm_available(dtype, CPU):
            print(f"{dtype}: ladle's GEMM does not run here (needs AVX-512 or AVX2 + FMA, and a C++ compiler)")
            continue
        best = measure(dtype, m_values, args.rounds)
        size = weights * dtype.itemsize
        print(f"\n### {dtype}: one SmolLM-135M step's GEMMs ({size / 1e6:.0f} MB of weights), best of {args.rounds} "
              "rounds")
        comparison(best, ("base", baseline(dtype)), ("tiled", "tiled"), m_values, weights, size)
        if ("vdpbf16ps", m_values[0]) in best:
            print("\nAMX tiles against vdpbf16ps (the same tiled weights, AMX off):\n")
            comparison(best, ("vdpbf16ps", "vdpbf16ps"), ("tiled", "AMX"), m_values, weights, size)


def comparison(best: dict[tuple[str, int], float], first: tuple[str, str], second: tuple[str, str],
               m_values: list[int], weights: int, size: int) -> None:
    """A markdown table of two configurations' best times: (key in `best`, name) each; `second / first` is the
    speed-up of the second."""
    (a, a_name), (b, b_name) = first, second
    print(f"| rows | {a_name} ms | {b_name} ms | {b_name} / {a_name} | {a_name} GB/s | {b_name} GB/s | "
          f"{a_name} GFLOP/s | {b_name} GFLOP/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for m in m_values:
        one, two = best[a, m], best[b, m]
        flops = 2 * m * weights
        print(f"| {m} | {one * 1e3:.2f} | {two * 1e3:.2f} | {one / two:.2f}x | {size / one / 1e9:.1f} | "
              f"{size / two / 1e9:.1f} | {flops / one / 1e9:.0f} | {flops / two / 1e9:.0f} |")


if __name__ == "__main__":
    main()
