/* FINALIZE and the fused residual add, as both row kernels run them: the exact rows
 * (native_exact.c) and the float rows (native.c), each row while it is in cache. */
#ifndef TGN_NATIVE_FINALIZE_H
#define TGN_NATIVE_FINALIZE_H

#include <math.h>
#include <stdint.h>

#include "native_half.h"
#include "native_quotient.h"
#include "tgn_native.h"

#ifndef INLINE
#define INLINE static inline __attribute__((always_inline))
#endif

/* --- FINALIZE, fused: kernels.finalize for one row, while the row is in cache -----
 *
 *   mean = total / D + eps      (in the accumulation dtype; torch rounds a Python
 *                                eps to it before adding, as (float)eps does here)
 *   rms  = sqrt(mean)           (taken in fp64 and rounded, as kernels does)
 *   y    = x / rms; y *= w      (two roundings: the quotient is IEEE division's,
 *                                formed with fmas from one reciprocal per row,
 *                                native_quotient.h, then one multiply)
 *
 * with the weight w + offset (one fp32 addition, kernels.finalize_weight; none when
 * offset is 0) and, for casting_mode="llama" on a bf16 or fp16 row (flags), the
 * quotient rounded to the row's dtype before the weight (TGN_ROUND_QUOTIENT; fp16 with
 * TGN_ROUND_F16) and, with a weight of that dtype, the product rounded to it too
 * (TGN_ROUND_PRODUCT): the product of two bf16 or two fp16 values is exact in fp32, so
 * rounding it once is torch's bf16 or fp16 multiply.  The rounding is torch's float ->
 * bf16 / fp16 (round to nearest even; native_half.h); a NaN it meets is not rounded
 * here: the row is reported (return 1) and the caller gives it the reference's bits,
 * since torch's vector and scalar casts of a NaN differ.
 *
 * y may be x itself (a bf16/fp16 row widened into fp32 scratch): each element is
 * read before it is written.  The caller casts a narrow result back with torch.
 */
/* (TGN_ROUND_QUOTIENT, TGN_ROUND_PRODUCT, TGN_ROUND_F16 and TGN_TOTAL_AS_RMS: tgn_constants.h.  With
 * TGN_TOTAL_AS_RMS, float rows leave in total[i] the row's rms (finalize_row_float's
 * sqrt(total / D + eps)) instead of its total: what the backward keeps.) */

#define NORMALIZE_ROW(row, y, w, hidden, rms)                                          \
    do {                                                                               \
        if (w)                                                                         \
            for (int64_t j = 0; j < (hidden); ++j)                                     \
                (y)[j] = ((row)[j] / (rms)) * (w)[j];                                  \
        else                                                                           \
            for (int64_t j = 0; j < (hidden); ++j)                                     \
                (y)[j] = (row)[j] / (rms);                                             \
    } while (0)

/* The weight plus a nonzero offset: y = (x / rms) * (w + offset). */
#define NORMALIZE_ROW_OFFSET(row, y, w, hidden, rms, off)                              \
    do {                                                                               \
        for (int64_t j = 0; j < (hidden); ++j)                                         \
            (y)[j] = ((row)[j] / (rms)) * ((w)[j] + (off));                            \
    } while (0)

/* llama's rounding of an fp32 value to the row's dtype, read back as fp32 */
INLINE float round_llama(float f, int f16)
{
    return f16 ? tgn_f16_to_f32(tgn_f32_to_f16(f)) : tgn_bf16_to_f32(tgn_f32_to_bf16(f));
}

/* casting_mode="llama" on a bf16 or fp16 row (y is fp32 scratch holding values of
 * that dtype, or an fp32 output for an fp32 weight); returns 1 if a NaN was met. */
static inline int llama_row(const float *row, float *y, const float *w, int64_t hidden, float rms, int64_t flags,
                     float off)
{
    const int f16 = (flags & TGN_ROUND_F16) != 0;
    int nan = 0;
    for (int64_t j = 0; j < hidden; ++j) {
        float q = row[j] / rms;
        nan |= q != q;
        q = round_llama(q, f16);
        if (w) {
            q = q * (off != 0.0f ? w[j] + off : w[j]);
            if (flags & TGN_ROUND_PRODUCT) {
                nan |= q != q;
                q = round_llama(q, f16);
            }
        }
        y[j] = q;
    }
    return nan;
}

static inline float rms_of_total_float(float total, int64_t hidden, double eps)
{
    float mean = total / (float)(double)hidden + (float)eps;
    return (float)sqrt((double)mean);
}

/* FINALIZE of n elements of a row (any part of it: each element's bits are its own)
 * given the row's rms; 1 if the llama rounding met a NaN.  ahead (NULL: none): the
 * next row's same elements, prefetched as these go (a row read from memory next, whose
 * sums then find it in L2). */
static inline int finalize_span_float(const float *row, float *y, const float *w, int64_t n, float rms,
                               int64_t flags, double offset, const float *ahead)
{
    float off = (float)offset;
    if (flags & TGN_ROUND_QUOTIENT)
        return llama_row(row, y, w, n, rms, flags, off);
    tgn_quotient_row_f32_ahead(row, y, w, w ? off : 0.0f, n, rms, /* native_quotient.h */
                               (flags & TGN_STREAM_STORES) != 0, ahead);
    return 0;
}

static inline int finalize_row_float(const float *row, float *y, const float *w, int64_t hidden,
                              float total, double eps, int64_t flags, double offset, const float *ahead)
{
    return finalize_span_float(row, y, w, hidden, rms_of_total_float(total, hidden, eps), flags, offset, ahead);
}

/* The fp64 form is IEEE throughout, but torch's CPU fp64 sqrt is not correctly
 * rounded (docs/design.md), so loader.py never asks for it: fp64 rows keep torch's
 * FINALIZE.  It is here because the kernels are written once for both dtypes. */
static inline int finalize_row_double(const double *row, double *y, const double *w, int64_t hidden,
                               double total, double eps, int64_t flags, double offset, const double *ahead)
{
    (void)flags, (void)ahead;
    double mean = total / (double)hidden + eps;
    double rms = sqrt(mean);
    if (w && offset != 0.0)
        NORMALIZE_ROW_OFFSET(row, y, w, hidden, rms, offset);
    else
        NORMALIZE_ROW(row, y, w, hidden, rms);
    return 0;
}

/* --- the fused residual add: h = x + r (kernels.residual_add), one IEEE addition
 * per element; h may be x or r itself (each element is read before it is written).
 * The kernels then read the row from h, still in cache. */
#define ADD_RESIDUAL(T)                                                                \
    static inline const T *add_residual_##T(const T *row, const T *rrow, T *hrow, int64_t hidden) \
    {                                                                                  \
        for (int64_t j = 0; j < hidden; ++j)                                           \
            hrow[j] = row[j] + rrow[j];                                                \
        return hrow;                                                                   \
    }
ADD_RESIDUAL(float)
ADD_RESIDUAL(double)

#define RESIDUAL_ARGS(T) const T *r, int64_t r_stride, T *h, int64_t h_stride
#define FINALIZE_ARGS(T) T *y, int64_t y_stride, const T *w, double eps, int64_t flags, double offset


#endif /* TGN_NATIVE_FINALIZE_H */
