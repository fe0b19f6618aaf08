/* The exact weight gradient's direct path (native_dw.c has the argument): per panel,
 * each column's largest and smallest nonzero |dy| and |b| over a block; from them the
 * first fold's scales (a bound of the products instead of their measured max) and
 * whether one fold leaves exact remainders; then the folds of a full tile with the
 * products formed as they are folded (x / rms by the reciprocal pair where its range
 * holds).  A tile it cannot finish takes the measured path (native_dw_measured.c). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native_dw.h"
#include "native_dw_tile.h"
#include "native_quotient.h"
#include "tgn_native.h"

#ifdef __FAST_MATH__
#error "the native kernels must not be compiled with -ffast-math"
#endif

DW_WIDE_BEGIN

/* p = a * h in fp64 (exact: 48 bits) plus c, rounded once: with FMA, one fma (the
 * same rounding, since a * h is exact). */
#if defined(__FMA__)
#define DW_MUL_ADD(a, h, c) fma((double)(a), (double)(h), (c))
#else
#define DW_MUL_ADD(a, h, c) ((double)(a) * (double)(h) + (c))
#endif

/* Each full tile's largest |dy| and |b| bits over a block of a panel (a NaN's bits are
 * above every number's) and smallest nonzero ones less one (UINT32_MAX: none), as
 * integers: tops[2 t], tops[2 t + 1] (dy, b) and lows the same, for the tiles t of
 * `cols` (the columns of a narrow last tile are not read: it takes the measured path).
 * Each tile's four bounds stay in registers along the rows; a column's own bounds
 * would give a finer first scale, but any bound of the products serves the fold
 * (native_dw.c), and one per tile leaves one scale to find instead of DW_TILE. */
void tgn_dw_tile_tops(const float *dy, int64_t dy_stride, const float *b, int64_t b_stride, int64_t rows,
                      int64_t cols, uint32_t *restrict tops, uint32_t *restrict lows)
{
    for (int64_t t = 0; (t + 1) * DW_TILE <= cols; ++t) {
        uint32_t tdy[DW_TILE], tb[DW_TILE], ldy[DW_TILE], lb[DW_TILE];
        for (int j = 0; j < DW_TILE; ++j) {
            tdy[j] = tb[j] = 0;
            ldy[j] = lb[j] = UINT32_MAX;
        }
        for (int64_t i = 0; i < rows; ++i) {
            const float *a = dy + i * dy_stride + t * DW_TILE, *c = b + i * b_stride + t * DW_TILE;
            for (int j = 0; j < DW_TILE; ++j) {
                uint32_t u, v;
                memcpy(&u, a + j, sizeof u);
                memcpy(&v, c + j, sizeof v);
                u &= 0x7fffffffu;
                v &= 0x7fffffffu;
                tdy[j] = u > tdy[j] ? u : tdy[j];
                tb[j] = v > tb[j] ? v : tb[j];
                u -= 1u; /* 0 becomes UINT32_MAX */
                v -= 1u;
                ldy[j] = u < ldy[j] ? u : ldy[j];
                lb[j] = v < lb[j] ? v : lb[j];
            }
        }
        uint32_t m0 = 0, m1 = 0, l0 = UINT32_MAX, l1 = UINT32_MAX;
        for (int j = 0; j < DW_TILE; ++j) {
            m0 = tdy[j] > m0 ? tdy[j] : m0;
            m1 = tb[j] > m1 ? tb[j] : m1;
            l0 = ldy[j] < l0 ? ldy[j] : l0;
            l1 = lb[j] < l1 ? lb[j] : l1;
        }
        tops[2 * t] = m0;
        tops[2 * t + 1] = m1;
        lows[2 * t] = l0;
        lows[2 * t + 1] = l1;
    }
}

INLINE float dw_float_bits(uint32_t bits)
{
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* log2 of the ulp of the fp32 number of bits `bits` (2^-149 for zero and subnormals). */
INLINE int dw_ulp_exponent(uint32_t bits)
{
    int e = (int)((bits & 0x7fffffffu) >> 23);
    return (e > 0 ? e : 1) - 150;
}

/* How a full tile's columns are folded (dw_tile_direct), from the tile's bounds over
 * the block (tdy, tb: max |dy| and max |b| bits; ldy, lb: min nonzero less one):
 *
 * - the first scale from a bound B >= |p| instead of the measured max: B = max|dy|
 *   max|x_hat|, or with rms, max|dy| Bh with Bh = (max|x| / min rms) (1 + 2^-20) +
 *   2^-149 >= |fl(x / r)| (fp32 division: relative error below 2^-24, or 2^-150
 *   absolute where the quotient is subnormal), the fp64 roundings covered by the
 *   margins.  The fold's argument holds for any bound of the products (a larger M),
 *   so one scale serves the tile's columns.
 * - one fold and the exact remainder where every product is a multiple of the second
 *   fold's grid u2 = 2^(s2 - 53): p = dy h is a multiple of ulp(min|dy|) ulp(min|h|)
 *   over the nonzero factors (ulp(v) >= ulp(min|v|)), and min|h| >= fl(min|x| / max
 *   rms) (division rounds monotonically).  Then q1 (a multiple of u1 >= u2) and
 *   r = p - q1 are multiples of u2 with |r| <= u1, so the second fold's q2 is r itself
 *   and leaves nothing.
 *
 * Writes the scale into s1[0 .. DW_TILE) and returns 2 (one fold), 1 (two folds), or
 * 0 where the bound is NaN or above 2^256 (an Inf or NaN, a tiny rms): the caller
 * takes the measured path. */
int tgn_dw_bound_scales(uint32_t tdy, uint32_t tb, uint32_t ldy, uint32_t lb, double inv_rmin, float rmax,
                        int with_rms, int *s1)
{
    double mb = dw_float_bits(tb), bound;
    if (with_rms)
        bound = dw_float_bits(tdy) * ((mb * inv_rmin * (1.0 + 0x1p-20) + 0x1p-149) * (1.0 + 0x1p-50));
    else
        bound = dw_float_bits(tdy) * mb; /* exact */
    if (!(bound <= 0x1p256)) /* NaN, or above every fp32 product (the digits' range) */
        return 0;
    int s = bound > 0.0 ? dw_scale(bound) : DW_SMIN, one_fold = 1;
    for (int j = 0; j < DW_TILE; ++j)
        s1[j] = s;
    if (ldy != UINT32_MAX && lb != UINT32_MAX) { /* else a zero factor in every row: only zero products */
        uint32_t hmin = lb + 1u;
        if (with_rms) {
            float q = dw_float_bits(hmin) / rmax;
            memcpy(&hmin, &q, sizeof hmin);
        }
        one_fold = dw_ulp_exponent(ldy + 1u) + dw_ulp_exponent(hmin) >= dw_second(s) - 53;
    }
    return 1 + one_fold;
}

/* x / r with IEEE division's bits from r's reciprocal pair (native_quotient.h's
 * tgn_q_setup and tgn_q_vec_ranged: a multiply and three fmas per vector where the
 * divider takes about five cycles), for r in [2^-40, 2^40] and x = +-0 or 2^-50 <=
 * |x| <= 2^60: the direct fold's largest cost on rows of x. */
#if DW_HAS_QUOTIENT
/* h[0, DW_TILE) = c[j] / r for one row of a tile, by tgn_q_vec_ranged (its range
 * holds: dw_tile_in_quotient_range and the rows' rms). */
INLINE void dw_quotients(const float *c, const tgn_q_div_t *d, float *restrict h)
{
    for (int j = 0; j < DW_TILE; j += 16)
        _mm512_storeu_ps(h + j, tgn_q_vec_ranged(d, _mm512_loadu_ps(c + j)));
}
#endif

/* The folds of a block x full tile with the products formed as they are folded (no
 * buffer), with scales s1 (dw_bound_scales): the first two folds as dw_two_folds
 * makes them, or with one_fold the first and the exact remainder.  Adds the sums to
 * the digits and returns 1 when nothing is left for a third fold (a remainder is seen
 * by its bits: r - q2 is +0 when nothing is left) and the sums are finite; else adds
 * nothing and returns 0.
 *
 * one_fold keeps the first fold's sum biased instead of forming each q1 (one operation
 * less per product): A starts at 3 * 2^s1, in the binade [2^(s1+1), 2^(s1+2)) whose
 * grid is u = 2^(s1-51), and |sum of the q| <= 64 (2^(s1-L) + u/2) < 2^s1 keeps every
 * A there.  Each step t = fl(A + p) rounds p to that grid: q = t - A is exact
 * (Sterbenz), so A - t = -q is too, and p - q = (A + p) - t, the addition's rounding
 * error, is a number (|.| <= u/2), which fma(dy, h, A - t) gives exactly.  The q sum
 * A - 3 * 2^s1 (exact) is a multiple of u, below 2^53 units 2^(s1-53) of s1's digits;
 * the remainders are multiples of the product grid, itself a multiple of the second
 * fold's unit u2 (one_fold's test), and their sum, at most 64 u/2 = 2^53 u2, is exact:
 * the same integers as the unbiased fold's (native_dw.c's argument for any split). */
INLINE int dw_tile_direct(const float *dy, int64_t dy_stride, const float *b, int64_t b_stride, const float *rms,
                          const float *recip, int64_t rows, const int *s1, int one_fold, int64_t *state,
                          int64_t stride, int *span)
{
    double g1[DW_TILE], g2[DW_TILE], a1[DW_TILE], a2[DW_TILE];
    uint64_t left[DW_TILE];
    for (int j = 0; j < DW_TILE; ++j) {
        g1[j] = dw_pow2(s1[j]);
        g2[j] = dw_pow2(dw_second(s1[j]));
        a1[j] = a2[j] = 0.0;
        left[j] = 0;
    }
    if (one_fold)
        for (int j = 0; j < DW_TILE; ++j)
            a1[j] = 3.0 * g1[j]; /* the biased sum A (above) */
    for (int64_t i = 0; i < rows; ++i) {
        const float *a = dy + i * dy_stride, *c = b + i * b_stride;
        const float r = rms ? rms[i] : 1.0f;
#if DW_HAS_QUOTIENT
        float hq[DW_TILE];
        if (recip) {
            const tgn_q_div_t d = {TGN_Q_SET1(r), TGN_Q_SET1(recip[2 * i]), TGN_Q_SET1(recip[2 * i + 1])};
            dw_quotients(c, &d, hq);
        }
#endif
        for (int j = 0; j < DW_TILE; ++j) {
#if DW_HAS_QUOTIENT
            const float h = recip ? hq[j] : rms ? c[j] / r : c[j];
#else
            const float h = rms ? c[j] / r : c[j];
#endif
            if (one_fold) {
                double t = DW_MUL_ADD(a[j], h, a1[j]);
                a2[j] += DW_MUL_ADD(a[j], h, a1[j] - t); /* p - q, exact */
                a1[j] = t;
                continue;
            }
            double q1 = DW_MUL_ADD(a[j], h, g1[j]) - g1[j];
            double rest = DW_MUL_ADD(a[j], h, -q1); /* exact */
            a1[j] += q1;
            double q2 = (rest + g2[j]) - g2[j];
            double after = rest - q2;
            uint64_t bits;
            memcpy(&bits, &after, sizeof bits);
            a2[j] += q2;
            left[j] |= bits;
        }
    }
    if (one_fold)
        for (int j = 0; j < DW_TILE; ++j)
            a1[j] -= 3.0 * g1[j]; /* the q sum, exact (NaN or infinite where a product was) */
    int bad = 0;
    for (int j = 0; j < DW_TILE; ++j)
        bad |= (left[j] != 0) | !(fabs(a1[j]) <= 0x1p1023) | !(fabs(a2[j]) <= 0x1p1023);
    if (bad)
        return 0;
    int s2[DW_TILE];
    for (int j = 0; j < DW_TILE; ++j)
        s2[j] = dw_second(s1[j]);
    dw_add_tile(state, stride, a1, s1, DW_TILE, span);
    dw_add_tile(state, stride, a2, s2, DW_TILE, span);
    return 1;
}

/* dw_tile_direct with its constant arguments inlined: one loop per case (recip: the
 * block's reciprocal pairs, where the rms and the tile's x allow the quotient). */
int tgn_dw_tile_direct_any(const float *dy, int64_t dy_stride, const float *b, int64_t b_stride,
                           const float *rms, const float *recip, int64_t rows, const int *s1, int one_fold,
                           int64_t *state, int64_t stride, int *span)
{
#if DW_HAS_QUOTIENT
    if (recip)
        return one_fold ? dw_tile_direct(dy, dy_stride, b, b_stride, rms, recip, rows, s1, 1, state, stride, span)
                        : dw_tile_direct(dy, dy_stride, b, b_stride, rms, recip, rows, s1, 0, state, stride, span);
#endif
    if (rms)
        return one_fold ? dw_tile_direct(dy, dy_stride, b, b_stride, rms, NULL, rows, s1, 1, state, stride, span)
                        : dw_tile_direct(dy, dy_stride, b, b_stride, rms, NULL, rows, s1, 0, state, stride, span);
    return one_fold ? dw_tile_direct(dy, dy_stride, b, b_stride, NULL, NULL, rows, s1, 1, state, stride, span)
                    : dw_tile_direct(dy, dy_stride, b, b_stride, NULL, NULL, rows, s1, 0, state, stride, span);
}

/* Whether every x of a tile (its largest |x| bits `tb` and smallest nonzero ones less
 * one `lb`) lies in dw_quotient's range: +-0 or 2^-50 <= |x| <= 2^60. */
int tgn_dw_tile_in_quotient_range(uint32_t tb, uint32_t lb)
{
    return (lb == UINT32_MAX || lb + 1u >= TGN_Q_LO) && tb <= TGN_Q_HI;
}

DW_WIDE_END
