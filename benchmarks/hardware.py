"""This machine's limits as the benchmarks see them: bf16 and fp32 GEMM GFLOP/s and memory bandwidth under torch.

Each figure is the best of several timed repetitions (the box is shared, so the best filters other load out);
bandwidth counts bytes read plus bytes written by one large tensor copy.

    .venv/bin/python benchmarks/hardware.py [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from ladle.llm.dtypes import cpu_has_native_bf16

GEMM_N = 2048
COPY_BYTES = 512 * 1024 * 1024  # far beyond the last-level cache, so the copy streams from and to DRAM


def best_seconds(work: Callable[[], object], reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        work()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_gflops(dtype: torch.dtype, n: int = GEMM_N, reps: int = 8) -> float:
    """2·n³ FLOPs of one n-by-n GEMM over its best time."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    # `a @ b`, not torch.mm(out=...): the out= variant skips oneDNN's bf16 kernel here and runs ~30% slower.
    seconds = best_seconds(lambda: a @ b, reps)
    return 2 * n**3 / seconds / 1e9


def copy_bandwidth_gbs(nbytes: int = COPY_BYTES, reps: int = 8) -> float:
    """(bytes read + bytes written) / best time of one `dst.copy_(src)` of `nbytes`."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    seconds = best_seconds(lambda: dst.copy_(src), reps)
    return 2 * nbytes / seconds / 1e9


def measure(threads: int = 2) -> dict[str, float]:
    """{'threads', 'bf16_gflops', 'fp32_gflops', 'bandwidth_gbs'}; restores torch's thread count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return {
            "threads": threads,
            # emulated bf16 (CPUs without avx512_bf16/AMX) runs a 2048² GEMM for minutes: a smaller one says as much
            "bf16_gflops": matmul_gflops(torch.bfloat16, GEMM_N if cpu_has_native_bf16() else 512),
            "fp32_gflops": matmul_gflops(torch.float32),
            "bandwidth_gbs": copy_bandwidth_gbs(),
        }
    finally:
        torch.set_num_threads(before)


def describe(hw: dict[str, float]) -> str:
    return (f"{hw['threads']} torch threads: bf16 GEMM {hw['bf16_gflops']:,.0f} GFLOP/s, fp32 GEMM "
            f"{hw['fp32_gflops']:,.0f} GFLOP/s ({GEMM_N}² GEMM), memory bandwidth {hw['bandwidth_gbs']:.1f} GB/s "
            "(read + write, 512 MiB copy)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    print(describe(measure(parser.parse_args().threads)))


if __name__ == "__main__":
    main()
