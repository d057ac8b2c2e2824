/* Weight-streaming GEMM for the linear layers of a decoder on the CPU: out[M, N] = x[M, K] W[N, K]^T (+ bias)
 * (+ other | SwiGLU), float32 or bfloat16 weights, float32 accumulation.
 *
 * Why: a decode step reads every weight once for a handful of rows, so a linear layer costs its weight bytes over the
 * memory bandwidth. The weights are packed at load into tiles of 64 output columns, each tile one contiguous stream
 * (float32: [tiles][K][64]; bfloat16: [tiles][K/2][64][2], the pair layout of vdpbf16ps), and a thread streams its
 * tiles front to back while every row of x (up to MR at a time, broadcast from L1) is multiplied against the same
 * loaded vectors. Larger M loops over MR-row chunks per tile while the tile sits in L2.
 * SwiGLU layers pack 32 gate and 32 up columns per tile, so a tile yields 32 outputs silu(gate) * up directly.
 *
 * The tile kernels and epilogue are per instruction set (-march=native at build time): gemm_avx512.h (float32 on
 * AVX-512, bfloat16 on AVX-512-BF16) or gemm_avx2.h (AVX2 + FMA: float32, and bfloat16 split into float32 in
 * registers); gemm_available() says which dtypes this build runs. Without either, callers keep oneDNN.
 */
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define TILE 64
#define MR 6

enum { EPI_NONE = 0, EPI_ADD = 1, EPI_SWIGLU = 2 };

int gemm_available(int bf16) {
#if defined(__AVX512BF16__)
    return 1;
#elif defined(__AVX512F__)
    return !bf16;
#elif defined(__AVX2__) && defined(__FMA__)
    (void)bf16;
    return 1;
#else
    (void)bf16;
    return 0;
#endif
}

#if defined(__AVX512F__)
#include "gemm_avx512.h"
#elif defined(__AVX2__) && defined(__FMA__)
#include "gemm_avx2.h"
#endif

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))

/* x [M, K] (row stride ldx), packed weight of `tiles` tiles, bias [tiles * TILE] in packed column order (or NULL),
 * other [M, n_out] (row stride ldo; EPI_ADD), out [M, n_out] (row stride ldout). Returns nonzero when this build
 * cannot run the dtype. */
int gemm(const void *x, int64_t ldx, const void *w, const float *bias, const void *other, int64_t ldo, void *out,
         int64_t ldout, int64_t m_len, int64_t k_len, int64_t tiles, int64_t n_out, int kind, int bf16, int threads) {
    if (!gemm_available(bf16) || (bf16 && k_len % 2)) return 1;
    const size_t elem = bf16 ? 2 : 4;
    const int64_t tile_elems = k_len * TILE;
    const int chunk = row_chunk(bf16);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        float acc[MR][TILE];
        const char *wt = (const char *)w + (size_t)t * tile_elems * elem;
        const int64_t col0 = kind == EPI_SWIGLU ? t * (TILE / 2) : t * TILE;
        for (int64_t m0 = 0; m0 < m_len; m0 += chunk) {
            const int rows = m_len - m0 < chunk ? (int)(m_len - m0) : chunk;
            tile_rows((const char *)x + m0 * ldx * elem, ldx, wt, k_len, acc, rows, bf16);
            epilogue(acc, rows, bias ? bias + t * TILE : NULL, other ? (const char *)other + m0 * ldo * elem : NULL,
                     ldo, (char *)out + m0 * ldout * elem, ldout, col0, n_out, kind, bf16);
        }
    }
    return 0;
}

#else  /* no AVX-512 or AVX2: callers keep oneDNN */

int gemm(const void *x, int64_t ldx, const void *w, const float *bias, const void *other, int64_t ldo, void *out,
         int64_t ldout, int64_t m_len, int64_t k_len, int64_t tiles, int64_t n_out, int kind, int bf16, int threads) {
    return 1;
}

#endif
