"""A/B of two versions of the tiled GEMM (kernels/gemm.c and its headers) in one process, calls alternating: the
only stable per-kernel figure on a noisy host (issues 9 and 16). A "step" runs every linear layer of the SmolLM-135M
shapes of benchmarks/llm once (30 layers of qkv 576->960, o 576->576, SwiGLU gate_up 576->2x1536, down 1536->576), each
layer with its own weights, so at few rows the weights come from DRAM as in a decode step.

    .venv/bin/python benchmarks/micro/gemm_ab.py [--a REV] [--b REV] [--dtype float32,bfloat16,int8,int4]
        [--m 1,8,32,128,512]
        [--threads 1] [--rounds 15]

--a defaults to the kernels as committed (git HEAD), --b to the working tree's: edit gemm.c or a header, run this,
and read b/a (below 1: b is faster). Each side's gemm.c and headers are compiled the way kernels/ops.cpp compiles
them (C++, kernels/build.py's CXX_FLAGS) into a temporary library beside a small driver that runs a step's layers;
ctypes calls the driver once per step. bfloat16 runs where the build has it (AVX-512-BF16, on AMX tiles where the
host has them, or AVX2); int8 and int4 where the build has ladle's int8 GEMM (AVX2 builds).
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
KERNELS = ROOT / "src" / "ladle" / "llm" / "kernels"
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "benchmarks" / "llm")]
from quant import describe_machine, machine  # noqa: E402 (CPU model and flags beside every figure)

from ladle.llm.kernels.build import CXX_FLAGS  # noqa: E402

LAYERS = 30
# (in, out, swiglu) per layer: SmolLM-135M's qkv, o, gate_up (SwiGLU: 2 x 1536 packed columns), down
SHAPES = ((576, 960, False), (576, 576, False), (576, 1536, True), (1536, 576, False))
KINDS = {"float32": 0, "int8": 1, "int4": 2, "bfloat16": 3}
GROUP = 32  # int4 group size (ladle's default)
P, I64 = ctypes.c_void_p, ctypes.c_int64

DRIVER = """
extern "C" {
#include "gemm.c"
/* one step: `count` matmuls, the i-th [m, k[i]] x its weights -> [m, n_out[i]] (kind: 0 float32, 1 int8, 2 int4,
 * 3 bfloat16: x, weights and out bfloat16) */
int step(int kind, const float *x, float *out, const void *const *w, const void *const *scales,
         const void *const *zeros, const int64_t *k, const int64_t *tiles, const int64_t *n_out, const int *epi,
         int count, int64_t m, int threads) {
    for (int i = 0; i < count; i++) {
        int rc = kind == 0 || kind == 3 ? gemm(x, k[i], w[i], NULL, NULL, 0, out, n_out[i], m, k[i], tiles[i],
                                               n_out[i], epi[i], kind == 3, threads)
                 : kind == 1 ? gemm_q8(x, k[i], (const int8_t *)w[i], (const float *)scales[i], NULL, NULL, 0, out,
                                       n_out[i], m, k[i], tiles[i], n_out[i], epi[i], 0, threads)
                             : gemm_q4(x, k[i], (const uint8_t *)w[i], (const uint16_t *)scales[i],
                                       (const uint16_t *)zeros[i], 32, NULL, NULL, 0, out, n_out[i], m, k[i],
                                       tiles[i], n_out[i], epi[i], 0, threads);
        if (rc) return rc;
    }
    return 0;
}
}
"""


def sources(rev: str | None, where: Path) -> Path:
    """gemm.c and the headers at a git revision (None: the working tree) copied into `where`."""
    where.mkdir(parents=True, exist_ok=True)
    names = ["gemm.c", *(p.name for p in KERNELS.glob("*.h"))]
    for name in names:
        if rev is None:
            text = (KERNELS / name).read_text()
        else:
            rel = (KERNELS / name).relative_to(ROOT)
            shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{rel}"], capture_output=True, text=True)
            if shown.returncode:  # a header the revision does not have
                continue
            text = shown.stdout
        (where / name).write_text(text)
    driver = where / "driver.cpp"
    driver.write_text(DRIVER)
    return driver


def build(driver: Path) -> ctypes.CDLL:
    lib = driver.with_suffix(".so")
    subprocess.run(["g++", *CXX_FLAGS, "-shared", str(driver), "-o", str(lib)], check=True)
    return ctypes.CDLL(str(lib))


class Weights:
    """A step's weights in one format, random (timing does not depend on the values), kept alive for ctypes."""

    def __init__(self, kind: str, tile: int, rng: np.random.Generator) -> None:
        self.keep: list[np.ndarray] = []
        w, s, z, k, tiles, n_out, epi = [], [], [], [], [], [], []
        for _ in range(LAYERS):
            for k_len, n, swiglu in SHAPES:
                columns = 2 * n if swiglu else n
                t = -(-columns // tile)
                w.append(self._array(self._codes(kind, t, tile, k_len, rng)))
                s.append(self._array(self._scales(kind, t, tile, k_len)))
                z.append(self._array(np.zeros(t * tile * (k_len // GROUP) if kind == "int4" else 1, np.uint16)))
                k.append(k_len)
                tiles.append(t)
                n_out.append(n if swiglu else columns)
                epi.append(2 if swiglu else 0)
        self.count = len(w)
        self.w, self.s, self.z = (P * self.count)(*w), (P * self.count)(*s), (P * self.count)(*z)
        self.k, self.tiles, self.n_out = ((I64 * self.count)(*v) for v in (k, tiles, n_out))
        self.epi = (ctypes.c_int * self.count)(*epi)
        self.max_k, self.max_n = max(k), max(n_out)

    def _array(self, a: np.ndarray) -> int:
        self.keep.append(a)
        return a.ctypes.data

    @staticmethod
    def _codes(kind: str, tiles: int, tile: int, k_len: int, rng: np.random.Generator) -> np.ndarray:
        if kind == "float32":
            return rng.standard_normal(tiles * tile * k_len, dtype=np.float32)
        if kind == "bfloat16":  # random values in [1, 2) (any bits time the same; these stay finite)
            return rng.integers(0x3F80, 0x4000, tiles * tile * k_len, dtype=np.uint16)
        if kind == "int8":
            return rng.integers(-127, 128, tiles * tile * (k_len + k_len % 2), dtype=np.int8)
        return rng.integers(0, 256, tiles * tile * k_len // 2, dtype=np.uint8)

    @staticmethod
    def _scales(kind: str, tiles: int, tile: int, k_len: int) -> np.ndarray:
        if kind == "int8":
            return np.full(tiles * tile, 0.01, np.float32)
        if kind == "int4":
            return np.full(tiles * tile * (k_len // GROUP), 0x3C00, np.uint16)  # bfloat16 0.0078
        return np.zeros(1, np.float32)


def step_args(kind: str, weights: Weights, x: np.ndarray, out: np.ndarray, m: int, threads: int) -> tuple:
    """ctypes arguments of one step of `kind` at m rows (x and out big enough for every layer)."""
    return (KINDS[kind], x.ctypes.data, out.ctypes.data, weights.w, weights.s, weights.z, weights.k, weights.tiles,
            weights.n_out, weights.epi, weights.count, m, threads)


def measure(libs: list[ctypes.CDLL], weights: dict[str, Weights], m: int, threads: int,
            rounds: int) -> dict[tuple[int, str], float]:
    """Median seconds per step for each (library, dtype), all of them alternating round by round, so that ratios
    between libraries and between dtypes come from the same moments of a noisy host."""
    kinds = list(weights)
    x = np.random.default_rng(1).standard_normal(m * max(w.max_k for w in weights.values()), dtype=np.float32)
    out = np.empty(m * max(w.max_n for w in weights.values()), np.float32)
    x16 = np.full(x.size, 0x3F80, np.uint16)  # bfloat16 1.0 (out is big enough for either width)
    args = {kind: step_args(kind, w, x16 if kind == "bfloat16" else x, out, m, threads) for kind, w in weights.items()}
    for lib in libs:
        lib.step.argtypes = [ctypes.c_int, P, P, P, P, P, P, P, P, P, ctypes.c_int, I64, ctypes.c_int]
        for kind in kinds:
            if lib.step(*args[kind]):
                raise SystemExit(f"{kind} does not run in this build (gemm returned nonzero)")
    times: dict[tuple[int, str], list[float]] = {(i, kind): [] for i in range(len(libs)) for kind in kinds}
    for _ in range(rounds):
        for (i, kind), seconds in times.items():
            t0 = time.perf_counter()
            libs[i].step(*args[kind])
            seconds.append(time.perf_counter() - t0)
    return {key: statistics.median(seconds) for key, seconds in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", default="HEAD", help="git revision of side a (default HEAD)")
    parser.add_argument("--b", default=None, help="git revision of side b (default: the working tree)")
    parser.add_argument("--dtype", default="float32,int8,int4")
    parser.add_argument("--m", default="1,8,32,128,512", help="rows of x (tokens in the step)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    print(describe_machine(machine()), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        libs = [build(sources(args.a, Path(tmp) / "a")), build(sources(args.b, Path(tmp) / "b"))]
        print(f"a = {args.a}, b = {args.b or 'working tree'}; {args.threads} thread(s), median of {args.rounds} "
              "alternating rounds, ms per step (30 layers x 4 matmuls)", flush=True)
        kinds = args.dtype.split(",")
        if not libs[0].gemm_q8_available():
            print("int8 / int4: not built here (ladle's int8/int4 GEMM runs on AVX2 builds)")
            kinds = [kind for kind in kinds if kind in ("float32", "bfloat16")]
        if "bfloat16" in kinds and not libs[0].gemm_available(1):
            print("bfloat16: not built here")
            kinds.remove("bfloat16")
        print("| dtype | M | a ms | b ms | b/a | a GFLOP/s | b GFLOP/s | b: float32 time / this |\n"
              "|---|---:|---:|---:|---:|---:|---:|---:|")
        weights = {kind: Weights(kind, libs[0].gemm_tile(), np.random.default_rng(0)) for kind in kinds}
        for m in (int(v) for v in args.m.split(",")):
            times = measure(libs, weights, m, args.threads, args.rounds)
            flops = 2 * m * LAYERS * sum(k * (2 * n if s else n) for k, n, s in SHAPES)
            for kind in kinds:
                a, b = times[0, kind], times[1, kind]
                vs = f"{times[1, 'float32'] / b:.2f}x" if "float32" in kinds else "-"
                print(f"| {kind} | {m} | {a * 1e3:.2f} | {b * 1e3:.2f} | {b / a:.2f} | {flops / a / 1e9:.1f} | "
                      f"{flops / b / 1e9:.1f} | {vs} |", flush=True)


if __name__ == "__main__":
    main()
