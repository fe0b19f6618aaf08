/* The gate of a gated RMSNorm: silu(g) = g / (1 + exp(-g)) and sigmoid(g) = 1 / (1 +
 * exp(-g)), each evaluated in fp64 from IEEE operations only and rounded once to fp32.
 * The operations are kernels/gate.py's, in the same order (no fma: -ffp-contract=off),
 * so both give the same bits, wherever an element sits in a loop. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "native_half.h"
#include "tgn_native.h"

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

/* exp(-g) for fp64 g: clamp, reduce, series, scale by 2**n built from its bits. */
static inline double exp_neg(double g)
{
    double t = -g;
    t = t < -(double)TGN_GATE_EXP_CLAMP ? -(double)TGN_GATE_EXP_CLAMP
        : (t > (double)TGN_GATE_EXP_CLAMP ? (double)TGN_GATE_EXP_CLAMP : t); /* NaN stays NaN */
    double n = nearbyint(t * INV_LN2);
    if (isnan(n))
        n = 0.0;
    double r = (t - n * LN2_HI) - n * LN2_LO;
    double p = COEFFICIENTS[TGN_GATE_EXP_TERMS - 1];
    for (int k = TGN_GATE_EXP_TERMS - 2; k >= 0; k--)
        p = p * r + COEFFICIENTS[k];
    uint64_t bits = (uint64_t)((int64_t)n + 1023) << 52;
    double scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static inline float load(const void *g, int64_t dtype, int64_t i)
{
    if (dtype == TGN_DTYPE_BF16)
        return tgn_bf16_to_f32(((const uint16_t *)g)[i]);
    if (dtype == TGN_DTYPE_F16)
        return tgn_f16_to_f32(((const uint16_t *)g)[i]);
    return ((const float *)g)[i];
}

int64_t tgn_gate_silu(const void *g, int64_t g_dtype, int64_t n, float *silu, float *sigmoid)
{
    if (g_dtype != TGN_DTYPE_F32 && g_dtype != TGN_DTYPE_BF16 && g_dtype != TGN_DTYPE_F16)
        return -1;
    for (int64_t i = 0; i < n; i++) {
        double gd = (double)load(g, g_dtype, i);
        double e = exp_neg(gd) + 1.0;
        silu[i] = (float)(gd / e);
        if (sigmoid)
            sigmoid[i] = (float)(1.0 / e);
    }
    return 0;
}

static inline void store(void *out, int64_t dtype, int64_t i, float v)
{
    if (dtype == TGN_DTYPE_BF16)
        ((uint16_t *)out)[i] = v != v ? (uint16_t)0xFFFF : tgn_f32_to_bf16(v);
    else if (dtype == TGN_DTYPE_F16)
        ((uint16_t *)out)[i] = v != v ? (uint16_t)0xFFFF : tgn_f32_to_f16(v);
    else
        ((float *)out)[i] = v;
}

int64_t tgn_gate_product(const void *g, int64_t g_dtype, const void *v, int64_t v_dtype, int64_t n, void *out,
                         int64_t out_dtype)
{
    int64_t codes[] = {g_dtype, v_dtype, out_dtype};
    for (int k = 0; k < 3; k++)
        if (codes[k] != TGN_DTYPE_F32 && codes[k] != TGN_DTYPE_BF16 && codes[k] != TGN_DTYPE_F16)
            return -1;
    for (int64_t i = 0; i < n; i++) {
        double gd = (double)load(g, g_dtype, i);
        float s = (float)(gd / (exp_neg(gd) + 1.0));
        store(out, out_dtype, i, load(v, v_dtype, i) * s);
    }
    return 0;
}
