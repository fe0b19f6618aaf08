/* The gate of a gated RMSNorm: silu(g) = g / (1 + exp(-g)) and sigmoid(g) = 1 / (1 +
 * exp(-g)), each evaluated in fp64 from IEEE operations only and rounded once to fp32.
 * The operations are kernels/gate.py's, in the same order (no fma: -ffp-contract=off),
 * so both give the same bits, wherever an element sits in a loop. */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#include "native_half.h"
#include "tgn_native.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__FAST_MATH__)
#error "the native kernels must not be compiled with -ffast-math"
#endif

/* ln 2 split (fdlibm's ln2HI, ln2LO) and 1/ln 2: kernels/gate.py's LN2_HI, LN2_LO, INV_LN2. */
static const double LN2_HI = 6.93147180369123816490e-01;
static const double LN2_LO = 1.90821492927058770002e-10;
static const double INV_LN2 = 1.44269504088896338700e00;

/* 1 / k! (k! exact in fp64; the quotient correctly rounded): kernels/gate.py's COEFFICIENTS. */
#if TGN_GATE_EXP_TERMS != 14
#error "COEFFICIENTS below has 14 terms: GATE_EXP_TERMS changed"
#endif
static const double COEFFICIENTS[14] = {
    1.0 / 1.0, 1.0 / 1.0, 1.0 / 2.0, 1.0 / 6.0, 1.0 / 24.0, 1.0 / 120.0, 1.0 / 720.0, 1.0 / 5040.0,
    1.0 / 40320.0, 1.0 / 362880.0, 1.0 / 3628800.0, 1.0 / 39916800.0, 1.0 / 479001600.0, 1.0 / 6227020800.0,
};

/* Elements per block: the gate is widened into an fp32 block, then one tight loop over it
 * (which the compiler vectorises) computes each element in fp64. */
#define GATE_BLOCK 512

/* 1 / (1 + exp(-g)) for fp64 g: clamp (a NaN stays NaN), reduce by n ln 2, the series,
 * then 2**n from its bits (n + 1.5 * 2**52 holds n in its low bits: exact for |n| < 2**51). */
static inline double one_plus_exp_neg(double g)
{
    double t = -g;
    t = t < -(double)TGN_GATE_EXP_CLAMP ? -(double)TGN_GATE_EXP_CLAMP : t;
    t = t > (double)TGN_GATE_EXP_CLAMP ? (double)TGN_GATE_EXP_CLAMP : t;
    double n = nearbyint(t * INV_LN2);
    n = n == n ? n : 0.0;
    double r = (t - n * LN2_HI) - n * LN2_LO;
    double p = COEFFICIENTS[TGN_GATE_EXP_TERMS - 1];
    for (int k = TGN_GATE_EXP_TERMS - 2; k >= 0; k--)
        p = p * r + COEFFICIENTS[k];
    double shifted = n + 0x1.8p52;
    uint64_t bits;
    memcpy(&bits, &shifted, sizeof bits);
    bits = (bits - UINT64_C(0x4338000000000000) + 1023) << 52;
    double scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale + 1.0;
}

#if defined(__AVX512F__)
/* one_plus_exp_neg on eight lanes: the same IEEE operations in the same order (no fma:
 * each product and sum its own instruction), so each lane has the scalar form's bits;
 * the compiler's own vectors of the scalar loop are 256-bit.  -g flips the sign bit;
 * max(-CLAMP, t) and min(CLAMP, t) return t where t is NaN, as the scalar tests do;
 * nearbyint is round-to-nearest-even (the default mode). */
static inline __m512d one_plus_exp_neg8(__m512d g)
{
    const __m512d clamp = _mm512_set1_pd((double)TGN_GATE_EXP_CLAMP);
    __m512d t = _mm512_castsi512_pd(_mm512_xor_si512(_mm512_castpd_si512(g), _mm512_set1_epi64(INT64_MIN)));
    t = _mm512_max_pd(_mm512_sub_pd(_mm512_setzero_pd(), clamp), t);
    t = _mm512_min_pd(clamp, t);
    __m512d n = _mm512_roundscale_pd(_mm512_mul_pd(t, _mm512_set1_pd(INV_LN2)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    n = _mm512_maskz_mov_pd(_mm512_cmp_pd_mask(n, n, _CMP_ORD_Q), n);
    __m512d r = _mm512_sub_pd(_mm512_sub_pd(t, _mm512_mul_pd(n, _mm512_set1_pd(LN2_HI))),
                              _mm512_mul_pd(n, _mm512_set1_pd(LN2_LO)));
    __m512d p = _mm512_set1_pd(COEFFICIENTS[TGN_GATE_EXP_TERMS - 1]);
    for (int k = TGN_GATE_EXP_TERMS - 2; k >= 0; k--)
        p = _mm512_add_pd(_mm512_mul_pd(p, r), _mm512_set1_pd(COEFFICIENTS[k]));
    __m512i bits = _mm512_castpd_si512(_mm512_add_pd(n, _mm512_set1_pd(0x1.8p52)));
    bits = _mm512_slli_epi64(_mm512_add_epi64(_mm512_sub_epi64(bits, _mm512_set1_epi64(0x4338000000000000LL)),
                                              _mm512_set1_epi64(1023)), 52);
    return _mm512_add_pd(_mm512_mul_pd(p, _mm512_castsi512_pd(bits)), _mm512_set1_pd(1.0));
}
#define GATE_LANES 8
#else
#define GATE_LANES 0
#endif

static void silu_block(const float *g, int64_t m, float *silu)
{
    int64_t i = 0;
#if GATE_LANES
    for (const int64_t lanes_end = m / GATE_LANES * GATE_LANES; i < lanes_end; i += GATE_LANES) {
        __m512d gd = _mm512_cvtps_pd(_mm256_loadu_ps(g + i));
        _mm256_storeu_ps(silu + i, _mm512_cvtpd_ps(_mm512_div_pd(gd, one_plus_exp_neg8(gd))));
    }
#endif
    for (; i < m; i++) {
        double gd = (double)g[i];
        silu[i] = (float)(gd / one_plus_exp_neg(gd));
    }
}

static void silu_sigmoid_block(const float *g, int64_t m, float *silu, float *sigmoid)
{
    int64_t i = 0;
#if GATE_LANES
    for (; i + GATE_LANES <= m; i += GATE_LANES) {
        __m512d gd = _mm512_cvtps_pd(_mm256_loadu_ps(g + i)), e = one_plus_exp_neg8(gd);
        _mm256_storeu_ps(silu + i, _mm512_cvtpd_ps(_mm512_div_pd(gd, e)));
        _mm256_storeu_ps(sigmoid + i, _mm512_cvtpd_ps(_mm512_div_pd(_mm512_set1_pd(1.0), e)));
    }
#endif
    for (; i < m; i++) {
        double gd = (double)g[i];
        double e = one_plus_exp_neg(gd);
        silu[i] = (float)(gd / e);
        sigmoid[i] = (float)(1.0 / e);
    }
}

static inline int known(int64_t dtype)
{
    return dtype == TGN_DTYPE_F32 || dtype == TGN_DTYPE_BF16 || dtype == TGN_DTYPE_F16;
}

/* silu of every bf16 and every fp16 value (index: the 16 bits), made once per process by
 * silu_block itself: a narrow gate's silu is then one load per element, with the bits
 * silu_block gives it (256 KiB a table, made on first use in about 0.1 ms). */
static float silu_table[2][1 << 16];
static pthread_once_t table_once[2] = {PTHREAD_ONCE_INIT, PTHREAD_ONCE_INIT};

static void make_table(int f16)
{
    float block[GATE_BLOCK];
    for (int64_t a = 0; a < (1 << 16); a += GATE_BLOCK) {
        for (int64_t i = 0; i < GATE_BLOCK; i++)
            block[i] = f16 ? tgn_f16_to_f32((uint16_t)(a + i)) : tgn_bf16_to_f32((uint16_t)(a + i));
        silu_block(block, GATE_BLOCK, silu_table[f16] + a);
    }
}

static void make_bf16_table(void) { make_table(0); }
static void make_f16_table(void) { make_table(1); }

const float *tgn_silu_table(int f16)
{
    pthread_once(&table_once[f16], f16 ? make_f16_table : make_bf16_table);
    return silu_table[f16];
}

static void silu_of_narrow(const uint16_t *g, int f16, int64_t n, float *silu)
{
    const float *table = tgn_silu_table(f16);
    int64_t i = 0;
#if GATE_LANES
    for (; i + 16 <= n; i += 16) {
        __m512i index = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(g + i)));
        _mm512_storeu_ps(silu + i, _mm512_i32gather_ps(index, table, 4));
    }
#endif
    for (; i < n; i++)
        silu[i] = table[g[i]];
}

int64_t tgn_gate_silu(const void *g, int64_t g_dtype, int64_t n, float *silu, float *sigmoid)
{
    float block[GATE_BLOCK];
    if (!known(g_dtype))
        return -1;
    if (!sigmoid && g_dtype != TGN_DTYPE_F32) {
        silu_of_narrow((const uint16_t *)g, g_dtype == TGN_DTYPE_F16, n, silu);
        return 0;
    }
    for (int64_t a = 0; a < n; a += GATE_BLOCK) {
        int64_t m = n - a < GATE_BLOCK ? n - a : GATE_BLOCK;
        tgn_widen_span(g, g_dtype, a, m, block);
        if (sigmoid)
            silu_sigmoid_block(block, m, silu + a, sigmoid + a);
        else
            silu_block(block, m, silu + a);
    }
    return 0;
}

static void store_block(const float *v, int64_t m, void *out, int64_t dtype, int64_t start)
{
    if (dtype == TGN_DTYPE_BF16) {
        uint16_t *b = (uint16_t *)out + start;
        for (int64_t i = 0; i < m; i++)
            b[i] = v[i] != v[i] ? (uint16_t)0xFFFF : tgn_f32_to_bf16(v[i]);
    } else if (dtype == TGN_DTYPE_F16) {
        uint16_t *h = (uint16_t *)out + start;
        for (int64_t i = 0; i < m; i++)
            h[i] = v[i] != v[i] ? (uint16_t)0xFFFF : tgn_f32_to_f16(v[i]);
    } else {
        memcpy((float *)out + start, v, (size_t)m * sizeof *v);
    }
}

int64_t tgn_gate_product(const void *g, int64_t g_dtype, const void *v, int64_t v_dtype, int64_t n, void *out,
                         int64_t out_dtype)
{
    float gb[GATE_BLOCK], s[GATE_BLOCK], vb[GATE_BLOCK];
    if (!known(g_dtype) || !known(v_dtype) || !known(out_dtype))
        return -1;
    for (int64_t a = 0; a < n; a += GATE_BLOCK) {
        int64_t m = n - a < GATE_BLOCK ? n - a : GATE_BLOCK;
        tgn_widen_span(g, g_dtype, a, m, gb);
        silu_block(gb, m, s);
        tgn_widen_span(v, v_dtype, a, m, vb);
        for (int64_t i = 0; i < m; i++)
            vb[i] = vb[i] * s[i];
        store_block(vb, m, out, out_dtype, a);
    }
    return 0;
}
