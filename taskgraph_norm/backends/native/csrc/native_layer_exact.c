/* LayerNorm's exact domain in C (native_layer.c's exact rows, native_layer_backward.c's
 * exact row means): the torch forms of kernels/layer.py's xsum_exact / sumsq_exact
 * (an exact pair), mean_exact (the pair's value over D, correctly rounded to fp32) and
 * round_pair (the pair's value correctly rounded to fp32), bit for bit
 * (tests/test_native_layer_exact.py compares them with the torch-ops backend).
 *
 * The pair: with M = max |v| over the row (fp64) and kernels.exact_scale's sigma1,
 * sigma2 for it, each v is pre-rounded as the torch form does, q1 = (v + sigma1) -
 * sigma1, q2 = ((v - q1) + sigma2) - sigma2, and S1 = sum q1, S2 = sum q2: every
 * addition is exact, so the lanes below (sixteen partial sums each) give the torch
 * form's values.  M comes from the bits where the terms are the row's values or
 * squares (|v| orders as its bits do).  v is a float value, or the fp64 product of two (exact).
 *
 * mean_exact: the candidate c = RN32(RN64(S1 + S2) / D), then the exact sign of
 * S1 + S2 - mid * D at the midpoints between c and its neighbours (mid split by
 * Veltkamp, D into two 26-bit halves: four exact products; a Shewchuk Grow-Expansion
 * of the six terms, whose last nonzero component has the sum's sign) moves it to a
 * neighbour, or keeps it on a tie to even.  round_pair: the fp64 TwoSum of the pair
 * made round-to-odd, then one rounding to fp32.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "tgn_native.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#ifdef __FAST_MATH__
#error "native_layer_exact.c must not be compiled with -ffast-math"
#endif

typedef double v4d __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
typedef int64_t v4l __attribute__((vector_size(32)));
typedef double v8d __attribute__((vector_size(64))); /* one AVX-512 register, or two AVX ones */
typedef float v8f __attribute__((vector_size(32)));
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

/* Eight fp32 lanes widened to fp64 (exact): with AVX-512 one vcvtps2pd (GCC lowers
 * __builtin_convertvector of eight lanes to halves widened and joined: 3x slower loops). */
#if defined(__AVX512F__)
static inline __attribute__((always_inline)) v8d widen8(v8f f) { return (v8d)_mm512_cvtps_pd((__m256)f); }
#else
static inline __attribute__((always_inline)) v8d widen8(v8f f) { return __builtin_convertvector(f, v8d); }
#endif

static inline __attribute__((always_inline)) v8d load8(const float *p)
{
    v8f f;
    memcpy(&f, p, sizeof f);
    return widen8(f);
}

static inline __attribute__((always_inline)) v4d load4(const float *p)
{
    v4f f;
    memcpy(&f, p, sizeof f);
    return __builtin_convertvector(f, v4d);
}

/* max |a[j]| (b NULL) or max |a[j] b[j]| (fp64, b = a: the largest square) into *m; 0 for a NaN. */
static int row_max(const float *a, const float *b, int64_t n, double *m)
{
    if (!b || b == a) { /* from the bits: |a| orders as its bits do, a NaN's above Inf's */
        uint32_t top = 0;
        for (int64_t j = 0; j < n; ++j) {
            uint32_t u;
            memcpy(&u, a + j, sizeof u);
            u &= 0x7fffffffu;
            top = u > top ? u : top;
        }
        float f;
        memcpy(&f, &top, sizeof f);
        *m = b ? (double)f * (double)f : (double)f;
        return top <= 0x7f800000u;
    }
    v4d mv = {0.0, 0.0, 0.0, 0.0};
    v4l nan = {0, 0, 0, 0};
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
        v4d v = load4(a + j) * load4(b + j);
        v = (v4d)((v4l)v & (int64_t)0x7fffffffffffffff);
        nan |= v != v;
        v4l gt = v > mv;
        mv = (v4d)(((v4l)v & gt) | ((v4l)mv & ~gt));
    }
    double out = 0.0;
    int bad = 0;
    for (int l = 0; l < 4; ++l) {
        out = mv[l] > out ? mv[l] : out;
        bad |= nan[l] != 0;
    }
    for (; j < n; ++j) {
        double v = fabs((double)a[j] * (double)b[j]);
        bad |= v != v;
        out = v > out ? v : out;
    }
    *m = out;
    return !bad;
}

/* The pair of the terms a[j] (b NULL), a[j] b[j] or (dev) (a[j] - mean)^2, each
 * difference rounded to fp32 once, the square exact in fp64; m: their largest magnitude. */
static inline __attribute__((always_inline)) int pair_of(const float *a, const float *b, int dev, float mean,
                                                         double m, int64_t n, double *t1, double *t2)
{
    double s1, s2;
    if (!tgn_exact_scale(m, n, &s1, &s2))
        return 0;
    const v8d s1v = {s1, s1, s1, s1, s1, s1, s1, s1}, s2v = {s2, s2, s2, s2, s2, s2, s2, s2};
    const v8f mv = {mean, mean, mean, mean, mean, mean, mean, mean};
    v8d a1 = {0.0}, a2 = a1, b1 = a1, b2 = a1;
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) { /* two independent lanes of eight: exact, so any order */
        v8d va, vb;
        if (dev) {
            v8f fa, fb;
            memcpy(&fa, a + j, sizeof fa);
            memcpy(&fb, a + j + 8, sizeof fb);
            va = widen8(fa - mv);
            vb = widen8(fb - mv);
            va *= va;
            vb *= vb;
        } else {
            va = load8(a + j), vb = load8(a + j + 8);
        }
        if (b) {
            va *= load8(b + j);
            vb *= load8(b + j + 8);
        }
        v8d qa = (va + s1v) - s1v, qb = (vb + s1v) - s1v;
        a1 += qa;
        b1 += qb;
        a2 += ((va - qa) + s2v) - s2v;
        b2 += ((vb - qb) + s2v) - s2v;
    }
    double u1 = 0.0, u2 = 0.0;
    for (int l = 0; l < 8; ++l) {
        u1 += a1[l] + b1[l];
        u2 += a2[l] + b2[l];
    }
    for (; j < n; ++j) {
        const double d = (double)(a[j] - mean);
        double v = dev ? d * d : b ? (double)a[j] * (double)b[j] : (double)a[j], q1 = (v + s1) - s1;
        u1 += q1;
        u2 += ((v - q1) + s2) - s2;
    }
    *t1 = u1;
    *t2 = u2;
    return 1;
}

int tgn_exact_pair_f32(const float *a, const float *b, int64_t n, double *t1, double *t2)
{
    double m;
    return row_max(a, b, n, &m) && pair_of(a, b, 0, 0.0f, m, n, t1, t2);
}

/* tgn_exact_pair_f32(dev, dev) of the deviations dev[j] = x[j] - mean (fp32, rounded
 * once), formed as they are loaded.  The largest |dev| is at the row's largest or
 * smallest value (rounding is monotone and odd): max(hi - mean, mean - lo), squared. */
int tgn_exact_dev_pair_f32(const float *x, float mean, int64_t n, double *t1, double *t2)
{
    /* lo and hi as ordered integers (a float's bits with the magnitude flipped where it
     * is negative order as its values do; x holds no NaN): a loop the compiler vectorises */
    int32_t lo = INT32_MAX, hi = INT32_MIN;
    for (int64_t j = 0; j < n; ++j) {
        int32_t u;
        memcpy(&u, x + j, sizeof u);
        u ^= (u >> 31) & 0x7fffffff;
        lo = u < lo ? u : lo;
        hi = u > hi ? u : hi;
    }
    lo ^= (lo >> 31) & 0x7fffffff;
    hi ^= (hi >> 31) & 0x7fffffff;
    float flo, fhi;
    memcpy(&flo, &lo, sizeof flo);
    memcpy(&fhi, &hi, sizeof fhi);
    const float up = fhi - mean, down = mean - flo, top = up > down ? up : down;
    return pair_of(x, 0, 1, mean, (double)top * (double)top, n, t1, t2);
}

/* Whether every value within e of s, divided by scale, rounds to the fp32 c: [s - e, s +
 * e] lies strictly between scale times the midpoints around c (each product exact: a
 * 25-bit midpoint times scale < 2^27).  No for c at the end of fp32's range. */
static int decides(double s, double e, float c, double scale)
{
    const float up = nextafterf(c, INFINITY), down = nextafterf(c, -INFINITY);
    if (!isfinite(up) || !isfinite(down))
        return 0;
    const double hi = ((double)c + (double)up) * 0.5 * scale, lo = ((double)c + (double)down) * 0.5 * scale;
    return s + e < hi && s - e > lo;
}

/* tgn_mean_exact_f32 of tgn_exact_pair_f32(x) where a plain fp64 sum proves it: 1 with
 * *mean set, 0 where the caller must form the pair.  The sum s of the terms in any order
 * is within (n - 1) 2^-53 A of their exact sum S (A = sum |x|, summed beside it in fp32
 * lanes, within a factor 1 + n 2^-23 of its value), and
 * the pair P within 4 n^3 M 2^-104 <= 4 n^3 A 2^-104 of S (as for tgn_dev_total_f32,
 * M = max |x|); e is twice that, with a for A.  Where decides() says so for c = RN32(s /
 * D), P / D rounds to c too. */
int tgn_mean_total_f32(const float *x, int64_t n, float *mean)
{
    if (n >= (INT64_C(1) << 19))
        return 0;
    v8d a = {0.0}, b = a;
    v16f p = {0.0f}; /* sum |x| in fp32 lanes: within a factor 1 + n 2^-23 of A (n < 2^19) */
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
        v16f f;
        memcpy(&f, x + j, sizeof f);
        p += (v16f)((v16i)f & 0x7fffffff);
        a += load8(x + j);
        b += load8(x + j + 8);
    }
    double s = 0.0, abs_sum = 0.0;
    for (int l = 0; l < 8; ++l)
        s += a[l] + b[l];
    for (int l = 0; l < 16; ++l)
        abs_sum += (double)p[l];
    for (; j < n; ++j) {
        s += (double)x[j];
        abs_sum += fabs((double)x[j]);
    }
    if (!(abs_sum < INFINITY)) /* (an Inf or a NaN: the pair says so) */
        return 0;
    const double dn = (double)n;
    const double e = abs_sum * (1.0 + dn * 0x1p-23) * (dn * 0x1p-52 + 8.0 * dn * dn * dn * 0x1p-104) * 1.0625;
    const float c = (float)(s / dn);
    if (!decides(s, e, c, dn))
        return 0;
    *mean = c;
    return 1;
}

/* tgn_mean_total_f32 of a bf16 row x (widened) from its span (tgn_widen_bf16_span), with
 * no error bound to sum: 1 with *mean set, 0 where the caller must try the other ways.
 * With every nonzero |x| in [2^emin, 2^(emax + 1)), R = emax - emin, each x is a multiple
 * of 2^(emin - 7) (eight significant bits), and so is any sum of them, below k 2^(emax + 1)
 * for k terms: exact in fp64 while n 2^(emax + 1) <= 2^(53 + emin - 7), that is n <=
 * 2^(45 - R), whatever the order; in fp32 for k <= 2^(16 - R), so where R <= 14 the row is
 * summed in fp32 by fours first (emin >= -119: no sum is subnormal, so a flush-to-zero
 * mode changes nothing).  s is then the exact sum S, and the pair within 4 n^3 M 2^-104
 * of it (tgn_dev_total_f32 says why; M < 2^(emax + 1)): e is twice that. */
int tgn_mean_span_f32(const float *x, int64_t n, uint32_t span, float *mean)
{
    const int top = (int16_t)(span >> 16), e_min = (int)(((span & 0xffffu) + 1u) >> 7) - 127;
    const int e_max = ((top + 1) >> 7) - 127, r = e_max - e_min;
    if (top < 0 || e_min < -119 || e_max > 100 || r > 45 || n >= (INT64_C(1) << 19) || n > (INT64_C(1) << (45 - r)))
        return 0; /* (only zeros, a subnormal, an Inf or a NaN, too wide a span) */
    v8d a = {0.0}, b = a, a2 = a, b2 = a; /* (four chains: the adds' latency bounds two) */
    int64_t j = 0;
    if (r <= 14) {
        for (; j + 64 <= n; j += 64) {
            v16f f0, f1, f2, f3; /* (one load each: an array of them goes through the stack) */
            memcpy(&f0, x + j, sizeof f0);
            memcpy(&f1, x + j + 16, sizeof f1);
            memcpy(&f2, x + j + 32, sizeof f2);
            memcpy(&f3, x + j + 48, sizeof f3);
            const v16f q = (f0 + f1) + (f2 + f3); /* (exact) */
            a += widen8(__builtin_shufflevector(q, q, 0, 1, 2, 3, 4, 5, 6, 7));
            b += widen8(__builtin_shufflevector(q, q, 8, 9, 10, 11, 12, 13, 14, 15));
        }
    }
    for (; j + 32 <= n; j += 32) {
        a += load8(x + j);
        b += load8(x + j + 8);
        a2 += load8(x + j + 16);
        b2 += load8(x + j + 24);
    }
    double s = 0.0;
    for (int l = 0; l < 8; ++l)
        s += (a[l] + b[l]) + (a2[l] + b2[l]);
    for (; j < n; ++j)
        s += (double)x[j];
    const double dn = (double)n, e = ldexp(8.0 * dn * dn * dn, e_max + 1 - 104);
    const float c = (float)(s / dn);
    if (!decides(s, e, c, dn))
        return 0;
    *mean = c;
    return 1;
}

/* tgn_round_pair_f32(tgn_exact_dev_pair_f32(x, mean)) where a plain fp64 sum proves it:
 * 1 with *var set, 0 where the caller must form the pair.  The terms dev^2 (dev = x -
 * mean rounded to fp32 once, its square exact in fp64) are positive, so the sum s of
 * them in any order is within (n - 1) 2^-53 S of their exact sum S, and the pair is
 * within n ulp(sigma2) / 2 <= 4 n^3 M 2^-104 <= 4 n^3 S 2^-104 of S (its second fold
 * rounds each remainder to a multiple of ulp(sigma2), with sigma2 < 8 n^2 M 2^-52 and M
 * the largest term: kernels.exact_scale).  e below is twice their sum, with s for S
 * (S <= s (1 + n 2^-52)); where decides() says so for v = RN32(s), the pair rounds to v
 * too.  (Ties, v at the top of fp32's range, an infinite s: the pair.) */
int tgn_dev_total_f32(const float *x, float mean, int64_t n, float *var)
{
    const v8f mv = {mean, mean, mean, mean, mean, mean, mean, mean};
    v8d a = {0.0}, b = a;
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
        v8f fa, fb;
        memcpy(&fa, x + j, sizeof fa);
        memcpy(&fb, x + j + 8, sizeof fb);
        v8d da = widen8(fa - mv), db = widen8(fb - mv);
#if defined(__AVX512F__) && defined(__FMA__)
        /* (one fma: the square of an fp32 value is exact in fp64, so RN(d d + a) is the
         * separate product's sum, bit for bit) */
        a = (v8d)_mm512_fmadd_pd((__m512d)da, (__m512d)da, (__m512d)a);
        b = (v8d)_mm512_fmadd_pd((__m512d)db, (__m512d)db, (__m512d)b);
#else
        a += da * da;
        b += db * db;
#endif
    }
    double s = 0.0;
    for (int l = 0; l < 8; ++l)
        s += a[l] + b[l];
    for (; j < n; ++j) {
        const double d = (double)(x[j] - mean);
        s += d * d;
    }
    return tgn_squares_total_f32(s, n, var);
}

/* The decision of tgn_dev_total_f32 for s, a plain fp64 sum (any order) of n squares of
 * fp32 values whose exact pair (kernels.exact_scale's folds, with M the largest
 * square) is T: 1 with *total = RN32(s) where that is RN32(T), 0 where it cannot say.
 * (e is twice the two bounds above, so it reaches at least 2^-52 S past S on each side
 * of s: native_exact.c relies on that for RN32(RN64(T)).) */
int tgn_squares_total_f32(double s, int64_t n, float *total)
{
    if (!(s < INFINITY))
        return 0;
    const double dn = (double)n, e = s * (dn * 0x1p-52 + 8.0 * dn * dn * dn * 0x1p-104) * 1.0625;
    const float v = (float)s;
    if (!decides(s, e, v, 1.0))
        return 0;
    *total = v;
    return 1;
}

static void two_sum(double a, double b, double *s, double *e)
{
    double t = a + b, bb = t - a;
    *s = t;
    *e = (a - (t - bb)) + (b - bb);
}

/* The sign (-1, 0, 1) of t1 + t2 - mid * D, exactly. */
static int side(double t1, double t2, double mid, int64_t hidden)
{
    const double p = mid * 134217729.0; /* 2^27 + 1: Veltkamp's split */
    const double hi = p - (p - mid), lo = mid - hi;
    const double d_lo = (double)(hidden % (INT64_C(1) << 26)), d_hi = (double)(hidden - hidden % (INT64_C(1) << 26));
    const double terms[6] = {t1, t2, -(hi * d_hi), -(hi * d_lo), -(lo * d_hi), -(lo * d_lo)};
    double comp[6];
    int n = 0;
    for (int k = 0; k < 6; ++k) {
        double q = terms[k];
        for (int i = 0; i < n; ++i)
            two_sum(q, comp[i], &q, &comp[i]);
        comp[n++] = q;
    }
    for (int i = n - 1; i >= 0; --i)
        if (comp[i] != 0.0)
            return comp[i] > 0.0 ? 1 : -1;
    return 0;
}

float tgn_mean_exact_f32(double t1, double t2, int64_t hidden)
{
    const float c = (float)((t1 + t2) / (double)hidden);
    const float up = nextafterf(c, INFINITY), down = nextafterf(c, -INFINITY);
    if (!isfinite(up) || !isfinite(down))
        return NAN; /* (the caller leaves such a row to torch ops) */
    const int above = side(t1, t2, ((double)c + (double)up) * 0.5, hidden);
    const int below = side(t1, t2, ((double)c + (double)down) * 0.5, hidden);
    uint32_t bits;
    memcpy(&bits, &c, sizeof bits);
    const int even = (bits & 1u) == 0;
    float out = above > 0 ? up : c;
    if (above == 0)
        out = even ? c : up;
    if (below < 0)
        out = down;
    if (below == 0)
        out = even ? c : down;
    return out;
}

float tgn_round_pair_f32(double t1, double t2)
{
    double s, e;
    two_sum(t1, t2, &s, &e);
    uint64_t bits;
    memcpy(&bits, &s, sizeof bits);
    if (isfinite(s) && e != 0.0 && (bits & 1u) == 0)
        s = nextafter(s, e > 0.0 ? INFINITY : -INFINITY);
    return (float)s;
}
