/* Paged decode attention on the CPU: one query token per sequence attends over its cached keys and values, read in
 * place through its block table (no gather of the context into a contiguous copy).
 *
 * Cache layout per layer: [kv_heads, num_blocks, block_size, head_dim] (attention.py). Queries [B, heads, head_dim]
 * float32; query head h reads KV head h / group. Output [B, heads, head_dim] float32. Work item = (sequence, KV
 * head): its `group` query heads share every K/V row it loads. Two passes per item: scores (then softmax) into
 * per-thread scratch, then the probability-weighted sum of V. Compiled at first use by kernels/build.py with
 * -O3 -march=native. On AVX2 (and AVX-512) hosts with head_dim a multiple of 8, decode_item_simd runs both passes in
 * explicit vectors, eight rows' dot products at a time: 1.3-1.9x the plain loops below, which GCC vectorized one dot
 * product at a time (one dependent FMA chain and a horizontal sum per row; `#pragma omp simd` on them made code 6x
 * slower in float32). The plain loops serve every other case.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_GROUP 64
#define MAX_HEAD_DIM 256

static inline float bf16_to_f32(uint16_t x) {
    uint32_t bits = (uint32_t)x << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* The cache row at element `base` as float32: a pointer into the cache (float32), or `buf` filled once (bfloat16),
 * so that a row is converted once for all the query heads of its group. */
static inline __attribute__((always_inline)) const float *row_of(const void *cache, int64_t base, int head_dim,
                                                                 float *buf, const int bf16) {
    if (!bf16) return (const float *)cache + base;
    const uint16_t *src = (const uint16_t *)cache + base;
    for (int d = 0; d < head_dim; d++) buf[d] = bf16_to_f32(src[d]);
    return buf;
}

static inline __attribute__((always_inline)) void decode_item(
    const float *q, const void *k_cache, const void *v_cache, const int64_t *table, int64_t len, float *out,
    int group, int head_dim, int block_size, float scale, float *scores, const int bf16) {
    /* q/out: this item's `group` heads, [group, head_dim]; scores: [group, len] scratch; table: this sequence's
     * block ids. k/v_cache: this KV head's [num_blocks, block_size, head_dim]. */
    float maxes[MAX_GROUP], buf[MAX_HEAD_DIM];
    for (int g = 0; g < group; g++) maxes[g] = -FLT_MAX; /* finite: built with -ffast-math */
    int64_t t = 0;
    for (int64_t b = 0; t < len; b++) {
        int64_t first = table[b] * block_size;
        int n = (int)((len - t) < block_size ? (len - t) : block_size);
        for (int j = 0; j < n; j++, t++) {
            const float *k = row_of(k_cache, (first + j) * head_dim, head_dim, buf, bf16);
            for (int g = 0; g < group; g++) {
                const float *qg = q + g * head_dim;
                float dot = 0.0f;
                for (int d = 0; d < head_dim; d++) dot += qg[d] * k[d];
                dot *= scale;
                scores[g * len + t] = dot;
                if (dot > maxes[g]) maxes[g] = dot;
            }
        }
    }
    for (int g = 0; g < group; g++) {
        float *s = scores + g * len;
        float sum = 0.0f, m = maxes[g];
        for (int64_t i = 0; i < len; i++) {
            float e = expf(s[i] - m);
            s[i] = e;
            sum += e;
        }
        float inv = 1.0f / sum;
        for (int64_t i = 0; i < len; i++) s[i] *= inv;
    }
    float acc[MAX_GROUP * MAX_HEAD_DIM];
    memset(acc, 0, sizeof(float) * group * head_dim);
    t = 0;
    for (int64_t b = 0; t < len; b++) {
        int64_t first = table[b] * block_size;
        int n = (int)((len - t) < block_size ? (len - t) : block_size);
        for (int j = 0; j < n; j++, t++) {
            const float *v = row_of(v_cache, (first + j) * head_dim, head_dim, buf, bf16);
            for (int g = 0; g < group; g++) {
                float p = scores[g * len + t];
                float *a = acc + g * head_dim;
                for (int d = 0; d < head_dim; d++) a[d] += p * v[d];
            }
        }
    }
    memcpy(out, acc, sizeof(float) * group * head_dim);
}

#if defined(__AVX2__) && defined(__FMA__)
#include "simd_avx2.h"
#define DECODE_SIMD 1

/* Scores of rows[0, n) (n <= 8, consecutive rows of one block, `row_bytes` apart) against the scaled query qs: eight
 * dot products in eight independent FMA chains, summed across lanes together at the end (one dot at a time was a
 * single dependent chain plus a horizontal sum per row: the kernel ran at ~5 GB/s from L3). Rows past n repeat row
 * n - 1 (valid memory; their sums are dropped). */
static inline __attribute__((always_inline)) void dots8(const float *qs, const char *rows, int n, size_t row_bytes,
                                                        int head_dim, float *dst, const int bf16) {
    const char *r[8];
    for (int j = 0; j < 8; j++) r[j] = rows + (size_t)(j < n ? j : n - 1) * row_bytes;
    __m256 acc[8];
    for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
    const size_t elem = bf16 ? 2 : 4;
    for (int d = 0; d < head_dim; d += 8) {
        const __m256 qv = _mm256_loadu_ps(qs + d);
        for (int j = 0; j < 8; j++) acc[j] = _mm256_fmadd_ps(load8_full(r[j] + d * elem, bf16), qv, acc[j]);
    }
    float sums[8];
    _mm256_storeu_ps(sums, sum_lanes8(acc));
    memcpy(dst, sums, sizeof(float) * n);
}

/* s[0, len) = exp(s - max s); returns their sum */
static inline float softmax_numerators(float *s, int64_t len) {
    __m256 vmax = _mm256_set1_ps(-FLT_MAX);
    int64_t i = 0;
    for (; i + 8 <= len; i += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(s + i));
    float lanes[8], m = -FLT_MAX, sum = 0.0f;
    _mm256_storeu_ps(lanes, vmax);
    for (int j = 0; j < 8; j++) m = lanes[j] > m ? lanes[j] : m;
    for (int64_t t = i; t < len; t++) m = s[t] > m ? s[t] : m;
    const __m256 vm = _mm256_set1_ps(m);
    __m256 vsum = _mm256_setzero_ps();
    for (i = 0; i + 8 <= len; i += 8) {
        __m256 e = exp_nonpositive8(_mm256_sub_ps(_mm256_loadu_ps(s + i), vm));
        _mm256_storeu_ps(s + i, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    _mm256_storeu_ps(lanes, vsum);
    for (int j = 0; j < 8; j++) sum += lanes[j];
    for (; i < len; i++) {
        s[i] = expf(s[i] - m);
        sum += s[i];
    }
    return sum;
}

/* out[0, 8 * nv) = inv * sum_t p[t] V[t][dc, dc + 8 * nv): nv accumulators held in registers over the whole context */
static inline __attribute__((always_inline)) void weighted_v(const char *v_cache, const int64_t *table, int64_t len,
                                                             int block_size, size_t row_bytes, int dc, const float *p,
                                                             float inv, float *out, const int nv, const int bf16) {
    __m256 acc[8];
    for (int i = 0; i < nv; i++) acc[i] = _mm256_setzero_ps();
    const size_t elem = bf16 ? 2 : 4;
    int64_t t = 0;
    for (int64_t b = 0; t < len; b++) {
        const char *row = v_cache + (size_t)table[b] * block_size * row_bytes + dc * elem;
        const int n = (int)((len - t) < block_size ? (len - t) : block_size);
        for (int j = 0; j < n; j++, t++, row += row_bytes) {
            const __m256 pv = _mm256_broadcast_ss(p + t);
            for (int i = 0; i < nv; i++) acc[i] = _mm256_fmadd_ps(load8_full(row + i * 8 * elem, bf16), pv, acc[i]);
        }
    }
    const __m256 vinv = _mm256_set1_ps(inv);
    for (int i = 0; i < nv; i++) _mm256_storeu_ps(out + i * 8, _mm256_mul_ps(acc[i], vinv));
}

static void weighted_v_any(const char *v_cache, const int64_t *table, int64_t len, int block_size, size_t row_bytes,
                           int dc, const float *p, float inv, float *out, int nv, const int bf16) {
#define WEIGHTED_V(N) weighted_v(v_cache, table, len, block_size, row_bytes, dc, p, inv, out, N, bf16)
    switch (nv) {
        case 1: WEIGHTED_V(1); return;
        case 2: WEIGHTED_V(2); return;
        case 3: WEIGHTED_V(3); return;
        case 4: WEIGHTED_V(4); return;
        case 5: WEIGHTED_V(5); return;
        case 6: WEIGHTED_V(6); return;
        case 7: WEIGHTED_V(7); return;
        default: WEIGHTED_V(8); return;
    }
#undef WEIGHTED_V
}

/* decode_item for head_dim a multiple of 8, in AVX2 vectors: the same two passes (scores over K, then V weighted by
 * the probabilities), each with independent accumulators in registers and a vectorized exp; the softmax's 1/sum is
 * applied to the output instead of to every probability. */
static inline __attribute__((always_inline)) void decode_item_simd(
    const float *q, const void *k_cache, const void *v_cache, const int64_t *table, int64_t len, float *out,
    int group, int head_dim, int block_size, float scale, float *scores, const int bf16) {
    float qs[MAX_GROUP * MAX_HEAD_DIM];
    for (int i = 0; i < group * head_dim; i++) qs[i] = q[i] * scale;
    const size_t row_bytes = (size_t)head_dim * (bf16 ? 2 : 4);
    const size_t block_bytes = (size_t)block_size * row_bytes;
    int64_t t = 0;
    for (int64_t b = 0; t < len; b++) {
        const char *block = (const char *)k_cache + (size_t)table[b] * block_bytes;
        const int n = (int)((len - t) < block_size ? (len - t) : block_size);
        for (int j = 0; j < n; j += 8) {
            const int rows = n - j < 8 ? n - j : 8;
            for (int g = 0; g < group; g++)
                dots8(qs + g * head_dim, block + j * row_bytes, rows, row_bytes, head_dim, scores + g * len + t + j,
                      bf16);
        }
        t += n;
    }
    for (int g = 0; g < group; g++) {
        const float inv = 1.0f / softmax_numerators(scores + g * len, len);
        for (int dc = 0; dc < head_dim; dc += 64) {
            const int nv = (head_dim - dc < 64 ? head_dim - dc : 64) / 8;
            weighted_v_any((const char *)v_cache, table, len, block_size, row_bytes, dc, scores + g * len, inv,
                           out + g * head_dim + dc, nv, bf16);
        }
    }
}
#endif

static inline __attribute__((always_inline)) int decode(
    const float *q, const void *k_cache, const void *v_cache, const int64_t *tables, const int64_t *lens, float *out,
    int batch, int heads, int kv_heads, int head_dim, int64_t num_blocks, int block_size, int max_blocks,
    float scale, int threads, float *scratch, int64_t max_len, const int bf16) {
    int group = heads / kv_heads;
    if (group > MAX_GROUP || head_dim > MAX_HEAD_DIM || heads % kv_heads) return 1;
    int64_t per_head = num_blocks * block_size * head_dim; /* elements of one KV head's cache */
    int items = batch * kv_heads;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int item = 0; item < items; item++) {
        int seq = item / kv_heads, h = item % kv_heads;
        int64_t off = ((int64_t)seq * heads + (int64_t)h * group) * head_dim;
        const size_t elem = bf16 ? 2 : 4;
        const char *kc = (const char *)k_cache + (size_t)h * per_head * elem;
        const char *vc = (const char *)v_cache + (size_t)h * per_head * elem;
#ifdef _OPENMP
        extern int omp_get_thread_num(void);
        float *scores = scratch + (int64_t)omp_get_thread_num() * group * max_len;
#else
        float *scores = scratch;
#endif
#ifdef DECODE_SIMD
        if (head_dim % 8 == 0) {
            decode_item_simd(q + off, kc, vc, tables + (int64_t)seq * max_blocks, lens[seq], out + off, group,
                             head_dim, block_size, scale, scores, bf16);
            continue;
        }
#endif
        decode_item(q + off, kc, vc, tables + (int64_t)seq * max_blocks, lens[seq], out + off, group, head_dim,
                    block_size, scale, scores, bf16);
    }
    return 0;
}

int paged_decode_f32(const float *q, const float *k_cache, const float *v_cache, const int64_t *tables,
                     const int64_t *lens, float *out, int batch, int heads, int kv_heads, int head_dim,
                     int64_t num_blocks, int block_size, int max_blocks, float scale, int threads, float *scratch,
                     int64_t max_len) {
    return decode(q, k_cache, v_cache, tables, lens, out, batch, heads, kv_heads, head_dim, num_blocks, block_size,
                  max_blocks, scale, threads, scratch, max_len, 0);
}

int paged_decode_bf16(const float *q, const uint16_t *k_cache, const uint16_t *v_cache, const int64_t *tables,
                      const int64_t *lens, float *out, int batch, int heads, int kv_heads, int head_dim,
                      int64_t num_blocks, int block_size, int max_blocks, float scale, int threads, float *scratch,
                      int64_t max_len) {
    return decode(q, k_cache, v_cache, tables, lens, out, batch, heads, kv_heads, head_dim, num_blocks, block_size,
                  max_blocks, scale, threads, scratch, max_len, 1);
}
