/* The exact weight gradient's state rounded to fp32 (ops/exact_grad.py through
 * backends/native/grads.py): kernels/exact_sum.round_state's operations, column by
 * column, or eight columns at a time with AVX-512.  tests/test_exact_grad.py and
 * tests/test_exact_fast_paths.py compare it with the torch form.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "native_dw.h"
#include "tgn_native.h"

#ifdef __FAST_MATH__
#error "the native kernels must not be compiled with -ffast-math"
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

/* rows: the digit rows [rows[0], rows[1]] that may be nonzero (the others are zero
 * and not read), rows[2] whether the NaN and infinity counts may be. */
static float round_column(const int64_t *state, int64_t stride, int to_odd, const int *rows)
{
    int64_t nan = 0, pos = 0, neg = 0;
    if (rows[2]) {
        nan = state[DW_DIGITS * stride];
        pos = state[(DW_DIGITS + 1) * stride];
        neg = state[(DW_DIGITS + 2) * stride];
    }
    if (nan > 0 || (pos > 0 && neg > 0))
        return NAN;
    if (neg > 0)
        return -INFINITY;
    if (pos > 0)
        return INFINITY;
    int64_t mag[DW_DIGITS];
    int top = -1;
    for (int k = 0; k < DW_DIGITS; ++k) {
        mag[k] = k >= rows[0] && k <= rows[1] ? state[k * stride] : 0;
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

#if defined(__AVX512F__) && defined(__AVX512DQ__)
/* round_column for eight columns at once (the host build on AVX-512): lane by lane
 * the same integer and IEEE operations, so the same bits.  Branches become per-lane
 * selects; digits that are zero in all eight columns are skipped (ordinary data uses
 * a few of the 19); nextafter of the positive finite fp64 sum, and of the fp32
 * result, is one step of their bits.  Returns 0 (writing nothing) when a lane has a
 * NaN or infinite product: round_column takes those eight columns. */
#include <immintrin.h>
typedef int64_t v8l __attribute__((vector_size(64)));
typedef double v8d __attribute__((vector_size(64)));
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

#define SEL(m, a, b) (((a) & (m)) | ((b) & ~(m))) /* m ? a : b per lane, m all ones or zero */

INLINE v8l load8l(const int64_t *p) { return (v8l)_mm512_loadu_si512((const void *)p); }
INLINE int any8(v8l v) { return _mm512_test_epi64_mask((__m512i)v, (__m512i)v) != 0; }

INLINE v8d two_sum_error8(v8d a, v8d b, v8d s)
{
    v8d bb = s - a;
    return (a - (s - bb)) + (b - bb);
}

static int round_eight(const int64_t *state, int64_t stride, int to_odd, float *out, const int *rows)
{
    if (rows[2] && any8(load8l(state + DW_DIGITS * stride) | load8l(state + (DW_DIGITS + 1) * stride)
                        | load8l(state + (DW_DIGITS + 2) * stride)))
        return 0;
    const v8l zero = {0};
    v8l mag[DW_DIGITS]; /* (only digits lo..hi are read below: the others are zero) */
    int lo = DW_DIGITS, hi = -1;
    for (int k = rows[0] > 0 ? rows[0] : 0; k <= rows[1] && k < DW_DIGITS; ++k) {
        mag[k] = load8l(state + k * stride);
        if (any8(mag[k])) {
            lo = lo < k ? lo : k;
            hi = k;
        }
    }
    if (hi < 0) {
        memset(out, 0, 8 * sizeof *out);
        return 1;
    }
    v8l top = zero - 1, negative = zero;
    for (int k = lo; k <= hi; ++k) {
        v8l nz = mag[k] != 0;
        top = SEL(nz, zero + k, top);
        negative = SEL(nz, (v8l)(mag[k] < 0), negative);
    }
    v8l empty = top < 0;
    for (int k = lo; k <= hi; ++k)
        mag[k] = (mag[k] ^ negative) - negative; /* negative ? -mag : mag */
    for (int k = lo; k < hi; ++k) { /* the magnitude's top digit is at most hi */
        v8l carry = mag[k] >> 32;
        mag[k] -= carry * ((int64_t)1 << 32);
        mag[k + 1] += carry;
    }
    top = zero - 1;
    for (int k = lo; k <= hi; ++k)
        top = SEL((v8l)(mag[k] != 0), zero + k, top);
    top = SEL((v8l)(top < 2), zero + 2, top);
    v8l a = zero, b = zero, c = zero, sticky = zero;
    for (int k = lo; k <= hi; ++k) {
        a = SEL((v8l)(top == k), mag[k], a);
        b = SEL((v8l)(top == k + 1), mag[k], b);
        c = SEL((v8l)(top == k + 2), mag[k], c);
        sticky |= (v8l)(k <= top - 3) & (v8l)(mag[k] != 0);
    }
    v8d da = __builtin_convertvector(a, v8d) * 0x1p64, db = __builtin_convertvector(b, v8d) * 0x1p32;
    v8d dc = __builtin_convertvector(c, v8d);
    v8d s1 = da + db;
    v8d t = two_sum_error8(da, db, s1) + dc;
    v8d sum = s1 + t;
    v8d error = two_sum_error8(s1, t, sum);
    v8l up = (v8l)(error > 0) | ((v8l)(error == 0) & sticky);
    v8l inexact = (v8l)(error != 0) | sticky;
    v8l bits = (v8l)sum;
    v8l step = inexact & (v8l)((bits & 1) == 0); /* round to odd: one step up or down */
    bits += step & SEL(up, zero + 1, zero - 1);
    v8l scale = (32 * (top - 2) + DW_BASE + 1023) << 52; /* 2^(32 (top - 2) + BASE), exact */
    v8d v = (v8d)bits * (v8d)scale;
    v = (v8d)((v8l)v ^ (negative & (zero + INT64_MIN)));
    v8f f = __builtin_convertvector(v, v8f);
    v8i fb = (v8i)f;
    if (to_odd) {
        v8d back = __builtin_convertvector(f, v8d);
        v8i inexact32 = __builtin_convertvector((v8l)(back != v), v8i);
        v8d absback = (v8d)((v8l)back & INT64_MAX), absv = (v8d)((v8l)v & INT64_MAX);
        v8i toward = __builtin_convertvector((v8l)(absback > absv), v8i); /* -1: one step toward 0 */
        fb = SEL(inexact32, (fb + toward) | 1, fb);
    }
    fb &= ~__builtin_convertvector(empty, v8i); /* +0 */
    memcpy(out, &fb, sizeof fb);
    return 1;
}
#else
static int round_eight(const int64_t *state, int64_t stride, int to_odd, float *out, const int *rows)
{
    (void)state, (void)stride, (void)to_odd, (void)out, (void)rows;
    return 0; /* round_column, column by column */
}
#endif

/* out[j] = column j of a normalised (22, n) state (row stride `stride`) rounded to
 * fp32 (to_odd = 0), or to odd at fp32 for a later bf16/fp16 conversion (1). */
void tgn_exact_round_f32(const int64_t *state, int64_t n, int64_t stride, int64_t to_odd, float *out)
{
    tgn_exact_round_rows_f32(state, n, stride, to_odd, out, 0, DW_DIGITS - 1, 1);
}

void tgn_exact_round_rows_f32(const int64_t *state, int64_t n, int64_t stride, int64_t to_odd, float *out, int lo,
                              int hi, int specials)
{
    const int rows[3] = {lo, hi, specials};
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
        if (!round_eight(state + j, stride, (int)to_odd, out + j, rows))
            for (int l = 0; l < 8; ++l)
                out[j + l] = round_column(state + j + l, stride, (int)to_odd, rows);
    for (; j < n; ++j)
        out[j] = round_column(state + j, stride, (int)to_odd, rows);
}
