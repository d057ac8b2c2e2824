/* Paged decode attention on the CPU: one query token per sequence attends over its cached keys and values, read in
 * place through its block table (no gather of the context into a contiguous copy).
 *
 * Cache layout per layer: [kv_heads, num_blocks, block_size, head_dim] (attention.py), float32, bfloat16 or float16
 * (the model's dtype, or --kv-cache-dtype: a 16-bit cache halves the bytes a decode step reads), or an 8-bit float
 * (--kv-cache-dtype fp8 / fp8_e4m3 / fp8_e5m2: a quarter of float32's bytes, read through float16). Queries [B, heads,
 * head_dim] float32; query head h reads KV head h / group. Output [B, heads, head_dim] float32. Work item = (sequence,
 * KV head): its `group` query heads share every K/V row it loads. Two passes per item: scores (then softmax) into
 * per-thread scratch, then the probability-weighted sum of V. Compiled at first use by kernels/build.py with -O3
 * -march=native. On AVX2 (and AVX-512) hosts with head_dim a multiple of 8, decode_span_simd runs both passes in
 * explicit vectors, register-blocked over rows and query heads, over a block-aligned span of the context where few
 * items would leave a thread idle (splits_for). (An earlier form, eight rows' dot products at a time, ran 1.3-1.9x
 * the plain loops below, which GCC vectorized one dot product at a time: one dependent FMA chain and a horizontal sum
 * per row; `#pragma omp simd` on them made code 6x slower in float32.) The plain loops serve every other case.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fpmode.h"

#define MAX_GROUP 64
#define MAX_HEAD_DIM 256

/* The cache's element types: float32, bfloat16 (the top half of a float32), IEEE float16, or the 8-bit floats of
 * --kv-cache-dtype fp8: e4m3 (OCP's e4m3fn: 4 exponent bits, bias 7, 3 mantissa bits, no infinities) and e5m2 (the
 * top byte of a float16) */
enum { KV_F32 = 0, KV_BF16 = 1, KV_F16 = 2, KV_E4M3 = 3, KV_E5M2 = 4 };

static inline size_t kv_elem_bytes(const int kind) { return kind == KV_F32 ? 4 : kind >= KV_E4M3 ? 1 : 2; }

/* An 8-bit value as a float16's bits, times a factor the caller undoes once: e5m2 is a float16's top byte (exact); an
 * e4m3 value v is stored as the float16 of v / 256 — its exponent and mantissa bits moved into float16's places (the
 * biases differ by 8), so e4m3's subnormals land on float16's and nothing needs a case. */
static inline uint16_t fp8_to_f16_bits(uint8_t x, const int kind) {
    if (kind == KV_E5M2) return (uint16_t)(x << 8);
    return (uint16_t)(((x & 0x80) << 8) | ((x & 0x7f) << 7));
}

/* What the float16 values of an e4m3 cache must be multiplied by (2^8), else 1 */
static inline float kv_factor(const int kind) { return kind == KV_E4M3 ? 256.0f : 1.0f; }

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
    if (kind >= KV_E4M3) {
        const uint8_t *src8 = (const uint8_t *)cache + base;
        for (int d = 0; d < head_dim; d++) buf[d] = f16_to_f32(fp8_to_f16_bits(src8[d], kind)) * kv_factor(kind);
        return buf;
    }
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

/* 8 cache values at p as float32 (F16C's conversion comes with every AVX2 CPU); e4m3's come out kv_factor() too small
 * (fp8_to_f16_bits): the caller scales q and the output instead of every value */
static inline __m256 load8_kv(const void *p, const int kind) {
    if (kind == KV_F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    if (kind == KV_E5M2) /* a float16's top byte */
        return _mm256_cvtph_ps(_mm_slli_epi16(_mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)p)), 8));
    if (kind == KV_E4M3) { /* sign-extended, then shifted by 7: eeeemmm in float16's bits 13-7, the sign in 15 and 14 */
        const __m128i wide = _mm_slli_epi16(_mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i *)p)), 7);
        return _mm256_cvtph_ps(_mm_and_si128(wide, _mm_set1_epi16((short)0xbfff))); /* bit 14 cleared */
    }
    return load8_full(p, kind == KV_BF16);
}

/* Both passes are register-blocked over up to HEADS_AT_ONCE query heads of a group: every K/V vector loaded feeds that
 * many FMAs, so K and V are read once per item, not once per query head. 4 rows x 3 heads (K) and 4 vectors x 3 heads
 * (V) hold 12 independent accumulators; 2 heads take 4 x 2, one head 8 x 1 (at least 8 chains: the FMA latency times
 * its two ports). 3 rows x 3 heads and 3 vectors x 3 heads (fewer registers in use) ran ~10% slower on L2-resident
 * data (benchmarks/micro/kernel_ab.py --layers 1). */
#define HEADS_AT_ONCE 3
/* Keeps a loaded K/V vector in its register. With 12 accumulators, 3 query vectors and the K vector in all 16
 * registers GCC folded the load into each FMA that used it instead (three loads of one vector, 15 loads per 12 FMAs,
 * past the two vector loads a cycle): 0.88-0.91x the time with it on L2-resident data, the same cold. */
#define IN_REGISTER(v) __asm__("" : "+x"(v))
#define MAX_BLOCK_ROWS 8 /* rows (K) or vectors (V) at one query head */

static inline int block_rows(int nh) { return nh == 1 ? MAX_BLOCK_ROWS : 4; }

/* The sums of four vectors' lanes, as the four lanes of one vector */
static inline __m128 sum_lanes4(__m256 a, __m256 b, __m256 c, __m256 d) {
    const __m256 u = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d)); /* low half's and high half's sums */
    return _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));
}

/* scores[g * stride + j] = qs[g] . r[j], for the nh (<= HEADS_AT_ONCE) query heads at qs and the first n of `rows`
 * cache rows (r[j] for j >= n repeats a valid row; its sums are dropped) */
static inline __attribute__((always_inline)) void k_scores(const float *qs, const char *const *r, int n, int head_dim,
                                                           float *scores, int64_t stride, const int rows, const int nh,
                                                           const int kind) {
    __m256 acc[MAX_BLOCK_ROWS][HEADS_AT_ONCE];
    for (int j = 0; j < rows; j++)
        for (int g = 0; g < nh; g++) acc[j][g] = _mm256_setzero_ps();
    const size_t elem = kv_elem_bytes(kind);
    for (int d = 0; d < head_dim; d += 8) {
        __m256 qv[HEADS_AT_ONCE];
        for (int g = 0; g < nh; g++) qv[g] = _mm256_loadu_ps(qs + g * head_dim + d);
        for (int j = 0; j < rows; j++) {
            __m256 kv = load8_kv(r[j] + d * elem, kind);
            IN_REGISTER(kv);
            for (int g = 0; g < nh; g++) acc[j][g] = _mm256_fmadd_ps(kv, qv[g], acc[j][g]);
        }
    }
    const __m256 zero = _mm256_setzero_ps();
    for (int g = 0; g < nh; g++) {
        for (int j = 0; j < rows && j < n; j += 4) {
            const __m128 sums = sum_lanes4(acc[j][g], j + 1 < rows ? acc[j + 1][g] : zero,
                                           j + 2 < rows ? acc[j + 2][g] : zero, j + 3 < rows ? acc[j + 3][g] : zero);
            if (n - j >= 4) {
                _mm_storeu_ps(scores + g * stride + j, sums);
            } else {
                float lanes[4];
                _mm_storeu_ps(lanes, sums);
                for (int i = 0; i < n - j; i++) scores[g * stride + j + i] = lanes[i];
            }
        }
    }
}

/* Cache lines ahead: K/V come from DRAM (a step reads every layer's cache once), and a block (4 KB in float32 at
 * head_dim 64) is one page, past which the hardware prefetchers do not follow. So the K pass asks for K block
 * b + PREFETCH_BLOCKS and V block b as it enters K block b (V is then in L2 for the second pass), and the V pass
 * for the next unit's first K blocks. */
#define PREFETCH_BLOCKS 2

static inline __attribute__((always_inline)) void prefetch_block(const char *block, size_t bytes) {
    for (size_t off = 0; off < bytes; off += 64) _mm_prefetch(block + off, _MM_HINT_T1);
}

/* What a unit of work reads: one sequence's rows (or a block-aligned part of them) of one KV head, through its block
 * table */
struct span {
    const char *k, *v;
    const int64_t *table;
    int64_t len;
};

/* The K pass: scores[g * len + t] = qs[g] . K[t] for every row t of the span, block by block, `rows` rows at a time */
static inline __attribute__((always_inline)) void k_pass(const struct span *s, const float *qs, int group, int head_dim,
                                                         int block_size, float *scores, const int kind) {
    const size_t row_bytes = (size_t)head_dim * kv_elem_bytes(kind), block_bytes = (size_t)block_size * row_bytes;
    const int64_t num_blocks = (s->len + block_size - 1) / block_size;
    for (int64_t b = 0; b < PREFETCH_BLOCKS && b < num_blocks; b++)
        prefetch_block(s->k + (size_t)s->table[b] * block_bytes, block_bytes);
    int64_t t = 0;
    for (int64_t b = 0; t < s->len; b++) {
        const char *block = s->k + (size_t)s->table[b] * block_bytes;
        const int n = (int)((s->len - t) < block_size ? (s->len - t) : block_size);
        if (b + PREFETCH_BLOCKS < num_blocks)
            prefetch_block(s->k + (size_t)s->table[b + PREFETCH_BLOCKS] * block_bytes, block_bytes);
        prefetch_block(s->v + (size_t)s->table[b] * block_bytes, block_bytes);
        for (int g = 0; g < group; g += HEADS_AT_ONCE) {
            const int nh = group - g < HEADS_AT_ONCE ? group - g : HEADS_AT_ONCE, rows = block_rows(nh);
            const float *q = qs + g * head_dim;
            for (int j = 0; j < n; j += rows) {
                const int m = n - j < rows ? n - j : rows;
                const char *r[MAX_BLOCK_ROWS];
                for (int i = 0; i < rows; i++) r[i] = block + (size_t)(j + (i < m ? i : m - 1)) * row_bytes;
                float *out = scores + g * s->len + t + j;
                if (nh == 3) k_scores(q, r, m, head_dim, out, s->len, 4, 3, kind);
                else if (nh == 2) k_scores(q, r, m, head_dim, out, s->len, 4, 2, kind);
                else k_scores(q, r, m, head_dim, out, s->len, MAX_BLOCK_ROWS, 1, kind);
            }
        }
        t += n;
    }
}

/* s[0, len) = exp(s - max s); returns their sum, and the max in *max */
static inline float softmax_numerators(float *s, int64_t len, float *max) {
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
    *max = m;
    return sum;
}

/* out[g * head_dim + [0, 8 * nv)] = inv[g] * sum_t p[g * stride + t] V[t][dc, dc + 8 * nv), for nh (<=
 * HEADS_AT_ONCE) query heads and nv <= MAX_BLOCK_ROWS vectors: nh x nv accumulators held in registers over the span */
static inline __attribute__((always_inline)) void weighted_v(const struct span *s, int block_size, size_t row_bytes,
                                                             int dc, const float *p, const float *inv, float *out,
                                                             int head_dim, const int nv, const int nh,
                                                             const int kind) {
    __m256 acc[HEADS_AT_ONCE][MAX_BLOCK_ROWS];
    for (int g = 0; g < nh; g++)
        for (int i = 0; i < nv; i++) acc[g][i] = _mm256_setzero_ps();
    const size_t elem = kv_elem_bytes(kind);
    int64_t t = 0;
    for (int64_t b = 0; t < s->len; b++) {
        const char *row = s->v + (size_t)s->table[b] * block_size * row_bytes + dc * elem;
        const int n = (int)((s->len - t) < block_size ? (s->len - t) : block_size);
        for (int j = 0; j < n; j++, t++, row += row_bytes) {
            __m256 pv[HEADS_AT_ONCE];
            for (int g = 0; g < nh; g++) pv[g] = _mm256_broadcast_ss(p + g * s->len + t);
            for (int i = 0; i < nv; i++) {
                __m256 vv = load8_kv(row + i * 8 * elem, kind);
                IN_REGISTER(vv);
                for (int g = 0; g < nh; g++) acc[g][i] = _mm256_fmadd_ps(vv, pv[g], acc[g][i]);
            }
        }
    }
    for (int g = 0; g < nh; g++) {
        const __m256 vinv = _mm256_set1_ps(inv[g]);
        for (int i = 0; i < nv; i++) _mm256_storeu_ps(out + g * head_dim + i * 8, _mm256_mul_ps(acc[g][i], vinv));
    }
}

/* The V pass over the whole head_dim, nh heads at a time, in chunks of as many vectors as the block shape holds */
static inline __attribute__((always_inline)) void v_pass(const struct span *s, const float *scores, const float *inv,
                                                         float *out, int group, int head_dim, int block_size,
                                                         const int kind) {
    const size_t row_bytes = (size_t)head_dim * kv_elem_bytes(kind);
#define WEIGHTED_V(NV, NH) weighted_v(s, block_size, row_bytes, dc, p, inv + g, o, head_dim, NV, NH, kind)
    for (int g = 0; g < group; g += HEADS_AT_ONCE) {
        const int nh = group - g < HEADS_AT_ONCE ? group - g : HEADS_AT_ONCE, most = block_rows(nh);
        const float *p = scores + g * s->len;
        for (int dc = 0; dc < head_dim; dc += most * 8) {
            const int nv = (head_dim - dc) / 8 < most ? (head_dim - dc) / 8 : most;
            float *o = out + g * head_dim + dc;
            if (nh == 3) {
                if (nv == 4) WEIGHTED_V(4, 3); else if (nv == 3) WEIGHTED_V(3, 3);
                else if (nv == 2) WEIGHTED_V(2, 3); else WEIGHTED_V(1, 3);
            } else if (nh == 2) {
                if (nv == 4) WEIGHTED_V(4, 2); else if (nv == 3) WEIGHTED_V(3, 2);
                else if (nv == 2) WEIGHTED_V(2, 2); else WEIGHTED_V(1, 2);
            } else {
                switch (nv) {
                    case 8: WEIGHTED_V(8, 1); break;
                    case 7: WEIGHTED_V(7, 1); break;
                    case 6: WEIGHTED_V(6, 1); break;
                    case 5: WEIGHTED_V(5, 1); break;
                    case 4: WEIGHTED_V(4, 1); break;
                    case 3: WEIGHTED_V(3, 1); break;
                    case 2: WEIGHTED_V(2, 1); break;
                    default: WEIGHTED_V(1, 1);
                }
            }
        }
    }
#undef WEIGHTED_V
}

/* decode_item for head_dim a multiple of 8, in AVX2 vectors, over a span: the same two passes (scores over K, then V
 * weighted by the probabilities), with independent accumulators in registers and a vectorized exp. With `ml` NULL
 * the span is the whole context and out gets the attention; else out gets the unnormalized sums and ml[2g], ml[2g+1]
 * the max score and the sum of exp(score - max) of head g, for merge_splits. `next`: the unit this thread runs next
 * (NULL: none), whose first K blocks the V pass prefetches. */
static inline __attribute__((always_inline)) void decode_span_simd(const struct span *s, const float *q, float *out,
                                                                   float *ml, int group, int head_dim, int block_size,
                                                                   float scale, float *scores, const int kind,
                                                                   const struct span *next) {
    float qs[group * head_dim], inv[MAX_GROUP];
    const float factor = kv_factor(kind); /* K and V values load8_kv leaves that many times too small */
    for (int i = 0; i < group * head_dim; i++) qs[i] = q[i] * scale * factor;
    k_pass(s, qs, group, head_dim, block_size, scores, kind);
    for (int g = 0; g < group; g++) {
        float max;
        const float sum = softmax_numerators(scores + g * s->len, s->len, &max);
        if (ml) ml[2 * g] = max, ml[2 * g + 1] = sum, inv[g] = factor;
        else inv[g] = factor / sum;
    }
    if (next != NULL && next->len > 0) {
        const size_t block_bytes = (size_t)block_size * head_dim * kv_elem_bytes(kind);
        const int64_t ahead = (next->len + block_size - 1) / block_size;
        for (int64_t b = 0; b < ahead && b < PREFETCH_BLOCKS; b++)
            prefetch_block(next->k + (size_t)next->table[b] * block_bytes, block_bytes);
    }
    v_pass(s, scores, inv, out, group, head_dim, block_size, kind);
}
#endif

/* A call's work: batch x kv_heads items, each cut into `splits` block-aligned spans (units). Splitting a sequence's
 * context (flash-decoding's split-K) keeps every thread busy when there are few items: one sequence of 3 KV heads on 2
 * threads would otherwise leave one thread idle a third of the call. */
struct decode_job {
    const float *q;
    const char *k_cache, *v_cache;
    const int64_t *tables, *lens;
    float *out, *scratch, *partial; /* partial: per unit, group x (head_dim sums + max + sum), when splits > 1 */
    int heads, kv_heads, group, head_dim, block_size, max_blocks, splits, units;
    int64_t per_head_bytes, max_len;
    float scale;
};

static inline __attribute__((always_inline)) void unit_span(const struct decode_job *j, int unit, struct span *s) {
    const int item = unit / j->splits, part = unit % j->splits, seq = item / j->kv_heads, h = item % j->kv_heads;
    const int64_t len = j->lens[seq], blocks = (len + j->block_size - 1) / j->block_size;
    const int64_t lo = blocks * part / j->splits, hi = blocks * (part + 1) / j->splits;
    const int64_t end = hi * j->block_size < len ? hi * j->block_size : len;
    s->k = j->k_cache + (size_t)h * j->per_head_bytes;
    s->v = j->v_cache + (size_t)h * j->per_head_bytes;
    s->table = j->tables + (int64_t)seq * j->max_blocks + lo;
    s->len = end > lo * j->block_size ? end - lo * j->block_size : 0;
}

/* One thread's share: units claimed one ahead (to prefetch the next one's first blocks) until none are left */
static inline __attribute__((always_inline)) void run_units(const struct decode_job *j, int *claimed, const int kind) {
    const unsigned mode = flush_subnormals(); /* fpmode.h: subnormal K/V ran this ~50x slower */
#ifdef _OPENMP
    extern int omp_get_thread_num(void);
    float *scores = j->scratch + (int64_t)omp_get_thread_num() * j->group * j->max_len;
#else
    float *scores = j->scratch;
#endif
    int unit = __atomic_fetch_add(claimed, 1, __ATOMIC_RELAXED);
    while (unit < j->units) {
        const int next = __atomic_fetch_add(claimed, 1, __ATOMIC_RELAXED);
        const int item = unit / j->splits, seq = item / j->kv_heads, h = item % j->kv_heads;
        const int64_t off = ((int64_t)seq * j->heads + (int64_t)h * j->group) * j->head_dim;
        struct span s;
        unit_span(j, unit, &s);
#ifdef DECODE_SIMD
        if (j->head_dim % 8 == 0) {
            struct span ahead;
            if (next < j->units) unit_span(j, next, &ahead);
            const int64_t stride = (int64_t)j->group * (j->head_dim + 2);
            float *part = j->splits > 1 ? j->partial + (int64_t)unit * stride : NULL;
            if (part == NULL || s.len > 0)
                decode_span_simd(&s, j->q + off, part ? part : j->out + off,
                                 part ? part + (int64_t)j->group * j->head_dim : NULL, j->group, j->head_dim,
                                 j->block_size, j->scale, scores, kind, next < j->units ? &ahead : NULL);
            else /* an empty span: no weight in the merge */
                for (int g = 0; g < j->group; g++) part[(int64_t)j->group * j->head_dim + 2 * g + 1] = 0.0f;
        } else
#endif
            decode_item(j->q + off, s.k, s.v, s.table, s.len, j->out + off, j->group, j->head_dim, j->block_size,
                        j->scale, scores, kind);
        unit = next;
    }
    restore_mode(mode);
}

/* out of each item from its spans' unnormalized sums: weights exp(max_i - max) rescale every span to a common max */
static void merge_splits(const struct decode_job *j) {
    const int items = j->units / j->splits, gd = j->group * j->head_dim;
    const int64_t stride = (int64_t)j->group * (j->head_dim + 2);
    for (int item = 0; item < items; item++) {
        const int seq = item / j->kv_heads, h = item % j->kv_heads;
        float *out = j->out + ((int64_t)seq * j->heads + (int64_t)h * j->group) * j->head_dim;
        const float *first = j->partial + (int64_t)item * j->splits * stride;
        for (int g = 0; g < j->group; g++) {
            float max = -FLT_MAX, total = 0.0f, w[j->splits];
            for (int p = 0; p < j->splits; p++) {
                const float *ml = first + p * stride + gd + 2 * g;
                if (ml[1] > 0.0f && ml[0] > max) max = ml[0];
            }
            for (int p = 0; p < j->splits; p++) {
                const float *ml = first + p * stride + gd + 2 * g;
                w[p] = ml[1] > 0.0f ? expf(ml[0] - max) : 0.0f;
                total += w[p] * ml[1];
            }
            for (int d = 0; d < j->head_dim; d++) {
                float acc = 0.0f;
                for (int p = 0; p < j->splits; p++)
                    if (w[p] > 0.0f) acc += w[p] * first[p * stride + g * j->head_dim + d];
                out[g * j->head_dim + d] = acc / total;
            }
        }
    }
}

static int gcd(int a, int b) { return b ? gcd(b, a % b) : a; }

/* Spans per item: 1 when the items spread evenly over the threads (or are many enough that the last one idles a thread
 * for under ~1/16 of the call), else as many as make the units a multiple of the threads, each span at least
 * MIN_SPAN_BLOCKS blocks (the merge and a span's setup cost about a block's work). One sequence of 3 KV heads on 2
 * threads: 0.89-0.91x the time at 192 tokens, 0.79x at 1,024 (kernel_ab.py, cold). */
#define MIN_SPAN_BLOCKS 4
static int splits_for(int items, int threads, int64_t max_len, int block_size, int head_dim) {
    if (head_dim % 8 || threads <= 1 || items % threads == 0 || items >= 8 * threads) return 1;
    const int want = threads / gcd(items, threads);
    const int64_t most = (max_len + block_size - 1) / block_size / MIN_SPAN_BLOCKS;
    return most >= want ? want : 1;
}

static int decode(const float *q, const void *k_cache, const void *v_cache, const int64_t *tables, const int64_t *lens,
                  float *out, int batch, int heads, int kv_heads, int head_dim, int64_t num_blocks, int block_size,
                  int max_blocks, float scale, int threads, float *scratch, int64_t max_len, const int kind) {
    const int group = heads / kv_heads;
    if (group > MAX_GROUP || head_dim > MAX_HEAD_DIM || heads % kv_heads) return 1;
    const int items = batch * kv_heads;
#ifdef DECODE_SIMD
    const int splits = splits_for(items, threads, max_len, block_size, head_dim);
#else
    const int splits = 1;
#endif
    struct decode_job j = {q, (const char *)k_cache, (const char *)v_cache, tables, lens, out, scratch, NULL, heads,
                           kv_heads, group, head_dim, block_size, max_blocks, splits, items * splits,
                           num_blocks * block_size * head_dim * (int64_t)kv_elem_bytes(kind), max_len, scale};
    if (splits > 1) {
        j.partial = (float *)malloc(sizeof(float) * (size_t)j.units * group * (head_dim + 2));
        if (j.partial == NULL) j.splits = 1, j.units = items;
    }
    int claimed = 0;
    /* one parallel region per cache dtype, so that each outlined body is compiled for its `kind` (a region inside
     * one shared function kept `kind` a runtime value in every inner loop) */
#define RUN_UNITS(KIND)                                                                                               \
    _Pragma("omp parallel num_threads(threads)") run_units(&j, &claimed, KIND);                                       \
    break
    switch (kind) {
        case KV_F32: RUN_UNITS(KV_F32);
        case KV_BF16: RUN_UNITS(KV_BF16);
        case KV_E4M3: RUN_UNITS(KV_E4M3);
        case KV_E5M2: RUN_UNITS(KV_E5M2);
        default: RUN_UNITS(KV_F16);
    }
#undef RUN_UNITS
    if (j.partial != NULL) {
        merge_splits(&j);
        free(j.partial);
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

/* The narrower caches' entry points: the same signature, K/V as uint16 (16-bit floats) or bytes (--kv-cache-dtype
 * fp8_e4m3 / fp8_e5m2) */
#define PAGED_DECODE_NARROW(name, elem, kind)                                                                         \
    int name(const float *q, const elem *k_cache, const elem *v_cache, const int64_t *tables, const int64_t *lens,   \
             float *out, int batch, int heads, int kv_heads, int head_dim, int64_t num_blocks, int block_size,       \
             int max_blocks, float scale, int threads, float *scratch, int64_t max_len) {                            \
        return decode(q, k_cache, v_cache, tables, lens, out, batch, heads, kv_heads, head_dim, num_blocks,          \
                      block_size, max_blocks, scale, threads, scratch, max_len, kind);                               \
    }
PAGED_DECODE_NARROW(paged_decode_bf16, uint16_t, KV_BF16)
PAGED_DECODE_NARROW(paged_decode_f16, uint16_t, KV_F16)
PAGED_DECODE_NARROW(paged_decode_e4m3, uint8_t, KV_E4M3)
PAGED_DECODE_NARROW(paged_decode_e5m2, uint8_t, KV_E5M2)
