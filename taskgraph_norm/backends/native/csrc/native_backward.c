/* The native backward of fp32 rows (ops/backward.py through backends/native/grads.py): each
 * row's input gradient and the weight gradient's row-block sums, the C form of
 * kernels.input_grad and kernels.weight_grad_float, bit for bit
 * (tests/test_ops.py compares them with the torch ops); and the rms of the forward's
 * row totals.  The forward's rows are native.c; the exact weight gradient native_dw.c.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef __FAST_MATH__
#error "the native kernels must not be compiled with -ffast-math"
#endif

#include "native_quotient.h"
#include "tgn_native.h"

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
 * and, with blocks, t = dy * (x / r) summed over each block of TGN_BACKWARD_ROW_BLOCK
 * rows by
 * pairwise halving over the rows (kernels.weight_grad_float), one row per block in
 * blocks; the caller merges the blocks.  Every operation is the torch ops' IEEE fp32
 * (or fp64) operation in the same order (the quotients g / r and x / r formed as
 * FINALIZE's are, native_quotient.h: IEEE division's bits).  A row whose s or k is not finite is
 * counted and the caller recomputes everything with torch ops (NaN payloads).
 */

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
    for (int64_t c = tgn_chunk_sums_f32(p, chunk, hidden / chunk, slots); c < n_chunks; ++c) {
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

/* dx = g / r - x k with g = dy w (dy without a weight), one pass; the quotient is
 * native_quotient.h's (IEEE division's bits), the rest the same roundings as written. */
static void dx_row(const float *dy, const float *w, const float *x, float r, float k, float *dx, int64_t n)
{
    int64_t j = 0;
#if TGN_QUOTIENT_LANES > 1
    if (tgn_quotient_rms_in_range(r)) {
        const tgn_q_div_t d = tgn_q_setup(r);
        const TGN_QV kv = TGN_Q_SET1(k);
        for (; j + TGN_QUOTIENT_LANES <= n; j += TGN_QUOTIENT_LANES) {
            TGN_QV g = w ? TGN_Q_MUL(TGN_Q_LOAD(dy + j), TGN_Q_LOAD(w + j)) : TGN_Q_LOAD(dy + j);
            TGN_Q_STORE(dx + j, TGN_Q_SUB(tgn_q_vec(&d, g), TGN_Q_MUL(TGN_Q_LOAD(x + j), kv)));
        }
    }
#endif
    for (; j < n; ++j) {
        float g = w ? dy[j] * w[j] : dy[j];
        dx[j] = g / r - x[j] * k;
    }
}

/* t = dy (x / r), one pass (the weight gradient's term of one row). */
static void block_row(const float *dy, const float *x, float r, float *t, int64_t n)
{
    int64_t j = 0;
#if TGN_QUOTIENT_LANES > 1
    if (tgn_quotient_rms_in_range(r)) {
        const tgn_q_div_t d = tgn_q_setup(r);
        for (; j + TGN_QUOTIENT_LANES <= n; j += TGN_QUOTIENT_LANES)
            TGN_Q_STORE(t + j, TGN_Q_MUL(TGN_Q_LOAD(dy + j), tgn_q_vec(&d, TGN_Q_LOAD(x + j))));
    }
#endif
    for (; j < n; ++j)
        t[j] = dy[j] * (x[j] / r);
}

int64_t tgn_backward_rows_f32(const float *x, const float *dy, const float *w, const float *rms,
                              int64_t rows, int64_t hidden, int64_t chunk, const int64_t *adds,
                              int64_t n_adds, int64_t root, int64_t exact, float *dx, float *blocks)
{
    int64_t n_chunks = (hidden + chunk - 1) / chunk, bad = 0;
    int64_t need = 2 * hidden + n_chunks + n_adds + (blocks ? TGN_BACKWARD_ROW_BLOCK * hidden : 0);
    float *work = (float *)malloc((size_t)need * sizeof(float));
    if (!work)
        return -1;
    float *g = work, *p = work + hidden, *slots = p + hidden, *tb = slots + n_chunks + n_adds;
    const float fd = (float)(double)hidden;
    for (int64_t b0 = 0; b0 < rows; b0 += TGN_BACKWARD_ROW_BLOCK) {
        int64_t in_block = rows - b0 < TGN_BACKWARD_ROW_BLOCK ? rows - b0 : TGN_BACKWARD_ROW_BLOCK;
        for (int64_t i = b0; i < b0 + in_block; ++i) {
            const float *xr = x + i * hidden, *dyr = dy + i * hidden;
            const float r = rms[i];
            if (dx) {
                float s;
                if (exact) {
                    if (w)
                        for (int64_t j = 0; j < hidden; ++j)
                            g[j] = dyr[j] * w[j];
                    else
                        memcpy(g, dyr, (size_t)hidden * sizeof(float));
                    s = row_dot_exact(g, xr, hidden);
                } else {
                    if (w) /* p = g x with g = dy w, not kept: dx_row forms g again */
                        for (int64_t j = 0; j < hidden; ++j)
                            p[j] = (dyr[j] * w[j]) * xr[j];
                    else
                        for (int64_t j = 0; j < hidden; ++j)
                            p[j] = dyr[j] * xr[j];
                    s = row_dot_float(p, hidden, chunk, adds, n_adds, root, slots);
                }
                float k = ((s / fd) / r / r) / r;
                if (!isfinite(s) || !isfinite(k))
                    ++bad;
                dx_row(dyr, w, xr, r, k, dx + i * hidden, hidden);
            }
            if (blocks)
                block_row(dyr, xr, r, tb + (i - b0) * hidden, hidden);
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
            memcpy(blocks + (b0 / TGN_BACKWARD_ROW_BLOCK) * hidden, tb, (size_t)hidden * sizeof(float));
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
