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
#include <omp.h>

#include "fpmode.h"

#define MR 6
#define STREAM_AHEAD 4096 /* bytes of its own stream a tile's first chunk prefetches ahead (struct ahead) */
/* row chunks up to which tiles prefetch (decode-sized steps, up to 36 rows): measured faster there; at 256-512 rows
 * (prefill, compute-bound) a run on a contended box measured ~0.9x, so those keep the hardware prefetcher alone */
#define AHEAD_CHUNKS 6

enum { EPI_NONE = 0, EPI_ADD = 1, EPI_SWIGLU = 2 };

/* Software prefetching inside a tile kernel's k loop: `lines` 64-byte lines from `p`, spread evenly over the loop,
 * into L1 (`l1`) or L2. gemm.c's chunk_ahead says which. */
struct ahead {
    const char *p;
    int64_t lines;
    int l1;
};

/* Inside a k loop of `iters` iterations stepping by `step`: issue this iteration's share of `pf`'s lines (`due`
 * carries the remainder) */
#define PREFETCH_AHEAD(pf, due, step, iters)                      \
    do {                                                          \
        if ((pf).lines) {                                         \
            (due) += (pf).lines * (step);                         \
            while ((due) >= (iters)) {                            \
                if ((pf).l1) __builtin_prefetch((pf).p, 0, 3);    \
                else __builtin_prefetch((pf).p, 0, 2);            \
                (pf).p += 64;                                     \
                (due) -= (iters);                                 \
            }                                                     \
        }                                                         \
    } while (0)

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

/* What gemm_run's tiles share: x (float32 or bfloat16 rows; bfloat16 widened on AVX2), the epilogue's inputs, the
 * rows in `chunks` chunks of up to `chunk` rows. A full chunk first: chunk 0 computes while the tile streams in, so the
 * more rows it has, the more of the step's FMAs hide under the DRAM stream (8 rows split 4 + 4 ran ~0.85x as fast as
 * 6 + 2, benchmarks/RESULTS.md) */
struct gemm_job {
    const char *x;
    int64_t x_ld;
    size_t x_elem, elem;
    const void *w;
    const float *bias;
    const void *other;
    int64_t ldo;
    void *out;
    int64_t ldout, m_len, k_len, n_out, tiles, tile_bytes, chunks;
    int chunk, kind, bf16;
};

/* Chunk c's rows: chunk 0 as many as fit (see gemm_job), the rest of the rows shared evenly by the later chunks, so
 * that none is left with one or two rows (32 rows as 6 + 6 + 5 + 5 + 5 + 5, not 6 x 5 + 2): a 2-row chunk has four
 * accumulator chains, too few to cover the FMA latency. Real compiled decode steps at 32 sequences, one process,
 * alternating 40 times: 0.95x the time (pairwise median; quartiles 0.93-1.00), against 1.00x for an unchanged
 * 8-sequence control. */
static int chunk_rows(const struct gemm_job *j, int64_t c, int64_t m0) {
    if (c == 0) return (int)(j->m_len - m0 < j->chunk ? j->m_len - m0 : j->chunk);
    const int64_t rest = j->m_len - j->chunk, n = j->chunks - 1;
    return (int)(rest / n + (c - 1 < rest % n));
}

static void tile_epilogue(const struct gemm_job *j, int64_t t, float acc[MR][TILE], int rows, int64_t m0) {
    const int64_t col0 = j->kind == EPI_SWIGLU ? t * (TILE / 2) : t * TILE;
    epilogue(acc, rows, j->bias ? j->bias + t * TILE : NULL,
             j->other ? (const char *)j->other + m0 * j->ldo * j->elem : NULL, j->ldo,
             (char *)j->out + m0 * j->ldout * j->elem, j->ldout, col0, j->n_out, j->kind, j->bf16);
}

/* Where a chunk's kernel prefetches (struct ahead). Chunk 0 streams the tile from DRAM and, from 3 rows on, prefetches
 * its own stream STREAM_AHEAD bytes ahead into L1 (the hardware prefetcher alone left the loads waiting once the FMAs
 * took a real share of the time: 8 rows cost ~1.6x one row's time, ~1.4x with it). The later chunks read the tile from L2
 * and prefetch the next tile into L2 meanwhile, an equal share each; without that DRAM sat idle while they computed
 * (a step's GEMMs ran at ~75% of their hot-cache FLOP rate at 16-32 rows). Real compiled engine steps in one process,
 * with and without it alternating: decode at 32 sequences 0.90x the time (twice), at 8 0.91x and 1.00x. */
static struct ahead chunk_ahead(const char *tile, int64_t tile_bytes, int64_t c, int64_t chunks, int rows,
                                int last_tile) {
    const int64_t lines = tile_bytes / 64;
    if (chunks > AHEAD_CHUNKS) return (struct ahead){NULL, 0, 0};
    if (c == 0) return rows >= 3 ? (struct ahead){tile + STREAM_AHEAD, lines, 1} : (struct ahead){NULL, 0, 0};
    if (last_tile) return (struct ahead){NULL, 0, 0};
    const int64_t lo = lines * (c - 1) / (chunks - 1), hi = lines * c / (chunks - 1);
    return (struct ahead){tile + tile_bytes + lo * 64, hi - lo, 0};
}

/* What runs one tile's rows over k values [k0, k0 + k_len) of it: through the epilogue when `sum` is NULL, else its
 * float32 sums ([m_len][TILE]) into `sum` (a piece of a tile cut between threads, see run_share). `ctx`: the
 * path's own per-thread state. */
typedef void (*tile_fn)(const struct gemm_job *j, void *ctx, int64_t t, int64_t k0, int64_t k_len, float *sum);

/* Tile t (or a piece of it) chunk by chunk, each chunk through the epilogue or into `sum` */
static void tile_streamed(const struct gemm_job *j, void *ctx, int64_t t, int64_t k0, int64_t k_len, float *sum) {
    (void)ctx;
    float acc[MR][TILE];
    const char *wt = (const char *)j->w + t * j->tile_bytes + k0 * TILE * (int64_t)j->elem;
    const char *x = j->x + k0 * (int64_t)j->x_elem;
    int64_t m0 = 0;
    for (int64_t c = 0; c < j->chunks; c++) {
        const int rows = chunk_rows(j, c, m0);
        /* a piece's stream is part of a tile: it prefetches nothing (the next tile is another thread's) */
        const struct ahead pf = sum ? (struct ahead){NULL, 0, 0}
                                    : chunk_ahead(wt, j->tile_bytes, c, j->chunks, rows, t + 1 == j->tiles);
        tile_rows(x + m0 * j->x_ld * j->x_elem, j->x_ld, wt, k_len, acc, rows, j->bf16, pf);
        if (sum)
            memcpy(sum + m0 * TILE, acc, sizeof(float) * TILE * rows);
        else
            tile_epilogue(j, t, acc, rows, m0);
        m0 += rows;
    }
}

/* Balance: a layer's tiles rarely divide evenly over the threads (SmolLM-135M's qkv is 15 tiles, o and down 9), and
 * dealt whole, one thread runs an extra tile while the others wait at the end of the call. So where they do not
 * divide, the work is dealt as tiles x slices of KSLICE k values, an equal run of slices per thread; a tile cut between
 * threads is computed in pieces (partial sums over its k ranges), which the thread holding its first piece adds up
 * and puts through the epilogue after a barrier. */
#define KSLICE 32

static int balanced(const struct gemm_job *j, int threads) {
    return threads > 1 && j->m_len > 0 && j->tiles % threads && j->k_len % KSLICE == 0;
}

/* The pieces of a balanced job: per thread two slots, 0 for a tile begun by an earlier thread (its first tile), 1
 * for a tile it begins but does not finish (its last); `tiles` says which tile each holds (-1: none) */
struct pieces {
    float *sums; /* [threads][2][m_len][TILE] */
    int64_t *tiles;
};

static int pieces_alloc(struct pieces *p, const struct gemm_job *j, int threads) {
    p->sums = (float *)malloc(sizeof(float) * 2 * threads * (size_t)j->m_len * TILE);
    p->tiles = (int64_t *)malloc(sizeof(int64_t) * 2 * threads);
    if (p->sums && p->tiles) return 1;
    free(p->sums);
    free(p->tiles);
    return 0;
}

static void pieces_free(struct pieces *p) {
    free(p->sums);
    free(p->tiles);
}

/* This thread's share of the job through `fn`, inside the parallel region: whole tiles, an equal run of them, unless
 * `p` (allocated for at least the team's threads) is given and the team's tiles do not divide: then balanced (above),
 * ending with a barrier and the sums of the tiles whose first piece this thread holds */
static inline __attribute__((always_inline)) void share_of(const struct gemm_job *j, struct pieces *p, tile_fn fn,
                                                           void *ctx) {
    const int threads = omp_get_num_threads(), tid = omp_get_thread_num();
    if (!p || !balanced(j, threads)) {
        /* as OpenMP's static schedule deals them: the first tiles % threads threads one more */
        const int64_t q = j->tiles / threads, r = j->tiles % threads;
        const int64_t first = tid * q + (tid < r ? tid : r), count = q + (tid < r);
        for (int64_t t = first; t < first + count; t++) fn(j, ctx, t, 0, j->k_len, NULL);
        return;
    }
    const int64_t steps = j->k_len / KSLICE, units = j->tiles * steps;
    const int64_t lo = units * tid / threads, hi = units * (tid + 1) / threads;
    const size_t floats = (size_t)j->m_len * TILE;
    p->tiles[2 * tid] = p->tiles[2 * tid + 1] = -1;
    for (int64_t t = lo / steps; lo < hi && t * steps < hi; t++) {
        const int64_t a = (lo > t * steps ? lo : t * steps) - t * steps;
        const int64_t b = (hi < (t + 1) * steps ? hi : (t + 1) * steps) - t * steps;
        if (a == 0 && b == steps) {
            fn(j, ctx, t, 0, j->k_len, NULL);
            continue;
        }
        const int slot = 2 * tid + (a == 0);
        p->tiles[slot] = t;
        fn(j, ctx, t, a * KSLICE, (b - a) * KSLICE, p->sums + slot * floats);
    }
#pragma omp barrier
    const int64_t t = p->tiles[2 * tid + 1];
    if (t < 0) return;
    float *sum = p->sums + (2 * tid + 1) * floats;
    for (int u = tid + 1; u < threads; u++) { /* the later pieces of tile t */
        if (units * u / threads == units * (u + 1) / threads) continue; /* no share (fewer slices than threads) */
        if (p->tiles[2 * u] != t) break;
        const float *more = p->sums + 2 * u * floats;
        for (size_t i = 0; i < floats; i++) sum[i] += more[i];
    }
    tile_epilogue(j, t, (float(*)[TILE])sum, (int)j->m_len, 0);
}

/* share_of with subnormals flushed in this thread meanwhile (fpmode.h: float32 activations of them ran the GEMM ~60x
 * slower) */
static inline __attribute__((always_inline)) void run_share(const struct gemm_job *j, struct pieces *p, tile_fn fn,
                                                            void *ctx) {
    const unsigned mode = flush_subnormals();
    share_of(j, p, fn, ctx);
    restore_mode(mode);
}

#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__)
#include "gemm_amx.h"
#else
static int amx_runs(int bf16, int64_t k_len) { return 0; }
static int gemm_amx(const struct gemm_job *j, int threads) { return 1; }
static void amx_set(int on) {}
#endif

/* whether bfloat16 layers (with K a multiple of 32) run on AMX tiles here */
int gemm_amx_available(void) { return amx_runs(1, 32); }

/* AMX on or off for later calls (where it runs at all); returns gemm_amx_available() */
int gemm_use_amx(int on) {
    amx_set(on);
    return gemm_amx_available();
}

/* x [M, K] (row stride ldx), packed weight of `tiles` tiles, bias [tiles * TILE] in packed column order (or NULL),
 * other [M, n_out] (row stride ldo; EPI_ADD), out [M, n_out] (row stride ldout), weights of x's dtype. Returns
 * nonzero when this build cannot run the dtype (1) or memory ran out (2). */
static int gemm_run(const void *x, int64_t ldx, const void *w, const float *bias, const void *other, int64_t ldo,
                    void *out, int64_t ldout, int64_t m_len, int64_t k_len, int64_t tiles, int64_t n_out, int kind,
                    int bf16, int threads) {
    if (!gemm_available(bf16) || (bf16 && k_len % 2)) return 1;
    const size_t elem = bf16 ? 2 : 4;
    const int chunk = row_chunk(bf16);
    float *wide = widen_x(bf16) ? widened(x, ldx, m_len, k_len, threads) : NULL;
    if (widen_x(bf16) && !wide) return 2;
    const struct gemm_job job = {
        .x = wide ? (const char *)wide : (const char *)x, .x_ld = wide ? k_len : ldx, .x_elem = wide ? 4 : elem,
        .elem = elem, .w = w, .bias = bias, .other = other, .ldo = ldo, .out = out, .ldout = ldout, .m_len = m_len,
        .k_len = k_len, .n_out = n_out, .tiles = tiles, .tile_bytes = k_len * TILE * (int64_t)elem,
        .chunks = (m_len + chunk - 1) / chunk, .chunk = chunk, .kind = kind, .bf16 = bf16};
    if (amx_runs(bf16, k_len)) return gemm_amx(&job, threads);
    struct pieces pieces;
    const int balance = balanced(&job, threads);
    if (balance && !pieces_alloc(&pieces, &job, threads)) {
        free(wide);
        return 2;
    }
#pragma omp parallel num_threads(threads)
    run_share(&job, balance ? &pieces : NULL, tile_streamed, NULL);
    if (balance) pieces_free(&pieces);
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
    const int64_t chunks = (m_len + MR - 1) / MR;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        float acc[MR][TILE];
        const int8_t *wt = w + (size_t)t * k_pad * TILE;
        const int64_t col0 = kind == EPI_SWIGLU ? t * (TILE / 2) : t * TILE;
        for (int64_t m0 = 0; m0 < m_len; m0 += MR) {
            const int rows = m_len - m0 < MR ? (int)(m_len - m0) : MR;
            const struct ahead pf = chunk_ahead((const char *)wt, k_pad * TILE, m0 / MR, chunks, rows, t + 1 == tiles);
            tile_rows_q8(xq + m0 * k_pad, k_pad, wt, k_pad / 2, scales + t * TILE, x_scale + m0, acc, rows, pf);
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

int gemm_amx_available(void) { return 0; }

int gemm_use_amx(int on) { return 0; }

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
