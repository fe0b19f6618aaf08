/* The exact domain's rows (docs/exact.md): whole rows of sums of squares whose every
 * addition is exact, so a row's bits are the same in any order.  (The float rows are
 * native.c; FINALIZE, which both run on each row while it is in cache,
 * native_finalize.h; the fp64 rows native_exact_f64.c; the vector lanes both files
 * use, native_exact.h.)
 *
 * The kernel is kernels.rowmax_sq_whole + kernels.exact_scale +
 * kernels.sumsq_exact over whole rows: a max pass and a sum pass per row, with the
 * row in cache (for fp32 rows, each FINALIZE interleaved with the next row's sum
 * pass: tgn_exact_rows_f32).  Every operation
 * is the same IEEE binary64 operation the torch kernels perform, in round to
 * nearest even:
 *
 *   M      = max|x|^2                       (fp64)
 *   bound  = M * (2 D)
 *   sigma1 = 2^ceil(log2(bound))            (1 for a zero row)
 *   sigma2 = 2^ceil(log2(sigma1 * D 2^-52))
 *   v      = x * x                          (fp64; exact for fp32 x)
 *   q1     = (v + sigma1) - sigma1,  r = v - q1,  q2 = (r + sigma2) - sigma2
 *   S1     = sum q1,  S2 = sum q2
 *
 * Every addition of q1 (resp. q2) values is exact (a multiple of ulp(sigma) far below
 * 2^53 ulps), so the sums are the same in any order: the lanes below sum them in
 * another order than torch.sum, with the same result.  The compile flags keep the
 * expressions as written: no -ffast-math (which would fold (v + s) - s into v and
 * set flush-to-zero) and -ffp-contract=off (an fma would round an fp64 x * x + s
 * once instead of twice; fp32 rows, whose x * x is exact, use one on purpose below).
 *
 * A row with no scale (an Inf square, or an fp64 row whose bound passes 2^1023)
 * or with a NaN (seen by the fp32 rows' max, or as a NaN sum) is not finished here:
 * its pair is set to NaN and the row is counted, and the caller gives it the
 * reference interpreter's bits.
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native_exact.h"
#include "native_finalize.h"
#include "tgn_native.h"

#ifdef __FAST_MATH__
#error "native_exact.c must not be compiled with -ffast-math"
#endif

static double pow2_at_least(double bound)
{
    /* torch.frexp / torch.ldexp, as kernels._pow2_at_least uses them. */
    int exponent;
    double mantissa = frexp(bound, &exponent);
    if (mantissa == 0.5)
        exponent -= 1;
    return ldexp(1.0, exponent);
}

/* kernels.exact_scale for one row maximum; returns 0 when the row has no scale. */
int tgn_exact_scale(double row_max, int64_t hidden, double *sigma1, double *sigma2)
{
    double bound = row_max * (2.0 * (double)hidden);
    if (!isfinite(bound) || bound > 0x1p1023) { /* sigma1 would be 2^1024 = inf */
        *sigma1 = 0.0;
        *sigma2 = 0.0;
        return 0;
    }
    double safe = row_max > 0.0 ? bound : 1.0;
    double s1 = pow2_at_least(safe);
    *sigma1 = s1;
    *sigma2 = pow2_at_least(s1 * ((double)hidden * 0x1p-52));
    return 1;
}

/* --- fp32 rows ----------------------------------------------------------------------
 *
 * One pass over the row's bits as integers (|x| orders as its bits do) gives max|x|
 * and the smallest nonzero |x|; then one pass forms the sums, in vectors of NW fp64
 * lanes (8 with AVX-512, 4 otherwise: lanes only change the order of exact additions).
 *
 * The second fold is often the identity.  Every x is a multiple of g = ulp(min|x|)
 * over the nonzero x (ulp(x) >= g), so every v = x^2 is a multiple of g^2.  If
 * g^2 >= u2 = ulp(sigma2) (powers of two), v and q1 (a multiple of u1 >= u2) are
 * multiples of u2, so is r = v - q1, and |r| <= u1 / 2 < sigma2 / 2: r + sigma2 is
 * exact and q2 = (r + sigma2) - sigma2 = r.  The pass then adds r itself (two
 * operations fewer per element).  Rows with tiny elements (below about 2^-16 of the
 * row's maximum for D = 4096) take the two folds.
 *
 * With FMA (the host build): x^2 is exact in fp64 for fp32 x, so fma(x, x, c) is the
 * same rounding of x^2 + c as the two operations, and r = fma(x, x, -q1) is exact. */
/* The row's largest |x| bits (a NaN's are above every number's) and its smallest
 * nonzero |x| bits less one (UINT32_MAX when no element is nonzero).  A plain loop,
 * which the compiler vectorises (integer max and min). */
static void row_bits_float(const float *row, int64_t hidden, uint32_t *top, uint32_t *low)
{
    uint32_t hi = 0, lo = UINT32_MAX;
    for (int64_t j = 0; j < hidden; ++j) {
        uint32_t a;
        memcpy(&a, row + j, sizeof a);
        a &= 0x7fffffffu;
        hi = a > hi ? a : hi;
        a -= 1u; /* 0 becomes UINT32_MAX */
        lo = a < lo ? a : lo;
    }
    *top = hi;
    *low = lo;
}

#if defined(__AVX512F__) && defined(__FMA__)
#define NW 8
typedef double vwd __attribute__((vector_size(64)));
INLINE vwd loadw_f32(const float *p) { return (vwd)_mm512_cvtps_pd(_mm256_loadu_ps(p)); }
/* fma(x, x, c): RN(x^2 + c) with x^2 exact, the bits of (x * x) + c */
INLINE vwd sq_add(vwd x, vwd c) { return (vwd)_mm512_fmadd_pd((__m512d)x, (__m512d)x, (__m512d)c); }
#else
#define NW 4
typedef v4d vwd;
#define loadw_f32 load4_f32
INLINE vwd sq_add(vwd x, vwd c) { return x * x + c; }
#endif

#if defined(__AVX512F__) && defined(__AVX512DQ__)
/* The same two numbers with AVX-512DQ's vrangeps, one instruction per 16 elements for
 * each: max|x| (imm 0x0B: the larger magnitude, sign cleared) and min|x| (0x0A), four
 * accumulators of each to cover the latency; a tail under 16 by a masked step that
 * leaves the other lanes as they were.  min|x| counts zeros, so a row with a zero (or
 * whose max or min is not a positive finite number: a NaN or an Inf, whatever vrangeps
 * makes of it) takes the integer pass above instead, which gives the bits it always
 * did; otherwise the bits of max|x| and min|x| are top and low + 1. */
static void row_bits_float_fast(const float *row, int64_t hidden, uint32_t *top, uint32_t *low)
{
    __m512 h0 = _mm512_setzero_ps(), h1 = h0, h2 = h0, h3 = h0;
    __m512 l0 = _mm512_set1_ps(INFINITY), l1 = l0, l2 = l0, l3 = l0;
    int64_t j = 0;
    for (; j + 64 <= hidden; j += 64) {
        __m512 a = _mm512_loadu_ps(row + j), b = _mm512_loadu_ps(row + j + 16);
        __m512 c = _mm512_loadu_ps(row + j + 32), d = _mm512_loadu_ps(row + j + 48);
        h0 = _mm512_range_ps(h0, a, 0x0B);
        h1 = _mm512_range_ps(h1, b, 0x0B);
        h2 = _mm512_range_ps(h2, c, 0x0B);
        h3 = _mm512_range_ps(h3, d, 0x0B);
        l0 = _mm512_range_ps(l0, a, 0x0A);
        l1 = _mm512_range_ps(l1, b, 0x0A);
        l2 = _mm512_range_ps(l2, c, 0x0A);
        l3 = _mm512_range_ps(l3, d, 0x0A);
    }
    for (; j + 16 <= hidden; j += 16) {
        __m512 a = _mm512_loadu_ps(row + j);
        h0 = _mm512_range_ps(h0, a, 0x0B);
        l0 = _mm512_range_ps(l0, a, 0x0A);
    }
    if (j < hidden) {
        __mmask16 k = (__mmask16)((1u << (hidden - j)) - 1u);
        __m512 a = _mm512_maskz_loadu_ps(k, row + j);
        h0 = _mm512_mask_range_ps(h0, k, h0, a, 0x0B);
        l0 = _mm512_mask_range_ps(l0, k, l0, a, 0x0A);
    }
    h0 = _mm512_range_ps(_mm512_range_ps(h0, h1, 0x0B), _mm512_range_ps(h2, h3, 0x0B), 0x0B);
    l0 = _mm512_range_ps(_mm512_range_ps(l0, l1, 0x0A), _mm512_range_ps(l2, l3, 0x0A), 0x0A);
    float hv[16], lv[16];
    _mm512_storeu_ps(hv, h0);
    _mm512_storeu_ps(lv, l0);
    float m = hv[0], n = lv[0];
    for (int l = 1; l < 16; ++l) {
        m = hv[l] > m ? hv[l] : m;
        n = lv[l] < n ? lv[l] : n;
    }
    int nan = 0; /* a NaN lane, which the comparisons above pass over */
    for (int l = 0; l < 16; ++l)
        nan |= hv[l] != hv[l] || lv[l] != lv[l];
    if (nan || !(n > 0.0f) || !(m <= 0x1.fffffep127f)) {
        row_bits_float(row, hidden, top, low);
        return;
    }
    memcpy(top, &m, sizeof m);
    memcpy(low, &n, sizeof n);
    *low -= 1u;
}
#else
#define row_bits_float_fast row_bits_float
#endif

/* The exact sums of one fp32 row in three steps, so that the rows loop can interleave
 * them with the previous row's FINALIZE (tgn_exact_rows_f32): exact_begin_float (the
 * bits pass, the scales and the fold), exact_span_float over [j0, j1) (whole steps of
 * 2 NW elements), exact_end_float (the lanes' sum and the tail).  The additions are
 * exact, so the split changes no bit. */
typedef struct {
    vwd s1v, s2v, a1, a2, b1, b2;
    double s1, s2;
    int one_fold;
    int plain; /* the plain sum of x^2 in a1, b1, a2, b2 (see tgn_exact_rows_f32) */
} exact_state_float;

/* 0 when the row has no scale (an Inf or a NaN). */
static int exact_begin_float(const float *row, int64_t hidden, exact_state_float *st)
{
    uint32_t top, low;
    row_bits_float_fast(row, hidden, &top, &low);
    float m;
    memcpy(&m, &top, sizeof m);
    double s1, s2;
    if (!tgn_exact_scale((double)m * (double)m, hidden, &s1, &s2))
        return 0; /* an Inf or a NaN */
    /* g^2 = 2^(2 (e - 150)) for the smallest nonzero |x| of biased exponent e (1 for
     * subnormals); no nonzero element: nothing to round */
    int e = (int)((low + 1u) >> 23);
    st->one_fold = low == UINT32_MAX || ldexp(1.0, 2 * ((e > 0 ? e : 1) - 150)) >= s2 * 0x1p-52;
    st->s1 = s1;
    st->s2 = s2;
    for (int l = 0; l < NW; ++l) {
        st->s1v[l] = s1;
        st->s2v[l] = s2;
        st->a1[l] = st->a2[l] = st->b1[l] = st->b2[l] = 0.0;
    }
    return 1;
}

INLINE void exact_span_float(exact_state_float *st, const float *row, int64_t j0, int64_t j1, const float *next)
{
    const vwd s1v = st->s1v, s2v = st->s2v;
    vwd a1 = st->a1, a2 = st->a2, b1 = st->b1, b2 = st->b2;
    if (st->plain) { /* four sums in flight: the conversions, not fma's latency, bound it */
        int64_t j = j0;
        for (; j + 4 * NW <= j1; j += 4 * NW) {
            a1 = sq_add(loadw_f32(row + j), a1);
            b1 = sq_add(loadw_f32(row + j + NW), b1);
            a2 = sq_add(loadw_f32(row + j + 2 * NW), a2);
            b2 = sq_add(loadw_f32(row + j + 3 * NW), b2);
            if (next) { /* both lines of the step's 4 NW floats */
                __builtin_prefetch(next + j, 0, 2);
                __builtin_prefetch(next + j + 2 * NW, 0, 2);
            }
        }
        if (j < j1) {
            a1 = sq_add(loadw_f32(row + j), a1);
            b1 = sq_add(loadw_f32(row + j + NW), b1);
        }
    } else if (st->one_fold)
        for (int64_t j = j0; j < j1; j += 2 * NW) {
            vwd xa = loadw_f32(row + j), xb = loadw_f32(row + j + NW);
            vwd qa = sq_add(xa, s1v) - s1v, qb = sq_add(xb, s1v) - s1v;
            a1 += qa;
            b1 += qb;
            a2 += sq_add(xa, -qa);
            b2 += sq_add(xb, -qb);
            if (next)
                __builtin_prefetch(next + j, 0, 2);
        }
    else
        for (int64_t j = j0; j < j1; j += 2 * NW) {
            vwd xa = loadw_f32(row + j), xb = loadw_f32(row + j + NW);
            vwd qa = sq_add(xa, s1v) - s1v, qb = sq_add(xb, s1v) - s1v;
            vwd ra = sq_add(xa, -qa), rb = sq_add(xb, -qb);
            a1 += qa;
            b1 += qb;
            a2 += (ra + s2v) - s2v;
            b2 += (rb + s2v) - s2v;
            if (next)
                __builtin_prefetch(next + j, 0, 2);
        }
    st->a1 = a1;
    st->a2 = a2;
    st->b1 = b1;
    st->b2 = b2;
}

/* j: where the spans stopped (the tail [j, hidden) is under 2 NW elements). */
static void exact_end_float(const exact_state_float *st, const float *row, int64_t j, int64_t hidden,
                            double *t1, double *t2)
{
    vwd acc1 = st->a1 + st->b1, acc2 = st->a2 + st->b2;
    double u1 = 0.0, u2 = 0.0, s1 = st->s1, s2 = st->s2;
    for (int l = 0; l < NW; ++l) {
        u1 += acc1[l];
        u2 += acc2[l];
    }
    for (; j < hidden; ++j)
        EXACT_STEP(row[j], s1, s2, u1, u2);
    *t1 = u1;
    *t2 = u2;
}

/* The plain sum's end: its lanes and the tail added, then tgn_squares_total_f32's
 * proof; 1 with t1 = RN32(RN64(T)) as a double (t2 = 0), 0 where it cannot say. */
static int plain_end_float(const exact_state_float *st, const float *row, int64_t j, int64_t hidden, double *t1,
                           double *t2)
{
    vwd acc = (st->a1 + st->b1) + (st->a2 + st->b2);
    double s = 0.0;
    for (int l = 0; l < NW; ++l)
        s += acc[l];
    for (; j < hidden; ++j)
        s += (double)row[j] * (double)row[j]; /* (the product exact: one rounding) */
    float c;
    if (!tgn_squares_total_f32(s, hidden, &c))
        return 0;
    *t1 = c;
    *t2 = 0.0;
    return 1;
}

/* The pair of a whole row, not pipelined (a row the plain sum did not prove); 0 when it
 * has no scale. */
static int exact_whole_float(const float *row, int64_t hidden, double *t1, double *t2)
{
    exact_state_float st = {0};
    if (!exact_begin_float(row, hidden, &st))
        return 0;
    const int64_t main = hidden - hidden % (2 * NW);
    exact_span_float(&st, row, 0, main, NULL);
    exact_end_float(&st, row, main, hidden, t1, t2);
    return 1;
}

/* Where the call wants y and not the pairs (no gradient to record: the direct call),
 * or reads each pair only as its fp32 total (TGN_TOTAL_ROUNDED: the ops' rms, and
 * native_narrow.c's fused rows, which get (c, 0) as the pair), a row needs only
 * c = RN32(RN64(T)), T = S1 + S2 the pair's value.  tgn_squares_total_f32
 * (native_layer_exact.c: LayerNorm's variance, whose terms are squares of fp32 values
 * under the same scales, as these are) proves it from a plain fp64 sum s of the x^2
 * where it can: it returns 1 only where [s - e, s + e], which holds T, lies strictly
 * between the fp32 midpoints around c.  Its e is at least twice the sum's error bound
 * (n - 1) 2^-53 S, so the interval reaches 2^-52 S >= ulp(T) past T on each side:
 * RN64(T) lies strictly between those midpoints too, and rounds to c.  So such a row's
 * spans form the plain sum s of x^2 (one fma per value, four sums in flight) instead of
 * the pair's folds, beside the previous row's FINALIZE as the pair's are; a row it does
 * not prove (a NaN, an Inf, a tie, a top-of-range c) forms its pair after them.
 *
 * The fp32 rows as EXACT_ROWS (native_exact_f64.c), software-pipelined: row i's FINALIZE
 * is done in slices of SLICE elements, each after a slice of row i + 1's sums, so that the core overlaps the
 * sums' arithmetic (bound by the vector ports) with FINALIZE's loads and stores (bound
 * by the caches and memory) instead of doing one after the other.  Each element of y,
 * and each exact sum, has the bits it has when the rows are done one at a time. */
#define SLICE 256 /* a multiple of 2 NW */

/* The pair and the count of one row whose sums and FINALIZE are done. */
INLINE void exact_pair_done(double t1, double t2, int64_t i, double *pair, int64_t *unscaled)
{
    if (t1 != t1 || t2 != t2) { /* no scale, or a NaN in the row */
        t1 = t2 = NAN;
        ++*unscaled;
    }
    if (pair) {
        pair[2 * i] = t1;
        pair[2 * i + 1] = t2;
    }
}

int64_t tgn_exact_rows_f32(const float *x, int64_t rows, int64_t hidden, int64_t row_stride, double *pair,
                           FINALIZE_ARGS(float), RESIDUAL_ARGS(float))
{
    int64_t unscaled = 0;
    /* the row waiting for its FINALIZE: index, row, rms, pair; done: its elements done */
    int64_t pi = -1, done = 0;
    const float *prow = NULL;
    float prms = 0.0f;
    double p1 = 0.0, p2 = 0.0;
    int pnan = 0;
    for (int64_t i = 0; i <= rows; ++i) {
        const float *row = NULL;
        double t1 = NAN, t2 = NAN;
        exact_state_float st = {0}; /* (set by exact_begin_float when it is read) */
        int ok = 0;
        int64_t main = 0;
        if (i < rows) {
            row = x + i * row_stride;
            if (r)
                row = add_residual_float(row, r + i * r_stride, h + i * h_stride, hidden);
            if ((!pair && y) || (flags & TGN_TOTAL_ROUNDED)) { /* the plain sum first (below) */
                st.plain = ok = 1;
                main = hidden - hidden % (2 * NW);
            } else {
                ok = exact_begin_float(row, hidden, &st);
                main = ok ? hidden - hidden % (2 * NW) : 0;
            }
        }
        const float *next = !r && i + 1 < rows ? row + row_stride : NULL;
        for (int64_t j = 0; j < main; j += SLICE) {
            int64_t end = j + SLICE < main ? j + SLICE : main;
            exact_span_float(&st, row, j, end, next);
            if (pi >= 0 && done < end) {
                pnan |= finalize_span_float(prow + done, y + pi * y_stride + done, w ? w + done : NULL,
                                            end - done, prms, flags, offset, NULL); /* (the sums fetch) */
                done = end;
            }
        }
        if (ok && st.plain && !plain_end_float(&st, row, main, hidden, &t1, &t2))
            ok = exact_whole_float(row, hidden, &t1, &t2); /* not proved: the pair */
        else if (ok && !st.plain)
            exact_end_float(&st, row, main, hidden, &t1, &t2);
        if (pi >= 0) { /* the rest of the previous row's FINALIZE */
            if (done < hidden)
                pnan |= finalize_span_float(prow + done, y + pi * y_stride + done, w ? w + done : NULL,
                                            hidden - done, prms, flags, offset, NULL);
            if (pnan)
                p1 = NAN; /* a NaN the llama rounding left to the caller */
            exact_pair_done(p1, p2, pi, pair, &unscaled);
            pi = -1;
        }
        if (i == rows)
            break;
        if (y && t1 == t1 && t2 == t2) { /* FINALIZE with the next row's sums */
            pi = i;
            prow = row;
            prms = rms_of_total_float((float)(t1 + t2), hidden, eps);
            p1 = t1;
            p2 = t2;
            pnan = 0;
            done = 0;
        } else
            exact_pair_done(t1, t2, i, pair, &unscaled);
    }
    if (flags & TGN_STREAM_STORES)
        tgn_store_fence();
    return unscaled;
}
