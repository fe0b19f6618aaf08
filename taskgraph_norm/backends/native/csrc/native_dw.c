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
#include "native_dw_tile.h"
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
 * the first scale from a bound of the products instead of their measured max, one
 * bound for a tile's columns (the argument above holds for any M >= max |p|: each
 * column's integer is the same whatever scale folds it), the products formed again as they are
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
 *
 * The measured path (products into a buffer, then the folds) is native_dw_measured.c,
 * the direct one (the bound route above) native_dw_direct.c, the steps both take
 * (the scales, the digits' add) native_dw_tile.h; this file runs the blocks.
 */

DW_WIDE_BEGIN

/* Balanced digits, as kernels/exact_sum.normalize_, of a state that was balanced
 * before digits span[0]..span[1] were added to; returns the count of columns whose
 * top digit passes DW_TOP_LIMIT.  The digits below span[0] are as they were; from
 * span[1] up, a row whose carries are all zero leaves every row above it as it was
 * (balanced), so the pass stops there: ordinary data touches 4-6 of the 19 rows.
 * span[1] is raised to the highest row a carry reached. */
int64_t tgn_dw_normalize(int64_t *state, int64_t cols, int64_t stride, int *span)
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
        if (any && k + 1 > span[1])
            span[1] = k + 1;
        if (k >= span[1] && !any)
            break;
    }
    int64_t over = 0;
    const int64_t *top = state + (DW_DIGITS - 1) * stride;
    for (int64_t j = 0; j < cols; ++j)
        over += top[j] > DW_TOP_LIMIT || top[j] < -DW_TOP_LIMIT;
    return over;
}

/* Inputs from this many products per call on take dw_run_measured: past the caches
 * (about 48 MiB of dy and x), a pass that only streams them and a pass that only
 * computes cost more than the measured path's one pass that does both (4096 x 4096
 * fp32: 22-23 ms against 19 ms; 1024 x 4096: 3.4 against 3.7-4.1 ms, one thread). */
#define DW_DIRECT_MAX_PRODUCTS (INT64_C(6) << 20)

/* One block of at most DW_BLOCK rows over `cols` columns added into the digits of
 * state, not normalised (span: the digit rows written, and span[2] set when a special
 * product was counted).  Per panel of columns: each full tile's largest and smallest
 * nonzero |dy| and |b| along the block's rows (or `given`'s, the same four bounds
 * over all the block's columns, which the fused backward's dx pass gathers as it
 * reads the rows: any bounds serve, native_dw_direct.c), then per full tile the
 * direct folds from the bound; a narrow tile, a tile whose bound is not finite and a tile that
 * needs a third fold (a product 2^45 times below its tile's bound; random data has
 * none) take the measured path.  Returns
 * 0, or -2 if a tile did not finish within DW_MAX_FOLDS folds (impossible). */
int64_t tgn_dw_block(const float *dyb, int64_t dy_stride, const float *bb, int64_t b_stride, const float *rb,
                     int64_t nr, int64_t cols, int64_t *state, int64_t stride, int *span, const uint32_t *given)
{
    enum { PANEL = DW_PANEL * DW_TILE };
    double buf[DW_BLOCK * DW_TILE], mx[DW_TILE];
    uint32_t tops[2 * DW_PANEL], lows[2 * DW_PANEL];
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
    /* given bounds: one scale and route for every full tile of the block */
    int given_s1[DW_TILE], given_how = 0;
    const float *given_rq = NULL;
    if (given && rmin > 0.0) {
        given_how = tgn_dw_bound_scales(given[0], given[1], given[2], given[3], 1.0 / rmin, rmax, rb != NULL,
                                        given_s1);
        given_rq = given_how && quotient && tgn_dw_tile_in_quotient_range(given[1], given[3]) ? recip : NULL;
    }
    for (int64_t j0 = 0; j0 < cols; j0 += PANEL) {
        int64_t nc = cols - j0 < PANEL ? cols - j0 : PANEL;
        if (!given)
            tgn_dw_tile_tops(dyb + j0, dy_stride, bb + j0, b_stride, nr, nc, tops, lows);
        for (int64_t t = 0; t * DW_TILE < nc; ++t) {
            int64_t o = j0 + t * DW_TILE, w = nc - t * DW_TILE < DW_TILE ? nc - t * DW_TILE : DW_TILE;
            int s1[DW_TILE], how = 0;
            const float *rq = NULL;
            if (w == DW_TILE && given) {
                how = given_how;
                rq = given_rq;
                memcpy(s1, given_s1, sizeof s1);
            } else if (w == DW_TILE && rmin > 0.0) {
                how = tgn_dw_bound_scales(tops[2 * t], tops[2 * t + 1], lows[2 * t], lows[2 * t + 1], 1.0 / rmin,
                                          rmax, rb != NULL, s1);
                rq = how && quotient && tgn_dw_tile_in_quotient_range(tops[2 * t + 1], lows[2 * t + 1]) ? recip
                                                                                                         : NULL;
            }
            if (how && tgn_dw_tile_direct_any(dyb + o, dy_stride, bb + o, b_stride, rb, rq, nr, s1, how == 2,
                                              state + o, stride, span))
                continue;
            if (!tgn_dw_tile_measured(dyb + o, dy_stride, bb + o, b_stride, rb, nr, w, state + o, stride, buf, mx,
                                      span))
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
        return tgn_dw_run_measured(dy, dy_stride, b, b_stride, rms, rows, cols, state, stride);
    int span[3] = {DW_DIGITS, -1, 0};
    for (int64_t i0 = 0; i0 < rows; i0 += DW_BLOCK) {
        int64_t nr = rows - i0 < DW_BLOCK ? rows - i0 : DW_BLOCK;
        if (tgn_dw_block(dy + i0 * dy_stride, dy_stride, b + i0 * b_stride, b_stride, rms ? rms + i0 : NULL, nr,
                         cols, state, stride, span, NULL) < 0)
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

DW_WIDE_END
