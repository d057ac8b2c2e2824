/* Vector helpers shared by the AVX2 kernels (gemm_avx2.h, paged_decode.c). */
#ifndef LADLE_SIMD_AVX2_H
#define LADLE_SIMD_AVX2_H
#include <immintrin.h>

/* exp(x) for x <= 0 (callers pass -|g| or s - max): 2^(x log2 e), 2^frac by its degree-6 Taylor polynomial (relative
 * error ~1e-7 on [-0.5, 0.5]), 2^n built in the exponent bits (x >= -87 keeps n >= -126, a normal float) */
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

/* 8 float32 or bfloat16 values at p as float32 (bfloat16 is the top half of a float32) */
static inline __m256 load8_full(const void *p, const int bf16) {
    if (!bf16) return _mm256_loadu_ps((const float *)p);
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

#endif
