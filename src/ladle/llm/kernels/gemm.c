/* Weight-streaming GEMM for the linear layers of a decoder on the CPU: out[M, N] = x[M, K] W[N, K]^T (+ bias)
 * (+ other | SwiGLU), float32 or bfloat16 weights, float32 accumulation.
 *
 * Why: a decode step reads every weight once for a handful of rows, so a linear layer costs its weight bytes over the
 * memory bandwidth. The weights are packed at load into tiles of TILE output columns (64 on AVX-512, 16 on AVX2),
 * each tile one contiguous stream (float32: [tiles][K][TILE]; bfloat16: [tiles][K/2][TILE][2], the pair layout of
 * vdpbf16ps), and a thread streams its tiles front to back while every row of x (up to MR at a time, broadcast from
 * L1) is multiplied against the same loaded vectors. Larger M loops over MR-row chunks per tile while the tile sits in
 * L2. SwiGLU layers pack TILE/2 gate and TILE/2 up columns per tile, so a tile yields TILE/2 outputs
 * silu(gate) * up directly.
 *
 * int8 weights (gemm_q8, AVX2 only so far) are packed in k-pairs like bfloat16's and multiplied against x
 * quantized to int16 per row, in integer multiply-adds (gemm_avx2.h: tile_q8); each tile's sums are scaled per column
 * and per row before the epilogue.
 *
 * The tile kernels and epilogue are per instruction set (-march=native at build time): gemm_avx512.h (float32 on
 * AVX-512, bfloat16 on AVX-512-BF16) or gemm_avx2.h (AVX2 + FMA: float32, and bfloat16 split into float32 in
 * registers); gemm_available() says which dtypes this build runs. Without either, callers keep oneDNN.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

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

/* TILE: output columns per packed tile, the instruction set's (gemm_tile() tells the packing code) */
#if defined(__AVX512F__)
#define TILE 64
#include "gemm_avx512.h"
#elif defined(__AVX2__) && defined(__FMA__)
#define TILE 16
#include "gemm_avx2.h"
#else
#define TILE 64
#endif

int gemm_tile(void) { return TILE; }

/* whether int8 and int4 weights run here (gemm_q8, gemm_q4): the AVX2 build's kernels; AVX-512 hosts keep fbgemm's
 * int8 (VNNI) and torch's int4 kernel */
int gemm_q8_available(void) {
#if defined(LADLE_GEMM_Q8)
    return 1;
#else
    return 0;
#endif
}

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))

/* bfloat16 x [M, K] (row stride ldx) as a float32 [M, K] copy (NULL when out of memory) */
static float *widened(const void *x, int64_t ldx, int64_t m_len, int64_t k_len, int threads) {
    float *wide = (float *)malloc((size_t)(m_len ? m_len : 1) * k_len * sizeof(float));
    if (!wide) return NULL;
    /* a decode step's few rows are widened in well under the cost of waking the OpenMP team */
#pragma omp parallel for num_threads(threads) schedule(static) if (m_len * k_len >= (1 << 16))
    for (int64_t m = 0; m < m_len; m++) {
        const uint16_t *row = (const uint16_t *)x + m * ldx;
        for (int64_t k = 0; k < k_len; k++) {
            uint32_t bits = (uint32_t)row[k] << 16;
            memcpy(wide + m * k_len + k, &bits, sizeof bits);
        }
    }
    return wide;
}

/* x [M, K] (row stride ldx), packed weight of `tiles` tiles, bias [tiles * TILE] in packed column order (or NULL),
 * other [M, n_out] (row stride ldo; EPI_ADD), out [M, n_out] (row stride ldout), weights of x's dtype. Returns
 * nonzero when this build cannot run the dtype (1) or memory ran out (2). */
static int gemm_run(const void *x, int64_t ldx, const void *w, const float *bias, const void *other, int64_t ldo,
                    void *out, int64_t ldout, int64_t m_len, int64_t k_len, int64_t tiles, int64_t n_out, int kind,
                    int bf16, int threads) {
    if (!gemm_available(bf16) || (bf16 && k_len % 2)) return 1;
    const size_t elem = bf16 ? 2 : 4;
    const int64_t tile_elems = k_len * TILE;
    const int chunk = row_chunk(bf16);
    float *wide = widen_x(bf16) ? widened(x, ldx, m_len, k_len, threads) : NULL;
    if (widen_x(bf16) && !wide) return 2;
    const size_t x_elem = wide ? 4 : elem;
    const int64_t x_ld = wide ? k_len : ldx;
    const char *xs = wide ? (const char *)wide : (const char *)x;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        float acc[MR][TILE];
        const char *wt = (const char *)w + (size_t)t * tile_elems * elem;
        const int64_t col0 = kind == EPI_SWIGLU ? t * (TILE / 2) : t * TILE;
        for (int64_t m0 = 0; m0 < m_len; m0 += chunk) {
            const int rows = m_len - m0 < chunk ? (int)(m_len - m0) : chunk;
            tile_rows(xs + m0 * x_ld * x_elem, x_ld, wt, k_len, acc, rows, bf16);
            epilogue(acc, rows, bias ? bias + t * TILE : NULL, other ? (const char *)other + m0 * ldo * elem : NULL,
                     ldo, (char *)out + m0 * ldout * elem, ldout, col0, n_out, kind, bf16);
        }
    }
    free(wide);
    return 0;
}

int gemm(const void *x, int64_t ldx, const void *w, const float *bias, const void *other, int64_t ldo, void *out,
         int64_t ldout, int64_t m_len, int64_t k_len, int64_t tiles, int64_t n_out, int kind, int bf16, int threads) {
    return gemm_run(x, ldx, w, bias, other, ldo, out, ldout, m_len, k_len, tiles, n_out, kind, bf16, threads);
}

#if defined(LADLE_GEMM_Q8)
/* x [M, K] as int16 rows of k_pad (even) values and their scales (quantize_row_i16); NULL when out of memory */
static int16_t *quantized_x(const void *x, int64_t ldx, int64_t m_len, int64_t k_len, int64_t k_pad, int bf16,
                            int threads, float **x_scale) {
    const size_t elem = bf16 ? 2 : 4;
    const int64_t rows = m_len ? m_len : 1;
    int16_t *xq = (int16_t *)malloc((size_t)rows * k_pad * sizeof(int16_t));
    *x_scale = (float *)malloc((size_t)rows * sizeof(float));
    if (!xq || !*x_scale) {
        free(xq);
        free(*x_scale);
        return NULL;
    }
#pragma omp parallel for num_threads(threads) schedule(static) if (m_len * k_len >= (1 << 16))
    for (int64_t m = 0; m < m_len; m++)
        (*x_scale)[m] = quantize_row_i16((const char *)x + m * ldx * elem, k_len, bf16, xq + m * k_pad, k_pad);
    return xq;
}
#endif

/* gemm over int8 weights packed in k-pairs ([tiles][K_pad/2][TILE][2], K_pad = K rounded up to even, zeros past K)
 * with per-column float32 `scales` [tiles * TILE]; x is quantized to int16 per row first (tile_rows_q8) */
int gemm_q8(const void *x, int64_t ldx, const int8_t *w, const float *scales, const float *bias, const void *other,
            int64_t ldo, void *out, int64_t ldout, int64_t m_len, int64_t k_len, int64_t tiles, int64_t n_out,
            int kind, int bf16, int threads) {
#if defined(LADLE_GEMM_Q8)
    const size_t elem = bf16 ? 2 : 4;
    const int64_t k_pad = k_len + (k_len & 1);
    float *x_scale;
    int16_t *xq = quantized_x(x, ldx, m_len, k_len, k_pad, bf16, threads, &x_scale);
    if (!xq) return 2;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        float acc[MR][TILE];
        const int8_t *wt = w + (size_t)t * k_pad * TILE;
        const int64_t col0 = kind == EPI_SWIGLU ? t * (TILE / 2) : t * TILE;
        for (int64_t m0 = 0; m0 < m_len; m0 += MR) {
            const int rows = m_len - m0 < MR ? (int)(m_len - m0) : MR;
            if (m_len >= Q8_HALVES_FROM)
                tile_rows_q8_halves(xq + m0 * k_pad, k_pad, wt, k_pad / 2, scales + t * TILE, x_scale + m0, acc, rows);
            else
                tile_rows_q8(xq + m0 * k_pad, k_pad, wt, k_pad / 2, scales + t * TILE, x_scale + m0, acc, rows);
            epilogue(acc, rows, bias ? bias + t * TILE : NULL, other ? (const char *)other + m0 * ldo * elem : NULL,
                     ldo, (char *)out + m0 * ldout * elem, ldout, col0, n_out, kind, bf16);
        }
    }
    free(xq);
    free(x_scale);
    return 0;
#else
    return 1;
#endif
}

/* gemm over int4 weights: codes q in 0..15, w = (q - 8) * scale + zero per group of `group` inputs (a multiple of 32
 * dividing K), tiles [tiles][K/4][32] bytes (four k per 32-byte block, laid out for gemm_avx2.h's tile_q4: low
 * nibbles the first k-pair, high nibbles the second), scales and zeros bfloat16 [tiles][K / group][TILE]; x quantized
 * to int16 per row as for gemm_q8 (tile_rows_q4) */
int gemm_q4(const void *x, int64_t ldx, const uint8_t *w, const uint16_t *scales, const uint16_t *zeros, int64_t group,
            const float *bias, const void *other, int64_t ldo, void *out, int64_t ldout, int64_t m_len,
            int64_t k_len, int64_t tiles, int64_t n_out, int kind, int bf16, int threads) {
#if defined(LADLE_GEMM_Q8)
    if (group <= 0 || group % 32 || k_len % group) return 1;
    const size_t elem = bf16 ? 2 : 4;
    const int64_t groups = k_len / group, rows = m_len ? m_len : 1;
    float *x_scale;
    int16_t *xq = quantized_x(x, ldx, m_len, k_len, k_len, bf16, threads, &x_scale);
    if (!xq) return 2;
    float *xsum = (float *)malloc((size_t)rows * groups * sizeof(float));
    int32_t *xsum8 = (int32_t *)malloc((size_t)rows * groups * sizeof(int32_t));
    if (!xsum || !xsum8) {
        free(xq);
        free(x_scale);
        free(xsum);
        free(xsum8);
        return 2;
    }
#pragma omp parallel for num_threads(threads) schedule(static) if (m_len * k_len >= (1 << 16))
    for (int64_t m = 0; m < m_len; m++) /* each group's sum of x as the kernel sees it (its int16 values) */
        for (int64_t g = 0; g < groups; g++) {
            int64_t total = 0;
            for (int64_t k = g * group; k < (g + 1) * group; k++) total += xq[m * k_len + k];
            xsum[m * groups + g] = (float)total * x_scale[m];
            xsum8[m * groups + g] = (int32_t)(8 * total); /* |8 x 32767 x group| < 2^31 for groups up to 8191 */
        }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        float acc[MR][TILE];
        const uint8_t *wt = w + (size_t)t * (k_len / 2) * TILE;
        const uint16_t *st = scales + (size_t)t * groups * TILE, *zt = zeros + (size_t)t * groups * TILE;
        const int64_t col0 = kind == EPI_SWIGLU ? t * (TILE / 2) : t * TILE;
        for (int64_t m0 = 0; m0 < m_len; m0 += Q4_ROWS) {
            const int rows_now = m_len - m0 < Q4_ROWS ? (int)(m_len - m0) : Q4_ROWS;
            tile_rows_q4(xq + m0 * k_len, k_len, xsum + m0 * groups, xsum8 + m0 * groups, groups, wt, group / 4, st,
                         zt, x_scale + m0, acc, rows_now);
            epilogue(acc, rows_now, bias ? bias + t * TILE : NULL,
                     other ? (const char *)other + m0 * ldo * elem : NULL, ldo, (char *)out + m0 * ldout * elem, ldout,
                     col0, n_out, kind, bf16);
        }
    }
    free(xq);
    free(x_scale);
    free(xsum);
    free(xsum8);
    return 0;
#else
    return 1;
#endif
}

#else  /* no AVX-512 or AVX2: callers keep oneDNN */

int gemm(const void *x, int64_t ldx, const void *w, const float *bias, const void *other, int64_t ldo, void *out,
         int64_t ldout, int64_t m_len, int64_t k_len, int64_t tiles, int64_t n_out, int kind, int bf16, int threads) {
    return 1;
}

int gemm_q8(const void *x, int64_t ldx, const int8_t *w, const float *scales, const float *bias, const void *other,
            int64_t ldo, void *out, int64_t ldout, int64_t m_len, int64_t k_len, int64_t tiles, int64_t n_out,
            int kind, int bf16, int threads) {
    return 1;
}

int gemm_q4(const void *x, int64_t ldx, const uint8_t *w, const uint16_t *scales, const uint16_t *zeros, int64_t group,
            const float *bias, const void *other, int64_t ldo, void *out, int64_t ldout, int64_t m_len,
            int64_t k_len, int64_t tiles, int64_t n_out, int kind, int bf16, int threads) {
    return 1;
}

#endif
