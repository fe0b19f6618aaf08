/* FINALIZE's quotient row, y = (x / rms) * w, with the bits of IEEE division.
 *
 * The divider bounds FINALIZE: vdivps retires 8 fp32 quotients in about five cycles,
 * so a 4096-wide row spends ~0.85 us dividing once its sums (0.22 us) are done.  The
 * divisor is one value per row, so its reciprocal is taken once, as a sum of two
 * floats, and every element then costs a multiply and three fused multiply-adds,
 * which give the correctly rounded quotient, the same bits as x / rms:
 *
 *   y  = RN(1 / b)                 once per row (one division)
 *   e  = RN(1 - b y)               once per row (fma; exact)
 *   yl = RN(e y)                   once per row: y + yl is 1 / b within 2^-47
 *   q0 = RN(a y + RN(a yl))        (mul, fma)
 *   r  = RN(a - b q0)              (fma; exact)
 *   q  = RN(q0 + r y)              (fma)
 *
 * Why q = RN(a / b), for 2^-40 <= b <= 2^40 and a = +0 or 2^-50 <= |a| <= 2^60
 * (fp32, precision p = 24, round to nearest even):
 *
 *   1. y = RN(1/b) is normal, with relative error below 2^-24.
 *   2. y is a faithful quotient of 1 / b, so its remainder 1 - b y is a float (the
 *      remainder of a faithful division is exact, away from underflow: b y is near
 *      1), and e = 1 - b y exactly, with e / b = 1/b - y.  So e y = (1/b - y)(1 - e)
 *      and yl = (1/b - y)(1 + d1), |d1| <= 2^-23, and y + yl = (1/b)(1 + h) with
 *      |h| <= 2^-24 2^-23 = 2^-47.  (e is 0 or at least 2^-47, so e y is normal.)
 *   3. t = RN(a yl) is a yl within 2^-24 of itself (or 2^-150 absolutely, if it is
 *      subnormal: far below what follows), so the fma's exact value a y + t is
 *      a/b (1 + h'), |h'| < 2^-46, and q0, its rounding, is a faithful rounding of
 *      a / b: one of the two floats around it (a value that close to a / b is nearer
 *      to one of them than to any other float).  (RN(a y) alone need not be: where
 *      a / b is just below a power of two and 1 / b's rounding error is at its
 *      largest, it can be 1.5 ulps off.)
 *   4. Markstein's theorem (P. Markstein, IBM J. Res. Dev. 34(1), 1990; Muller et
 *      al., Handbook of Floating-Point Arithmetic, the division chapter): when y
 *      approximates 1 / b with relative error below 2^-p and q0 is a faithful
 *      rounding of a / b, r = a - b q0 is a float and RN(q0 + r y) = RN(a / b), given
 *      no underflow or overflow on the way.  The ranges keep every value normal:
 *      |a / b| lies in [2^-90, 2^100], and a - b q0 is a multiple of ulp(b) ulp(q0)
 *      >= 2^(e_a - 47) >= 2^-97.
 *   5. a = +0 gives +0 at every step (RN(+0 + -0) is +0).  a = -0 would give +0 where
 *      yl < 0, so -0 is left to the divider.
 *
 * Rows whose rms is outside [2^-40, 2^40] (zero, inf, NaN, tiny or huge rows), and any
 * vector with an element outside the range above (-0, subnormals and tiny values,
 * infinities, NaN), divide as before.  Then q is multiplied by w (w + offset) exactly
 * as the scalar loop does.  tests/test_native_quotient_widths.py builds this file at
 * each vector width on its own and compares it with torch's division over every
 * significand of the divisors whose reciprocals round worst, the ranges' edges,
 * zeros and specials (and builds mutants of it, which must fail);
 * tests/test_native_quotient.py compares the kernel's y with the division (ties on
 * subnormal midpoints, zero and infinite rms); the portable build keeps the divider,
 * and tests/test_native.py compares the two builds' bits.
 *
 * Measured (python benchmarks/finalize.py, one thread, a 4096-row): see
 * docs/performance.md, "FINALIZE's quotient".
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

/* |a| bits: 2^-50 and 2^60; rms: 2^-40 and 2^40.  These and the number of
 * corrections may be set otherwise only by the tests' mutants (a build with one of
 * them changed must fail tests/test_native_quotient_widths.py). */
#ifndef TGN_Q_LO
#define TGN_Q_LO 0x26800000u
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
#define TGN_Q_CORRECTIONS 1
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
#define TGN_Q_STREAM _mm512_stream_ps
#define TGN_Q_SET1 _mm512_set1_ps
#define TGN_Q_MUL _mm512_mul_ps
#define TGN_Q_ADD _mm512_add_ps
#define TGN_Q_SUB _mm512_sub_ps
#define TGN_Q_DIV _mm512_div_ps
#define TGN_Q_FMADD _mm512_fmadd_ps
#define TGN_Q_FNMADD _mm512_fnmadd_ps
/* All lanes of a: +0, or 2^-50 <= |a| <= 2^60? */
static inline int tgn_q_in_range(__m512 a)
{
    __m512i bits = _mm512_castps_si512(a);
    __m512i mag = _mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff));
    __mmask16 ok = _mm512_cmple_epu32_mask(_mm512_sub_epi32(mag, _mm512_set1_epi32((int)TGN_Q_LO)),
                                           _mm512_set1_epi32((int)(TGN_Q_HI - TGN_Q_LO)))
                   | _mm512_cmpeq_epi32_mask(bits, _mm512_setzero_si512());
    return ok == 0xffff;
}
#elif TGN_QUOTIENT_LANES == 8
#define TGN_QV __m256
#define TGN_Q_LOAD _mm256_loadu_ps
#define TGN_Q_STORE _mm256_storeu_ps
#define TGN_Q_STREAM _mm256_stream_ps
#define TGN_Q_SET1 _mm256_set1_ps
#define TGN_Q_MUL _mm256_mul_ps
#define TGN_Q_ADD _mm256_add_ps
#define TGN_Q_SUB _mm256_sub_ps
#define TGN_Q_DIV _mm256_div_ps
#define TGN_Q_FMADD _mm256_fmadd_ps
#define TGN_Q_FNMADD _mm256_fnmadd_ps
static inline int tgn_q_in_range(__m256 a)
{
    /* magnitudes as signed ints (all >= 0): LO <= mag <= HI, or the bits of +0 */
    __m256i bits = _mm256_castps_si256(a);
    __m256i mag = _mm256_and_si256(bits, _mm256_set1_epi32(0x7fffffff));
    __m256i below = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)TGN_Q_LO), mag);
    __m256i above = _mm256_cmpgt_epi32(mag, _mm256_set1_epi32((int)TGN_Q_HI));
    __m256i zero = _mm256_cmpeq_epi32(bits, _mm256_setzero_si256());
    __m256i bad = _mm256_andnot_si256(zero, _mm256_or_si256(below, above));
    return _mm256_testz_si256(bad, bad);
}
#endif

/* y = RN(1/b) and yl = RN(RN(1 - b y) y) (see the top): 1/b - y to 2^-23. */
static inline void tgn_q_pair1(float b, float *y, float *yl)
{
    *y = 1.0f / b;
    *yl = __builtin_fmaf(-b, *y, 1.0f) * *y;
}

#if TGN_QUOTIENT_LANES > 1
/* One row's divisor, ready for tgn_q_vec: b, y = RN(1/b) and yl (see the top). */
typedef struct {
    TGN_QV b, r, rl;
} tgn_q_div_t;

static inline tgn_q_div_t tgn_q_setup(float rms)
{
    float inv, lo;
    tgn_q_pair1(rms, &inv, &lo);
    tgn_q_div_t d = {TGN_Q_SET1(rms), TGN_Q_SET1(inv), TGN_Q_SET1(lo)};
    return d;
}

/* tgn_q_setup's divisor from a pair tgn_q_pairs made: pair[0] = y, pair[1] = yl */
static inline tgn_q_div_t tgn_q_from_pair(float rms, const float *pair)
{
    tgn_q_div_t d = {TGN_Q_SET1(rms), TGN_Q_SET1(pair[0]), TGN_Q_SET1(pair[1])};
    return d;
}

/* a / b per lane, IEEE division's bits; b from tgn_q_setup of an rms for which
 * tgn_quotient_rms_in_range holds (a vector with a lane outside a's range divides). */
static inline TGN_QV tgn_q_vec(const tgn_q_div_t *d, TGN_QV a)
{
    if (!tgn_q_in_range(a))
        return TGN_Q_DIV(a, d->b);
    TGN_QV q = TGN_Q_FMADD(a, d->r, TGN_Q_MUL(a, d->rl)); /* faithful */
    for (int k = 0; k < TGN_Q_CORRECTIONS; ++k)            /* unrolled: a constant count */
        q = TGN_Q_FMADD(TGN_Q_FNMADD(q, d->b, a), d->r, q);
    return q;
}

/* tgn_q_vec without the range check, for a caller that knows every lane of a is +-0
 * or 2^-50 <= |a| <= 2^60 (an fp16 value, for one; so is any finite a of a row whose rms
 * is in range and whose hidden size is below 2^38, except the tiny ones: rms^2 >=
 * a^2 / D there).  Round to nearest even is symmetric, so every step of the fmas on -a
 * is the negation of the same step on a (a nonzero a keeps q0 nonzero, and an exact
 * zero remainder is +0 for either sign, which leaves q0 as it is): the lanes of a
 * nonzero a come out with a's sign already.  Only a = -0 would come out +0 (RN(-0 +
 * +0) is +0), and a's sign put back with an OR makes it -0 again without touching the
 * others (a +0 gives +0 at every step, and a negative a's q is negative). */
static inline TGN_QV tgn_q_vec_ranged(const tgn_q_div_t *d, TGN_QV a)
{
    TGN_QV q = TGN_Q_FMADD(a, d->r, TGN_Q_MUL(a, d->rl));
    for (int k = 0; k < TGN_Q_CORRECTIONS; ++k)
        q = TGN_Q_FMADD(TGN_Q_FNMADD(q, d->b, a), d->r, q);
#if TGN_QUOTIENT_LANES == 16 /* q | (a & sign) */
    const __m512i sign = _mm512_set1_epi32((int)0x80000000u);
    return _mm512_castsi512_ps(_mm512_ternarylogic_epi32(_mm512_castps_si512(q), _mm512_castps_si512(a), sign, 0xF8));
#else
    const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32((int)0x80000000u));
    return _mm256_or_ps(q, _mm256_and_ps(a, sign));
#endif
}
#endif

/* tgn_q_setup's y and yl for n divisors b at once, into pairs[2 k] and pairs[2 k + 1]
 * (native_narrow_direct.c's tgn_narrow_divisors: a step of short rows' pairs in one
 * pass): the same three operations, lane by lane (tests/test_native_quotient_widths.py
 * compares them). */
static inline void tgn_q_pairs(const float *b, int64_t n, float *pairs)
{
    int64_t k = 0;
#if TGN_QUOTIENT_LANES == 16
    const __m512 one = _mm512_set1_ps(1.0f);
    const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
    for (; k + 16 <= n; k += 16) {
        const __m512 v = _mm512_loadu_ps(b + k), inv = _mm512_div_ps(one, v);
        const __m512 lo = _mm512_mul_ps(_mm512_fnmadd_ps(v, inv, one), inv);
        _mm512_storeu_ps(pairs + 2 * k, _mm512_permutex2var_ps(inv, first, lo));
        _mm512_storeu_ps(pairs + 2 * k + 16, _mm512_permutex2var_ps(inv, second, lo));
    }
#endif
    for (; k < n; ++k)
        tgn_q_pair1(b[k], pairs + 2 * k, pairs + 2 * k + 1);
}

/* 1 where every lane of x[0, n) is +-0 or 2^-50 <= |a| <= 2^60 (no tiny, huge, infinite
 * or NaN value): tgn_q_vec_ranged may divide it. */
static inline int tgn_quotient_all_ranged(const float *x, int64_t n)
{
    int ok = 1;
    for (int64_t j = 0; j < n; ++j) {
        uint32_t u;
        memcpy(&u, x + j, sizeof u);
        u &= 0x7fffffffu;
        ok &= u == 0 || (u >= TGN_Q_LO && u <= TGN_Q_HI);
    }
    return ok;
}

/* tgn_quotient_row_f32 for a row of which the caller knows tgn_quotient_all_ranged
 * (the tests' entry to tgn_q_vec_ranged). */
static inline void tgn_quotient_row_f32_ranged(const float *x, float *y, const float *w, float off, int64_t n,
                                               float rms)
{
#if TGN_QUOTIENT_LANES > 1
    if (tgn_quotient_rms_in_range(rms)) {
        const tgn_q_div_t d = tgn_q_setup(rms);
        const TGN_QV o = TGN_Q_SET1(off);
        int64_t j = 0;
        for (; j + TGN_QUOTIENT_LANES <= n; j += TGN_QUOTIENT_LANES) {
            TGN_QV q = tgn_q_vec_ranged(&d, TGN_Q_LOAD(x + j));
            if (w)
                q = TGN_Q_MUL(q, off != 0.0f ? TGN_Q_ADD(TGN_Q_LOAD(w + j), o) : TGN_Q_LOAD(w + j));
            TGN_Q_STORE(y + j, q);
        }
        tgn_quotient_div_f32(x + j, y + j, w ? w + j : NULL, off, n - j, rms);
        return;
    }
#endif
    tgn_quotient_div_f32(x, y, w, off, n, rms);
}

/* y[j] = (x[j] / rms) * w[j] ((w[j] + off) when off != 0; no weight when w is NULL),
 * with the bits of the scalar loop.  y may be x (each vector is read before it is
 * written).  stream: write the vectors with non-temporal stores where y is aligned to
 * a vector (TGN_STREAM_STORES: an output far larger than the caches, written past
 * them instead of read into them first); the caller fences (tgn_store_fence).  ahead
 * (NULL: none): the next row, whose lines are prefetched into L2 as this one goes. */
static inline void tgn_quotient_row_f32_ahead(const float *x, float *y, const float *w, float off, int64_t n,
                                              float rms, int stream, const float *ahead)
{
#if TGN_QUOTIENT_LANES > 1
    if (!tgn_quotient_rms_in_range(rms)) {
        tgn_quotient_div_f32(x, y, w, off, n, rms);
        return;
    }
    const tgn_q_div_t d = tgn_q_setup(rms);
    const TGN_QV o = TGN_Q_SET1(off);
    const int64_t L = TGN_QUOTIENT_LANES;
    const int nt = stream && ((uintptr_t)y % sizeof(TGN_QV)) == 0; /* then every y + j is aligned */
    int64_t j = 0;
    for (; j + L <= n; j += L) {
        if (ahead && j % 16 == 0)
            __builtin_prefetch(ahead + j, 0, 2); /* one line of the next row */
        TGN_QV q = tgn_q_vec(&d, TGN_Q_LOAD(x + j));
        if (w) {
            TGN_QV wv = TGN_Q_LOAD(w + j);
            if (off != 0.0f)
                wv = TGN_Q_ADD(wv, o);
            q = TGN_Q_MUL(q, wv);
        }
        if (nt)
            TGN_Q_STREAM(y + j, q);
        else
            TGN_Q_STORE(y + j, q);
    }
    tgn_quotient_div_f32(x + j, y + j, w ? w + j : NULL, off, n - j, rms);
#else
    (void)stream, (void)ahead;
    tgn_quotient_div_f32(x, y, w, off, n, rms);
#endif
}

static inline void tgn_quotient_row_f32_to(const float *x, float *y, const float *w, float off, int64_t n,
                                           float rms, int stream)
{
    tgn_quotient_row_f32_ahead(x, y, w, off, n, rms, stream, 0);
}

static inline void tgn_quotient_row_f32(const float *x, float *y, const float *w, float off, int64_t n,
                                        float rms)
{
    tgn_quotient_row_f32_to(x, y, w, off, n, rms, 0);
}

/* Orders this thread's non-temporal stores before what follows (the team's join). */
static inline void tgn_store_fence(void)
{
#if TGN_QUOTIENT_LANES > 1
    _mm_sfence();
#endif
}

#endif /* TGN_NATIVE_QUOTIENT_H */
