"""A/B of two versions of the decode-attention kernel (paged_decode.c) in one process, calls alternating: the only
stable per-kernel figure on a noisy host (issue 16). The KV cache is cold and server-shaped: every call of a sweep
reads another layer's cache, as a decode step does, so K/V come from DRAM.

    .venv/bin/python benchmarks/micro/kernel_ab.py [--a REV_OR_FILE] [--b REV_OR_FILE] [--batch 1,8,32]
        [--context 192] [--layers 30] [--threads 2] [--reps 15] [--a-cache float32] [--b-cache float32]

--a defaults to the kernel as committed (git HEAD), --b to the working tree's: edit the kernel, run this, and read
b/a (below 1: b is faster). Each version is built with kernels/build.py's compile flags (and linked with them, so
this process flushes subnormals: timings do not depend on it) into a temporary library, beside a small C driver that
loops over a step's layers; ctypes calls the driver once per step. The SmolLM-135M shapes of benchmarks/llm: 30 layers,
9 query heads over 3 KV heads of 64, 16-token blocks handed out in a shuffled order (as a busy pool does), a float32
cache; --a-cache / --b-cache give a side a bfloat16 or float16 copy of it instead (--kv-cache-dtype: the same kernel,
half the bytes; --a and --b may then be the same version).
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
sys.path.insert(0, str(ROOT / "benchmarks" / "llm"))
from quant import describe_machine, machine  # noqa: E402 (CPU model and flags beside every figure)

FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-shared"]
LAYERS, HEADS, KV_HEADS, HEAD_DIM, BLOCK = 30, 9, 3, 64, 16
I64, F32 = ctypes.c_int64, ctypes.c_float
KINDS = {"float32": 0, "bfloat16": 1, "float16": 2}  # the driver's `kind`: which paged_decode_* it calls
P = ctypes.c_void_p


def source(spec: str | None, name: str, where: Path) -> Path:
    """The kernel's source for one side: a file, or a git revision of the committed one (default HEAD). Its
    headers are copied beside it from the working tree (the A/B is of the .c file)."""
    where.mkdir(parents=True, exist_ok=True)
    for header in KERNELS.glob("*.h"):
        (where / header.name).write_text(header.read_text())
    target = where / f"{name}.c"
    if spec is not None and Path(spec).is_file():
        target.write_text(Path(spec).read_text())
    else:
        rel = (KERNELS / f"{name}.c").relative_to(ROOT)
        target.write_text(subprocess.run(["git", "-C", str(ROOT), "show", f"{spec or 'HEAD'}:{rel}"], check=True,
                                         capture_output=True, text=True).stdout)
    return target


# Loops over a step's calls in C, so that the figures are the kernel's alone (through ctypes, each call cost ~26 us
# of Python, more than the whole kernel at batch 1)
DRIVER = """
#include <stdint.h>
/* weak: a version of the kernel from before its 16-bit entry points still builds (and serves float32 sides) */
#define ENTRY(name) int name(const float *, const uint16_t *, const uint16_t *, const int64_t *, const int64_t *, \\
                             float *, int, int, int, int, int64_t, int, int, float, int, float *, int64_t) \\
                             __attribute__((weak))
ENTRY(paged_decode_bf16);
ENTRY(paged_decode_f16);
#include "paged_decode.c"
int sweep(const float *q, const void *cache, int64_t layer_stride, int64_t kv_stride, int layers, int calls,
          const int64_t *tables, const int64_t *lens, float *out, int batch, int heads, int kv_heads, int head_dim,
          int64_t num_blocks, int block_size, int max_blocks, float scale, int threads, float *scratch,
          int64_t max_len, int kind) {
    for (int c = 0; c < calls; c++) {
        int failed;
        if (kind == 0) {
            const float *k = (const float *)cache + (c % layers) * layer_stride;
            failed = paged_decode_f32(q, k, k + kv_stride, tables, lens, out, batch, heads, kv_heads, head_dim,
                                      num_blocks, block_size, max_blocks, scale, threads, scratch, max_len);
        } else {
            const uint16_t *k = (const uint16_t *)cache + (c % layers) * layer_stride;
            int (*kernel)(const float *, const uint16_t *, const uint16_t *, const int64_t *, const int64_t *,
                          float *, int, int, int, int, int64_t, int, int, float, int, float *, int64_t) =
                kind == 1 ? paged_decode_bf16 : paged_decode_f16;
            if (!kernel) return 2; /* a kernel version without this entry point */
            failed = kernel(
                q, k, k + kv_stride, tables, lens, out, batch, heads, kv_heads, head_dim, num_blocks, block_size,
                max_blocks, scale, threads, scratch, max_len);
        }
        if (failed) return 1;
    }
    return 0;
}
"""


def build(src: Path) -> ctypes.CDLL:
    driver = src.with_name("driver.c")
    driver.write_text(DRIVER)
    lib = src.with_suffix(".so")
    subprocess.run(["gcc", *FLAGS, str(driver), "-o", str(lib), "-lm"], check=True)
    return ctypes.CDLL(str(lib))


def ptr(a: np.ndarray) -> int:
    return a.ctypes.data


class Attention:
    """One decode step's attention over all layers: batch sequences of `context` tokens, a layer per call."""

    def __init__(self, batch: int, context: int, rng: np.random.Generator, layers: int = LAYERS, threads: int = 2
                 ) -> None:
        per_seq = -(-context // BLOCK)
        self.blocks = batch * per_seq + 8
        # [layers, 2, kv_heads, blocks, block, head_dim], as runner.py allocates it
        self.cache = rng.standard_normal((layers, 2, KV_HEADS, self.blocks, BLOCK, HEAD_DIM), np.float32)
        self.narrow: dict[str, np.ndarray] = {}  # 16-bit copies of the cache, made when a side asks for one
        self.tables = rng.permutation(self.blocks)[: batch * per_seq].reshape(batch, per_seq).astype(np.int64)
        self.lens = np.full(batch, context, np.int64)
        self.q = rng.standard_normal((batch, HEADS, HEAD_DIM), np.float32)
        self.out = np.zeros_like(self.q)
        self.scratch = np.zeros(threads * (HEADS // KV_HEADS) * context, np.float32)
        self.batch, self.context, self.per_seq = batch, context, per_seq
        self.layers, self.threads = layers, threads

    def cache_of(self, dtype: str) -> np.ndarray:
        if dtype == "float32":
            return self.cache
        if dtype not in self.narrow:
            if dtype == "float16":
                self.narrow[dtype] = self.cache.astype(np.float16).view(np.uint16)
            else:  # bfloat16: the top half of each float32, rounded to nearest even
                bits = self.cache.view(np.uint32)
                self.narrow[dtype] = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        return self.narrow[dtype]

    def sweep(self, lib: ctypes.CDLL, dtype: str = "float32") -> None:
        """A step's calls, each on the next layer's cache (fewer layers: warmer caches)."""
        cache = self.cache_of(dtype)
        layer_stride, kv_stride = cache[0].size, cache[0, 0].size
        failed = lib.sweep(P(ptr(self.q)), P(ptr(cache)), I64(layer_stride), I64(kv_stride), self.layers, LAYERS,
                           P(ptr(self.tables)), P(ptr(self.lens)), P(ptr(self.out)), self.batch, HEADS, KV_HEADS,
                           HEAD_DIM, I64(self.blocks), BLOCK, self.per_seq, F32(HEAD_DIM**-0.5), self.threads,
                           P(ptr(self.scratch)), I64(self.context), KINDS[dtype])
        if failed:
            raise SystemExit("this kernel version has no 16-bit entry point" if failed == 2
                             else "the kernel refused the shape")

    def result(self, lib: ctypes.CDLL, dtype: str = "float32") -> np.ndarray:
        self.sweep(lib, dtype)
        return self.out.copy()

    def bytes_read(self, dtype: str = "float32") -> int:
        return LAYERS * 2 * self.batch * KV_HEADS * self.context * HEAD_DIM * (4 if dtype == "float32" else 2)

    def label(self) -> str:
        return f"attention b={self.batch} ctx={self.context} layers={self.layers} threads={self.threads}"


def ab(case: Attention, a: ctypes.CDLL, b: ctypes.CDLL, reps: int, a_cache: str = "float32",
       b_cache: str = "float32") -> dict:
    tolerance = (1e-4, 1e-5) if a_cache == b_cache else (2e-2, 2e-2)  # a 16-bit copy: its rounding
    if not np.allclose(case.result(a, a_cache), case.result(b, b_cache), rtol=tolerance[0], atol=tolerance[1]):
        raise SystemExit(f"{case.label()}: a and b disagree")
    times: dict[str, list[float]] = {"a": [], "b": []}
    sides = {"a": (a, a_cache), "b": (b, b_cache)}
    for rep in range(reps):
        for side in ("a", "b") if rep % 2 == 0 else ("b", "a"):
            lib, dtype = sides[side]
            start = time.perf_counter()
            case.sweep(lib, dtype)
            times[side].append(time.perf_counter() - start)
    a_ms, b_ms = (statistics.median(times[s]) * 1e3 for s in "ab")
    return {"case": case.label(), "a_ms": a_ms, "b_ms": b_ms, "b/a": b_ms / a_ms,
            "a_GBps": case.bytes_read(a_cache) / a_ms / 1e6, "b_GBps": case.bytes_read(b_cache) / b_ms / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", help="a git revision or a file (default: HEAD)")
    parser.add_argument("--b", help="a git revision or a file (default: the working tree)")
    parser.add_argument("--batch", default="1,8,32", help="sequences per step")
    parser.add_argument("--context", type=int, default=192, help="tokens of context per sequence")
    parser.add_argument("--layers", type=int, default=LAYERS, help="distinct layer caches (1 and a small batch: hot)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--a-cache", default="float32", choices=list(KINDS), help="side a's cache dtype")
    parser.add_argument("--b-cache", default="float32", choices=list(KINDS), help="side b's cache dtype")
    args = parser.parse_args()
    name = "paged_decode"
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        a = build(source(args.a, name, Path(tmp) / "a"))
        b = build(source(args.b or str(KERNELS / f"{name}.c"), name, Path(tmp) / "b"))
        cases = [Attention(int(n), args.context, rng, args.layers, args.threads) for n in args.batch.split(",")]
        print(describe_machine(machine()))
        print(f"a: {args.a or 'HEAD'}, {args.a_cache} cache; b: {args.b or 'working tree'}, {args.b_cache} cache")
        print("| case | a ms | b ms | b/a | a GB/s | b GB/s |\n|---|---|---|---|---|---|")
        for case in cases:
            r = ab(case, a, b, args.reps, args.a_cache, args.b_cache)
            print(f"| {r['case']} | {r['a_ms']:.2f} | {r['b_ms']:.2f} | {r['b/a']:.3f} | {r['a_GBps']:.1f} "
                  f"| {r['b_GBps']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
