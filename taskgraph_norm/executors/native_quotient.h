/* FINALIZE's quotient row, y = (x / rms) * w, with the bits of IEEE division.
 *
 * The divider is FINALIZE's bound: vdivps retires 8 fp32 quotients in about five
 * cycles, so a 4096-wide row spends ~0.7 us dividing once its sums are done
 * (0.22 us).  The divisor is one value per row, so its reciprocal is taken once and
 * every element then costs five fused multiply-adds, which give the correctly
 * rounded quotient, the same bits as x / rms:
 *
 *   y  = RN(1 / b)                          once per row (one division)
 *   q0 = RN(a y)
 *   r0 = RN(a - b q0),  q1 = RN(q0 + r0 y)  (fma, fma)
 *   r1 = RN(a - b q1),  q  = RN(q1 + r1 y)  (fma, fma)
 *
 * Why q = RN(a / b), for 2^-40 <= b <= 2^40 and a = 0 or 2^-60 <= |a| <= 2^60
 * (fp32, precision 24, round to nearest even):
 *
 *   1. y = RN(1/b) is normal, with relative error below 2^-24.  So a y is within
 *      relative 2^-24 of a / b, and q0 within 2 ulps of it: e0 = a/b - q0 is small.
 *   2. a - b q0 = b e0 is a nonzero multiple of ulp(b) ulp(q0) >= 2^-107 (or 0), so
 *      r0 is normal and r0 = b e0 (1 + d), |d| <= 2^-24.  The fma's exact value
 *      q0 + r0 y = a/b + e0 (d + d' + d d') (y = (1 + d') / b) is within 2^-22 ulp
 *      of a / b, so q1, its rounding, is a faithful rounding of a / b (one of the two
 *      floats around it).  (q0 itself need not be: when a / b is just below a power
 *      of two and 1 / b's rounding error is at its largest, q0 can be 1.5 ulps off.)
 *   3. Markstein's theorem (P. Markstein, IBM J. Res. Dev. 34(1), 1990; Muller et
 *      al., Handbook of Floating-Point Arithmetic, the division chapter): when y
 *      approximates 1 / b with relative error below 2^-p and q1 is a faithful
 *      rounding of a / b, r1 = a - b q1 is exact and RN(q1 + r1 y) = RN(a / b),
 *      given no underflow or overflow on the way.  The ranges keep every value
 *      normal: |a / b| lies in [2^-100, 2^100], and a - b q1 is a multiple of
 *      2^(e_a - 48) >= 2^-108.
 *   4. a = -0: the steps give +0 (an fma adding -0 to +0 gives +0); the sign of a
 *      is ORed into q, which changes nothing for any other a (q has a's sign).
 *
 * Rows whose rms is outside [2^-40, 2^40] (zero, inf, NaN, tiny or huge rows),
 * and any vector with an element outside the range above (subnormal quotients,
 * infinities, NaN), divide as before.  Then q is multiplied by w (w + offset)
 * exactly as the scalar loop does.  tests/test_native_quotient.py compares every
 * path with torch's division on hard quotients (every significand for divisors
 * whose reciprocals round worst, ties on subnormal midpoints, the range's edges);
 * tests/test_native_quotient_widths.py builds this file at each vector width on its
 * own (and mutants of it, which must fail); the portable build keeps the divider, and
 * tests/test_native.py compares the two builds' bits.
 *
 * Measured on one thread (Sapphire Rapids class, a 4096-wide row after its sums):
 * FINALIZE ~700 -> ~250 ns.
 */
#ifndef TGN_NATIVE_QUOTIENT_H
#define TGN_NATIVE_QUOTIENT_H

#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__FMA__)
#define TGN_QUOTIENT_LANES 16
#elif defined(__AVX2__) && defined(__FMA__)
#define TGN_QUOTIENT_LANES 8
#else
#define TGN_QUOTIENT_LANES 1
#endif

#if TGN_QUOTIENT_LANES > 1
#include <immintrin.h>
#endif

/* |a| bits: 2^-60 and 2^60; rms: 2^-40 and 2^40.  These and the number of
 * corrections may be set otherwise only by the tests' mutants (a build with one of
 * them changed must fail tests/test_native_quotient_widths.py). */
#ifndef TGN_Q_LO
#define TGN_Q_LO 0x21800000u
#endif
#ifndef TGN_Q_HI
#define TGN_Q_HI 0x5d800000u
#endif
#ifndef TGN_Q_RMS_LO
#define TGN_Q_RMS_LO 0x2b800000u
#endif
#ifndef TGN_Q_RMS_HI
#define TGN_Q_RMS_HI 0x53800000u
#endif
#ifndef TGN_Q_CORRECTIONS
#define TGN_Q_CORRECTIONS 2
#endif

/* The scalar loop: the divider.  w NULL: no weight; off != 0: weight w + off. */
static inline void tgn_quotient_div_f32(const float *x, float *y, const float *w, float off, int64_t n,
                                        float rms)
{
    if (!w)
        for (int64_t j = 0; j < n; ++j)
            y[j] = x[j] / rms;
    else if (off != 0.0f)
        for (int64_t j = 0; j < n; ++j)
            y[j] = (x[j] / rms) * (w[j] + off);
    else
        for (int64_t j = 0; j < n; ++j)
            y[j] = (x[j] / rms) * w[j];
}

static inline int tgn_quotient_rms_in_range(float rms)
{
    uint32_t u;
    memcpy(&u, &rms, sizeof u); /* a negative or NaN rms fails too */
    return u >= TGN_Q_RMS_LO && u <= TGN_Q_RMS_HI;
}

#if TGN_QUOTIENT_LANES == 16
#define TGN_QV __m512
#define TGN_Q_LOAD _mm512_loadu_ps
#define TGN_Q_STORE _mm512_storeu_ps
#define TGN_Q_SET1 _mm512_set1_ps
#define TGN_Q_MUL _mm512_mul_ps
#define TGN_Q_ADD _mm512_add_ps
#define TGN_Q_DIV _mm512_div_ps
#define TGN_Q_FMADD _mm512_fmadd_ps
#define TGN_Q_FNMADD _mm512_fnmadd_ps
/* All lanes of a: 0 or 2^-60 <= |a| <= 2^60? */
static inline int tgn_q_in_range(__m512 a)
{
    __m512i mag = _mm512_and_si512(_mm512_castps_si512(a), _mm512_set1_epi32(0x7fffffff));
    __mmask16 ok = _mm512_cmple_epu32_mask(_mm512_sub_epi32(mag, _mm512_set1_epi32((int)TGN_Q_LO)),
                                           _mm512_set1_epi32((int)(TGN_Q_HI - TGN_Q_LO)))
                   | _mm512_cmpeq_epi32_mask(mag, _mm512_setzero_si512());
    return ok == 0xffff;
}
static inline __m512 tgn_q_sign_of(__m512 q, __m512 a)
{
    return _mm512_castsi512_ps(_mm512_or_si512(
        _mm512_castps_si512(q), _mm512_and_si512(_mm512_castps_si512(a), _mm512_set1_epi32((int)0x80000000u))));
}
#elif TGN_QUOTIENT_LANES == 8
#define TGN_QV __m256
#define TGN_Q_LOAD _mm256_loadu_ps
#define TGN_Q_STORE _mm256_storeu_ps
#define TGN_Q_SET1 _mm256_set1_ps
#define TGN_Q_MUL _mm256_mul_ps
#define TGN_Q_ADD _mm256_add_ps
#define TGN_Q_DIV _mm256_div_ps
#define TGN_Q_FMADD _mm256_fmadd_ps
#define TGN_Q_FNMADD _mm256_fnmadd_ps
static inline int tgn_q_in_range(__m256 a)
{
    /* magnitudes as signed ints (all >= 0): LO <= mag <= HI, or mag == 0 */
    __m256i mag = _mm256_and_si256(_mm256_castps_si256(a), _mm256_set1_epi32(0x7fffffff));
    __m256i below = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)TGN_Q_LO), mag);
    __m256i above = _mm256_cmpgt_epi32(mag, _mm256_set1_epi32((int)TGN_Q_HI));
    __m256i zero = _mm256_cmpeq_epi32(mag, _mm256_setzero_si256());
    __m256i bad = _mm256_andnot_si256(zero, _mm256_or_si256(below, above));
    return _mm256_testz_si256(bad, bad);
}
static inline __m256 tgn_q_sign_of(__m256 q, __m256 a)
{
    return _mm256_or_ps(q, _mm256_and_ps(a, _mm256_castsi256_ps(_mm256_set1_epi32((int)0x80000000u))));
}
#endif

/* y[j] = (x[j] / rms) * w[j] ((w[j] + off) when off != 0; no weight when w is NULL),
 * with the bits of the scalar loop.  y may be x (each vector is read before it is
 * written). */
static inline void tgn_quotient_row_f32(const float *x, float *y, const float *w, float off, int64_t n,
                                        float rms)
{
#if TGN_QUOTIENT_LANES > 1
    if (!tgn_quotient_rms_in_range(rms)) {
        tgn_quotient_div_f32(x, y, w, off, n, rms);
        return;
    }
    const float inv = 1.0f / rms;
    const TGN_QV b = TGN_Q_SET1(rms), r = TGN_Q_SET1(inv), o = TGN_Q_SET1(off);
    const int64_t L = TGN_QUOTIENT_LANES;
    int64_t j = 0;
    for (; j + L <= n; j += L) {
        TGN_QV a = TGN_Q_LOAD(x + j), q;
        if (tgn_q_in_range(a)) {
            q = TGN_Q_MUL(a, r);
            for (int k = 0; k < TGN_Q_CORRECTIONS; ++k) /* unrolled: a constant count */
                q = TGN_Q_FMADD(TGN_Q_FNMADD(q, b, a), r, q);
            q = tgn_q_sign_of(q, a);
        } else {
            q = TGN_Q_DIV(a, b);
        }
        if (w) {
            TGN_QV wv = TGN_Q_LOAD(w + j);
            if (off != 0.0f)
                wv = TGN_Q_ADD(wv, o);
            q = TGN_Q_MUL(q, wv);
        }
        TGN_Q_STORE(y + j, q);
    }
    tgn_quotient_div_f32(x + j, y + j, w ? w + j : NULL, off, n - j, rms);
#else
    tgn_quotient_div_f32(x, y, w, off, n, rms);
#endif
}

#endif /* TGN_NATIVE_QUOTIENT_H */
