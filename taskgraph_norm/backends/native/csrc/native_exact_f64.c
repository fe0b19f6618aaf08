/* The exact domain's fp64 rows (docs/exact.md; the argument, the scale and the fp32
 * rows are native_exact.c): each row's max pass, then its exact pair (S1, S2) in
 * fp64 vector lanes, then FINALIZE (native_finalize.h) while the row is in cache. */

#include <math.h>
#include <stdint.h>

#include "native_exact.h"
#include "native_finalize.h"
#include "tgn_native.h"

#ifdef __FAST_MATH__
#error "native_exact_f64.c must not be compiled with -ffast-math"
#endif

static double row_max_double(const double *row, int64_t hidden)
{
    const v4l absmask = {INT64_MAX, INT64_MAX, INT64_MAX, INT64_MAX};
    v4d top0 = {0}, top1 = {0};
    int64_t j = 0;
    for (; j + 8 <= hidden; j += 8) {
        top0 = max4_f64((v4d)((v4l)load4_f64(row + j) & absmask), top0);
        top1 = max4_f64((v4d)((v4l)load4_f64(row + j + 4) & absmask), top1);
    }
    double m = 0.0;
    for (int l = 0; l < 4; ++l) {
        m = top0[l] > m ? top0[l] : m;
        m = top1[l] > m ? top1[l] : m;
    }
    for (; j < hidden; ++j) {
        double a = fabs(row[j]);
        m = a > m ? a : m;
    }
    return m * m;
}


/* The exact pair of one row, (S1, S2) in *t1, *t2; returns 0 when the row has no
 * scale (its sums are not formed).  A NaN in the row gives a NaN sum (fp64 rows) or
 * no scale (fp32 rows, whose max sees it): either way the caller hands it back.
 * `next` (or NULL): the row the caller reads next, prefetched meanwhile. */
static int exact_row_double(const double *row, int64_t hidden, const double *next, double *t1, double *t2)
{
    (void)next;
    double s1, s2;
    if (!tgn_exact_scale(row_max_double(row, hidden), hidden, &s1, &s2))
        return 0;
    const v4d s1v = {s1, s1, s1, s1}, s2v = {s2, s2, s2, s2};
    v4d a1 = {0}, a2 = {0}, b1 = {0}, b2 = {0};
    int64_t j = 0;
    for (; j + 8 <= hidden; j += 8) {
        v4d xa = load4_f64(row + j), xb = load4_f64(row + j + 4);
        v4d va = xa * xa, vb = xb * xb;
        v4d qa = (va + s1v) - s1v, qb = (vb + s1v) - s1v;
        v4d ra = va - qa, rb = vb - qb;
        a1 += qa;
        b1 += qb;
        a2 += (ra + s2v) - s2v;
        b2 += (rb + s2v) - s2v;
    }
    v4d acc1 = a1 + b1, acc2 = a2 + b2;
    double u1 = 0.0, u2 = 0.0;
    for (int l = 0; l < 4; ++l) {
        u1 += acc1[l];
        u2 += acc2[l];
    }
    for (; j < hidden; ++j)
        EXACT_STEP(row[j], s1, s2, u1, u2);
    *t1 = u1;
    *t2 = u2;
    return 1;
}

#define EXACT_ROWS(NAME, T)                                                            \
    int64_t NAME(const T *x, int64_t rows, int64_t hidden, int64_t row_stride,       \
                 double *pair, FINALIZE_ARGS(T), RESIDUAL_ARGS(T))                    \
    {                                                                                 \
        int64_t unscaled = 0;                                                         \
        for (int64_t i = 0; i < rows; ++i) {                                          \
            const T *row = x + i * row_stride;                                        \
            if (r)                                                                    \
                row = add_residual_##T(row, r + i * r_stride, h + i * h_stride, hidden); \
            double t1 = NAN, t2 = NAN;                                                \
            if (exact_row_##T(row, hidden, !r && i + 1 < rows ? row + row_stride : NULL, &t1, &t2) \
                && t1 == t1 && t2 == t2 && y                                          \
                && finalize_row_##T(row, y + i * y_stride, w, hidden, (T)(t1 + t2), eps, \
                                    flags, offset, NULL))                             \
                t1 = NAN; /* a NaN the llama rounding left to the caller */           \
            if (t1 != t1 || t2 != t2) { /* no scale, or a NaN in the row */            \
                t1 = t2 = NAN;                                                        \
                ++unscaled;                                                           \
            }                                                                         \
            if (pair) {                                                               \
                pair[2 * i] = t1;                                                     \
                pair[2 * i + 1] = t2;                                                 \
            }                                                                         \
        }                                                                             \
        if (flags & TGN_STREAM_STORES)                                                \
            tgn_store_fence();                                                        \
        return unscaled;                                                              \
    }

EXACT_ROWS(tgn_exact_rows_f64, double)
