/* native_narrow.c's conversions and its FINALIZE into a narrow y: the bf16/fp16
 * loads and roundings (vectorised with AVX-512 / F16C where the build has them, in
 * plain C otherwise: the same roundings), and each row's quotient written straight
 * in the narrow dtype.  Included by native_narrow.c only. */
#ifndef TGN_NATIVE_NARROW_H
#define TGN_NATIVE_NARROW_H

#include <stdint.h>

#include "native_half.h"
#include "native_quotient.h"
#include "tgn_native.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#define LANES 16
#endif

#if defined(LANES)
static inline __m512 load_bf16(const uint16_t *p)
{
    __m256i b = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}

static inline __m512 load_narrow(const uint16_t *p, int64_t code)
{
    return code == TGN_DTYPE_BF16 ? load_bf16(p) : _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}

static inline __m256i round_bf16(__m512 v)
{
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb);
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

static inline __m256i round_narrow(__m512 v, int64_t code)
{
    if (code != TGN_DTYPE_BF16)
        return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#if defined(__AVX512BF16__)
    /* vcvtneps2bf16 rounds to nearest even too, but flushes fp32 subnormals to zero */
    if (!_mm512_fpclass_ps_mask(v, 0x20)) /* no subnormal lane */
        return (__m256i)_mm512_cvtneps_pbh(v);
#endif
    return round_bf16(v);
}
#endif

static inline float widen1(const uint16_t *p, int64_t code)
{
    return code == TGN_DTYPE_BF16 ? tgn_bf16_to_f32(*p) : tgn_f16_to_f32(*p);
}

static inline uint16_t narrow1(float f, int64_t code)
{
    return code == TGN_DTYPE_BF16 ? tgn_f32_to_bf16(f) : tgn_f32_to_f16(f);
}

#if defined(LANES)
/* Lanes of v outside tgn_q_vec_ranged's range though finite: nonzero, |v| < 2^-50 (a
 * bf16 row's tiny values; an fp16 value never is one). */
static inline __mmask16 tiny_lanes(__m512 v)
{
    __m512i mag = _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7fffffff));
    return _mm512_cmplt_epu32_mask(_mm512_sub_epi32(mag, _mm512_set1_epi32(1)),
                                   _mm512_set1_epi32((int)TGN_Q_LO - 1));
}
#endif

static inline int tiny1(float f) { return (tgn_bits_of(f) & 0x7fffffffu) - 1u < TGN_Q_LO - 1u; }

/* y = s rounded to the narrow dtype, n values; returns whether s holds a NaN */
static inline int narrow(const float *s, int64_t code, uint16_t *y, int64_t n)
{
    int64_t j = 0;
    int nan = 0;
#if defined(LANES)
    __mmask16 unordered = 0;
    for (; j + LANES <= n; j += LANES) {
        __m512 v = _mm512_loadu_ps(s + j);
        unordered |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        _mm256_storeu_si256((__m256i *)(y + j), round_narrow(v, code));
    }
    nan = unordered != 0;
#endif
    for (; j < n; ++j) {
        nan |= s[j] != s[j];
        y[j] = narrow1(s[j], code);
    }
    return nan;
}

/* FINALIZE of one row of scratch s straight into the narrow y: the operations of
 * tgn_quotient_row_f32 (native_quotient.h), each vector rounded as it is made instead of
 * stored in fp32 and read again; returns whether a NaN was met.  The weight comes with
 * its offset already added (tgn_rows_call makes it so for every narrow call).  ranged:
 * no value of the row is tiny, so with rms in range every one is in tgn_q_vec_ranged's
 * (|a| <= 2^60 as rms^2 >= a^2 / D, and rms is finite), and the vectors skip the range
 * check.  clean (with ranged): besides, every lane of the weight is finite and +-0 or
 * at least 2^-30 in magnitude (tgn_narrow_weight_clean), so no product is a NaN or
 * subnormal (2^-90 <= |q| <= 2^60, or q = +-0): the vectors skip the NaN check, and a
 * bf16 y rounds with vcvtne2ps2bf16 (two vectors at once) without looking for
 * subnormals.  Two vectors per step, the next step's x (or, with none, the scratch)
 * prefetched once per 32 values: no branch on the offset, the dtype or the step's place
 * in a line is left in the loop. */
#if defined(LANES) && TGN_QUOTIENT_LANES == LANES
static inline __attribute__((always_inline)) __m512 quotient_v(__m512 a, const float *w, const tgn_q_div_t *dv,
                                                                const int ranged, const int clean,
                                                                __mmask16 *unordered)
{
    __m512 q = ranged ? tgn_q_vec_ranged(dv, a) : tgn_q_vec(dv, a);
    if (w)
        q = _mm512_mul_ps(q, _mm512_loadu_ps(w));
    if (!clean)
        *unordered |= _mm512_cmp_ps_mask(q, q, _CMP_UNORD_Q);
    return q;
}

static inline __attribute__((always_inline)) __m512 quotient_q(const float *s, const float *w, const tgn_q_div_t *dv,
                                                                const int ranged, const int clean,
                                                                __mmask16 *unordered)
{
    return quotient_v(_mm512_loadu_ps(s), w, dv, ranged, clean, unordered);
}

static inline __attribute__((always_inline)) __m256i quotient_vector(const float *s, const float *w,
                                                                     const tgn_q_div_t *dv, const int64_t code,
                                                                     const int ranged, const int clean,
                                                                     __mmask16 *unordered)
{
    return round_narrow(quotient_q(s, w, dv, ranged, clean, unordered), code);
}

/* 16 narrow values of y: a non-temporal store, or an ordinary one */
static inline void put16(uint16_t *y, __m256i v, const int stream)
{
    if (stream)
        _mm256_stream_si256((__m256i *)y, v);
    else
        _mm256_storeu_si256((__m256i *)y, v);
}

/* A clean bf16 row's products without the exact quotient.  y is bf16, so it needs the
 * fp32 p = RN(RN(a / b) w) only to round it again, and a cheaper p' = RN(RN(a r) w),
 * r = RN(1 / b), rounds the same way unless a bf16 rounding boundary lies between them:
 *
 *   RN(a r) = (a / b)(1 + d1)(1 + d2) and RN(a / b) = (a / b)(1 + d3), |di| <= 2^-24;
 *   with w's product and its rounding (d4, d5), p' / p lies within 1 +- 5.0001 2^-24,
 *   and fp32 values are more than |v| 2^-24 apart near v, so at most 5 fp32 values lie
 *   between p' and p (6 across a power of two; counted on the bit patterns, which
 *   order the fp32 values of one sign, and p' and p have a's and w's sign).
 *
 * Every boundary of bf16's round to nearest even (the midpoint of two neighbouring bf16
 * values, where the rounding switches) is an fp32 value whose low 16 bits are 0x8000:
 * bf16 is fp32 with 16 fewer bits, over the same exponents.  So where p's low 16 bits lie
 * NARROW_GUARD or more from 0x8000 (NARROW_GUARD > 6), p rounds as p' does, and a pair
 * of vectors with a lane that does not (about 1 in 2048 lanes) is done again with the
 * exact quotient (quotient_v).  Neither is subnormal (a clean row's |p| >= 2^-120 or p
 * is +-0, the same +-0 both ways); a p' or p past fp32's largest value lies past bf16's
 * largest boundary too (both round to infinity).  So y has the exact quotient's bits:
 * tests/test_native_narrow.py::test_the_cheap_quotient_of_bf16_rows_keeps_the_bits finds
 * rows where p' alone rounds otherwise.  An fp16 y keeps the exact quotient: its
 * boundaries are 13 bits apart (1 lane in 256 would be done again, each pair a
 * mispredicted branch, which cost more than the quotient saves) and its subnormals
 * round at other bits. */
#define NARROW_GUARD 8

static inline __attribute__((always_inline)) __m512 cheap_product(__m512 a, const float *w, const tgn_q_div_t *dv)
{
    __m512 q = _mm512_mul_ps(a, dv->r);
    return w ? _mm512_mul_ps(q, _mm512_loadu_ps(w)) : q;
}

/* Lanes of p' whose low 16 bits lie in [0x8000 - G, 0x8000 + G) */
static inline __attribute__((always_inline)) __mmask16 near_boundary(__m512 p)
{
    const __m512i bits = _mm512_castps_si512(p);
    return _mm512_testn_epi32_mask(_mm512_sub_epi32(bits, _mm512_set1_epi32(0x8000 - NARROW_GUARD)),
                                   _mm512_set1_epi32(0xFFFF & -2 * NARROW_GUARD));
}

/* bf16 values of two vectors (q1 after q0), or of q0 alone */
static inline __attribute__((always_inline)) void put_bf16(uint16_t *y, __m512 q0, __m512 q1, const int two,
                                                           const int stream)
{
#if defined(__AVX512BF16__)
    /* no subnormal product: one vcvtne2ps2bf16 for both */
    __m512i v = (__m512i)_mm512_cvtne2ps_pbh(q1, q0);
    if (!two)
        put16(y, _mm512_castsi512_si256(v), stream);
    else if (stream)
        _mm512_stream_si512((void *)y, v);
    else
        _mm512_storeu_si512((void *)y, v);
#else
    put16(y, round_narrow(q0, TGN_DTYPE_BF16), stream);
    if (two)
        put16(y + LANES, round_narrow(q1, TGN_DTYPE_BF16), stream);
#endif
}

/* 32 values of a clean row's y from their fp32 values a0 and a1 (whose row's rms is in
 * the quotient's range and has no tiny value): bf16 from the cheap product (see above),
 * fp16 from the exact quotient.  The scratch path reads a0 and a1 from the scratch,
 * native_narrow.c's rows without it widen them from x. */
static inline __attribute__((always_inline)) void clean_pair(__m512 a0, __m512 a1, const float *w,
                                                             const tgn_q_div_t *dv, const int64_t code, uint16_t *y,
                                                             const int stream)
{
    __mmask16 unused = 0;
    if (code == TGN_DTYPE_BF16) {
        __m512 p0 = cheap_product(a0, w, dv), p1 = cheap_product(a1, w ? w + LANES : 0, dv);
        if (__builtin_expect((near_boundary(p0) | near_boundary(p1)) != 0, 0)) {
            p0 = quotient_v(a0, w, dv, 1, 1, &unused);
            p1 = quotient_v(a1, w ? w + LANES : 0, dv, 1, 1, &unused);
        }
        put_bf16(y, p0, p1, 1, stream);
    } else {
        put16(y, round_narrow(quotient_v(a0, w, dv, 1, 1, &unused), code), stream);
        put16(y + LANES, round_narrow(quotient_v(a1, w ? w + LANES : 0, dv, 1, 1, &unused), code), stream);
    }
}

static inline __attribute__((always_inline)) int quotient_vectors(const float *s, const float *w, int64_t n,
                                                                  const tgn_q_div_t *dv, const int64_t code,
                                                                  uint16_t *y, const int ranged, const int clean,
                                                                  const uint16_t *ahead, const int stream)
{
    __mmask16 unordered = 0;
    const char *fetch = ahead ? (const char *)ahead : (const char *)s; /* a prefetch never faults */
    int64_t j = 0;
    for (; j + 2 * LANES <= n; j += 2 * LANES) {
        __builtin_prefetch(fetch + 2 * j, 0, 3); /* one line: 32 narrow values */
        if (clean) {
            clean_pair(_mm512_loadu_ps(s + j), _mm512_loadu_ps(s + j + LANES), w ? w + j : 0, dv, code, y + j,
                       stream);
            continue;
        }
        put16(y + j, quotient_vector(s + j, w ? w + j : 0, dv, code, ranged, clean, &unordered), stream);
        put16(y + j + LANES, quotient_vector(s + j + LANES, w ? w + j + LANES : 0, dv, code, ranged, clean,
                                             &unordered), stream);
    }
    if (j + LANES <= n && clean && code == TGN_DTYPE_BF16) { /* one vector left */
        const __m512 a = _mm512_loadu_ps(s + j);
        __m512 p = cheap_product(a, w ? w + j : 0, dv);
        if (near_boundary(p))
            p = quotient_v(a, w ? w + j : 0, dv, 1, 1, &unordered);
        put_bf16(y + j, p, p, 0, stream);
    } else if (j + LANES <= n)
        put16(y + j, quotient_vector(s + j, w ? w + j : 0, dv, code, ranged, clean, &unordered), stream);
    return unordered != 0;
}

/* quotient_vectors with the dtype a constant in each copy */
static inline __attribute__((always_inline)) int quotient_dtype(const float *s, const float *w, int64_t n,
                                                                const tgn_q_div_t *dv, int64_t code, uint16_t *y,
                                                                const int ranged, const int clean,
                                                                const uint16_t *ahead, int stream)
{
    return code == TGN_DTYPE_BF16 ? quotient_vectors(s, w, n, dv, TGN_DTYPE_BF16, y, ranged, clean, ahead, stream)
                                  : quotient_vectors(s, w, n, dv, TGN_DTYPE_F16, y, ranged, clean, ahead, stream);
}
#endif

/* rcp: rms's reciprocal pair (tgn_q_setup's r and rl, made for a step's rows at once:
 * tgn_narrow_divisors), or NULL: made here. */
static inline int finalize_narrow(float *s, const float *w, int64_t n, float rms, const float *rcp, int64_t code,
                                  uint16_t *y, int ranged, int clean, const uint16_t *ahead, int64_t flags)
{
#if defined(LANES) && TGN_QUOTIENT_LANES == LANES
    if (tgn_quotient_rms_in_range(rms)) {
        const tgn_q_div_t dv = rcp ? tgn_q_from_pair(rms, rcp) : tgn_q_setup(rms);
        /* TGN_STREAM_STORES: non-temporal stores where y is 64-byte aligned (then every
         * vector, and every pair a clean bf16 row stores at once, is); the caller fences */
        const int stream = (flags & TGN_STREAM_STORES) && (uintptr_t)y % 64 == 0;
        int nan = !ranged || n >= ((int64_t)1 << 38) ? quotient_dtype(s, w, n, &dv, code, y, 0, 0, ahead, stream)
                  : clean ? quotient_dtype(s, w, n, &dv, code, y, 1, 1, ahead, stream)
                          : quotient_dtype(s, w, n, &dv, code, y, 1, 0, ahead, stream);
        int64_t j = n / LANES * LANES;
        if (j == n) /* (QK-norm's short rows: no tail, no call) */
            return nan;
        tgn_quotient_div_f32(s + j, s + j, w ? w + j : 0, 0.0f, n - j, rms); /* the scalar tail, as there */
        return narrow(s + j, code, y + j, n - j) | nan;
    }
#endif
    (void)rcp, (void)ranged, (void)clean, (void)ahead, (void)flags;
    tgn_quotient_row_f32(s, s, w, 0.0f, n, rms);
    return narrow(s, code, y, n);
}

#endif /* TGN_NATIVE_NARROW_H */
