/* What the exact weight gradient's accumulate (native_dw.c) and its two paths share:
 * the measured path (native_dw_measured.c: the products into a buffer, their maxima,
 * then the folds) and the direct one (native_dw_direct.c: the folds from bounds of
 * the products, formed as they are folded).  The fold's scales and the digits' add
 * (the same integers on either path), the host build's wider vectors, and the calls
 * between the files. */
#ifndef TGN_NATIVE_DW_TILE_H
#define TGN_NATIVE_DW_TILE_H

#include <stdint.h>
#include <string.h>

#include "native_dw.h"
#include "native_quotient.h"
#include "tgn_native.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__AVX512F__)
/* A host build on an AVX-512 CPU: gcc's -march=native keeps 256-bit vectors by
 * default; the dW loops run faster at 512 (the bits do not depend on it: native_dw.c).
 * Each file's code after its includes sits between DW_WIDE_BEGIN and DW_WIDE_END. */
#define DW_WIDE 1
#define DW_WIDE_BEGIN _Pragma("GCC push_options") _Pragma("GCC target(\"prefer-vector-width=512\")")
#define DW_WIDE_END _Pragma("GCC pop_options")
#else
#define DW_WIDE_BEGIN
#define DW_WIDE_END
#endif

/* x / r with IEEE division's bits from r's reciprocal pair (native_quotient.h's
 * tgn_q_setup and tgn_q_vec_ranged; native_dw_direct.c's dw_quotients) where the
 * vectors have 16 lanes. */
#if TGN_QUOTIENT_LANES == 16 && DW_TILE % 16 == 0
#define DW_HAS_QUOTIENT 1
#else
#define DW_HAS_QUOTIENT 0
#endif

DW_WIDE_BEGIN

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

/* dw_add_units (native_dw_measured.c) for the columns of a tile at once: digits j +=
 * sum[j] * 2^(s[j] - 53) for j < cols.  The same integers (a zero sum adds zeros),
 * vectorised across the columns: each column's three digit words, then one pass per
 * digit row the tile touches (3-4 rows where the columns' scales are alike, as they
 * are in a tile). */
static inline void dw_add_tile(int64_t *digits, int64_t stride, const double *sum, const int *s, int cols, int *span)
{
    int uniform = 1;
    for (int j = 1; j < cols; ++j)
        uniform &= s[j] == s[0];
    if (uniform && cols > 0) { /* one scale (the direct folds'): the same words into three rows */
        const double unit = dw_pow2(53 - s[0]); /* exact: a power of two */
        const int shift = s[0] - 53 - DW_BASE, o = shift & 31, k = shift >> 5;
        int64_t *restrict d0 = digits + k * stride, *restrict d1 = d0 + stride, *restrict d2 = d1 + stride;
        for (int j = 0; j < cols; ++j) {
            int64_t m = (int64_t)(sum[j] * unit);
            int64_t lo = (int64_t)(((uint64_t)m & 0xffffffffu) << o);
            int64_t hi = (m >> 32) * ((int64_t)1 << o); /* arithmetic shift: floor */
            d0[j] += lo & 0xffffffff;
            d1[j] += (lo >> 32) + (hi & 0xffffffff);
            d2[j] += hi >> 32;
        }
        span[0] = k < span[0] ? k : span[0];
        span[1] = k + 2 > span[1] ? k + 2 : span[1];
        return;
    }
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

DW_WIDE_END

/* native_dw_measured.c: one block x tile by the measured path, and whole panels by it
 * (past the caches).  native_dw_direct.c: each tile's bounds over a block of a
 * panel, the first scale from them, the direct folds of a full tile, and whether a
 * tile's x lies in the quotient's range.  (Each is described where it is defined.) */
int tgn_dw_tile_measured(const float *dy, int64_t dy_stride, const float *b, int64_t b_stride, const float *rms,
                         int64_t rows, int64_t cols, int64_t *state, int64_t stride, double *buf, double *mx,
                         int *span);
int64_t tgn_dw_run_measured(const float *dy, int64_t dy_stride, const float *b, int64_t b_stride,
                            const float *rms, int64_t rows, int64_t cols, int64_t *state, int64_t stride);
void tgn_dw_tile_tops(const float *dy, int64_t dy_stride, const float *b, int64_t b_stride, int64_t rows,
                      int64_t cols, uint32_t *restrict tops, uint32_t *restrict lows);
int tgn_dw_bound_scales(uint32_t tdy, uint32_t tb, uint32_t ldy, uint32_t lb, double inv_rmin, float rmax,
                        int with_rms, int *s1);
int tgn_dw_tile_direct_any(const float *dy, int64_t dy_stride, const float *b, int64_t b_stride,
                           const float *rms, const float *recip, int64_t rows, const int *s1, int one_fold,
                           int64_t *state, int64_t stride, int *span);
int tgn_dw_tile_in_quotient_range(uint32_t tb, uint32_t lb);

#endif /* TGN_NATIVE_DW_TILE_H */
