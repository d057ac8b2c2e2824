/* The floating-point mode of a kernel's threads (included by gemm.c and paged_decode.c).
 *
 * Subnormal floats (below 1.2e-38) take a microcode assist per operation on x86: a bfloat16 KV cache of them ran the
 * decode kernel ~50x slower, and float32 activations of them the tiled GEMM ~60x slower. So each kernel thread flushes
 * them to zero (MXCSR's FTZ and DAZ) while it runs its share and restores its mode after: the rest of the process
 * computes as it did. */
#ifndef LADLE_FPMODE_H
#define LADLE_FPMODE_H
#if defined(__SSE__)
#include <xmmintrin.h>
#define FLUSH_SUBNORMALS 0x8040u /* FTZ | DAZ */
static inline unsigned flush_subnormals(void) {
    const unsigned mode = _mm_getcsr();
    _mm_setcsr(mode | FLUSH_SUBNORMALS);
    return mode;
}
static inline void restore_mode(unsigned mode) { _mm_setcsr(mode); }
#else
static inline unsigned flush_subnormals(void) { return 0; }
static inline void restore_mode(unsigned mode) { (void)mode; }
#endif
#endif
