/* bf16 and fp16 values widened to fp32 in registers, 32 at a time (AVX-512): the
 * values tgn_bf16_to_f32 / tgn_f16_to_f32 give, for native_narrow.c's rows that skip
 * the fp32 scratch and for native_sums.c's chunk sums of such rows. */
#ifndef TGN_NATIVE_WIDEN_H
#define TGN_NATIVE_WIDEN_H

#include <stdint.h>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define TGN_WIDEN32 1

/* lo, hi: fp32 of p[0, 16) and p[16, 32); bf16: the bits of each value moved to the high
 * half of its lane by one vpermw (the low half zeroed), and *least kept as the least
 * |b| - 1 (unsigned) over the values, which tells tiny ones (native_narrow.c's widen);
 * fp16: vcvtph2ps (exact). */
static inline __attribute__((always_inline)) void tgn_widen32(const uint16_t *p, const int bf16, __m512 *lo,
                                                              __m512 *hi, __m512i *least)
{
    if (bf16) {
        const __m512i at = _mm512_set_epi16(15, 0, 14, 0, 13, 0, 12, 0, 11, 0, 10, 0, 9, 0, 8, 0, 7, 0, 6, 0, 5, 0, 4,
                                            0, 3, 0, 2, 0, 1, 0, 0, 0);
        const __m512i at_hi = _mm512_add_epi16(at, _mm512_set1_epi32(16 << 16));
        __m512i b = _mm512_loadu_si512((const void *)p);
        __m512i mag = _mm512_and_si512(b, _mm512_set1_epi16(0x7fff));
        *least = _mm512_min_epu16(*least, _mm512_sub_epi16(mag, _mm512_set1_epi16(1)));
        *lo = _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(0xAAAAAAAAu, at, b));
        *hi = _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(0xAAAAAAAAu, at_hi, b));
    } else {
        *lo = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
        *hi = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + 16)));
    }
}
#endif

#endif /* TGN_NATIVE_WIDEN_H */
