/* The exact weight gradient's C (ops/exact_grad.py through backends/native/grads.py):
 * the accumulator state kernels/exact_sum.py defines, added to from dy and x_hat (or x
 * and the rows' rms; the state rounded to fp32 is native_dw_round.c).  tests/test_exact_grad.py and
 * tests/test_exact_dw_fused.py compare it with the torch form.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native_dw.h"
#include "native_quotient.h"
#include "tgn_native.h"

#ifdef __FAST_MATH__
#error "the native kernels must not be compiled with -ffast-math"
#endif

/* --- the exact weight gradient: state += sum over rows of dy * x_hat, exactly ------
 *
 * The C route to kernels/exact_sum.py's state (docs/training.md): per column j, an
 * integer number of units 2^-320 in balanced radix-2^32 digits, state[k * n + j],
 * with counts of NaN, +inf and -inf products in rows 19..21.  The torch form adds
 * each product's units digit by digit; this kernel gets the same integers faster:
 *
 *   for each block of up to DW_BLOCK rows and each tile of DW_TILE columns:
 *     p = (double)dy * (double)xh            exact (fp32 x fp32 has 48 bits, and its
 *                                            exponent lies in [-298, 256]); xh is
 *                                            given, or x / rms[i] in fp32 (the bits
 *                                            of torch.div(x, rms))
 *     M = max |p| per column                 (a NaN or inf product is counted, then 0)
 *     repeat while some remainder is nonzero (a fold):
 *       s = ceil(log2 M) + DW_L,  sigma = 2^s   (s >= DW_SMIN)
 *       q = (p + sigma) - sigma;  p -= q;  S += q;  M = max |p|
 *       add S (an integer number of 2^(s-53) units) into the digits
 *
 * Why every step is exact (Demmel-Nguyen pre-rounding): |p| <= 2^(s-1), so
 * sigma + p lies in [2^(s-1), 2^s + 2^(s-1)] and q = fl(sigma + p) - sigma is
 * exact (Sterbenz), a multiple of u = 2^(s-53) (p rounded to the grid of u, or of
 * 2u where sigma + p >= 2^s) with |q| <= 2^ceil(log2 M); the remainder p - q
 * (|.| <= u) is exact too.  A block has at most 2^(DW_L-1) rows, so every
 * partial sum S is a multiple of u with |S| <= 2^(s-1) < 2^53 u: every addition
 * is exact, S = sum q exactly, and S / u is an integer below 2^53.  Each fold
 * lowers the largest remainder by a factor of at least 2^(53 - DW_L) (46 bits
 * here); the fold at s = DW_SMIN rounds to a grid of 2^-298 or finer, the
 * quantum of every product, so it leaves nothing.  Different blocks (and the torch
 * form) split the same products differently, but the digits hold the same integer
 * and normalize() gives it one balanced form: the state is the same.
 *
 * The first two folds are one pass (dw_two_folds): the second fold's M is not
 * measured but bounded, M2 = 2^(s1-53) >= every remainder of the first (|p - q|
 * <= u1), so s2 = s1 - (53 - DW_L) (at least DW_SMIN): the general fold's own
 * argument with a larger M, hence exact.  It leaves the remainders unwritten and
 * only measures them; random data leaves none (a product needs a third fold only
 * when it is 2^45 times smaller than its column's block maximum), and a block that
 * does recomputes them and goes on with the general folds (dw_more_folds).
 *
 * Most tiles take a shorter route to the same integers (dw_run, dw_bound_scales):
 * the first scale from a bound of the products instead of their measured max (the
 * argument above holds for any M >= max |p|), the products formed again as they are
 * folded instead of written, and, where every product is a multiple of the second
 * fold's grid, one fold and the exact remainders.  A tile where that route could
 * leave something (a third fold, a NaN or infinite bound) takes the measured one.
 *
 * Every column's operations are the same IEEE operations in the same order in any
 * vectorisation (the loops run across columns; the max is order-free; the host
 * build's fma(dy, xh, c) rounds as (dy * xh) + c does, the product being exact), so
 * the portable and host builds give the same state.  The flags keep (p + sigma) - sigma
 * as written (no -ffast-math).  Returns the number of columns whose top digit
 * passes 2^40 (the caller raises).
 */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__AVX512F__)
/* A host build on an AVX-512 CPU: gcc's -march=native keeps 256-bit vectors by
 * default; the dW loops run faster at 512 (the bits do not depend on it, above). */
#pragma GCC push_options
#pragma GCC target("prefer-vector-width=512")
#define DW_WIDE 1
#endif

/* s = ceil(log2 m) + DW_L (at least DW_SMIN) for a normal m > 0, from its bits. */
static inline int dw_scale(double m)
{
    uint64_t bits;
    memcpy(&bits, &m, sizeof bits);
    int e = (int)((bits >> 52) & 0x7ff) - 1023; /* m = 1.f 2^e */
    int s = e + ((bits & 0xfffffffffffffu) != 0) + DW_L;
    return s < DW_SMIN ? DW_SMIN : s;
}

/* The second fold's scale in dw_two_folds: dw_scale(2^(s1-53)). */
static inline int dw_second(int s1)
{
    int s = s1 - (53 - DW_L);
    return s < DW_SMIN ? DW_SMIN : s;
}

/* digits += S * 2^(s - 53), S an integer number of units 2^(s-53), |S| < 2^53;
 * span[0] and span[1] widen to the lowest and highest digit written (dw_normalize
 * runs over them). */
static void dw_add_units(int64_t *digits, int64_t stride, double sum, int s, int *span)
{
    int64_t m = (int64_t)(sum * dw_pow2(53 - s)); /* exact: a power of two */
    int shift = s - 53 - DW_BASE; /* >= 21 */
    int k = shift >> 5, o = shift & 31;
    span[0] = k < span[0] ? k : span[0];
    span[1] = k + 2 > span[1] ? k + 2 : span[1];
    int64_t lo = (int64_t)(((uint64_t)m & 0xffffffffu) << o);
    int64_t hi = (m >> 32) * ((int64_t)1 << o); /* arithmetic shift: floor */
    digits[k * stride] += lo & 0xffffffff;
    digits[(k + 1) * stride] += (lo >> 32) + (hi & 0xffffffff);
    digits[(k + 2) * stride] += hi >> 32;
}

/* dw_add_units for the columns of a tile at once: digits j += sum[j] * 2^(s[j] - 53)
 * for j < cols.  The same integers (a zero sum adds zeros), vectorised across the
 * columns: each column's three digit words, then one pass per digit row the tile
 * touches (3-4 rows where the columns' scales are alike, as they are in a tile). */
static void dw_add_tile(int64_t *digits, int64_t stride, const double *sum, const int *s, int cols, int *span)
{
    int64_t w0[DW_TILE], w1[DW_TILE], w2[DW_TILE];
    int k[DW_TILE], kmin = DW_DIGITS, kmax = -1;
    for (int j = 0; j < cols; ++j) {
        int64_t m = (int64_t)(sum[j] * dw_pow2(53 - s[j])); /* exact: a power of two */
        int shift = s[j] - 53 - DW_BASE; /* >= 21 */
        int o = shift & 31;
        int64_t lo = (int64_t)(((uint64_t)m & 0xffffffffu) << o);
        int64_t hi = (m >> 32) * ((int64_t)1 << o); /* arithmetic shift: floor */
        k[j] = shift >> 5;
        w0[j] = lo & 0xffffffff;
        w1[j] = (lo >> 32) + (hi & 0xffffffff);
        w2[j] = hi >> 32;
    }
    for (int j = 0; j < cols; ++j) {
        kmin = k[j] < kmin ? k[j] : kmin;
        kmax = k[j] > kmax ? k[j] : kmax;
    }
    for (int r = kmin; r <= kmax + 2; ++r) {
        int64_t *restrict d = digits + r * stride;
        for (int j = 0; j < cols; ++j)
            d[j] += (k[j] == r ? w0[j] : 0) + (k[j] + 1 == r ? w1[j] : 0) + (k[j] + 2 == r ? w2[j] : 0);
    }
    span[0] = kmin < span[0] ? kmin : span[0];
    span[1] = kmax + 2 > span[1] ? kmax + 2 : span[1];
}

/* One row's products over `cols` columns of a tile: row[j] = p = a[j] * xh[j] in
 * fp64, mx[j] = max |p| (a NaN p leaves it as it is; an infinite one makes it inf).
 * xh = c, or c / r in fp32 when divide.  Inlined with constant cols and divide: one
 * loop per case. */
INLINE void dw_row(const float *a, const float *c, float r, int divide, int cols, double *restrict row,
                   double *restrict mx)
{
    for (int j = 0; j < cols; ++j) {
        const float h = divide ? c[j] / r : c[j];
        double p = (double)a[j] * (double)h;
        double ap = fabs(p);
        row[j] = p;
        mx[j] = ap > mx[j] ? ap : mx[j];
    }
}

/* The products of a panel (`rows` rows of `cols` <= DW_PANEL * DW_TILE columns) in
 * one pass along the rows: tile t's rows at buf + t * DW_BLOCK * DW_TILE (a narrow
 * last tile padded with zeros), its columns' max |p| (dw_row) at mx + t * DW_TILE.
 * rms: NULL (b is x_hat) or the block's rms (b is x). */
static void dw_products(const float *dy, int64_t dy_stride, const float *b, int64_t b_stride, const float *rms,
                        int64_t rows, int64_t cols, double *restrict buf, double *restrict mx)
{
    const int64_t full = cols / DW_TILE, tail = cols - full * DW_TILE;
    const int64_t width = (full + (tail > 0)) * DW_TILE;
    for (int64_t j = 0; j < width; ++j)
        mx[j] = 0.0;
    if (tail)
        for (int64_t i = 0; i < rows; ++i)
            for (int64_t j = tail; j < DW_TILE; ++j)
                buf[(full * DW_BLOCK + i) * DW_TILE + j] = 0.0;
    for (int64_t i = 0; i < rows; ++i) {
        const float *a = dy + i * dy_stride, *c = b + i * b_stride;
        const float r = rms ? rms[i] : 1.0f;
        for (int64_t t = 0; t < full; ++t) {
            double *restrict row = buf + (t * DW_BLOCK + i) * DW_TILE;
            if (rms)
                dw_row(a + t * DW_TILE, c + t * DW_TILE, r, 1, DW_TILE, row, mx + t * DW_TILE);
            else
                dw_row(a + t * DW_TILE, c + t * DW_TILE, r, 0, DW_TILE, row, mx + t * DW_TILE);
        }
        if (tail) {
            const int64_t o = full * DW_TILE;
            double *restrict row = buf + (full * DW_BLOCK + i) * DW_TILE;
            if (rms)
                dw_row(a + o, c + o, r, 1, (int)tail, row, mx + o);
            else
                dw_row(a + o, c + o, r, 0, (int)tail, row, mx + o);
        }
    }
}

/* A block with NaN or infinite products: count them per column, zero them in buf,
 * and take mx over the finite ones. */
static void dw_specials(double *restrict buf, int64_t rows, int64_t cols, int64_t *state, int64_t stride,
                        double *restrict mx)
{
    for (int64_t j = 0; j < cols; ++j) {
        mx[j] = 0.0;
        for (int64_t i = 0; i < rows; ++i) {
            double p = buf[i * DW_TILE + j];
            if (p != p)
                state[(DW_DIGITS + 0) * stride + j] += 1;
            else if (p == INFINITY)
                state[(DW_DIGITS + 1) * stride + j] += 1;
            else if (p == -INFINITY)
                state[(DW_DIGITS + 2) * stride + j] += 1;
            else {
                double ap = fabs(p);
                mx[j] = ap > mx[j] ? ap : mx[j];
                continue;
            }
            buf[i * DW_TILE + j] = 0.0;
        }
    }
}

/* The first two folds in one pass over buf (above), with s1 from each column's max:
 * their sums go into the digits, each column's largest remainder into mx.  Returns
 * how many columns have a remainder left, or -1 (and adds nothing) when a sum is NaN:
 * a NaN product, which the max did not see. */
static int dw_two_folds(const double *restrict buf, int64_t rows, int64_t cols, const int *s1,
                        int64_t *state, int64_t stride, double *restrict mx, int *span)
{
    double g1[DW_TILE], g2[DW_TILE], a1[DW_TILE], a2[DW_TILE], m2[DW_TILE];
    for (int j = 0; j < DW_TILE; ++j) {
        g1[j] = dw_pow2(s1[j]);
        g2[j] = dw_pow2(dw_second(s1[j]));
        a1[j] = a2[j] = m2[j] = 0.0;
    }
    for (int64_t i = 0; i < rows; ++i) {
        const double *restrict row = buf + i * DW_TILE;
        for (int j = 0; j < DW_TILE; ++j) {
            double p = row[j];
            double q1 = (p + g1[j]) - g1[j];
            double r = p - q1;
            double q2 = (r + g2[j]) - g2[j];
            double ar = fabs(r - q2);
            a1[j] += q1;
            a2[j] += q2;
            m2[j] = ar > m2[j] ? ar : m2[j];
        }
    }
    int nan = 0;
    for (int j = 0; j < DW_TILE; ++j)
        nan |= a1[j] != a1[j];
    if (nan)
        return -1;
    int live = 0, s2[DW_TILE];
    for (int j = 0; j < DW_TILE; ++j)
        s2[j] = dw_second(s1[j]);
    dw_add_tile(state, stride, a1, s1, (int)cols, span);
    dw_add_tile(state, stride, a2, s2, (int)cols, span);
    for (int j = 0; j < cols; ++j) {
        mx[j] = m2[j];
        live += m2[j] > 0.0;
    }
    return live;
}

/* After dw_two_folds left something: its remainders into buf (the same operations),
 * then the general folds until none is left.  Returns 0 if DW_MAX_FOLDS did not do. */
static int dw_more_folds(double *restrict buf, int64_t rows, int64_t cols, const int *s1, int64_t *state,
                         int64_t stride, double *restrict mx, int *span)
{
    double sig[DW_TILE], g2[DW_TILE], acc[DW_TILE];
    int s[DW_TILE];
    for (int j = 0; j < DW_TILE; ++j) {
        sig[j] = dw_pow2(s1[j]);
        g2[j] = dw_pow2(dw_second(s1[j]));
    }
    for (int64_t i = 0; i < rows; ++i) {
        double *restrict row = buf + i * DW_TILE;
        for (int j = 0; j < DW_TILE; ++j) {
            double p = row[j];
            double r = p - ((p + sig[j]) - sig[j]);
            row[j] = r - ((r + g2[j]) - g2[j]);
        }
    }
    int live = 0;
    for (int j = 0; j < DW_TILE; ++j) {
        live += j < cols && mx[j] > 0.0;
        s[j] = j < cols && mx[j] > 0.0 ? dw_scale(mx[j]) : DW_SMIN;
    }
    for (int folds = 0; live; ++folds) {
        if (folds == DW_MAX_FOLDS)
            return 0; /* cannot happen (see above); never loop forever */
        for (int j = 0; j < DW_TILE; ++j) {
            sig[j] = dw_pow2(s[j]);
            acc[j] = 0.0;
            mx[j] = 0.0;
        }
        for (int64_t i = 0; i < rows; ++i) {
            double *restrict row = buf + i * DW_TILE;
            for (int j = 0; j < DW_TILE; ++j) {
                double p = row[j];
                double q = (p + sig[j]) - sig[j];
                double r = p - q;
                double ar = fabs(r);
                acc[j] += q;
                row[j] = r;
                mx[j] = ar > mx[j] ? ar : mx[j];
            }
        }
        live = 0;
        for (int j = 0; j < cols; ++j) {
            if (acc[j] != 0.0)
                dw_add_units(state + j, stride, acc[j], s[j], span);
            live += mx[j] > 0.0;
            s[j] = mx[j] > 0.0 ? dw_scale(mx[j]) : DW_SMIN;
        }
    }
    return 1;
}

static void dw_scales(const double *mx, int64_t cols, int *s1)
{
    for (int j = 0; j < DW_TILE; ++j)
        s1[j] = j < cols && mx[j] > 0.0 ? dw_scale(mx[j]) : DW_SMIN;
}

/* One block x tile after its products: specials counted (an infinite product shows
 * in mx, a NaN one in dw_two_folds's sums), then the folds. */
static int dw_tile(double *restrict buf, int64_t rows, int64_t cols, int64_t *state, int64_t stride,
                   double *restrict mx, int *span)
{
    int s1[DW_TILE], inf = 0;
    for (int j = 0; j < DW_TILE; ++j)
        inf |= mx[j] == INFINITY;
    if (inf) {
        dw_specials(buf, rows, cols, state, stride, mx);
        span[2] = 1;
    }
    dw_scales(mx, cols, s1);
    int live = dw_two_folds(buf, rows, cols, s1, state, stride, mx, span);
    if (live < 0) { /* a NaN product: nothing was added; count, zero, and fold again */
        dw_specials(buf, rows, cols, state, stride, mx);
        span[2] = 1;
        dw_scales(mx, cols, s1);
        live = dw_two_folds(buf, rows, cols, s1, state, stride, mx, span);
    }
    return live == 0 ? 1 : dw_more_folds(buf, rows, cols, s1, state, stride, mx, span);
}

/* Balanced digits, as kernels/exact_sum.normalize_, of a state that was balanced
 * before digits span[0]..span[1] were added to; returns the count of columns whose
 * top digit passes DW_TOP_LIMIT.  The digits below span[0] are as they were; from
 * span[1] up, a row whose carries are all zero leaves every row above it as it was
 * (balanced), so the pass stops there: ordinary data touches 4-6 of the 19 rows. */
int64_t tgn_dw_normalize(int64_t *state, int64_t cols, int64_t stride, const int *span)
{
    for (int k = span[0] < 0 ? 0 : span[0]; k < DW_DIGITS - 1; ++k) {
        int64_t *restrict d = state + k * stride, *restrict up = d + stride;
        int64_t any = 0;
        for (int64_t j = 0; j < cols; ++j) {
            int64_t carry = (d[j] + ((int64_t)1 << 31)) >> 32;
            d[j] -= carry * ((int64_t)1 << 32);
            up[j] += carry;
            any |= carry;
        }
        if (k >= span[1] && !any)
            break;
    }
    int64_t over = 0;
    const int64_t *top = state + (DW_DIGITS - 1) * stride;
    for (int64_t j = 0; j < cols; ++j)
        over += top[j] > DW_TOP_LIMIT || top[j] < -DW_TOP_LIMIT;
    return over;
}

/* p = a * h in fp64 (exact: 48 bits) plus c, rounded once: with FMA, one fma (the
 * same rounding, since a * h is exact). */
#if defined(__FMA__)
#define DW_MUL_ADD(a, h, c) fma((double)(a), (double)(h), (c))
#else
#define DW_MUL_ADD(a, h, c) ((double)(a) * (double)(h) + (c))
#endif

/* Each column's largest |dy| and |b| bits over a block of a panel (a NaN's bits are
 * above every number's) and smallest nonzero ones less one (UINT32_MAX: none), as
 * integers. */
static void dw_column_tops(const float *dy, int64_t dy_stride, const float *b, int64_t b_stride, int64_t rows,
                           int64_t cols, uint32_t *restrict tops, uint32_t *restrict lows)
{
    uint32_t *restrict tdy = tops, *restrict tb = tops + cols, *restrict ldy = lows, *restrict lb = lows + cols;
    for (int64_t j = 0; j < cols; ++j) {
        tdy[j] = tb[j] = 0;
        ldy[j] = lb[j] = UINT32_MAX;
    }
    for (int64_t i = 0; i < rows; ++i) {
        const float *a = dy + i * dy_stride, *c = b + i * b_stride;
        for (int64_t j = 0; j < cols; ++j) {
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

/* How a full tile's columns are folded (dw_tile_direct), from each column's bounds
 * over the block (tops: max |dy| then max |b| bits; lows: min nonzero less one):
 *
 * - the first scale from a bound B >= |p| instead of the measured max: B = max|dy|
 *   max|x_hat|, or with rms, max|dy| Bh with Bh = (max|x| / min rms) (1 + 2^-20) +
 *   2^-149 >= |fl(x / r)| (fp32 division: relative error below 2^-24, or 2^-150
 *   absolute where the quotient is subnormal), the fp64 roundings covered by the
 *   margins.  The fold's argument holds for any bound of the products (a larger M).
 * - one fold and the exact remainder where every product is a multiple of the second
 *   fold's grid u2 = 2^(s2 - 53): p = dy h is a multiple of ulp(min|dy|) ulp(min|h|)
 *   over the nonzero factors (ulp(v) >= ulp(min|v|)), and min|h| >= fl(min|x| / max
 *   rms) (division rounds monotonically).  Then q1 (a multiple of u1 >= u2) and
 *   r = p - q1 are multiples of u2 with |r| <= u1, so the second fold's q2 is r itself
 *   and leaves nothing.
 *
 * Returns 2 (one fold for every column), 1 (two folds), or 0 where a bound is NaN or
 * above 2^256 (an Inf or NaN, a tiny rms): the caller takes the measured path. */
static int dw_bound_scales(const uint32_t *tdy, const uint32_t *tb, const uint32_t *ldy, const uint32_t *lb,
                           double inv_rmin, float rmax, int with_rms, int *s1)
{
    int one_fold = 1;
    for (int j = 0; j < DW_TILE; ++j) {
        double mb = dw_float_bits(tb[j]), bound;
        if (with_rms)
            bound = dw_float_bits(tdy[j]) * ((mb * inv_rmin * (1.0 + 0x1p-20) + 0x1p-149) * (1.0 + 0x1p-50));
        else
            bound = dw_float_bits(tdy[j]) * mb; /* exact */
        if (!(bound <= 0x1p256)) /* NaN, or above every fp32 product (the digits' range) */
            return 0;
        s1[j] = bound > 0.0 ? dw_scale(bound) : DW_SMIN;
        if (ldy[j] == UINT32_MAX || lb[j] == UINT32_MAX)
            continue; /* a zero factor in every row: only zero products */
        uint32_t hmin = lb[j] + 1u;
        if (with_rms) {
            float q = dw_float_bits(hmin) / rmax;
            memcpy(&hmin, &q, sizeof hmin);
        }
        one_fold &= dw_ulp_exponent(ldy[j] + 1u) + dw_ulp_exponent(hmin) >= dw_second(s1[j]) - 53;
    }
    return 1 + one_fold;
}

/* x / r with IEEE division's bits from r's reciprocal pair (native_quotient.h's
 * tgn_q_setup and tgn_q_vec_ranged: a multiply and three fmas per vector where the
 * divider takes about five cycles), for r in [2^-40, 2^40] and x = +-0 or 2^-50 <=
 * |x| <= 2^60: the direct fold's largest cost on rows of x. */
#if TGN_QUOTIENT_LANES == 16 && DW_TILE % 16 == 0
#define DW_HAS_QUOTIENT 1
/* h[0, DW_TILE) = c[j] / r for one row of a tile, by tgn_q_vec_ranged (its range
 * holds: dw_tile_in_quotient_range and the rows' rms). */
INLINE void dw_quotients(const float *c, const tgn_q_div_t *d, float *restrict h)
{
    for (int j = 0; j < DW_TILE; j += 16)
        _mm512_storeu_ps(h + j, tgn_q_vec_ranged(d, _mm512_loadu_ps(c + j)));
}
#else
#define DW_HAS_QUOTIENT 0
#endif

/* The folds of a block x full tile with the products formed as they are folded (no
 * buffer), with scales s1 (dw_bound_scales): the first two folds as dw_two_folds
 * makes them, or with one_fold the first and the exact remainder.  Adds the sums to
 * the digits and returns 1 when nothing is left for a third fold (a remainder is seen
 * by its bits: r - q2 is +0 when nothing is left) and the sums are finite; else adds
 * nothing and returns 0. */
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
            double q1 = DW_MUL_ADD(a[j], h, g1[j]) - g1[j];
            double rest = DW_MUL_ADD(a[j], h, -q1); /* exact */
            a1[j] += q1;
            if (one_fold) {
                a2[j] += rest;
                continue;
            }
            double q2 = (rest + g2[j]) - g2[j];
            double after = rest - q2;
            uint64_t bits;
            memcpy(&bits, &after, sizeof bits);
            a2[j] += q2;
            left[j] |= bits;
        }
    }
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
static int dw_tile_direct_any(const float *dy, int64_t dy_stride, const float *b, int64_t b_stride,
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

/* Whether every x of a tile (its columns' largest |x| bits `tb` and smallest nonzero
 * ones less one `lb`) lies in dw_quotient's range: +-0 or 2^-50 <= |x| <= 2^60. */
static int dw_tile_in_quotient_range(const uint32_t *tb, const uint32_t *lb)
{
    int ok = 1;
    for (int j = 0; j < DW_TILE; ++j)
        ok &= (lb[j] == UINT32_MAX || lb[j] + 1u >= TGN_Q_LO) && tb[j] <= TGN_Q_HI;
    return ok;
}

/* One block x tile by the measured path: its products into buf, each column's max,
 * specials, then the folds (dw_tile). */
static int dw_tile_measured(const float *dy, int64_t dy_stride, const float *b, int64_t b_stride,
                            const float *rms, int64_t rows, int64_t cols, int64_t *state, int64_t stride,
                            double *buf, double *mx, int *span)
{
    dw_products(dy, dy_stride, b, b_stride, rms, rows, cols, buf, mx);
    return dw_tile(buf, rows, cols, state, stride, mx, span);
}

/* The measured path for whole panels: the products of a block x panel in one pass
 * along the rows into a 512 KiB buffer that stays in L2 (the pass computes while it
 * streams the inputs from memory), then each tile's folds from it. */
static int64_t dw_run_measured(const float *dy, int64_t dy_stride, const float *b, int64_t b_stride,
                               const float *rms, int64_t rows, int64_t cols, int64_t *state, int64_t stride)
{
    enum { PANEL = DW_PANEL * DW_TILE };
    double *buf = (double *)malloc(sizeof(double) * (DW_BLOCK + 1) * PANEL);
    if (!buf)
        return -1;
    double *mx = buf + DW_BLOCK * PANEL;
    int span[3] = {DW_DIGITS, -1, 0};
    for (int64_t i0 = 0; i0 < rows; i0 += DW_BLOCK) {
        int64_t nr = rows - i0 < DW_BLOCK ? rows - i0 : DW_BLOCK;
        for (int64_t j0 = 0; j0 < cols; j0 += PANEL) {
            int64_t nc = cols - j0 < PANEL ? cols - j0 : PANEL;
            dw_products(dy + i0 * dy_stride + j0, dy_stride, b + i0 * b_stride + j0, b_stride,
                        rms ? rms + i0 : NULL, nr, nc, buf, mx);
            for (int64_t t = 0; t * DW_TILE < nc; ++t) {
                int64_t w = nc - t * DW_TILE < DW_TILE ? nc - t * DW_TILE : DW_TILE;
                if (!dw_tile(buf + t * DW_BLOCK * DW_TILE, nr, w, state + j0 + t * DW_TILE, stride,
                             mx + t * DW_TILE, span)) {
                    free(buf);
                    return -2;
                }
            }
        }
    }
    free(buf);
    return tgn_dw_normalize(state, cols, stride, span);
}

/* Inputs from this many products per call on take dw_run_measured: past the caches
 * (about 48 MiB of dy and x), a pass that only streams them and a pass that only
 * computes cost more than the measured path's one pass that does both (4096 x 4096
 * fp32: 22-23 ms against 19 ms; 1024 x 4096: 3.4 against 3.7-4.1 ms, one thread). */
#define DW_DIRECT_MAX_PRODUCTS (INT64_C(6) << 20)

/* One block of at most DW_BLOCK rows over `cols` columns added into the digits of
 * state, not normalised (span: the digit rows written, and span[2] set when a special
 * product was counted).  Per panel of columns: each column's largest and smallest
 * nonzero |dy| and |b| in one pass along the rows (sequential reads, 4 KiB of each
 * row), then per full tile the direct folds from the bound; a narrow tile, a tile
 * whose bound is not finite and a tile that needs a third fold (a product 2^45 times
 * below its column's bound; random data has none) take the measured path.  Returns
 * 0, or -2 if a tile did not finish within DW_MAX_FOLDS folds (impossible). */
int64_t tgn_dw_block(const float *dyb, int64_t dy_stride, const float *bb, int64_t b_stride, const float *rb,
                     int64_t nr, int64_t cols, int64_t *state, int64_t stride, int *span)
{
    enum { PANEL = DW_PANEL * DW_TILE };
    double buf[DW_BLOCK * DW_TILE], mx[DW_TILE];
    uint32_t tops[2 * PANEL], lows[2 * PANEL];
    double rmin = rb ? INFINITY : 1.0; /* 0: an rms that is not positive (or NaN) */
    float rmax = 1.0f;
    float recip[2 * DW_BLOCK]; /* each row's reciprocal pair (dw_quotient) */
    int quotient = DW_HAS_QUOTIENT && rb != NULL;
    for (int64_t i = 0; rb && i < nr; ++i) {
        rmin = !(rb[i] > 0.0f) ? 0.0 : rb[i] < rmin ? rb[i] : rmin;
        rmax = i == 0 || rb[i] > rmax ? rb[i] : rmax;
        quotient &= tgn_quotient_rms_in_range(rb[i]);
    }
#if DW_HAS_QUOTIENT
    for (int64_t i = 0; quotient && i < nr; ++i) { /* tgn_q_setup's pair */
        recip[2 * i] = 1.0f / rb[i];
        recip[2 * i + 1] = __builtin_fmaf(-rb[i], recip[2 * i], 1.0f) * recip[2 * i];
    }
#endif
    for (int64_t j0 = 0; j0 < cols; j0 += PANEL) {
        int64_t nc = cols - j0 < PANEL ? cols - j0 : PANEL;
        dw_column_tops(dyb + j0, dy_stride, bb + j0, b_stride, nr, nc, tops, lows);
        for (int64_t t = 0; t * DW_TILE < nc; ++t) {
            int64_t o = j0 + t * DW_TILE, w = nc - t * DW_TILE < DW_TILE ? nc - t * DW_TILE : DW_TILE;
            int s1[DW_TILE], how = 0;
            if (w == DW_TILE && rmin > 0.0)
                how = dw_bound_scales(tops + t * DW_TILE, tops + nc + t * DW_TILE, lows + t * DW_TILE,
                                      lows + nc + t * DW_TILE, 1.0 / rmin, rmax, rb != NULL, s1);
            const float *rq = quotient && dw_tile_in_quotient_range(tops + nc + t * DW_TILE, lows + nc + t * DW_TILE)
                                  ? recip : NULL;
            if (how && dw_tile_direct_any(dyb + o, dy_stride, bb + o, b_stride, rb, rq, nr, s1, how == 2, state + o,
                                          stride, span))
                continue;
            if (!dw_tile_measured(dyb + o, dy_stride, bb + o, b_stride, rb, nr, w, state + o, stride, buf, mx, span))
                return -2;
        }
    }
    return 0;
}

/* Blocks of DW_BLOCK rows through tgn_dw_block, then the state normalised. */
static int64_t dw_run(const float *dy, int64_t dy_stride, const float *b, int64_t b_stride, const float *rms,
                      int64_t rows, int64_t cols, int64_t *state, int64_t stride)
{
    if (rows * cols >= DW_DIRECT_MAX_PRODUCTS)
        return dw_run_measured(dy, dy_stride, b, b_stride, rms, rows, cols, state, stride);
    int span[3] = {DW_DIGITS, -1, 0};
    for (int64_t i0 = 0; i0 < rows; i0 += DW_BLOCK) {
        int64_t nr = rows - i0 < DW_BLOCK ? rows - i0 : DW_BLOCK;
        if (tgn_dw_block(dy + i0 * dy_stride, dy_stride, b + i0 * b_stride, b_stride, rms ? rms + i0 : NULL, nr,
                         cols, state, stride, span) < 0)
            return -2;
    }
    return tgn_dw_normalize(state, cols, stride, span);
}

/* state (22 rows of row stride `stride`, columns 0..cols-1 here) += the exact column
 * sums of dy * xh over `rows` rows (unit stride along a row), then normalised.
 * The caller bounds rows (kernels/exact_sum.ROWS_PER_ADD) so no digit overflows.
 * Returns -1 when the scratch cannot be allocated, -2 if a block did not finish
 * within DW_MAX_FOLDS folds (impossible by the argument above), else the count of
 * overflowed columns. */
int64_t tgn_exact_dw_f32(const float *dy, int64_t dy_stride, const float *xh, int64_t xh_stride,
                         int64_t rows, int64_t cols, int64_t *state, int64_t stride)
{
    return dw_run(dy, dy_stride, xh, xh_stride, NULL, rows, cols, state, stride);
}

/* The same with xh = x / rms[i] (fp32, per row; rms contiguous): RMSNorm's x_hat,
 * the bits of torch.div(x, rms), formed in the loop instead of read. */
int64_t tgn_exact_dw_rows_f32(const float *dy, int64_t dy_stride, const float *x, int64_t x_stride,
                              const float *rms, int64_t rows, int64_t cols, int64_t *state, int64_t stride)
{
    return dw_run(dy, dy_stride, x, x_stride, rms, rows, cols, state, stride);
}

#ifdef DW_WIDE
#pragma GCC pop_options
#endif
