/* Scalar bf16 and fp16 conversions with c10's bit formulas (BFloat16.h, Half.h):
 * round to nearest even, subnormals and overflow to infinity included.  A NaN may
 * come out as anything: torch's own casts write a NaN by the element's position, so
 * the callers leave a row with a NaN result to the reference (kernels.widen). */
#ifndef TGN_NATIVE_HALF_H
#define TGN_NATIVE_HALF_H

#include <stdint.h>
#include <string.h>

#include "tgn_constants.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

static inline float tgn_f32_of(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint32_t tgn_bits_of(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float tgn_bf16_to_f32(uint16_t b) { return tgn_f32_of((uint32_t)b << 16); }

static inline uint16_t tgn_f32_to_bf16(float f)
{
    uint32_t u = tgn_bits_of(f);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static inline float tgn_f16_to_f32(uint16_t h)
{
    const uint32_t w = (uint32_t)h << 16, sign = w & 0x80000000u, two_w = w + w;
    const float normal = tgn_f32_of((two_w >> 4) + (UINT32_C(0xE0) << 23)) * 0x1.0p-112f;
    const float subnormal = tgn_f32_of((two_w >> 17) | (UINT32_C(126) << 23)) - 0.5f;
    return tgn_f32_of(sign | (two_w < (UINT32_C(1) << 27) ? tgn_bits_of(subnormal) : tgn_bits_of(normal)));
}

static inline uint16_t tgn_f32_to_f16(float f)
{
    float base = (__builtin_fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = tgn_bits_of(f), shl1_w = w + w, sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u)
        bias = 0x71000000u;
    base = tgn_f32_of((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = tgn_bits_of(base);
    const uint32_t nonsign = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

#if defined(__AVX512F__)
/* Sixteen fp32 lanes rounded to bf16: tgn_f32_to_bf16's formula on each lane. */
static inline __m256i tgn_bf16x16(__m512 v)
{
    const __m512i u = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd), 16);
    return _mm512_cvtepi32_epi16(r); /* (r < 2^16: the low halves) */
}

/* tgn_bf16x16(q) stored at y; returns the lanes of q that are NaN.  Where the build has
 * AVX512-BF16, vcvtneps2bf16: that formula on every lane but a subnormal (which it
 * flushes to zero) or a NaN one, which vfpclassps finds (class bits 0x01 QNaN, 0x20
 * subnormal, 0x80 SNaN): only such a vector takes the integer steps and the NaN test. */
static inline __attribute__((always_inline)) __mmask16 tgn_store_bf16x16(uint16_t *y, __m512 q)
{
#if defined(__AVX512BF16__)
    if (__builtin_expect(_mm512_fpclass_ps_mask(q, 0xA1) == 0, 1)) {
        _mm256_storeu_si256((__m256i *)y, (__m256i)_mm512_cvtneps_pbh(q));
        return 0;
    }
#endif
    _mm256_storeu_si256((__m256i *)y, tgn_bf16x16(q));
    return _mm512_cmp_ps_mask(q, q, _CMP_UNORD_Q);
}
#endif

/* dst[0, n) = src[start, start + n) widened to fp32, src of the TGN_DTYPE_* code `code`
 * (fp32, bf16 or fp16): exact. */
static inline void tgn_widen_span(const void *src, int64_t code, int64_t start, int64_t n, float *dst)
{
    if (code == TGN_DTYPE_BF16) {
        const uint16_t *b = (const uint16_t *)src + start;
        for (int64_t i = 0; i < n; i++)
            dst[i] = tgn_bf16_to_f32(b[i]);
    } else if (code == TGN_DTYPE_F16) {
        const uint16_t *h = (const uint16_t *)src + start;
        for (int64_t i = 0; i < n; i++)
            dst[i] = tgn_f16_to_f32(h[i]);
    } else {
        memcpy(dst, (const float *)src + start, (size_t)n * sizeof *dst);
    }
}

/* dst[0, n) = the bf16 values b[0, n) widened to fp32 (tgn_widen_span's), and the row's
 * span: the smallest nonzero magnitude's bits less one in the low 16 bits (0xffff: none),
 * the largest magnitude's bits less one (as int16; -1: only zeros) in the high 16
 * (tgn_mean_span_f32 reads the exponents from them). */
static inline uint32_t tgn_widen_bf16_span(const uint16_t *b, int64_t n, float *dst)
{
    uint16_t low = 0xffff; /* min of (|bits| - 1) unsigned: +-0 wraps to the top */
    int16_t top = -1;      /* max of (|bits| - 1) signed: +-0 counts as -1 */
    int64_t j = 0;
#if defined(__AVX512BW__)
    const __m512i mag = _mm512_set1_epi16(0x7fff), one = _mm512_set1_epi16(1);
    __m512i lo = _mm512_set1_epi16(-1), hi = lo;
    for (; j + 32 <= n; j += 32) {
        const __m512i r = _mm512_loadu_si512((const void *)(b + j));
        const __m512i t = _mm512_sub_epi16(_mm512_and_si512(r, mag), one);
        lo = _mm512_min_epu16(lo, t);
        hi = _mm512_max_epi16(hi, t);
        _mm512_storeu_si512((void *)(dst + j), _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(r)), 16));
        _mm512_storeu_si512((void *)(dst + j + 16),
                            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(r, 1)), 16));
    }
    uint16_t los[32], his[32];
    _mm512_storeu_si512((void *)los, lo);
    _mm512_storeu_si512((void *)his, hi);
    for (int k = 0; k < 32; ++k) {
        low = los[k] < low ? los[k] : low;
        top = (int16_t)his[k] > top ? (int16_t)his[k] : top;
    }
#endif
    for (; j < n; ++j) {
        const uint16_t t = (uint16_t)((b[j] & 0x7fffu) - 1u);
        low = t < low ? t : low;
        top = (int16_t)t > top ? (int16_t)t : top;
        dst[j] = tgn_bf16_to_f32(b[j]);
    }
    return (uint32_t)low | (uint32_t)(uint16_t)top << 16;
}

#endif /* TGN_NATIVE_HALF_H */
