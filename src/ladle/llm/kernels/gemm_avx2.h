/* gemm.c's AVX2 (+FMA) tile kernels and epilogue (included by gemm.c; see there), for x86 CPUs without AVX-512.
 *
 * ymm registers hold 8 float32 lanes and there are only 16 of them, so a 64-column tile is covered in column blocks
 * sized to the rows at hand: one row takes the whole tile (8 accumulators), two rows half of it per pass, three to
 * six rows (float32; bfloat16: three or four) a quarter per pass. A pass reads its block of every k-row of the tile
 * (stride 256 bytes, which the prefetchers follow); the tile stays in L2 between passes. bfloat16 has no native
 * multiply here: a 256-bit load holds 8 columns' k-pairs, split into the even and the odd k's float32 by a shift and
 * a mask (bfloat16 is the top half of a float32), then multiplied in float32 like the rest.
 */

#define AVX2_BF16_ROWS 4 /* bfloat16 rows per pass: 4 x 2 accumulators + 4 split weights + 2 split x in 16 registers */

/* exp(x) for x <= 0 (callers pass -|g|): 2^(x log2 e), 2^frac by its degree-6 Taylor polynomial, 2^n built in the
 * exponent bits (x >= -87 keeps n >= -126, a normal float) */
static inline __m256 exp_nonpositive8(__m256 x) {
    __m256 t = _mm256_mul_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(1.44269504088896341f));
    __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 f = _mm256_sub_ps(t, n);
    static const float c[] = {1.5403530e-4f, 1.3333558e-3f, 9.6181291e-3f, 5.5504109e-2f, 2.4022651e-1f,
                              6.9314718e-1f, 1.0f};
    __m256 p = _mm256_set1_ps(c[0]);
    for (int i = 1; i < 7; i++) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(c[i]));
    __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

static inline __m256 silu_mul8(__m256 g, __m256 u) { /* silu(g) * u = g * sigmoid(g) * u, exp of a non-positive */
    __m256 abs = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), g);
    __m256 e = exp_nonpositive8(_mm256_sub_ps(_mm256_setzero_ps(), abs));
    __m256 r = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(_mm256_set1_ps(1.0f), e));
    __m256 sig = _mm256_blendv_ps(r, _mm256_mul_ps(r, e), _mm256_cmp_ps(g, _mm256_setzero_ps(), _CMP_LT_OQ));
    return _mm256_mul_ps(_mm256_mul_ps(g, sig), u);
}

/* 8 lanes of a float32 or bfloat16 row, `lanes` (1..8) of them real; the rest read as 0 */
static inline __m256 load8(const void *p, int64_t lanes, int bf16) {
    if (lanes >= 8) {
        if (!bf16) return _mm256_loadu_ps((const float *)p);
        __m128i h = _mm_loadu_si128((const __m128i *)p);
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
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

/* `nv` 8-column vectors of the tile from column c0, for `rows` rows: out[m][c0 .. c0 + 8 nv) */
static inline __attribute__((always_inline)) void block_f32(const float *x, int64_t ldx, const float *w,
                                                            int64_t k_len, float out[MR][TILE], const int rows,
                                                            const int nv, const int c0) {
    __m256 acc[MR][8];
    for (int m = 0; m < rows; m++)
        for (int j = 0; j < nv; j++) acc[m][j] = _mm256_setzero_ps();
    for (int64_t k = 0; k < k_len; k++) {
        const float *wk = w + k * TILE + c0;
        for (int m = 0; m < rows; m++) {
            __m256 xb = _mm256_broadcast_ss(x + m * ldx + k);
            for (int j = 0; j < nv; j++) acc[m][j] = _mm256_fmadd_ps(_mm256_loadu_ps(wk + 8 * j), xb, acc[m][j]);
        }
    }
    for (int m = 0; m < rows; m++)
        for (int j = 0; j < nv; j++) _mm256_storeu_ps(out[m] + c0 + 8 * j, acc[m][j]);
}

static inline __attribute__((always_inline)) void block_bf16(const uint16_t *x, int64_t ldx, const uint16_t *w,
                                                             int64_t k_len, float out[MR][TILE], const int rows,
                                                             const int nv, const int c0) {
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    __m256 acc[MR][8];
    for (int m = 0; m < rows; m++)
        for (int j = 0; j < nv; j++) acc[m][j] = _mm256_setzero_ps();
    for (int64_t kp = 0; kp < k_len / 2; kp++) {
        const uint16_t *wk = w + (kp * TILE + c0) * 2;
        __m256 even[8], odd[8];
        for (int j = 0; j < nv; j++) {
            __m256i pairs = _mm256_loadu_si256((const __m256i *)(wk + 16 * j));
            even[j] = _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
            odd[j] = _mm256_castsi256_ps(_mm256_and_si256(pairs, high));
        }
        for (int m = 0; m < rows; m++) {
            int32_t pair;
            memcpy(&pair, x + m * ldx + 2 * kp, sizeof pair);
            __m256i xp = _mm256_set1_epi32(pair);
            __m256 xe = _mm256_castsi256_ps(_mm256_slli_epi32(xp, 16)), xo = _mm256_castsi256_ps(_mm256_and_si256(xp, high));
            for (int j = 0; j < nv; j++) acc[m][j] = _mm256_fmadd_ps(odd[j], xo, _mm256_fmadd_ps(even[j], xe, acc[m][j]));
        }
    }
    for (int m = 0; m < rows; m++)
        for (int j = 0; j < nv; j++) _mm256_storeu_ps(out[m] + c0 + 8 * j, acc[m][j]);
}

/* rows (<= row_chunk) and the column blocks are compile-time constants in each case, so the accumulators stay in
 * registers: 1 row x 64 columns, 2 x 32 (two passes), else up to 6 (bfloat16: 4) x 16 (four passes) */
#define AVX2_BLOCKS(fn, X, W, R)                                                                                     \
    do {                                                                                                             \
        if ((R) == 1) { fn(X, ldx, W, k_len, out, 1, 8, 0); }                                                        \
        else if ((R) == 2) { fn(X, ldx, W, k_len, out, 2, 4, 0); fn(X, ldx, W, k_len, out, 2, 4, 32); }               \
        else { for (int c0 = 0; c0 < TILE; c0 += 16) fn(X, ldx, W, k_len, out, R, 2, c0); }                          \
    } while (0)

static void tile_rows(const void *x, int64_t ldx, const void *w, int64_t k_len, float out[MR][TILE], int rows,
                      int bf16) {
    if (bf16) {
        const uint16_t *xb = (const uint16_t *)x, *wb = (const uint16_t *)w;
        switch (rows) {
            case 1: AVX2_BLOCKS(block_bf16, xb, wb, 1); return;
            case 2: AVX2_BLOCKS(block_bf16, xb, wb, 2); return;
            case 3: AVX2_BLOCKS(block_bf16, xb, wb, 3); return;
            default: AVX2_BLOCKS(block_bf16, xb, wb, 4); return;
        }
    }
    const float *xf = (const float *)x, *wf = (const float *)w;
    switch (rows) {
        case 1: AVX2_BLOCKS(block_f32, xf, wf, 1); return;
        case 2: AVX2_BLOCKS(block_f32, xf, wf, 2); return;
        case 3: AVX2_BLOCKS(block_f32, xf, wf, 3); return;
        case 4: AVX2_BLOCKS(block_f32, xf, wf, 4); return;
        case 5: AVX2_BLOCKS(block_f32, xf, wf, 5); return;
        default: AVX2_BLOCKS(block_f32, xf, wf, 6); return;
    }
}

static int row_chunk(int bf16) { return bf16 ? AVX2_BF16_ROWS : MR; }
