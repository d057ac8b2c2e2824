/* Paged decode attention on the CPU: one query token per sequence attends over its cached keys and values, read in
 * place through its block table (no gather of the context into a contiguous copy).
 *
 * Cache layout per layer: [kv_heads, num_blocks, block_size, head_dim] (attention.py). Queries [B, heads, head_dim]
 * float32; query head h reads KV head h / group. Output [B, heads, head_dim] float32. Work item = (sequence, KV
 * head): its `group` query heads share every K/V row it loads. Two passes per item: scores (then softmax) into
 * per-thread scratch, then the probability-weighted sum of V. Compiled at first use by kernels/build.py with
 * -O3 -march=native, so the inner loops over head_dim vectorize for the host's SIMD width. GCC's own vectorizer
 * does it: `#pragma omp simd` on these loops made code 6x slower in float32 (measured, B=32, 192 tokens).
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
