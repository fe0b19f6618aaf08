/* The exact weight gradient's measured path (native_dw.c has the argument): a block
 * x tile's products written into a buffer with each column's largest |p|, the NaN and
 * infinite ones counted, then the folds from the measured maxima (the first two in one
 * pass, the general folds after where a remainder is left).  The direct path
 * (native_dw_direct.c) hands it the tiles it cannot finish; tgn_dw_run_measured takes
 * whole panels where the inputs are past the caches. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native_dw.h"
#include "native_dw_tile.h"
#include "tgn_native.h"

#ifdef __FAST_MATH__
#error "the native kernels must not be compiled with -ffast-math"
#endif

DW_WIDE_BEGIN

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

/* One block x tile by the measured path: its products into buf, each column's max,
 * specials, then the folds (dw_tile). */
int tgn_dw_tile_measured(const float *dy, int64_t dy_stride, const float *b, int64_t b_stride,
                         const float *rms, int64_t rows, int64_t cols, int64_t *state, int64_t stride,
                         double *buf, double *mx, int *span)
{
    dw_products(dy, dy_stride, b, b_stride, rms, rows, cols, buf, mx);
    return dw_tile(buf, rows, cols, state, stride, mx, span);
}

/* The measured path for whole panels: the products of a block x panel in one pass
 * along the rows into a 512 KiB buffer that stays in L2 (the pass computes while it
 * streams the inputs from memory), then each tile's folds from it. */
int64_t tgn_dw_run_measured(const float *dy, int64_t dy_stride, const float *b, int64_t b_stride,
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

DW_WIDE_END
