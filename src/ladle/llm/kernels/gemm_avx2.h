/* gemm.c's AVX2 (+FMA) tile kernels and epilogue (included by gemm.c; see there), for x86 CPUs without AVX-512.
 *
 * ymm registers hold 8 float32 lanes and there are only 16 of them, so tiles are 16 columns wide here (TILE = 16:
 * float32 [tiles][K][16], bfloat16 [tiles][K/2][16][2]): a k-row of a tile is one 64-byte cache line, each tile one
 * sequential stream, and up to MR = 6 rows (bfloat16: 4) x 2 vectors of accumulators fit the registers. (64-column
 * tiles walked in column passes read memory in strides the prefetchers follow poorly: about 2x slower from DRAM at 2-8
 * rows, benchmarks/RESULTS.md.) bfloat16 has no native multiply here: a 256-bit load holds 8 columns' k-pairs, split
 * into the even and the odd k's float32 by a shift and a mask (bfloat16 is the top half of a float32), then
 * multiplied in float32 like the rest against x widened to float32 once per call.
 */

#define AVX2_BF16_ROWS 4 /* bfloat16 rows per block: 4 x 2 accumulators + 4 split weights + x + the mask */

#include "simd_avx2.h"

static inline __m256 silu_mul8(__m256 g, __m256 u) { /* silu(g) * u = g * sigmoid(g) * u, exp of a non-positive */
    __m256 abs = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), g);
    __m256 e = exp_nonpositive8(_mm256_sub_ps(_mm256_setzero_ps(), abs));
    __m256 r = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(_mm256_set1_ps(1.0f), e));
    __m256 sig = _mm256_blendv_ps(r, _mm256_mul_ps(r, e), _mm256_cmp_ps(g, _mm256_setzero_ps(), _CMP_LT_OQ));
    return _mm256_mul_ps(_mm256_mul_ps(g, sig), u);
}

/* 8 lanes of a float32 or bfloat16 row, `lanes` (1..8) of them real; the rest read as 0 */
static inline __m256 load8(const void *p, int64_t lanes, int bf16) {
    if (lanes >= 8) return load8_full(p, bf16);
    float tmp[8] = {0};
    for (int64_t i = 0; i < lanes; i++) {
        if (!bf16) {
            tmp[i] = ((const float *)p)[i];
        } else {
            uint32_t bits = (uint32_t)((const uint16_t *)p)[i] << 16;
            memcpy(tmp + i, &bits, sizeof bits);
        }
    }
    return _mm256_loadu_ps(tmp);
}

/* float32 -> bfloat16 rounding to nearest even, as torch converts (NaN stays a quiet NaN) */
static inline __m128i to_bf16_8(__m256 v) {
    __m256i bits = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), nan);
    __m256i packed = _mm256_packus_epi32(rounded, rounded); /* per 128-bit lane: [a0..a3 a0..a3 | b0..b3 b0..b3] */
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
}

static inline void store8(void *p, __m256 v, int64_t lanes, int bf16) {
    if (lanes >= 8) {
        if (bf16) _mm_storeu_si128((__m128i *)p, to_bf16_8(v));
        else _mm256_storeu_ps((float *)p, v);
        return;
    }
    if (bf16) {
        uint16_t tmp[8];
        _mm_storeu_si128((__m128i *)tmp, to_bf16_8(v));
        memcpy(p, tmp, (size_t)lanes * 2);
    } else {
        float tmp[8];
        _mm256_storeu_ps(tmp, v);
        memcpy(p, tmp, (size_t)lanes * 4);
    }
}

/* One tile's results for `rows` rows through the epilogue into out, 8 lanes at a time (as gemm_avx512.h's) */
static void epilogue(float acc[MR][TILE], int rows, const float *bias, const void *other, int64_t ldo, void *out,
                     int64_t ldout, int64_t col0, int64_t n_out, int kind, int bf16) {
    const size_t elem = bf16 ? 2 : 4;
    const int outputs = kind == EPI_SWIGLU ? TILE / 2 : TILE;
    for (int m = 0; m < rows; m++) {
        for (int j = 0; j < outputs; j += 8) {
            int64_t lanes = n_out - (col0 + j);
            if (lanes <= 0) break;
            __m256 v = _mm256_loadu_ps(acc[m] + j);
            if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + j));
            if (kind == EPI_SWIGLU) {
                __m256 u = _mm256_loadu_ps(acc[m] + TILE / 2 + j);
                if (bias) u = _mm256_add_ps(u, _mm256_loadu_ps(bias + TILE / 2 + j));
                v = silu_mul8(v, u);
            } else if (kind == EPI_ADD) {
                v = _mm256_add_ps(v, load8((const char *)other + (m * ldo + col0 + j) * elem, lanes, bf16));
            }
            store8((char *)out + (m * ldout + col0 + j) * elem, v, lanes, bf16);
        }
    }
}

/* The phases of each row summed into out[m], times the tile's column scales where there are (int8 weights) */
static inline __attribute__((always_inline)) void finish(__m256 acc[MR][2], float out[MR][TILE], const int rows,
                                                         const int phases, const float *scale) {
    for (int m = 0; m < rows; m++) {
        for (int p = 1; p < phases; p++) {
            acc[m][0] = _mm256_add_ps(acc[m][0], acc[p * rows + m][0]);
            acc[m][1] = _mm256_add_ps(acc[m][1], acc[p * rows + m][1]);
        }
        if (scale) {
            acc[m][0] = _mm256_mul_ps(acc[m][0], _mm256_loadu_ps(scale));
            acc[m][1] = _mm256_mul_ps(acc[m][1], _mm256_loadu_ps(scale + 8));
        }
        _mm256_storeu_ps(out[m], acc[m][0]);
        _mm256_storeu_ps(out[m] + 8, acc[m][1]);
    }
}

/* `rows` rows against the whole 16-column tile, k split over `phases` interleaved accumulator sets (summed at the
 * end) so that at least 8 independent FMA chains hide the FMA latency when there are few rows. Accumulator slot
 * p * rows + m holds phase p of row m: phases * rows <= MR keeps the array small enough for GCC to hold in registers
 * (a [phases][MR][2] array, or accumulators loaded from `out` at a runtime flag, were kept on the stack and stored
 * every iteration: 2-3x slower). */
static inline __attribute__((always_inline)) void tile_f32(const float *x, int64_t ldx, const float *w, int64_t k_len,
                                                           float out[MR][TILE], const int rows, const int phases,
                                                           struct ahead pf) {
    __m256 acc[MR][2];
    for (int s = 0; s < rows * phases; s++) acc[s][0] = acc[s][1] = _mm256_setzero_ps();
    int64_t k = 0, due = 0;
    for (; k + phases <= k_len; k += phases) {
        PREFETCH_AHEAD(pf, due, phases, k_len);
        for (int p = 0; p < phases; p++) {
            const float *wk = w + (k + p) * TILE;
            __m256 w0 = _mm256_loadu_ps(wk), w1 = _mm256_loadu_ps(wk + 8);
            for (int m = 0; m < rows; m++) {
                __m256 xb = _mm256_broadcast_ss(x + m * ldx + k + p);
                acc[p * rows + m][0] = _mm256_fmadd_ps(w0, xb, acc[p * rows + m][0]);
                acc[p * rows + m][1] = _mm256_fmadd_ps(w1, xb, acc[p * rows + m][1]);
            }
        }
    }
    for (; k < k_len; k++) {
        __m256 w0 = _mm256_loadu_ps(w + k * TILE), w1 = _mm256_loadu_ps(w + k * TILE + 8);
        for (int m = 0; m < rows; m++) {
            __m256 xb = _mm256_broadcast_ss(x + m * ldx + k);
            acc[m][0] = _mm256_fmadd_ps(w0, xb, acc[m][0]);
            acc[m][1] = _mm256_fmadd_ps(w1, xb, acc[m][1]);
        }
    }
    finish(acc, out, rows, phases, NULL);
}

/* As tile_f32 over k-pairs of bfloat16 weights: a 256-bit load is 8 columns' pairs, split into the even and the odd
 * k's float32. x comes widened to float32 (gemm widens it once per call: see widen_x), so each k is one broadcast
 * from memory; splitting x pairs in registers too left too few registers (spills: 40 GFLOP/s a core, not 75). */
static inline __attribute__((always_inline)) void tile_bf16(const float *x, int64_t ldx, const uint16_t *w,
                                                            int64_t k_len, float out[MR][TILE], const int rows,
                                                            const int phases, struct ahead pf) {
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    const int64_t pairs = k_len / 2;
    __m256 acc[MR][2];
    for (int s = 0; s < rows * phases; s++) acc[s][0] = acc[s][1] = _mm256_setzero_ps();
    int64_t due = 0;
    for (int64_t kp = 0; kp < pairs; kp += phases) {
        PREFETCH_AHEAD(pf, due, phases, pairs);
        for (int p = 0; p < phases && kp + p < pairs; p++) {
            const uint16_t *wk = w + (kp + p) * TILE * 2;
            __m256i lo = _mm256_loadu_si256((const __m256i *)wk), hi = _mm256_loadu_si256((const __m256i *)(wk + 16));
            __m256 e0 = _mm256_castsi256_ps(_mm256_slli_epi32(lo, 16));
            __m256 o0 = _mm256_castsi256_ps(_mm256_and_si256(lo, high));
            __m256 e1 = _mm256_castsi256_ps(_mm256_slli_epi32(hi, 16));
            __m256 o1 = _mm256_castsi256_ps(_mm256_and_si256(hi, high));
            const int64_t k = 2 * (kp + p);
            for (int m = 0; m < rows; m++) {
                const int s = p * rows + m;
                __m256 xe = _mm256_broadcast_ss(x + m * ldx + k);
                acc[s][0] = _mm256_fmadd_ps(e0, xe, acc[s][0]);
                acc[s][1] = _mm256_fmadd_ps(e1, xe, acc[s][1]);
                __m256 xo = _mm256_broadcast_ss(x + m * ldx + k + 1);
                acc[s][0] = _mm256_fmadd_ps(o0, xo, acc[s][0]);
                acc[s][1] = _mm256_fmadd_ps(o1, xo, acc[s][1]);
            }
        }
    }
    finish(acc, out, rows, phases, NULL);
}

/* int8 weights against x quantized to int16 per row ("W8A16", gemm.c's gemm_q8): tiles are packed like
 * bfloat16's, k in pairs ([tiles][K/2][16][2], one 32-byte k-pair row per tile), each 16 bytes sign-extended to 16
 * int16 (8 columns x 2 k) and multiplied against the row's broadcast k-pair by vpmaddwd, which sums the pair into int32.
 * Per 32 weights that is 2 extensions, then 2 multiply-adds and 2 adds per row: about half the instructions of
 * widening int8 to float32 for FMA (measured: that kernel streamed 8.6 GB/s at one row and ran at 0.85x float32 at
 * 32 rows). int32 sums of Q8_FLUSH_PAIRS k-pairs (|x| <= 32767, |w| <= 127: at most 1.07e9) cannot overflow; they are
 * added into the float32 `out` then. Each column's sum is scaled by its weight scale and the row's x scale at the end.
 */
#define Q8_FLUSH_PAIRS 128

/* GCC's partial-redundancy elimination (-ftree-pre) made a copy of every int32 accumulator in these loops: each
 * vpaddd landed in a fresh register and a vmovdqa moved it back, and 6 rows' 12 accumulators spilled to the stack (so
 * many rows used to run half a tile at a time). Without it the loops keep their accumulators in registers: the whole
 * tile at 6 rows runs int8 at 1.3-1.5x float32's GEMM from 32 to 2048 rows (before: 1.04-1.26x), int4 ~1.1x faster
 * (benchmarks/RESULTS.md, gemm_ab.py). float32 and bfloat16 were unchanged by it, so it is off for these kernels only. */
#pragma GCC push_options
#pragma GCC optimize("no-tree-pre")
/* kept out of line: inlined into their caller (gemm_q8's OpenMP body) they would be compiled with its options */
#define NO_PRE __attribute__((noinline))

static inline __attribute__((always_inline)) void tile_q8(const int16_t *x, int64_t ldx, const int8_t *w,
                                                          int64_t pairs, const float *scale, const float *x_scale,
                                                          float out[MR][TILE], const int rows, struct ahead pf) {
    for (int m = 0; m < rows; m++) {
        _mm256_storeu_ps(out[m], _mm256_setzero_ps());
        _mm256_storeu_ps(out[m] + 8, _mm256_setzero_ps());
    }
    int64_t due = 0;
    for (int64_t p0 = 0; p0 < pairs; p0 += Q8_FLUSH_PAIRS) {
        const int64_t end = pairs - p0 < Q8_FLUSH_PAIRS ? pairs : p0 + Q8_FLUSH_PAIRS;
        __m256i acc[MR][2];
        for (int m = 0; m < rows; m++) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
        for (int64_t kp = p0; kp < end; kp++) {
            PREFETCH_AHEAD(pf, due, 1, pairs);
            const int8_t *wk = w + kp * TILE * 2;
            __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)wk));
            __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wk + 16)));
            for (int m = 0; m < rows; m++) {
                int32_t pair;
                memcpy(&pair, x + m * ldx + 2 * kp, sizeof pair);
                __m256i xb = _mm256_set1_epi32(pair);
                acc[m][0] = _mm256_add_epi32(acc[m][0], _mm256_madd_epi16(w0, xb));
                acc[m][1] = _mm256_add_epi32(acc[m][1], _mm256_madd_epi16(w1, xb));
            }
        }
        for (int m = 0; m < rows; m++) {
            _mm256_storeu_ps(out[m], _mm256_add_ps(_mm256_loadu_ps(out[m]), _mm256_cvtepi32_ps(acc[m][0])));
            _mm256_storeu_ps(out[m] + 8, _mm256_add_ps(_mm256_loadu_ps(out[m] + 8), _mm256_cvtepi32_ps(acc[m][1])));
        }
    }
    const __m256 s0 = _mm256_loadu_ps(scale), s1 = _mm256_loadu_ps(scale + 8);
    for (int m = 0; m < rows; m++) {
        const __m256 xs = _mm256_set1_ps(x_scale[m]);
        _mm256_storeu_ps(out[m], _mm256_mul_ps(_mm256_loadu_ps(out[m]), _mm256_mul_ps(s0, xs)));
        _mm256_storeu_ps(out[m] + 8, _mm256_mul_ps(_mm256_loadu_ps(out[m] + 8), _mm256_mul_ps(s1, xs)));
    }
}

#define LADLE_GEMM_Q8 1 /* this ISA has tile_rows_q8 and quantize_row_i16 (gemm.c's gemm_q8) */

static NO_PRE void tile_rows_q8(const int16_t *x, int64_t ldx, const int8_t *w, int64_t pairs, const float *scale,
                                const float *x_scale, float out[MR][TILE], int rows, struct ahead pf) {
    switch (rows) {
        case 1: tile_q8(x, ldx, w, pairs, scale, x_scale, out, 1, pf); return;
        case 2: tile_q8(x, ldx, w, pairs, scale, x_scale, out, 2, pf); return;
        case 3: tile_q8(x, ldx, w, pairs, scale, x_scale, out, 3, pf); return;
        case 4: tile_q8(x, ldx, w, pairs, scale, x_scale, out, 4, pf); return;
        case 5: tile_q8(x, ldx, w, pairs, scale, x_scale, out, 5, pf); return;
        default: tile_q8(x, ldx, w, pairs, scale, x_scale, out, 6, pf); return;
    }
}

/* int4 weights ("W4A16", gemm.c's gemm_q4): w = (q - 8) * scale + zero per group of `group` inputs, q in 0..15.
 * A tile's codes come in 32-byte blocks of four k (two k-pairs) laid out for in-lane unpacking: the low nibbles of a
 * block, zero-extended by vpunpcklbw / vpunpckhbw, are directly tile_q8's k-pair rows (columns 0-7 / 8-15 of the first
 * k-pair, each column's even and odd k side by side), the high nibbles the second k-pair's (quant.py _Int4Tiled packs
 * them). Per 64 weights that is one load, three mask/shift ops and four unpacks, then two multiply-adds and two adds per
 * row; the first version sign-extended re-centred codes 16 at a time across lanes (vpmovsxbw), ~1.8x the work, and
 * ran compute-bound at one row. The codes are summed unsigned (0..15) and 8 x the group's integer sum of x (xsum8)
 * is taken off once per group, so the int32 sums equal those of (q - 8) exactly. Scales and zeros are bfloat16 (as
 * torch's int4 kernel takes them: 4 bytes per 32 weights, not 8). Each group's int32 sums are scaled into float32
 * accumulators (scale x the row's x scale), and zero x the group's sum of x added, so the zeros cost one FMA per
 * group, not per weight. Three rows at a time (float and int32 accumulators for each fill the registers). */
#define Q4_ROWS 3

static inline __attribute__((always_inline)) void tile_q4(const int16_t *x, int64_t ldx, const float *xsum,
                                                          const int32_t *xsum8, int64_t groups, const uint8_t *w,
                                                          int64_t group_quads, const uint16_t *scale,
                                                          const uint16_t *zero, const float *x_scale,
                                                          float out[MR][TILE], const int rows) {
    const __m256i low = _mm256_set1_epi8(0x0F), none = _mm256_setzero_si256();
    __m256 acc[Q4_ROWS][2];
    for (int m = 0; m < rows; m++) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m256i sum[Q4_ROWS][2];
        for (int m = 0; m < rows; m++) sum[m][0] = sum[m][1] = _mm256_setzero_si256();
        for (int64_t kq = g * group_quads; kq < (g + 1) * group_quads; kq++) {
            const __m256i b = _mm256_loadu_si256((const __m256i *)(w + kq * 2 * TILE));
            const __m256i lo = _mm256_and_si256(b, low), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low);
            const __m256i a0 = _mm256_unpacklo_epi8(lo, none), a1 = _mm256_unpackhi_epi8(lo, none);
            const __m256i c0 = _mm256_unpacklo_epi8(hi, none), c1 = _mm256_unpackhi_epi8(hi, none);
            for (int m = 0; m < rows; m++) {
                int32_t pairs[2];
                memcpy(pairs, x + m * ldx + 4 * kq, sizeof pairs);
                const __m256i xa = _mm256_set1_epi32(pairs[0]), xc = _mm256_set1_epi32(pairs[1]);
                sum[m][0] = _mm256_add_epi32(sum[m][0], _mm256_add_epi32(_mm256_madd_epi16(a0, xa),
                                                                         _mm256_madd_epi16(c0, xc)));
                sum[m][1] = _mm256_add_epi32(sum[m][1], _mm256_add_epi32(_mm256_madd_epi16(a1, xa),
                                                                         _mm256_madd_epi16(c1, xc)));
            }
        }
        const __m256 s0 = load8(scale + g * TILE, 8, 1), s1 = load8(scale + g * TILE + 8, 8, 1);
        const __m256 z0 = load8(zero + g * TILE, 8, 1), z1 = load8(zero + g * TILE + 8, 8, 1);
        for (int m = 0; m < rows; m++) {
            const __m256i centre = _mm256_set1_epi32(xsum8[m * groups + g]);
            const __m256 xs = _mm256_set1_ps(x_scale[m]), xg = _mm256_set1_ps(xsum[m * groups + g]);
            const __m256 q0 = _mm256_cvtepi32_ps(_mm256_sub_epi32(sum[m][0], centre));
            const __m256 q1 = _mm256_cvtepi32_ps(_mm256_sub_epi32(sum[m][1], centre));
            acc[m][0] = _mm256_fmadd_ps(q0, _mm256_mul_ps(s0, xs), acc[m][0]);
            acc[m][1] = _mm256_fmadd_ps(q1, _mm256_mul_ps(s1, xs), acc[m][1]);
            acc[m][0] = _mm256_fmadd_ps(z0, xg, acc[m][0]);
            acc[m][1] = _mm256_fmadd_ps(z1, xg, acc[m][1]);
        }
    }
    for (int m = 0; m < rows; m++) {
        _mm256_storeu_ps(out[m], acc[m][0]);
        _mm256_storeu_ps(out[m] + 8, acc[m][1]);
    }
}

static NO_PRE void tile_rows_q4(const int16_t *x, int64_t ldx, const float *xsum, const int32_t *xsum8,
                                int64_t groups, const uint8_t *w, int64_t group_quads, const uint16_t *scale,
                                const uint16_t *zero, const float *x_scale, float out[MR][TILE], int rows) {
    switch (rows) {
        case 1: tile_q4(x, ldx, xsum, xsum8, groups, w, group_quads, scale, zero, x_scale, out, 1); return;
        case 2: tile_q4(x, ldx, xsum, xsum8, groups, w, group_quads, scale, zero, x_scale, out, 2); return;
        default: tile_q4(x, ldx, xsum, xsum8, groups, w, group_quads, scale, zero, x_scale, out, 3); return;
    }
}

#pragma GCC pop_options

/* One row of x (float32 or bfloat16, k_len values) as int16 round(x / s), s = max |x| / 32767 (1 for a zero row),
 * into q[0, k_pad) (zeros past k_len); returns s */
static float quantize_row_i16(const void *x, int64_t k_len, int bf16, int16_t *q, int64_t k_pad) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 vmax = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= k_len; k += 8)
        vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, load8((const char *)x + k * (bf16 ? 2 : 4), 8, bf16)));
    float lanes[8], amax = 0.0f;
    _mm256_storeu_ps(lanes, vmax);
    for (int i = 0; i < 8; i++) amax = lanes[i] > amax ? lanes[i] : amax;
    for (; k < k_len; k++) {
        __m256 v = _mm256_andnot_ps(sign, load8((const char *)x + k * (bf16 ? 2 : 4), 1, bf16));
        float f = _mm_cvtss_f32(_mm256_castps256_ps128(v));
        amax = f > amax ? f : amax;
    }
    const float s = amax > 0.0f ? amax / 32767.0f : 1.0f;
    const __m256 inv = _mm256_set1_ps(amax > 0.0f ? 32767.0f / amax : 1.0f);
    for (k = 0; k < k_len; k += 8) {
        const int64_t n = k_len - k < 8 ? k_len - k : 8;
        __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(load8((const char *)x + k * (bf16 ? 2 : 4), n, bf16), inv));
        __m128i packed = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        int16_t tmp[8];
        _mm_storeu_si128((__m128i *)tmp, packed);
        memcpy(q + k, tmp, (size_t)n * sizeof(int16_t));
    }
    for (k = k_len; k < k_pad; k++) q[k] = 0;
    return s;
}

/* bfloat16 x is widened to float32 once per call (a [M, K] copy), not per tile: the kernels broadcast from it */
static int widen_x(int bf16) { return bf16; }

/* rows and phases are compile-time constants in each case, so the accumulators stay in registers: 8 to 12
 * independent ones (one row: 4 phases x 2 vectors; two: 2 x 2 x 2; three: 2 x 3 x 2; more: 1 x rows x 2) */
static void tile_rows(const void *x, int64_t ldx, const void *w, int64_t k_len, float out[MR][TILE], int rows,
                      int bf16, struct ahead pf) {
    if (bf16) {
        const float *xb = (const float *)x;
        const uint16_t *wb = (const uint16_t *)w;
        switch (rows) {
            case 1: tile_bf16(xb, ldx, wb, k_len, out, 1, 4, pf); return;
            case 2: tile_bf16(xb, ldx, wb, k_len, out, 2, 2, pf); return;
            case 3: tile_bf16(xb, ldx, wb, k_len, out, 3, 1, pf); return;
            default: tile_bf16(xb, ldx, wb, k_len, out, 4, 1, pf); return;
        }
    }
    const float *xf = (const float *)x, *wf = (const float *)w;
    switch (rows) {
        case 1: tile_f32(xf, ldx, wf, k_len, out, 1, 4, pf); return;
        case 2: tile_f32(xf, ldx, wf, k_len, out, 2, 2, pf); return;
        case 3: tile_f32(xf, ldx, wf, k_len, out, 3, 2, pf); return;
        case 4: tile_f32(xf, ldx, wf, k_len, out, 4, 1, pf); return;
        case 5: tile_f32(xf, ldx, wf, k_len, out, 5, 1, pf); return;
        default: tile_f32(xf, ldx, wf, k_len, out, 6, 1, pf); return;
    }
}

static int row_chunk(int bf16) { return bf16 ? AVX2_BF16_ROWS : MR; }
