/* gemm.c's AVX-512 tile kernels and epilogue (included by gemm.c; see there): zmm registers hold 16 float32 lanes,
 * so a tile row is 4 vectors and MR = 6 rows keep 24 accumulators in the 32 registers. bfloat16 multiplies k-pairs
 * with vdpbf16ps (AVX-512-BF16). */
/* exp(x) for x <= 0 (callers pass -|g|): 2^(x log2 e), 2^frac by its degree-6 Taylor polynomial (relative error
 * ~1e-7 on [-0.5, 0.5]) */
static inline __m512 exp_nonpositive(__m512 x) {
    __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(1.44269504088896341f));
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(t, n);
    static const float c[] = {1.5403530e-4f, 1.3333558e-3f, 9.6181291e-3f, 5.5504109e-2f, 2.4022651e-1f,
                              6.9314718e-1f, 1.0f};
    __m512 p = _mm512_set1_ps(c[0]);
    for (int i = 1; i < 7; i++) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c[i]));
    return _mm512_scalef_ps(p, n);
}

static inline __m512 silu_mul(__m512 g, __m512 u) { /* silu(g) * u = g * sigmoid(g) * u, exp of a non-positive */
    __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));
    __m512 r = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
    __m512 sig = _mm512_mask_mul_ps(r, _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ), r, e);
    return _mm512_mul_ps(_mm512_mul_ps(g, sig), u);
}

static inline __m512 load_lanes(const void *p, __mmask16 mask, int bf16) {
    if (!bf16) return _mm512_maskz_loadu_ps(mask, p);
    __m256i h = _mm256_maskz_loadu_epi16(mask, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline void store_lanes(void *p, __m512 v, __mmask16 mask, int bf16) {
#if defined(__AVX512BF16__)
    if (bf16) { /* round to nearest even, as torch converts */
        _mm256_mask_storeu_epi16(p, mask, (__m256i)_mm512_cvtneps_pbh(v));
        return;
    }
#endif
    _mm512_mask_storeu_ps(p, mask, v);
}

/* One tile's results for `rows` rows ([rows][TILE] float32 in `acc`) through the epilogue into out (float32 or
 * bfloat16), 16 lanes at a time. Tile column c is output column col0 + c (SwiGLU: col0 + c for c < TILE / 2, from
 * gate column c and up column TILE / 2 + c). */
static void epilogue(float acc[MR][TILE], int rows, const float *bias, const void *other, int64_t ldo, void *out,
                     int64_t ldout, int64_t col0, int64_t n_out, int kind, int bf16) {
    const size_t elem = bf16 ? 2 : 4;
    const int outputs = kind == EPI_SWIGLU ? TILE / 2 : TILE;
    for (int m = 0; m < rows; m++) {
        for (int j = 0; j < outputs; j += 16) {
            int64_t lanes = n_out - (col0 + j);
            if (lanes <= 0) break;
            __mmask16 mask = lanes >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << lanes) - 1);
            __m512 v = _mm512_loadu_ps(acc[m] + j);
            if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + j));
            if (kind == EPI_SWIGLU) {
                __m512 u = _mm512_loadu_ps(acc[m] + TILE / 2 + j);
                if (bias) u = _mm512_add_ps(u, _mm512_loadu_ps(bias + TILE / 2 + j));
                v = silu_mul(v, u);
            } else if (kind == EPI_ADD) {
                v = _mm512_add_ps(v, load_lanes((const char *)other + (m * ldo + col0 + j) * elem, mask, bf16));
            }
            store_lanes((char *)out + (m * ldout + col0 + j) * elem, v, mask, bf16);
        }
    }
}

static inline __attribute__((always_inline)) void tile_f32(const float *x, int64_t ldx, const float *w, int64_t k_len,
                                                           float out[MR][TILE], const int rows, struct ahead pf) {
    __m512 acc[MR][4];
    for (int m = 0; m < rows; m++)
        for (int j = 0; j < 4; j++) acc[m][j] = _mm512_setzero_ps();
    int64_t due = 0;
    for (int64_t k = 0; k < k_len; k++) {
        PREFETCH_AHEAD(pf, due, 1, k_len);
        const float *wk = w + k * TILE;
        __m512 w0 = _mm512_loadu_ps(wk), w1 = _mm512_loadu_ps(wk + 16), w2 = _mm512_loadu_ps(wk + 32),
               w3 = _mm512_loadu_ps(wk + 48);
        for (int m = 0; m < rows; m++) {
            __m512 xb = _mm512_set1_ps(x[m * ldx + k]);
            acc[m][0] = _mm512_fmadd_ps(w0, xb, acc[m][0]);
            acc[m][1] = _mm512_fmadd_ps(w1, xb, acc[m][1]);
            acc[m][2] = _mm512_fmadd_ps(w2, xb, acc[m][2]);
            acc[m][3] = _mm512_fmadd_ps(w3, xb, acc[m][3]);
        }
    }
    for (int m = 0; m < rows; m++)
        for (int j = 0; j < 4; j++) _mm512_storeu_ps(out[m] + 16 * j, acc[m][j]);
}

#if defined(__AVX512BF16__)
static inline __attribute__((always_inline)) void tile_bf16(const uint16_t *x, int64_t ldx, const uint16_t *w,
                                                            int64_t k_len, float out[MR][TILE], const int rows,
                                                            struct ahead pf) {
    __m512 acc[MR][4];
    for (int m = 0; m < rows; m++)
        for (int j = 0; j < 4; j++) acc[m][j] = _mm512_setzero_ps();
    int64_t due = 0;
    for (int64_t kp = 0; kp < k_len / 2; kp++) {
        PREFETCH_AHEAD(pf, due, 1, k_len / 2);
        const uint16_t *wk = w + kp * 2 * TILE;
        __m512bh w0 = (__m512bh)_mm512_loadu_si512(wk), w1 = (__m512bh)_mm512_loadu_si512(wk + 32),
                 w2 = (__m512bh)_mm512_loadu_si512(wk + 64), w3 = (__m512bh)_mm512_loadu_si512(wk + 96);
        for (int m = 0; m < rows; m++) {
            int32_t pair;
            memcpy(&pair, x + m * ldx + 2 * kp, sizeof pair);
            __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
            acc[m][0] = _mm512_dpbf16_ps(acc[m][0], w0, xb);
            acc[m][1] = _mm512_dpbf16_ps(acc[m][1], w1, xb);
            acc[m][2] = _mm512_dpbf16_ps(acc[m][2], w2, xb);
            acc[m][3] = _mm512_dpbf16_ps(acc[m][3], w3, xb);
        }
    }
    for (int m = 0; m < rows; m++)
        for (int j = 0; j < 4; j++) _mm512_storeu_ps(out[m] + 16 * j, acc[m][j]);
}
#endif

/* rows is a compile-time constant in each case, so the accumulators stay in registers */
static void tile_rows(const void *x, int64_t ldx, const void *w, int64_t k_len, float out[MR][TILE], int rows,
                      int bf16, struct ahead pf) {
#if defined(__AVX512BF16__)
    if (bf16) {
        const uint16_t *xb = (const uint16_t *)x, *wb = (const uint16_t *)w;
        switch (rows) {
            case 1: tile_bf16(xb, ldx, wb, k_len, out, 1, pf); return;
            case 2: tile_bf16(xb, ldx, wb, k_len, out, 2, pf); return;
            case 3: tile_bf16(xb, ldx, wb, k_len, out, 3, pf); return;
            case 4: tile_bf16(xb, ldx, wb, k_len, out, 4, pf); return;
            case 5: tile_bf16(xb, ldx, wb, k_len, out, 5, pf); return;
            default: tile_bf16(xb, ldx, wb, k_len, out, 6, pf); return;
        }
    }
#endif
    const float *xf = (const float *)x, *wf = (const float *)w;
    switch (rows) {
        case 1: tile_f32(xf, ldx, wf, k_len, out, 1, pf); return;
        case 2: tile_f32(xf, ldx, wf, k_len, out, 2, pf); return;
        case 3: tile_f32(xf, ldx, wf, k_len, out, 3, pf); return;
        case 4: tile_f32(xf, ldx, wf, k_len, out, 4, pf); return;
        case 5: tile_f32(xf, ldx, wf, k_len, out, 5, pf); return;
        default: tile_f32(xf, ldx, wf, k_len, out, 6, pf); return;
    }
}

static int row_chunk(int bf16) { (void)bf16; return MR; }

static int widen_x(int bf16) { (void)bf16; return 0; } /* vdpbf16ps takes bfloat16 x as it is */
