/* What the exact domain's two row files share (native_exact.c: the scale and the fp32
 * rows; native_exact_f64.c: the fp64 rows): the fp64 vector lanes and the one-element
 * step of the exact sums. */
#ifndef TGN_NATIVE_EXACT_H
#define TGN_NATIVE_EXACT_H

#include <stdint.h>
#include <string.h>

#include "native_finalize.h"
#include "tgn_native.h"

/* GCC/Clang vector extensions: 4 fp64 lanes (one AVX register, or two SSE2 or NEON
 * ones), two of them per step; with AVX the loads, widening and maxima are the
 * one-instruction intrinsics.  memcpy loads are unaligned-safe. */
typedef double v4d __attribute__((vector_size(32)));
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef int64_t v4l __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));

#if defined(__AVX__)
#include <immintrin.h>
INLINE v4d load4_f32(const float *p) { return (v4d)_mm256_cvtps_pd(_mm_loadu_ps(p)); }
INLINE v4d max4_f64(v4d a, v4d b) { return (v4d)_mm256_max_pd((__m256d)a, (__m256d)b); }
#else
INLINE v4d load4_f32(const float *p)
{
    v4f f;
    memcpy(&f, p, sizeof f);
    return __builtin_convertvector(f, v4d);
}
/* a > b ? a : b per lane (a NaN a gives b): what maxpd does. */
INLINE v4d max4_f64(v4d a, v4d b)
{
    v4l gt = a > b;
    return (v4d)(((v4l)a & gt) | ((v4l)b & ~gt));
}
#endif

INLINE v4d load4_f64(const double *p)
{
    v4d d;
    memcpy(&d, p, sizeof d);
    return d;
}

/* One element of the exact sums (the tails; the files' vector loops are the same
 * operations, lane by lane): S1 += q1, S2 += q2. */
#define EXACT_STEP(xv, s1, s2, t1, t2)                                                 \
    do {                                                                               \
        double v_ = (double)(xv) * (double)(xv);                                       \
        double q1_ = (v_ + (s1)) - (s1);                                               \
        double r_ = v_ - q1_;                                                          \
        (t1) += q1_;                                                                   \
        (t2) += (r_ + (s2)) - (s2);                                                    \
    } while (0)

#endif /* TGN_NATIVE_EXACT_H */
