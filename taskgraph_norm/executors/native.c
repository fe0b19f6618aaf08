/* The compiled executor's native kernels: whole rows of sums of squares, in C.
 *
 * Two kernels, each the C form of the torch ops it replaces, bit for bit (the tests
 * compare them with the reference interpreter):
 *
 *   tgn_exact_rows_*  the exact domain (docs/exact.md), below;
 *   tgn_float_rows_*  pairwise leaves and ordered ADD merges (at the end);
 *
 * each optionally followed, row by row, by FINALIZE (kernels.finalize) into y.
 *
 * The exact kernel is kernels.rowmax_sq_whole + kernels.exact_scale +
 * kernels.sumsq_exact over whole rows: a max pass and a sum pass per row, with the
 * row in cache.  Every operation
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
 * once instead of twice).
 *
 * A row with no scale (an Inf square, or an fp64 row whose bound passes 2^1023)
 * or with a NaN (seen as a NaN sum) is not finished here: its pair is set to NaN
 * and the row is counted, and the caller gives it the reference interpreter's bits.
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native_quotient.h"

#ifdef __FAST_MATH__
#error "native.c must not be compiled with -ffast-math"
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

/* GCC/Clang vector extensions: 4 fp64 lanes (one AVX register, or two SSE2 or NEON
 * ones), two of them per step; with AVX the loads, widening and maxima are the
 * one-instruction intrinsics.  memcpy loads are unaligned-safe. */
typedef double v4d __attribute__((vector_size(32)));
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef int64_t v4l __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));

#define INLINE static inline __attribute__((always_inline))

#if defined(__AVX__)
#include <immintrin.h>
INLINE v4d load4_f32(const float *p) { return (v4d)_mm256_cvtps_pd(_mm_loadu_ps(p)); }
INLINE v8f max8_f32(v8f a, v8f b) { return (v8f)_mm256_max_ps((__m256)a, (__m256)b); }
INLINE v4d max4_f64(v4d a, v4d b) { return (v4d)_mm256_max_pd((__m256d)a, (__m256d)b); }
#else
INLINE v4d load4_f32(const float *p)
{
    v4f f;
    memcpy(&f, p, sizeof f);
    return __builtin_convertvector(f, v4d);
}
/* a > b ? a : b per lane (a NaN a gives b): what maxps does. */
INLINE v8f max8_f32(v8f a, v8f b)
{
    v8i gt = a > b;
    return (v8f)(((v8i)a & gt) | ((v8i)b & ~gt));
}
INLINE v4d max4_f64(v4d a, v4d b)
{
    v4l gt = a > b;
    return (v4d)(((v4l)a & gt) | ((v4l)b & ~gt));
}
#endif

INLINE v4d load4_f64(const double *p)
{
    v4d d;
    memcpy(&d, p, sizeof d);
    return d;
}

/* max|x| of a row over its non-NaN elements, squared in fp64 (|x| widens exactly).
 * A NaN is not seen here: it makes the row's sums NaN, which the caller checks. */
static double row_max_float(const float *row, int64_t hidden)
{
    const v8i absmask = {INT32_MAX, INT32_MAX, INT32_MAX, INT32_MAX,
                         INT32_MAX, INT32_MAX, INT32_MAX, INT32_MAX};
    v8f top0 = {0}, top1 = {0};
    int64_t j = 0;
    for (; j + 16 <= hidden; j += 16) {
        v8f a, b;
        memcpy(&a, row + j, sizeof a);
        memcpy(&b, row + j + 8, sizeof b);
        top0 = max8_f32((v8f)((v8i)a & absmask), top0);
        top1 = max8_f32((v8f)((v8i)b & absmask), top1);
    }
    float m = 0.0f;
    for (int l = 0; l < 8; ++l) {
        m = top0[l] > m ? top0[l] : m;
        m = top1[l] > m ? top1[l] : m;
    }
    for (; j < hidden; ++j) {
        float a = fabsf(row[j]);
        m = a > m ? a : m;
    }
    return (double)m * (double)m;
}

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
 * offset is 0) and, for casting_mode="llama" on a bf16 row (flags), the quotient
 * rounded to bf16 before the weight (TGN_ROUND_QUOTIENT) and, with a bf16 weight,
 * the product rounded to bf16 too (TGN_ROUND_PRODUCT): the product of two bf16
 * values is exact in fp32, so rounding it once is torch's bf16 multiply.  The
 * rounding is torch's float -> bf16 (round to nearest even); a NaN it meets is not
 * rounded here: the row is reported (return 1) and the caller gives it the
 * reference's bits, since torch's vector and scalar casts of a NaN differ.
 *
 * y may be x itself (a bf16/fp16 row widened into fp32 scratch): each element is
 * read before it is written.  The caller casts a narrow result back with torch.
 */
#define TGN_ROUND_QUOTIENT 1
#define TGN_ROUND_PRODUCT 2
/* float rows: after FINALIZE, total[i] holds the row's rms (finalize_row_float's
 * sqrt(total / D + eps)) instead of its total: what the backward keeps. */
#define TGN_TOTAL_AS_RMS 4

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

INLINE float round_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* casting_mode="llama" on a bf16 row (y is fp32 scratch holding bf16 values, or an
 * fp32 output for an fp32 weight); returns 1 if a NaN was met. */
static int llama_row_bf16(const float *row, float *y, const float *w, int64_t hidden, float rms,
                          int64_t flags, float off)
{
    int nan = 0;
    for (int64_t j = 0; j < hidden; ++j) {
        float q = row[j] / rms;
        nan |= q != q;
        q = round_bf16(q);
        if (w) {
            q = q * (off != 0.0f ? w[j] + off : w[j]);
            if (flags & TGN_ROUND_PRODUCT) {
                nan |= q != q;
                q = round_bf16(q);
            }
        }
        y[j] = q;
    }
    return nan;
}

static int finalize_row_float(const float *row, float *y, const float *w, int64_t hidden,
                              float total, double eps, int64_t flags, double offset)
{
    float mean = total / (float)(double)hidden + (float)eps;
    float rms = (float)sqrt((double)mean);
    float off = (float)offset;
    if (flags & TGN_ROUND_QUOTIENT)
        return llama_row_bf16(row, y, w, hidden, rms, flags, off);
    tgn_quotient_row_f32(row, y, w, w ? off : 0.0f, hidden, rms); /* native_quotient.h */
    return 0;
}

/* The fp64 form is IEEE throughout, but torch's CPU fp64 sqrt is not correctly
 * rounded (docs/design.md), so native.py never asks for it: fp64 rows keep torch's
 * FINALIZE.  It is here because the kernels are written once for both dtypes. */
static int finalize_row_double(const double *row, double *y, const double *w, int64_t hidden,
                               double total, double eps, int64_t flags, double offset)
{
    (void)flags;
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
    static const T *add_residual_##T(const T *row, const T *rrow, T *hrow, int64_t hidden) \
    {                                                                                  \
        for (int64_t j = 0; j < hidden; ++j)                                           \
            hrow[j] = row[j] + rrow[j];                                                \
        return hrow;                                                                   \
    }
ADD_RESIDUAL(float)
ADD_RESIDUAL(double)

#define RESIDUAL_ARGS(T) const T *r, int64_t r_stride, T *h, int64_t h_stride
#define FINALIZE_ARGS(T) T *y, int64_t y_stride, const T *w, double eps, int64_t flags, double offset

#define EXACT_ROWS(NAME, T, LOAD)                                                      \
    int64_t NAME(const T *x, int64_t rows, int64_t hidden, int64_t row_stride,       \
                 double *pair, FINALIZE_ARGS(T), RESIDUAL_ARGS(T))                          \
    {                                                                                 \
        int64_t unscaled = 0;                                                         \
        for (int64_t i = 0; i < rows; ++i) {                                          \
            const T *row = x + i * row_stride;                                        \
            if (r)                                                                    \
                row = add_residual_##T(row, r + i * r_stride, h + i * h_stride, hidden); \
            double s1, s2;                                                            \
            if (!tgn_exact_scale(row_max_##T(row, hidden), hidden, &s1, &s2)) {       \
                if (pair) {                                                           \
                    pair[2 * i] = NAN;                                                \
                    pair[2 * i + 1] = NAN;                                            \
                }                                                                     \
                ++unscaled;                                                           \
                continue;                                                             \
            }                                                                         \
            const v4d s1v = {s1, s1, s1, s1}, s2v = {s2, s2, s2, s2};                 \
            v4d a1 = {0}, a2 = {0}, b1 = {0}, b2 = {0};                               \
            int64_t j = 0;                                                            \
            for (; j + 8 <= hidden; j += 8) {                                         \
                v4d xa = LOAD(row + j), xb = LOAD(row + j + 4);                       \
                v4d va = xa * xa, vb = xb * xb;                                       \
                v4d qa = (va + s1v) - s1v, qb = (vb + s1v) - s1v;                     \
                v4d ra = va - qa, rb = vb - qb;                                       \
                a1 += qa;                                                             \
                b1 += qb;                                                             \
                a2 += (ra + s2v) - s2v;                                               \
                b2 += (rb + s2v) - s2v;                                               \
            }                                                                         \
            v4d acc1 = a1 + b1, acc2 = a2 + b2;                                       \
            double t1 = 0.0, t2 = 0.0;                                                \
            for (int l = 0; l < 4; ++l) {                                             \
                t1 += acc1[l];                                                        \
                t2 += acc2[l];                                                        \
            }                                                                         \
            for (; j < hidden; ++j) {                                                 \
                double xv = (double)row[j];                                           \
                double v = xv * xv;                                                   \
                double q1 = (v + s1) - s1;                                            \
                double r = v - q1;                                                    \
                t1 += q1;                                                             \
                t2 += (r + s2) - s2;                                                  \
            }                                                                         \
            if (y && t1 == t1 && t2 == t2                                             \
                && finalize_row_##T(row, y + i * y_stride, w, hidden, (T)(t1 + t2), eps, \
                                    flags, offset))                                   \
                t1 = NAN; /* a NaN the llama rounding left to the caller */           \
            if (t1 != t1 || t2 != t2) { /* a NaN in the row */                        \
                t1 = t2 = NAN;                                                        \
                ++unscaled;                                                           \
            }                                                                         \
            if (pair) {                                                               \
                pair[2 * i] = t1;                                                     \
                pair[2 * i + 1] = t2;                                                 \
            }                                                                         \
        }                                                                             \
        return unscaled;                                                              \
    }

EXACT_ROWS(tgn_exact_rows_f32, float, load4_f32)
EXACT_ROWS(tgn_exact_rows_f64, double, load4_f64)

/* --- the float domain: pairwise leaves and ordered ADD merges -------------------
 *
 * kernels.sumsq_pairwise per chunk (the halving order of kernels.pairwise_halving_:
 * while L > 1, h = ceil(L/2), s[i] += s[i + h] for i < L - h) and then the plan's ADD
 * triples (dst, a, b) in level order: slots[dst] = slots[a] + slots[b].  These
 * additions are not exact, so the order is the plan's, operation for operation;
 * each one is the same IEEE operation in the accumulation dtype as the torch ops'.
 * The scratch (chunk + slots values) is on the stack, or malloc'd when large (-1 is
 * returned if that fails).  The count of rows whose total is NaN is returned: C
 * does not keep an operand order for NaNs (which of two NaNs a sum returns), so
 * the caller gives those rows the reference interpreter's bits.
 */
/* One chunk of a power-of-two length C, with C a compile-time constant: the same
 * halving order (h = C/2, C/4, ..., 1; s[k] += s[k + h] for k < h), which the
 * compiler unrolls and vectorises; the general loop below serves other lengths. */
#define CHUNK_POW2(T, C)                                                               \
    INLINE T chunk_##T##_##C(const T *restrict src)                                    \
    {                                                                                  \
        T buf[(C) / 2];                                                                \
        for (int k = 0; k < (C) / 2; ++k)                                              \
            buf[k] = src[k] * src[k] + src[k + (C) / 2] * src[k + (C) / 2];            \
        for (int h = (C) / 4; h >= 1; h /= 2)                                          \
            for (int k = 0; k < h; ++k)                                                \
                buf[k] += buf[k + h];                                                  \
        return buf[0];                                                                 \
    }
#define CHUNK_POW2_ALL(T) CHUNK_POW2(T, 2) CHUNK_POW2(T, 4) CHUNK_POW2(T, 8) CHUNK_POW2(T, 16) \
    CHUNK_POW2(T, 32) CHUNK_POW2(T, 64) CHUNK_POW2(T, 128) CHUNK_POW2(T, 256)
CHUNK_POW2_ALL(float)
CHUNK_POW2_ALL(double)

/* The chunk sums of one row's full power-of-two chunks into slots; returns 0 when
 * the chunk length has no specialised form. */
#define FULL_CHUNKS_POW2(T)                                                            \
    static int full_chunks_##T(const T *row, int64_t chunk, int64_t n_full, T *slots) \
    {                                                                                  \
        switch (chunk) {                                                               \
        case 2: for (int64_t c = 0; c < n_full; ++c) slots[c] = chunk_##T##_2(row + c * 2); return 1; \
        case 4: for (int64_t c = 0; c < n_full; ++c) slots[c] = chunk_##T##_4(row + c * 4); return 1; \
        case 8: for (int64_t c = 0; c < n_full; ++c) slots[c] = chunk_##T##_8(row + c * 8); return 1; \
        case 16: for (int64_t c = 0; c < n_full; ++c) slots[c] = chunk_##T##_16(row + c * 16); return 1; \
        case 32: for (int64_t c = 0; c < n_full; ++c) slots[c] = chunk_##T##_32(row + c * 32); return 1; \
        case 64: for (int64_t c = 0; c < n_full; ++c) slots[c] = chunk_##T##_64(row + c * 64); return 1; \
        case 128: for (int64_t c = 0; c < n_full; ++c) slots[c] = chunk_##T##_128(row + c * 128); return 1; \
        case 256: for (int64_t c = 0; c < n_full; ++c) slots[c] = chunk_##T##_256(row + c * 256); return 1; \
        default: return 0;                                                             \
        }                                                                              \
    }
FULL_CHUNKS_POW2(double)

#if defined(__AVX__)
/* fp32 with AVX: eight full chunks of a power-of-two length C >= 16 at a time, the
 * same additions in the same order (so the same bits; tests/test_native.py compares
 * this host build with the portable one, which keeps the loop above).  Each chunk's
 * vertical steps (the squares' pairs, then h = C/4 ... 8) leave an 8-lane vector v
 * with v[k] = buf[k]; the last steps h = 4, 2, 1 (buf[k] += buf[k + h]) of the eight
 * vectors then run as a transposing network, each lane one of those additions with
 * its operands in the scalar order (a + b, a the lower index):
 *   t = v_c[k] + v_c[k + 4]   two chunks per vector (lanes 0-3 and 4-7)
 *   u = t[k] + t[k + 2]       four chunks per vector
 *   w = u[k] + u[k + 1]       eight chunks: lanes [c0 c2 c4 c6 | c1 c3 c5 c7]
 * Measured on one thread for a row of 4096 in chunks of 64: 405 -> 165 ns. */
#define VERT8(C)                                                                       \
    INLINE __m256 vert8_##C(const float *s)                                            \
    {                                                                                  \
        __m256 p[(C) / 16];                                                            \
        for (int i = 0; i < (C) / 16; ++i) {                                           \
            __m256 a = _mm256_loadu_ps(s + 8 * i), b = _mm256_loadu_ps(s + (C) / 2 + 8 * i); \
            p[i] = _mm256_add_ps(_mm256_mul_ps(a, a), _mm256_mul_ps(b, b));            \
        }                                                                              \
        for (int h = (C) / 32; h >= 1; h /= 2)                                         \
            for (int i = 0; i < h; ++i)                                                \
                p[i] = _mm256_add_ps(p[i], p[i + h]);                                  \
        return p[0];                                                                   \
    }
VERT8(16) VERT8(32) VERT8(64) VERT8(128) VERT8(256)

INLINE __m256 pair_halves(__m256 a, __m256 b) /* h = 4 for two chunks */
{
    return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

INLINE void network8(const __m256 *v, float *slots)
{
    __m256 t01 = pair_halves(v[0], v[1]), t23 = pair_halves(v[2], v[3]);
    __m256 t45 = pair_halves(v[4], v[5]), t67 = pair_halves(v[6], v[7]);
    __m256 u0 = _mm256_add_ps(_mm256_shuffle_ps(t01, t23, _MM_SHUFFLE(1, 0, 1, 0)),
                              _mm256_shuffle_ps(t01, t23, _MM_SHUFFLE(3, 2, 3, 2)));
    __m256 u1 = _mm256_add_ps(_mm256_shuffle_ps(t45, t67, _MM_SHUFFLE(1, 0, 1, 0)),
                              _mm256_shuffle_ps(t45, t67, _MM_SHUFFLE(3, 2, 3, 2)));
    __m256 w = _mm256_add_ps(_mm256_shuffle_ps(u0, u1, _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm256_shuffle_ps(u0, u1, _MM_SHUFFLE(3, 1, 3, 1)));
#if defined(__AVX2__)
    _mm256_storeu_ps(slots, _mm256_permutevar8x32_ps(w, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
#else
    float o[8];
    _mm256_storeu_ps(o, w);
    for (int k = 0; k < 4; ++k) {
        slots[2 * k] = o[k];
        slots[2 * k + 1] = o[k + 4];
    }
#endif
}

#define EIGHT_CHUNKS(C)                                                                \
    for (c = 0; c + 8 <= n_full; c += 8) {                                             \
        __m256 v[8];                                                                   \
        for (int i = 0; i < 8; ++i)                                                    \
            v[i] = vert8_##C(row + (c + i) * (C));                                     \
        network8(v, slots + c);                                                        \
    }                                                                                  \
    for (; c < n_full; ++c)                                                            \
        slots[c] = chunk_float_##C(row + c * (C));                                     \
    return 1;

static int full_chunks_float(const float *row, int64_t chunk, int64_t n_full, float *slots)
{
    int64_t c;
    switch (chunk) {
    case 16: EIGHT_CHUNKS(16)
    case 32: EIGHT_CHUNKS(32)
    case 64: EIGHT_CHUNKS(64)
    case 128: EIGHT_CHUNKS(128)
    case 256: EIGHT_CHUNKS(256)
    case 2: for (c = 0; c < n_full; ++c) slots[c] = chunk_float_2(row + c * 2); return 1;
    case 4: for (c = 0; c < n_full; ++c) slots[c] = chunk_float_4(row + c * 4); return 1;
    case 8: for (c = 0; c < n_full; ++c) slots[c] = chunk_float_8(row + c * 8); return 1;
    default: return 0;
    }
}
#else
FULL_CHUNKS_POW2(float)
#endif

/* Each row's total is written to total[i] (its rms with TGN_TOTAL_AS_RMS); total may be
 * NULL when nobody reads them (the direct path without autograd).  So may the exact
 * kernel's pair. */
#define FLOAT_ROWS(NAME, T)                                                            \
    int64_t NAME(const T *x, int64_t rows, int64_t hidden, int64_t row_stride,           \
              int64_t chunk, const int64_t *adds, int64_t n_adds, int64_t root,       \
              T *total, FINALIZE_ARGS(T), RESIDUAL_ARGS(T))                                 \
    {                                                                                 \
        int64_t n_chunks = (hidden + chunk - 1) / chunk, nan_rows = 0;                \
        int64_t need = chunk + n_chunks + n_adds;                                     \
        T small[2048];                                                                \
        T *work = need <= 2048 ? small : (T *)malloc((size_t)need * sizeof(T));       \
        if (!work)                                                                    \
            return -1;                                                                \
        T *buf = work, *slots = work + chunk;                                         \
        for (int64_t i = 0; i < rows; ++i) {                                          \
            const T *row = x + i * row_stride;                                        \
            if (r)                                                                    \
                row = add_residual_##T(row, r + i * r_stride, h + i * h_stride, hidden); \
            int64_t c0 = full_chunks_##T(row, chunk, hidden / chunk, slots) ? hidden / chunk : 0; \
            for (int64_t c = c0; c < n_chunks; ++c) {                                 \
                const T *src = row + c * chunk;                                       \
                int64_t length = hidden - c * chunk < chunk ? hidden - c * chunk : chunk; \
                if (length == 1) {                                                    \
                    slots[c] = src[0] * src[0];                                       \
                    continue;                                                         \
                }                                                                     \
                /* the first halving step straight from the squares */               \
                int64_t half = (length + 1) / 2;                                      \
                for (int64_t k = 0; k < length - half; ++k)                           \
                    buf[k] = src[k] * src[k] + src[k + half] * src[k + half];         \
                if (length & 1)                                                       \
                    buf[half - 1] = src[half - 1] * src[half - 1];                    \
                for (length = half; length > 1; length = half) {                      \
                    half = (length + 1) / 2;                                          \
                    T *restrict lo = buf;                                             \
                    const T *restrict hi = buf + half;                                \
                    for (int64_t k = 0; k < length - half; ++k)                       \
                        lo[k] += hi[k];                                               \
                }                                                                     \
                slots[c] = buf[0];                                                    \
            }                                                                         \
            for (int64_t t = 0; t < n_adds; ++t)                                      \
                slots[adds[3 * t]] = slots[adds[3 * t + 1]] + slots[adds[3 * t + 2]]; \
            T tot = slots[root];                                                      \
            if (y && finalize_row_##T(row, y + i * y_stride, w, hidden, tot, eps,     \
                                      flags, offset))                                 \
                tot = NAN; /* a NaN the llama rounding left to the caller */          \
            else if (flags & TGN_TOTAL_AS_RMS)                                        \
                tot = (T)sqrt((double)(tot / (T)(double)hidden + (T)eps));            \
            if (total)                                                                \
                total[i] = tot;                                                       \
            nan_rows += tot != tot;                                                   \
        }                                                                             \
        if (work != small)                                                            \
            free(work);                                                               \
        return nan_rows;                                                              \
    }

FLOAT_ROWS(tgn_float_rows_f32, float)
FLOAT_ROWS(tgn_float_rows_f64, double)

/* A version number the loader checks, so a library left from an older install is
 * never used. */
int tgn_native_abi(void) { return 13; }

#ifdef TGN_BUILD_CPU
/* The host variant (setup.py builds it with -march=native): the features of the CPU
 * that built it, read from the file by native.py (cpu_features.parse_marker) before
 * it is loaded, so it is loaded only on a CPU that has all of them. */
const char tgn_build_cpu[] = "tgn-build-cpu:" TGN_BUILD_CPU;
#endif

/* --- the backward (kernels.py, "the backward"), fp32 rows ------------------------
 *
 * Per row, with r = rms[i] (the forward's):
 *   g  = dy * w                 (dy without a weight)
 *   s  = sum(g * x)             float: pairwise halving per chunk, then the plan's ADD
 *                               triples in order (the forward's DAG over the products);
 *                               exact: the two folds of kernels.sum_exact over the fp64
 *                               products (exact, so any order), S1 + S2 rounded to fp32
 *   k  = ((s / D) / r / r) / r
 *   dx = g / r - x * k
 * and, with blocks, t = dy * (x / r) summed over each block of ROW_BLOCK rows by
 * pairwise halving over the rows (kernels.weight_grad_float), one row per block in
 * blocks; the caller merges the blocks.  Every operation is the torch ops' IEEE fp32
 * (or fp64) operation in the same order (the quotients g / r and x / r formed as
 * FINALIZE's are, native_quotient.h: IEEE division's bits).  A row whose s or k is not finite is
 * counted and the caller recomputes everything with torch ops (NaN payloads).
 */
#define ROW_BLOCK 32

static float halve_in_place(float *restrict v, int64_t length)
{
    while (length > 1) {
        int64_t half = (length + 1) / 2;
        float *restrict lo = v;
        const float *restrict hi = v + half;
        for (int64_t k = 0; k < length - half; ++k)
            lo[k] += hi[k];
        length = half;
    }
    return v[0];
}

static float row_dot_float(float *p, int64_t hidden, int64_t chunk, const int64_t *adds, int64_t n_adds,
                           int64_t root, float *slots)
{
    int64_t n_chunks = (hidden + chunk - 1) / chunk;
    for (int64_t c = 0; c < n_chunks; ++c) {
        int64_t length = hidden - c * chunk < chunk ? hidden - c * chunk : chunk;
        slots[c] = halve_in_place(p + c * chunk, length);
    }
    for (int64_t t = 0; t < n_adds; ++t)
        slots[adds[3 * t]] = slots[adds[3 * t + 1]] + slots[adds[3 * t + 2]];
    return slots[root];
}

/* Returns NAN when the row has no finite scale. */
static float row_dot_exact(const float *g, const float *x, int64_t hidden)
{
    double m = 0.0;
    for (int64_t j = 0; j < hidden; ++j) {
        double a = fabs((double)g[j] * (double)x[j]);
        m = a > m ? a : m;
    }
    double s1, s2;
    if (!tgn_exact_scale(m, hidden, &s1, &s2))
        return NAN;
    double t1 = 0.0, t2 = 0.0;
    for (int64_t j = 0; j < hidden; ++j) {
        double v = (double)g[j] * (double)x[j];
        double q1 = (v + s1) - s1;
        double r = v - q1;
        t1 += q1;
        t2 += (r + s2) - s2;
    }
    return (float)(t1 + t2);
}

int64_t tgn_backward_rows_f32(const float *x, const float *dy, const float *w, const float *rms,
                              int64_t rows, int64_t hidden, int64_t chunk, const int64_t *adds,
                              int64_t n_adds, int64_t root, int64_t exact, float *dx, float *blocks)
{
    int64_t n_chunks = (hidden + chunk - 1) / chunk, bad = 0;
    int64_t need = 2 * hidden + n_chunks + n_adds + (blocks ? ROW_BLOCK * hidden : 0);
    float *work = (float *)malloc((size_t)need * sizeof(float));
    if (!work)
        return -1;
    float *g = work, *p = work + hidden, *slots = p + hidden, *tb = slots + n_chunks + n_adds;
    const float fd = (float)(double)hidden;
    for (int64_t b0 = 0; b0 < rows; b0 += ROW_BLOCK) {
        int64_t in_block = rows - b0 < ROW_BLOCK ? rows - b0 : ROW_BLOCK;
        for (int64_t i = b0; i < b0 + in_block; ++i) {
            const float *xr = x + i * hidden, *dyr = dy + i * hidden;
            const float r = rms[i];
            if (dx) {
                if (w)
                    for (int64_t j = 0; j < hidden; ++j)
                        g[j] = dyr[j] * w[j];
                else
                    memcpy(g, dyr, (size_t)hidden * sizeof(float));
                float s;
                if (exact) {
                    s = row_dot_exact(g, xr, hidden);
                } else {
                    for (int64_t j = 0; j < hidden; ++j)
                        p[j] = g[j] * xr[j];
                    s = row_dot_float(p, hidden, chunk, adds, n_adds, root, slots);
                }
                float k = ((s / fd) / r / r) / r;
                if (!isfinite(s) || !isfinite(k))
                    ++bad;
                float *dxr = dx + i * hidden;
                tgn_quotient_row_f32(g, dxr, NULL, 0.0f, hidden, r); /* g / r, IEEE's bits */
                for (int64_t j = 0; j < hidden; ++j)
                    dxr[j] = dxr[j] - xr[j] * k;
            }
            if (blocks) {
                float *t = tb + (i - b0) * hidden;
                tgn_quotient_row_f32(xr, t, NULL, 0.0f, hidden, r); /* x / r, IEEE's bits */
                for (int64_t j = 0; j < hidden; ++j)
                    t[j] = dyr[j] * t[j];
            }
        }
        if (blocks) {
            for (int64_t length = in_block; length > 1;) {
                int64_t half = (length + 1) / 2;
                for (int64_t q = 0; q < length - half; ++q) {
                    float *restrict lo = tb + q * hidden;
                    const float *restrict hi = tb + (q + half) * hidden;
                    for (int64_t j = 0; j < hidden; ++j)
                        lo[j] += hi[j];
                }
                length = half;
            }
            memcpy(blocks + (b0 / ROW_BLOCK) * hidden, tb, (size_t)hidden * sizeof(float));
        }
    }
    free(work);
    return bad;
}

/* kernels.finalize_rms for fp32 rows: rms = sqrt(total / D + eps), the value FINALIZE
 * divides by (finalize_row_float's two lines); an exact pair (channels 2, fp64) is
 * combined and rounded to fp32 first, as kernels.combine_exact then .to(fp32). */
void tgn_rms_of_totals_f32(const void *total, int64_t rows, int64_t channels, int64_t hidden, double eps,
                           float *rms)
{
    for (int64_t i = 0; i < rows; ++i) {
        float t = channels == 2 ? (float)(((const double *)total)[2 * i] + ((const double *)total)[2 * i + 1])
                                : ((const float *)total)[i];
        float mean = t / (float)(double)hidden + (float)eps;
        rms[i] = (float)sqrt((double)mean);
    }
}
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
 * Every column's operations are the same IEEE operations in the same order in any
 * vectorisation (the loops run across columns; the max is order-free), so the
 * portable and host builds give the same state.  The flags keep (p + sigma) - sigma
 * as written (no -ffast-math).  Returns the number of columns whose top digit
 * passes 2^40 (the caller raises).
 */
#define DW_DIGITS 19
#define DW_BASE (-320)
#define DW_BLOCK 64
#define DW_L 7 /* ceil(log2(DW_BLOCK)) + 1 */
#define DW_SMIN (-246) /* 2^(DW_SMIN - 52) = 2^-298: the coarsest grid of that fold */
#define DW_TILE 32
/* Tiles whose products one pass along the rows forms: 4 KiB of each input row at a
 * time (sequential reads) into a 512 KiB buffer that stays in L2. */
#define DW_PANEL 32
#define DW_TOP_LIMIT ((int64_t)1 << 40)
#define DW_MAX_FOLDS 32 /* (263 + 298) / 46 + 1 = 13 folds cover every product */

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__AVX512F__)
/* A host build on an AVX-512 CPU: gcc's -march=native keeps 256-bit vectors by
 * default; the dW loops run faster at 512 (the bits do not depend on it, above). */
#pragma GCC push_options
#pragma GCC target("prefer-vector-width=512")
#define DW_WIDE 1
#endif

/* 2^e for e in fp64's normal range, from its bits (exact; no libm call in the loop). */
static inline double dw_pow2(int e)
{
    uint64_t bits = (uint64_t)(e + 1023) << 52;
    double d;
    memcpy(&d, &bits, sizeof d);
    return d;
}

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

/* digits += S * 2^(s - 53), S an integer number of units 2^(s-53), |S| < 2^53. */
static void dw_add_units(int64_t *digits, int64_t stride, double sum, int s)
{
    int64_t m = (int64_t)(sum * dw_pow2(53 - s)); /* exact: a power of two */
    int shift = s - 53 - DW_BASE; /* >= 21 */
    int k = shift >> 5, o = shift & 31;
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
                        int64_t *state, int64_t stride, double *restrict mx)
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
    int live = 0;
    for (int j = 0; j < cols; ++j) {
        if (a1[j] != 0.0)
            dw_add_units(state + j, stride, a1[j], s1[j]);
        if (a2[j] != 0.0)
            dw_add_units(state + j, stride, a2[j], dw_second(s1[j]));
        mx[j] = m2[j];
        live += m2[j] > 0.0;
    }
    return live;
}

/* After dw_two_folds left something: its remainders into buf (the same operations),
 * then the general folds until none is left.  Returns 0 if DW_MAX_FOLDS did not do. */
static int dw_more_folds(double *restrict buf, int64_t rows, int64_t cols, const int *s1, int64_t *state,
                         int64_t stride, double *restrict mx)
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
                dw_add_units(state + j, stride, acc[j], s[j]);
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
                   double *restrict mx)
{
    int s1[DW_TILE], inf = 0;
    for (int j = 0; j < DW_TILE; ++j)
        inf |= mx[j] == INFINITY;
    if (inf)
        dw_specials(buf, rows, cols, state, stride, mx);
    dw_scales(mx, cols, s1);
    int live = dw_two_folds(buf, rows, cols, s1, state, stride, mx);
    if (live < 0) { /* a NaN product: nothing was added; count, zero, and fold again */
        dw_specials(buf, rows, cols, state, stride, mx);
        dw_scales(mx, cols, s1);
        live = dw_two_folds(buf, rows, cols, s1, state, stride, mx);
    }
    return live == 0 ? 1 : dw_more_folds(buf, rows, cols, s1, state, stride, mx);
}

/* Balanced digits, as kernels/exact_sum.normalize_; returns the count of columns
 * whose top digit passes DW_TOP_LIMIT. */
static int64_t dw_normalize(int64_t *state, int64_t cols, int64_t stride)
{
    for (int k = 0; k < DW_DIGITS - 1; ++k) {
        int64_t *restrict d = state + k * stride, *restrict up = d + stride;
        for (int64_t j = 0; j < cols; ++j) {
            int64_t carry = (d[j] + ((int64_t)1 << 31)) >> 32;
            d[j] -= carry * ((int64_t)1 << 32);
            up[j] += carry;
        }
    }
    int64_t over = 0;
    const int64_t *top = state + (DW_DIGITS - 1) * stride;
    for (int64_t j = 0; j < cols; ++j)
        over += top[j] > DW_TOP_LIMIT || top[j] < -DW_TOP_LIMIT;
    return over;
}

static int64_t dw_run(const float *dy, int64_t dy_stride, const float *b, int64_t b_stride, const float *rms,
                      int64_t rows, int64_t cols, int64_t *state, int64_t stride)
{
    enum { PANEL = DW_PANEL * DW_TILE };
    double *buf = (double *)malloc(sizeof(double) * (DW_BLOCK + 1) * PANEL);
    if (!buf)
        return -1;
    double *mx = buf + DW_BLOCK * PANEL;
    int64_t done = 0;
    for (int64_t i0 = 0; i0 < rows && !done; i0 += DW_BLOCK) {
        int64_t nr = rows - i0 < DW_BLOCK ? rows - i0 : DW_BLOCK;
        for (int64_t j0 = 0; j0 < cols && !done; j0 += PANEL) {
            int64_t nc = cols - j0 < PANEL ? cols - j0 : PANEL;
            dw_products(dy + i0 * dy_stride + j0, dy_stride, b + i0 * b_stride + j0, b_stride,
                        rms ? rms + i0 : NULL, nr, nc, buf, mx);
            for (int64_t t = 0; t * DW_TILE < nc; ++t) {
                int64_t w = nc - t * DW_TILE < DW_TILE ? nc - t * DW_TILE : DW_TILE;
                if (!dw_tile(buf + t * DW_BLOCK * DW_TILE, nr, w, state + j0 + t * DW_TILE, stride,
                             mx + t * DW_TILE)) {
                    done = -2;
                    break;
                }
            }
        }
    }
    free(buf);
    return done ? done : dw_normalize(state, cols, stride);
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

/* --- the exact sum rounded: kernels/exact_sum.round_state, column by column ---------
 *
 * The same operations as the torch form, on one column at a time: the digits'
 * sign and standard magnitude digits; the top three nonzero-led digits (at least 65
 * bits) added in fp64 with TwoSum, the digits below as a sticky bit, rounded to 53
 * bits to odd; then fp32: round to nearest even (fp32 results), or round to odd again
 * (for bf16 and fp16: the caller converts, ties to even).  NaN and +-inf from the
 * counters.  The state must be normalised.
 */
static double two_sum_error(double a, double b, double s)
{
    double bb = s - a;
    return (a - (s - bb)) + (b - bb);
}

static float round_column(const int64_t *state, int64_t stride, int to_odd)
{
    int64_t nan = state[DW_DIGITS * stride], pos = state[(DW_DIGITS + 1) * stride];
    int64_t neg = state[(DW_DIGITS + 2) * stride];
    if (nan > 0 || (pos > 0 && neg > 0))
        return NAN;
    if (neg > 0)
        return -INFINITY;
    if (pos > 0)
        return INFINITY;
    int64_t mag[DW_DIGITS];
    int top = -1;
    for (int k = 0; k < DW_DIGITS; ++k) {
        mag[k] = state[k * stride];
        top = mag[k] != 0 ? k : top;
    }
    if (top < 0)
        return 0.0f;
    int negative = mag[top] < 0;
    for (int k = 0; k < DW_DIGITS; ++k)
        mag[k] = negative ? -mag[k] : mag[k];
    for (int k = 0; k < DW_DIGITS - 1; ++k) {
        int64_t carry = mag[k] >> 32;
        mag[k] -= carry * ((int64_t)1 << 32);
        mag[k + 1] += carry;
    }
    top = -1;
    for (int k = 0; k < DW_DIGITS; ++k)
        top = mag[k] != 0 ? k : top;
    if (top < 0)
        return 0.0f; /* cannot happen: a nonzero digit leaves a nonzero magnitude */
    top = top < 2 ? 2 : top;
    double a = (double)mag[top] * 0x1p64, b = (double)mag[top - 1] * 0x1p32, c = (double)mag[top - 2];
    int sticky = 0;
    for (int k = 0; k <= top - 3; ++k)
        sticky |= mag[k] != 0;
    double s1 = a + b;
    double t = two_sum_error(a, b, s1) + c;
    double sum = s1 + t;
    double error = two_sum_error(s1, t, sum);
    int up = error > 0 || (error == 0 && sticky), inexact = error != 0 || sticky;
    uint64_t bits;
    memcpy(&bits, &sum, sizeof bits);
    if (inexact && !(bits & 1))
        sum = nextafter(sum, up ? INFINITY : 0.0);
    double v = sum * dw_pow2(32 * (top - 2) + DW_BASE); /* exact: a power of two */
    v = negative ? -v : v;
    float f = (float)v;
    if (!to_odd || (double)f == v)
        return f;
    float toward_zero = fabs((double)f) > fabs(v) ? nextafterf(f, 0.0f) : f;
    uint32_t fb;
    memcpy(&fb, &toward_zero, sizeof fb);
    fb |= 1;
    memcpy(&toward_zero, &fb, sizeof fb);
    return toward_zero;
}

/* out[j] = column j of a normalised (22, n) state (row stride `stride`) rounded to
 * fp32 (to_odd = 0), or to odd at fp32 for a later bf16/fp16 conversion (1). */
void tgn_exact_round_f32(const int64_t *state, int64_t n, int64_t stride, int64_t to_odd, float *out)
{
    for (int64_t j = 0; j < n; ++j)
        out[j] = round_column(state + j, stride, (int)to_odd);
}
