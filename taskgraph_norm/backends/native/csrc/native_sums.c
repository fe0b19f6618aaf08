/* The float domain's chunk sums (kernels.sumsq_pairwise per chunk), for native.c's
 * FLOAT_ROWS (the forward) and native_backward.c's dot products: each full chunk of a
 * row halved pairwise, the halving order of kernels.pairwise_halving_ (while L > 1,
 * h = ceil(L/2), s[i] += s[i + h] for i < L - h), here for the power-of-two chunk
 * lengths the plans use; FLOAT_ROWS halves other lengths, and the last partial chunk,
 * itself.  These additions are not exact, so each is the scalar order's, operation for
 * operation, whatever the vector width: tests/test_native.py compares the host build
 * (AVX, AVX-512) with the portable one and the reference.
 */
#include <stdint.h>

#include "native_quotient.h"
#include "native_widen.h"
#include "tgn_native.h"

#ifdef __FAST_MATH__
#error "native_sums.c must not be compiled with -ffast-math"
#endif

#define INLINE static inline __attribute__((always_inline))

#if defined(__AVX__)
#include <immintrin.h>
#endif

/* One chunk of a power-of-two length C, with C a compile-time constant: the same
 * halving order (h = C/2, C/4, ..., 1; s[k] += s[k + h] for k < h), which the
 * compiler unrolls and vectorises; FLOAT_ROWS's general loop (native.c) serves other
 * lengths. */
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
#define FULL_CHUNKS_POW2(T, NAME)                                                      \
    int NAME(const T *row, int64_t chunk, int64_t n_full, T *slots)                   \
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
FULL_CHUNKS_POW2(double, tgn_full_chunks_f64)

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
 * docs/performance.md, "The sums, eight chunks at a time", gives its speed. */
#define VERT(NAME, C, FIRST, L, V, LOAD, ADD, TO8)                                    \
    INLINE __m256 NAME##_##C(const float *s)                                           \
    {                                                                                  \
        V p[(C) / (2 * (L))];                                                          \
        for (int i = 0; i < (C) / (2 * (L)); ++i)                                      \
            p[i] = FIRST(LOAD(s + (L) * i), LOAD(s + (C) / 2 + (L) * i));              \
        for (int h = (C) / (4 * (L)); h >= 1; h /= 2)                                  \
            for (int i = 0; i < h; ++i)                                                \
                p[i] = ADD(p[i], p[i + h]);                                            \
        return TO8(p[0]);                                                              \
    }
/* the first halving step: squares of a pair (the forward), or a pair (the backward's p) */
INLINE __m256 squares8(__m256 a, __m256 b) { return _mm256_add_ps(_mm256_mul_ps(a, a), _mm256_mul_ps(b, b)); }
#define pairs8 _mm256_add_ps
#define SAME(v) (v)
#define VERT8(NAME, C, FIRST) VERT(NAME, C, FIRST, 8, __m256, _mm256_loadu_ps, _mm256_add_ps, SAME)
#if defined(__AVX512F__)
/* With AVX-512, chunks of C >= 64 run those vertical steps on 16 lanes: p[i][k] =
 * buf[16 i + k], so p[i] + p[i + h] is buf[k] += buf[k + 16 h] lane by lane, the same
 * additions down to h = 16; the step h = 8 (buf[k] += buf[k + 8], k < 8) is then p[0]'s
 * two halves added, which leaves the same 8-lane vector for the network. */
INLINE __m256 halves_added(__m512 v)
{
    return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}
INLINE __m512 squares16(__m512 a, __m512 b) { return _mm512_add_ps(_mm512_mul_ps(a, a), _mm512_mul_ps(b, b)); }
#define pairs16 _mm512_add_ps
#define VERT_WIDE(NAME, C, FIRST) VERT(NAME, C, FIRST, 16, __m512, _mm512_loadu_ps, _mm512_add_ps, halves_added)
#else
#define squares16 squares8
#define pairs16 pairs8
#define VERT_WIDE VERT8
#endif
/* (32 stays on 8 lanes: one 16-lane pair and the halves' add are slower there) */
VERT8(vert8, 16, squares8) VERT8(vert8, 32, squares8) VERT_WIDE(vert8, 64, squares16)
VERT_WIDE(vert8, 128, squares16) VERT_WIDE(vert8, 256, squares16)
VERT8(vert8_sum, 16, pairs8) VERT8(vert8_sum, 32, pairs8) VERT_WIDE(vert8_sum, 64, pairs16)
VERT_WIDE(vert8_sum, 128, pairs16) VERT_WIDE(vert8_sum, 256, pairs16)

/* LayerNorm's variance (native_layer.c): the same halving of each chunk of the squared
 * deviations (x - mean)^2, each difference and square rounded once, formed as the
 * first step loads them instead of read from a row of squares: the same additions of
 * the same values, so the same bits as tgn_full_chunks_f32 over that row. */
#define VERT_DEV(NAME, C, L, V, LOAD, SET1, SUB, MUL, ADD, TO8)                       \
    INLINE __m256 NAME##_##C(const float *s, float mean)                               \
    {                                                                                  \
        const V m = SET1(mean);                                                        \
        V p[(C) / (2 * (L))];                                                          \
        for (int i = 0; i < (C) / (2 * (L)); ++i) {                                    \
            V a = SUB(LOAD(s + (L) * i), m), b = SUB(LOAD(s + (C) / 2 + (L) * i), m); \
            p[i] = ADD(MUL(a, a), MUL(b, b));                                          \
        }                                                                              \
        for (int h = (C) / (4 * (L)); h >= 1; h /= 2)                                  \
            for (int i = 0; i < h; ++i)                                                \
                p[i] = ADD(p[i], p[i + h]);                                            \
        return TO8(p[0]);                                                              \
    }
#define VERT_DEV8(C) VERT_DEV(vert8_dev, C, 8, __m256, _mm256_loadu_ps, _mm256_set1_ps, _mm256_sub_ps, \
                              _mm256_mul_ps, _mm256_add_ps, SAME)
#if defined(__AVX512F__)
#define VERT_DEV_WIDE(C) VERT_DEV(vert8_dev, C, 16, __m512, _mm512_loadu_ps, _mm512_set1_ps, _mm512_sub_ps, \
                                  _mm512_mul_ps, _mm512_add_ps, halves_added)
#else
#define VERT_DEV_WIDE VERT_DEV8
#endif
VERT_DEV8(16) VERT_DEV8(32) VERT_DEV_WIDE(64) VERT_DEV_WIDE(128) VERT_DEV_WIDE(256)

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

/* Groups of eight full chunks of `row` through the network; leaves c at the first
 * chunk not summed. */
#define EIGHT_GROUPS(VERT, C)                                                          \
    for (c = 0; c + 8 <= n_full; c += 8) {                                             \
        __m256 v[8];                                                                   \
        for (int i = 0; i < 8; ++i)                                                    \
            v[i] = VERT##_##C(row + (c + i) * (C));                                    \
        network8(v, slots + c);                                                        \
    }

#define EIGHT_CHUNKS(C)                                                                \
    EIGHT_GROUPS(vert8, C)                                                             \
    for (; c < n_full; ++c)                                                            \
        slots[c] = chunk_float_##C(row + c * (C));                                     \
    return 1;

/* A bf16 or fp16 row's chunks as tgn_full_chunks_f32 sums them over the row widened:
 * the same 16-lane vertical steps (p[i] = v[16 i, 16 i + 16)^2 + v[C/2 + 16 i, ...)^2,
 * then p[i] + p[i + h]), each pair of p's from one load of 32 narrow values. */
#if defined(TGN_WIDEN32)
#define VERT_NARROW(C)                                                                 \
    INLINE __m256 vert_narrow_##C(const uint16_t *s, const int bf16, __m512i *least)   \
    {                                                                                  \
        __m512 p[(C) / 32];                                                            \
        for (int m = 0; m < (C) / 64; ++m) {                                           \
            __m512 a0, a1, b0, b1;                                                     \
            tgn_widen32(s + 32 * m, bf16, &a0, &a1, least);                            \
            tgn_widen32(s + (C) / 2 + 32 * m, bf16, &b0, &b1, least);                  \
            p[2 * m] = squares16(a0, b0);                                              \
            p[2 * m + 1] = squares16(a1, b1);                                          \
        }                                                                              \
        for (int h = (C) / 64; h >= 1; h /= 2)                                         \
            for (int i = 0; i < h; ++i)                                                \
                p[i] = _mm512_add_ps(p[i], p[i + h]);                                  \
        return halves_added(p[0]);                                                     \
    }
VERT_NARROW(64) VERT_NARROW(128) VERT_NARROW(256)

#define NARROW_GROUPS(C)                                                               \
    for (int64_t c = 0; c < n_full; c += 8) {                                          \
        __m256 v[8];                                                                   \
        for (int i = 0; i < 8; ++i)                                                    \
            v[i] = vert_narrow_##C(x + (c + i) * (C), bf16, &least);                   \
        network8(v, slots + c);                                                        \
    }                                                                                  \
    break;
#endif

int tgn_narrow_chunks_f32(const uint16_t *x, int64_t code, int64_t chunk, int64_t n_full, float *slots, int *tiny)
{
#if defined(TGN_WIDEN32)
    const int bf16 = code == TGN_DTYPE_BF16;
    __m512i least = _mm512_set1_epi16(-1);
    if (n_full % 8 || (code != TGN_DTYPE_BF16 && code != TGN_DTYPE_F16))
        return 0;
    switch (chunk) {
    case 64: NARROW_GROUPS(64)
    case 128: NARROW_GROUPS(128)
    case 256: NARROW_GROUPS(256)
    default: return 0;
    }
    /* (TGN_Q_LO's low half is 0: |x| bits in [1, TGN_Q_LO) is |b| in [1, TGN_Q_LO >> 16)) */
    *tiny = bf16 && _mm512_cmplt_epu16_mask(least, _mm512_set1_epi16((short)((TGN_Q_LO >> 16) - 1))) != 0;
    return 1;
#else
    (void)x, (void)code, (void)chunk, (void)n_full, (void)slots, (void)tiny;
    return 0;
#endif
}

int tgn_full_chunks_f32(const float *row, int64_t chunk, int64_t n_full, float *slots)
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

/* The backward's dot products (native_backward.c): the same halving of each full
 * chunk of row (here p = g * x, values already formed), eight chunks at a time; the first
 * step adds pairs where the forward adds squares of pairs.  Returns how many leading
 * full chunks it summed into slots (a multiple of 8: the caller halves the rest). */
#define EIGHT_SUMS(C)                                                                  \
    EIGHT_GROUPS(vert8_sum, C)                                                         \
    return c;

int64_t tgn_chunk_sums_f32(const float *row, int64_t chunk, int64_t n_full, float *slots)
{
    int64_t c;
    switch (chunk) {
    case 16: EIGHT_SUMS(16)
    case 32: EIGHT_SUMS(32)
    case 64: EIGHT_SUMS(64)
    case 128: EIGHT_SUMS(128)
    case 256: EIGHT_SUMS(256)
    default: return 0;
    }
}

/* The backward's dot products formed as the first step loads them (no row of products
 * written and read again): p = (dy * w) * x, or dy * x without a weight, each product
 * rounded as native_backward.c's scalar loop rounds it (two multiplies, no fma), then
 * the halving of tgn_chunk_sums_f32 over that row of products: the same values in the
 * same additions, so the same bits.  (Chunks of 64 or more take 16 lanes, as there.) */
#define VERT_DOT(NAME, C, L, V, LOAD, MUL, ADD, TO8)                                   \
    INLINE V NAME##_prod_##C(const float *dy, const float *w, const float *x, int64_t o) \
    {                                                                                  \
        return w ? MUL(MUL(LOAD(dy + o), LOAD(w + o)), LOAD(x + o)) : MUL(LOAD(dy + o), LOAD(x + o)); \
    }                                                                                  \
    INLINE __m256 NAME##_##C(const float *dy, const float *w, const float *x)          \
    {                                                                                  \
        V p[(C) / (2 * (L))];                                                          \
        for (int i = 0; i < (C) / (2 * (L)); ++i)                                      \
            p[i] = ADD(NAME##_prod_##C(dy, w, x, (L) * i), NAME##_prod_##C(dy, w, x, (C) / 2 + (L) * i)); \
        for (int h = (C) / (4 * (L)); h >= 1; h /= 2)                                  \
            for (int i = 0; i < h; ++i)                                                \
                p[i] = ADD(p[i], p[i + h]);                                            \
        return TO8(p[0]);                                                              \
    }
#define VERT_DOT8(C) VERT_DOT(vert8_dot, C, 8, __m256, _mm256_loadu_ps, _mm256_mul_ps, _mm256_add_ps, SAME)
#if defined(__AVX512F__)
#define VERT_DOT_WIDE(C) VERT_DOT(vert8_dot, C, 16, __m512, _mm512_loadu_ps, _mm512_mul_ps, _mm512_add_ps, \
                                  halves_added)
#else
#define VERT_DOT_WIDE VERT_DOT8
#endif
VERT_DOT8(16) VERT_DOT8(32) VERT_DOT_WIDE(64) VERT_DOT_WIDE(128) VERT_DOT_WIDE(256)

/* W: the weight, or NULL as a constant (each case its own loop, the test not in it). */
#define DOT_GROUPS(C, W)                                                               \
    for (c = 0; c + 8 <= n_full; c += 8) {                                             \
        __m256 v[8];                                                                   \
        for (int i = 0; i < 8; ++i) {                                                  \
            const int64_t o = (c + i) * (C);                                           \
            v[i] = vert8_dot_##C(dy + o, (W) ? (W) + o : 0, x + o);                    \
        }                                                                              \
        network8(v, slots + c);                                                        \
    }                                                                                  \
    return c;
#define EIGHT_DOTS(C)                                                                  \
    if (w) {                                                                           \
        DOT_GROUPS(C, w)                                                               \
    }                                                                                  \
    DOT_GROUPS(C, (const float *)0)

int64_t tgn_chunk_dots_f32(const float *dy, const float *w, const float *x, int64_t chunk, int64_t n_full,
                           float *slots)
{
    int64_t c;
    switch (chunk) {
    case 16: EIGHT_DOTS(16)
    case 32: EIGHT_DOTS(32)
    case 64: EIGHT_DOTS(64)
    case 128: EIGHT_DOTS(128)
    case 256: EIGHT_DOTS(256)
    default: return 0;
    }
}

#define EIGHT_DEVS(C)                                                                  \
    for (c = 0; c + 8 <= n_full; c += 8) {                                             \
        __m256 v[8];                                                                   \
        for (int i = 0; i < 8; ++i)                                                    \
            v[i] = vert8_dev_##C(row + (c + i) * (C), mean);                           \
        network8(v, slots + c);                                                        \
    }                                                                                  \
    return c;

int64_t tgn_chunk_sqdev_f32(const float *row, float mean, int64_t chunk, int64_t n_full, float *slots)
{
    int64_t c;
    switch (chunk) {
    case 16: EIGHT_DEVS(16)
    case 32: EIGHT_DEVS(32)
    case 64: EIGHT_DEVS(64)
    case 128: EIGHT_DEVS(128)
    case 256: EIGHT_DEVS(256)
    default: return 0;
    }
}
#endif

#if !defined(__AVX__)
FULL_CHUNKS_POW2(float, tgn_full_chunks_f32)

int64_t tgn_chunk_sqdev_f32(const float *row, float mean, int64_t chunk, int64_t n_full, float *slots)
{
    (void)row, (void)mean, (void)chunk, (void)n_full, (void)slots;
    return 0; /* the caller forms the squares and halves every chunk */
}

int64_t tgn_chunk_sums_f32(const float *row, int64_t chunk, int64_t n_full, float *slots)
{
    (void)row, (void)chunk, (void)n_full, (void)slots;
    return 0; /* the caller halves every chunk */
}

int64_t tgn_chunk_dots_f32(const float *dy, const float *w, const float *x, int64_t chunk, int64_t n_full,
                           float *slots)
{
    (void)dy, (void)w, (void)x, (void)chunk, (void)n_full, (void)slots;
    return 0; /* the caller forms the products and halves every chunk */
}
#endif

