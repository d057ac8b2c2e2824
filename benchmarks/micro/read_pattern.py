"""What bounds decode attention over a paged KV cache on this host (issue 16): DRAM read bandwidth by access pattern,
and the issue rate of the vector instructions a kernel could use. A small C probe, compiled here with -O3
-march=native -fopenmp, run on 2 threads over huge-page-advised memory, as the server's KV cache is.

    .venv/bin/python benchmarks/micro/read_pattern.py [--mb 144] [--threads 2]

Patterns: one 144 MB sweep (a 32-sequence step's K/V of the benchmark model in bfloat16) read as chunks of 2 KB to
64 MB at random chunk-aligned places (a 16-token block of one KV head is 2 KB in bfloat16 at head_dim 64), and as 2 KB
chunks read 1, 2, 4 or 8 at a time, line by line (several streams in flight). Every sweep starts cold: 1 GB of other
memory is read in between. Rates: independent vfmadd (256- and 512-bit) and vdpbf16ps per second on one thread.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "llm"))
from quant import describe_machine, machine  # noqa: E402 (CPU model and flags beside every figure)

PROBE = r"""
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/mman.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
static char *buf;
static size_t total, sweep;
static void evict(void) { for (size_t o = total / 2; o < total; o += 64) ((volatile char *)buf)[o]; }
/* n chunks of `chunk` bytes at idx[] * chunk, `ways` chunks read line by line together; best of 5 cold sweeps */
static double read_rate(size_t chunk, const size_t *idx, size_t n, int ways, int threads) {
    double best = 1e9;
    for (int rep = 0; rep < 5; rep++) {
        evict();
        double t0 = now();
        float sink = 0;
#pragma omp parallel num_threads(threads) reduction(+ : sink)
        {
            __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps(); /* 256-bit: AVX2 hosts too */
#pragma omp for schedule(static)
            for (size_t i = 0; i < n / ways; i++) {
                const char *p[8];
                for (int w = 0; w < ways; w++) p[w] = buf + idx[i * ways + w] * chunk;
                for (size_t o = 0; o < chunk; o += 128)
                    for (int w = 0; w < ways; w++) {
                        a = _mm256_add_ps(a, _mm256_add_ps(_mm256_loadu_ps((const float *)(p[w] + o)),
                                                           _mm256_loadu_ps((const float *)(p[w] + o + 32))));
                        b = _mm256_add_ps(b, _mm256_add_ps(_mm256_loadu_ps((const float *)(p[w] + o + 64)),
                                                           _mm256_loadu_ps((const float *)(p[w] + o + 96))));
                    }
            }
            sink += a[0] + b[0];
        }
        double t = now() - t0;
        if (t < best) best = t;
        if (sink == 12345.0f) puts("");
    }
    return (double)(n / ways * ways) * chunk / best / 1e9;
}
int main(int argc, char **argv) {
    sweep = (size_t)atol(argv[1]) << 20;
    const int threads = atoi(argv[2]);
    total = (size_t)2 << 30;
    buf = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    madvise(buf, total, MADV_HUGEPAGE);
    memset(buf, 1, total);
    const size_t chunks[] = {2048, 4096, 8192, 16384, 65536, (size_t)64 << 20};
    for (int c = 0; c < 6; c++) {
        size_t n = sweep / chunks[c], slots = total / 2 / chunks[c], *idx = malloc(n * sizeof *idx);
        for (size_t i = 0; i < n; i++) idx[i] = n * chunks[c] >= total / 2 ? i : ((size_t)rand() * 2654435761u) % slots;
        printf("chunk %zu 1 %.2f\n", chunks[c], read_rate(chunks[c], idx, n, 1, threads));
        free(idx);
    }
    size_t n = sweep / 2048, slots = total / 2 / 2048, *idx = malloc(n * sizeof *idx);
    for (size_t i = 0; i < n; i++) idx[i] = ((size_t)rand() * 2654435761u) % slots;
    for (int ways = 2; ways <= 8; ways *= 2)
        printf("chunk 2048 %d %.2f\n", ways, read_rate(2048, idx, n, ways, threads));
    const long iters = 100000000;
    /* `label`: 12 independent chains of `op` on vectors of type T (12 per loop: past any latency x ports) */
#define RATE(label, T, init, op)                                                                                    \
    {                                                                                                               \
        T v0 = init, v1 = init, v2 = init, v3 = init, v4 = init, v5 = init, v6 = init, v7 = init, v8 = init,        \
          v9 = init, v10 = init, v11 = init;                                                                        \
        double t0 = now();                                                                                          \
        for (long i = 0; i < iters; i++) {                                                                          \
            v0 = op(v0); v1 = op(v1); v2 = op(v2); v3 = op(v3); v4 = op(v4); v5 = op(v5);                           \
            v6 = op(v6); v7 = op(v7); v8 = op(v8); v9 = op(v9); v10 = op(v10); v11 = op(v11);                       \
            /* whole registers live: else the compiler computes only the lanes printed below, in scalars */         \
            __asm__("" : "+v"(v0), "+v"(v1), "+v"(v2), "+v"(v3), "+v"(v4), "+v"(v5));                               \
            __asm__("" : "+v"(v6), "+v"(v7), "+v"(v8), "+v"(v9), "+v"(v10), "+v"(v11));                             \
        }                                                                                                           \
        double t = now() - t0;                                                                                      \
        printf("rate %s %.2f %g\n", label, iters * 12 / t / 1e9,                                                    \
               v0[0] + v1[0] + v2[0] + v3[0] + v4[0] + v5[0] + v6[0] + v7[0] + v8[0] + v9[0] + v10[0] + v11[0]);   \
    }
#define FMA256(v) _mm256_fmadd_ps(v, _mm256_set1_ps(1.0001f), _mm256_set1_ps(0.999f))
    RATE("vfmadd-256", __m256, _mm256_set1_ps(1.0f), FMA256)
#if defined(__AVX512F__)
#define FMA512(v) _mm512_fmadd_ps(v, _mm512_set1_ps(1.0001f), _mm512_set1_ps(0.999f))
    RATE("vfmadd-512", __m512, _mm512_set1_ps(1.0f), FMA512)
#endif
#if defined(__AVX512BF16__)
#define DPBF16(v) _mm512_dpbf16_ps(v, (__m512bh)_mm512_set1_epi32(0x3f803f80), (__m512bh)_mm512_set1_epi32(0x3f003f00))
    RATE("vdpbf16ps-512", __m512, _mm512_set1_ps(1.0f), DPBF16)
#endif
    return 0;
}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=144, help="MB read per sweep")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print(describe_machine(machine()))
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "probe.c", Path(tmp) / "probe"
        src.write_text(PROBE)
        subprocess.run(["gcc", "-O3", "-march=native", "-fopenmp", str(src), "-o", str(exe)], check=True)
        print(f"reading {args.mb} MB per sweep on {args.threads} threads (2 GB allocated; ~15 s) ...", flush=True)
        lines = subprocess.run(
            [str(exe), str(args.mb), str(args.threads)], check=True, capture_output=True, text=True
        ).stdout.split("\n")
    print("\n| pattern | GB/s |\n|---|---:|")
    for line in lines:
        parts = line.split()
        if parts and parts[0] == "chunk":
            size, ways = int(parts[1]), int(parts[2])
            what = f"{size // 1024} KB chunks" if size < 1 << 20 else f"{size >> 20} MB sweeps (sequential)"
            print(f"| {what}{f', {ways} at a time' if ways > 1 else ''} | {float(parts[3]):.1f} |")
    print("\n| instruction (one thread, 12 independent chains) | G/s |\n|---|---:|")
    for line in lines:
        parts = line.split()
        if parts and parts[0] == "rate":
            print(f"| {parts[1]} | {float(parts[2]):.2f} |")


if __name__ == "__main__":
    main()
