/* Paged decode attention on the CPU: one query token per sequence attends over its cached keys and values, read in
 * place through its block table (no gather of the context into a contiguous copy).
 *
 * Cache layout per layer: [kv_heads, num_blocks, block_size, head_dim] (attention.py), float32, bfloat16 or float16
 * (the model's dtype, or --kv-cache-dtype: a 16-bit cache halves the bytes a decode step reads). Queries [B, heads,
 * head_dim] float32; query head h reads KV head h / group. Output [B, heads, head_dim] float32. Work item = (sequence,
 * KV head): its `group` query heads share every K/V row it loads. Two passes per item: scores (then softmax) into
 * per-thread scratch, then the probability-weighted sum of V. Compiled at first use by kernels/build.py with -O3
 * -march=native. On AVX2 (and AVX-512) hosts with head_dim a multiple of 8, decode_item_simd runs both passes in
 * explicit vectors, register-blocked over rows and query heads (an earlier form, eight rows' dot products at a time,
 * ran 1.3-1.9x the plain loops below, which GCC vectorized one dot product at a time: one dependent FMA chain and a
 * horizontal sum per row; `#pragma omp simd` on them made code 6x slower in float32). The plain loops serve every other
 * case.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_GROUP 64
#define MAX_HEAD_DIM 256

/* The cache's element types: float32, bfloat16 (the top half of a float32) or IEEE float16 (--kv-cache-dtype) */
enum { KV_F32 = 0, KV_BF16 = 1, KV_F16 = 2 };

static inline size_t kv_elem_bytes(const int kind) { return kind == KV_F32 ? 4 : 2; }

static inline float bf16_to_f32(uint16_t x) {
    uint32_t bits = (uint32_t)x << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* IEEE half to float in plain C, for the portable loops (the vector path converts with F16C) */
static inline float f16_to_f32(uint16_t x) {
    const uint32_t sign = (uint32_t)(x & 0x8000) << 16, exp = (x >> 10) & 0x1f, mant = x & 0x3ff;
    uint32_t bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (mant << 13); /* inf / nan */
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (mant << 13); /* rebias 15 -> 127 */
    } else {
        float f = (float)mant * 5.9604644775390625e-8f; /* subnormal (or zero): mant x 2^-24 */
        return sign ? -f : f;
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* The cache row at element `base` as float32: a pointer into the cache (float32), or `buf` filled once (16-bit
 * caches), so that a row is converted once for all the query heads of its group. */
static inline __attribute__((always_inline)) const float *row_of(const void *cache, int64_t base, int head_dim,
                                                                 float *buf, const int kind) {
    if (kind == KV_F32) return (const float *)cache + base;
    const uint16_t *src = (const uint16_t *)cache + base;
    for (int d = 0; d < head_dim; d++) buf[d] = kind == KV_BF16 ? bf16_to_f32(src[d]) : f16_to_f32(src[d]);
    return buf;
}

static inline __attribute__((always_inline)) void decode_item(
    const float *q, const void *k_cache, const void *v_cache, const int64_t *table, int64_t len, float *out,
    int group, int head_dim, int block_size, float scale, float *scores, const int kind) {
    /* q/out: this item's `group` heads, [group, head_dim]; scores: [group, len] scratch; table: this sequence's
     * block ids. k/v_cache: this KV head's [num_blocks, block_size, head_dim]. */
    float maxes[MAX_GROUP], buf[MAX_HEAD_DIM];
    for (int g = 0; g < group; g++) maxes[g] = -FLT_MAX; /* finite: built with -ffast-math */
    int64_t t = 0;
    for (int64_t b = 0; t < len; b++) {
        int64_t first = table[b] * block_size;
        int n = (int)((len - t) < block_size ? (len - t) : block_size);
        for (int j = 0; j < n; j++, t++) {
            const float *k = row_of(k_cache, (first + j) * head_dim, head_dim, buf, kind);
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
            const float *v = row_of(v_cache, (first + j) * head_dim, head_dim, buf, kind);
            for (int g = 0; g < group; g++) {
                float p = scores[g * len + t];
                float *a = acc + g * head_dim;
                for (int d = 0; d < head_dim; d++) a[d] += p * v[d];
            }
        }
    }
    memcpy(out, acc, sizeof(float) * group * head_dim);
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include "simd_avx2.h"
#define DECODE_SIMD 1

/* 8 cache values at p as float32 (F16C's conversion comes with every AVX2 CPU) */
static inline __m256 load8_kv(const void *p, const int kind) {
    if (kind == KV_F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    return load8_full(p, kind == KV_BF16);
}

/* Both passes are register-blocked over the query heads of a group, up to HEADS_AT_ONCE at a time: every K/V vector
 * loaded feeds that many FMAs, so K and V are read once per item, not once per query head (the previous form read V
 * once per head, the repeats from L2). 4 rows x 3 heads (K) and 4 vectors x 3 heads (V) fill 12 of the 16 AVX2
 * registers with accumulators. Measured with benchmarks/micro/kernel_ab.py on a cold cache, with the prefetching
 * below: 0.85-0.94x the previous kernel's time. On L2-resident data both forms cost ~7 us per item against ~0.8 us of
 * FMAs; why is not established (no hardware counters on the host it was measured on). */
#define HEADS_AT_ONCE 3
#define K_ROWS 4

/* The sums of four vectors' lanes, as the four lanes of one vector */
static inline __m128 sum_lanes4(__m256 a, __m256 b, __m256 c, __m256 d) {
    const __m256 u = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d)); /* low half's and high half's sums */
    return _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));
}

/* scores[g * stride + j] = qs[g] . row j, for the nh (<= HEADS_AT_ONCE) query heads at qs and the n (<= K_ROWS)
 * consecutive rows at `rows` (`row_bytes` apart; rows past n repeat row n - 1, valid memory, their sums dropped) */
static inline __attribute__((always_inline)) void k_scores(const float *qs, const char *rows, int n, size_t row_bytes,
                                                           int head_dim, float *scores, int64_t stride, const int nh,
                                                           const int kind) {
    const char *r[K_ROWS];
    for (int j = 0; j < K_ROWS; j++) r[j] = rows + (size_t)(j < n ? j : n - 1) * row_bytes;
    __m256 acc[K_ROWS][HEADS_AT_ONCE];
    for (int j = 0; j < K_ROWS; j++)
        for (int g = 0; g < nh; g++) acc[j][g] = _mm256_setzero_ps();
    const size_t elem = kv_elem_bytes(kind);
    for (int d = 0; d < head_dim; d += 8) {
        __m256 qv[HEADS_AT_ONCE];
        for (int g = 0; g < nh; g++) qv[g] = _mm256_loadu_ps(qs + g * head_dim + d);
        for (int j = 0; j < K_ROWS; j++) {
            const __m256 kv = load8_kv(r[j] + d * elem, kind);
            for (int g = 0; g < nh; g++) acc[j][g] = _mm256_fmadd_ps(kv, qv[g], acc[j][g]);
        }
    }
    for (int g = 0; g < nh; g++) {
        const __m128 sums = sum_lanes4(acc[0][g], acc[1][g], acc[2][g], acc[3][g]);
        if (n == K_ROWS) {
            _mm_storeu_ps(scores + g * stride, sums);
        } else {
            float lanes[4];
            _mm_storeu_ps(lanes, sums);
            for (int j = 0; j < n; j++) scores[g * stride + j] = lanes[j];
        }
    }
}

static void k_scores_any(const float *qs, const char *rows, int n, size_t row_bytes, int head_dim, float *scores,
                         int64_t stride, int nh, const int kind) {
    if (nh == 3) k_scores(qs, rows, n, row_bytes, head_dim, scores, stride, 3, kind);
    else if (nh == 2) k_scores(qs, rows, n, row_bytes, head_dim, scores, stride, 2, kind);
    else k_scores(qs, rows, n, row_bytes, head_dim, scores, stride, 1, kind);
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

/* out[g * head_dim + [0, 8 * nv)] = inv[g] * sum_t p[g * stride + t] V[t][dc, dc + 8 * nv), for nh (<=
 * HEADS_AT_ONCE) query heads and nv <= 4: nh x nv accumulators held in registers over the whole context */
static inline __attribute__((always_inline)) void weighted_v(const char *v_cache, const int64_t *table, int64_t len,
                                                             int block_size, size_t row_bytes, int dc, const float *p,
                                                             int64_t stride, const float *inv, float *out,
                                                             int head_dim, const int nv, const int nh, const int kind) {
    __m256 acc[HEADS_AT_ONCE][4];
    for (int g = 0; g < nh; g++)
        for (int i = 0; i < nv; i++) acc[g][i] = _mm256_setzero_ps();
    const size_t elem = kv_elem_bytes(kind);
    int64_t t = 0;
    for (int64_t b = 0; t < len; b++) {
        const char *row = v_cache + (size_t)table[b] * block_size * row_bytes + dc * elem;
        const int n = (int)((len - t) < block_size ? (len - t) : block_size);
        for (int j = 0; j < n; j++, t++, row += row_bytes) {
            __m256 pv[HEADS_AT_ONCE];
            for (int g = 0; g < nh; g++) pv[g] = _mm256_broadcast_ss(p + g * stride + t);
            for (int i = 0; i < nv; i++) {
                const __m256 vv = load8_kv(row + i * 8 * elem, kind);
                for (int g = 0; g < nh; g++) acc[g][i] = _mm256_fmadd_ps(vv, pv[g], acc[g][i]);
            }
        }
    }
    for (int g = 0; g < nh; g++) {
        const __m256 vinv = _mm256_set1_ps(inv[g]);
        for (int i = 0; i < nv; i++) _mm256_storeu_ps(out + g * head_dim + i * 8, _mm256_mul_ps(acc[g][i], vinv));
    }
}

static void weighted_v_any(const char *v_cache, const int64_t *table, int64_t len, int block_size, size_t row_bytes,
                           int dc, const float *p, int64_t stride, const float *inv, float *out, int head_dim, int nv,
                           int nh, const int kind) {
#define WEIGHTED_V(NV, NH) \
    weighted_v(v_cache, table, len, block_size, row_bytes, dc, p, stride, inv, out, head_dim, NV, NH, kind)
#define BY_HEADS(NV) \
    if (nh == 3) WEIGHTED_V(NV, 3); else if (nh == 2) WEIGHTED_V(NV, 2); else WEIGHTED_V(NV, 1); return
    switch (nv) {
        case 1: BY_HEADS(1);
        case 2: BY_HEADS(2);
        case 3: BY_HEADS(3);
        default: BY_HEADS(4);
    }
#undef BY_HEADS
#undef WEIGHTED_V
}

/* Cache lines ahead: K/V come from DRAM (a step reads every layer's cache once), and a block (4 KB in float32 at
 * head_dim 64) is one page, past which the hardware prefetchers do not follow. So the K pass asks for K block
 * b + PREFETCH_BLOCKS and V block b while it reads K block b (V is then in L2 for the second pass), and the V pass
 * for the next item's first K blocks. */
#define PREFETCH_BLOCKS 2

static inline __attribute__((always_inline)) void prefetch_block(const char *block, size_t bytes) {
    for (size_t off = 0; off < bytes; off += 64) _mm_prefetch(block + off, _MM_HINT_T1);
}

/* What an item reads, for prefetching it before its turn: its KV head's caches, block table and length. */
struct item_view {
    const char *k, *v;
    const int64_t *table;
    int64_t len;
};

/* decode_item for head_dim a multiple of 8, in AVX2 vectors: the same two passes (scores over K, then V weighted by
 * the probabilities), each with independent accumulators in registers and a vectorized exp; the softmax's 1/sum is
 * applied to the output instead of to every probability. `next`: the item this thread runs next (NULL: none). */
static inline __attribute__((always_inline)) void decode_item_simd(
    const float *q, const void *k_cache, const void *v_cache, const int64_t *table, int64_t len, float *out,
    int group, int head_dim, int block_size, float scale, float *scores, const int kind, const struct item_view *next) {
    float qs[MAX_GROUP * MAX_HEAD_DIM], inv[MAX_GROUP];
    for (int i = 0; i < group * head_dim; i++) qs[i] = q[i] * scale;
    const size_t row_bytes = (size_t)head_dim * (kv_elem_bytes(kind));
    const size_t block_bytes = (size_t)block_size * row_bytes;
    const int64_t num_blocks = (len + block_size - 1) / block_size;
    for (int64_t b = 0; b < PREFETCH_BLOCKS && b < num_blocks; b++)
        prefetch_block((const char *)k_cache + (size_t)table[b] * block_bytes, block_bytes);
    int64_t t = 0;
    for (int64_t b = 0; t < len; b++) {
        const char *block = (const char *)k_cache + (size_t)table[b] * block_bytes;
        const int n = (int)((len - t) < block_size ? (len - t) : block_size);
        if (b + PREFETCH_BLOCKS < num_blocks)
            prefetch_block((const char *)k_cache + (size_t)table[b + PREFETCH_BLOCKS] * block_bytes, block_bytes);
        prefetch_block((const char *)v_cache + (size_t)table[b] * block_bytes, block_bytes);
        for (int j = 0; j < n; j += K_ROWS) {
            const int rows = n - j < K_ROWS ? n - j : K_ROWS;
            for (int g = 0; g < group; g += HEADS_AT_ONCE)
                k_scores_any(qs + g * head_dim, block + j * row_bytes, rows, row_bytes, head_dim,
                             scores + g * len + t + j, len, group - g < HEADS_AT_ONCE ? group - g : HEADS_AT_ONCE,
                             kind);
        }
        t += n;
    }
    for (int g = 0; g < group; g++) inv[g] = 1.0f / softmax_numerators(scores + g * len, len);
    if (next != NULL) {
        const int64_t ahead = (next->len + block_size - 1) / block_size;
        for (int64_t b = 0; b < ahead && b < PREFETCH_BLOCKS; b++)
            prefetch_block(next->k + (size_t)next->table[b] * block_bytes, block_bytes);
    }
    for (int g = 0; g < group; g += HEADS_AT_ONCE) {
        const int nh = group - g < HEADS_AT_ONCE ? group - g : HEADS_AT_ONCE;
        for (int dc = 0; dc < head_dim; dc += 32) {
            const int nv = (head_dim - dc < 32 ? head_dim - dc : 32) / 8;
            weighted_v_any((const char *)v_cache, table, len, block_size, row_bytes, dc, scores + g * len, len,
                           inv + g, out + g * head_dim + dc, head_dim, nv, nh, kind);
        }
    }
}
#endif

static inline __attribute__((always_inline)) int decode(
    const float *q, const void *k_cache, const void *v_cache, const int64_t *tables, const int64_t *lens, float *out,
    int batch, int heads, int kv_heads, int head_dim, int64_t num_blocks, int block_size, int max_blocks,
    float scale, int threads, float *scratch, int64_t max_len, const int kind) {
    int group = heads / kv_heads;
    if (group > MAX_GROUP || head_dim > MAX_HEAD_DIM || heads % kv_heads) return 1;
    int64_t per_head = num_blocks * block_size * head_dim; /* elements of one KV head's cache */
    const int items = batch * kv_heads;
    const size_t elem = kv_elem_bytes(kind);
    int claimed = 0; /* items handed out: each thread claims its next item one ahead, to prefetch it */
#pragma omp parallel num_threads(threads)
    {
#ifdef _OPENMP
        extern int omp_get_thread_num(void);
        float *scores = scratch + (int64_t)omp_get_thread_num() * group * max_len;
#else
        float *scores = scratch;
#endif
        int item = __atomic_fetch_add(&claimed, 1, __ATOMIC_RELAXED);
        while (item < items) {
            const int next = __atomic_fetch_add(&claimed, 1, __ATOMIC_RELAXED);
            const int seq = item / kv_heads, h = item % kv_heads;
            const int64_t off = ((int64_t)seq * heads + (int64_t)h * group) * head_dim;
            const char *kc = (const char *)k_cache + (size_t)h * per_head * elem;
            const char *vc = (const char *)v_cache + (size_t)h * per_head * elem;
            const int64_t *table = tables + (int64_t)seq * max_blocks;
#ifdef DECODE_SIMD
            if (head_dim % 8 == 0) {
                struct item_view ahead, *p = NULL;
                if (next < items) {
                    const int nseq = next / kv_heads, nh = next % kv_heads;
                    ahead = (struct item_view){(const char *)k_cache + (size_t)nh * per_head * elem,
                                               (const char *)v_cache + (size_t)nh * per_head * elem,
                                               tables + (int64_t)nseq * max_blocks, lens[nseq]};
                    p = &ahead;
                }
                decode_item_simd(q + off, kc, vc, table, lens[seq], out + off, group, head_dim, block_size, scale,
                                 scores, kind, p);
            } else
#endif
                decode_item(q + off, kc, vc, table, lens[seq], out + off, group, head_dim, block_size, scale, scores,
                            kind);
            item = next;
        }
    }
    return 0;
}

int paged_decode_f32(const float *q, const float *k_cache, const float *v_cache, const int64_t *tables,
                     const int64_t *lens, float *out, int batch, int heads, int kv_heads, int head_dim,
                     int64_t num_blocks, int block_size, int max_blocks, float scale, int threads, float *scratch,
                     int64_t max_len) {
    return decode(q, k_cache, v_cache, tables, lens, out, batch, heads, kv_heads, head_dim, num_blocks, block_size,
                  max_blocks, scale, threads, scratch, max_len, KV_F32);
}

/* The 16-bit caches' entry points: the same signature, K/V as uint16 */
#define PAGED_DECODE_16(name, kind)                                                                                   \
    int name(const float *q, const uint16_t *k_cache, const uint16_t *v_cache, const int64_t *tables,                \
             const int64_t *lens, float *out, int batch, int heads, int kv_heads, int head_dim, int64_t num_blocks,  \
             int block_size, int max_blocks, float scale, int threads, float *scratch, int64_t max_len) {            \
        return decode(q, k_cache, v_cache, tables, lens, out, batch, heads, kv_heads, head_dim, num_blocks,          \
                      block_size, max_blocks, scale, threads, scratch, max_len, kind);                               \
    }
PAGED_DECODE_16(paged_decode_bf16, KV_BF16)
PAGED_DECODE_16(paged_decode_f16, KV_F16)
