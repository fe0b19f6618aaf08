/* A gated (and grouped) RMSNorm's no-grad forward in one pass (ops/gated.py's
 * construction, backends/native/gated_rows.py): each step of a team block's group rows
 * is read once, into fp32 scratch that stays in L1, and written once.
 *
 *   s = silu(gate)                 tgn_gate_silu (native_gate.c): fp64, rounded once
 *   h = x.to(fp32) * s             gate before the norm (Mamba2), one fp32 multiply;
 *   h = x.to(fp32)                 gate after (Qwen3-Next)
 *   rms of each group row of h     tgn_float_rows_f32, totals only: the plan's chunk
 *                                  sums and ADD merges, sqrt(total / D + eps)
 *   q = FINALIZE(h, rms, w)        finalize_span_float (native_finalize.h) with the
 *                                  flags of the call's cast order: llama's roundings to
 *                                  x's dtype (ROUND_QUOTIENT, ROUND_PRODUCT) or none;
 *                                  w is the weight plus offset made in fp32 once per
 *                                  call (tgn_narrow_weight), the group's slice of it
 *   q = q * s                      gate after: m.float() * silu(gate), one multiply
 *   y = q rounded to y's dtype     round to nearest even (native_half.h)
 *
 * which are the operations, in order, of the path it replaces (the elementwise torch
 * ops and the merge graph's rows; tests/test_native_gated.py compares the bits).  A
 * row with a NaN total, or a NaN anywhere in its result, is counted and the caller
 * runs that path for the whole call (torch's casts write a NaN by its position).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native_finalize.h"
#include "native_half.h"
#include "tgn_native.h"

#if defined(__FAST_MATH__)
#error "the native kernels must not be compiled with -ffast-math"
#endif

/* fp32 values per step (h and s: 32 KiB together), and group rows per step at most */
#define SCRATCH 4096
#define MAX_STEP 256

typedef struct gated_job {
    const tgn_rows_cfg_t *cfg; /* hidden: the group size; flags: FINALIZE's */
    const void *x, *g;
    void *y;
    const float *w; /* groups * hidden fp32 values, the offset included; NULL: none */
    double eps;
    int64_t g_dtype, groups, after;
} gated_job_t;

static inline int64_t size_of(int64_t code) { return code == TGN_DTYPE_F32 ? 4 : 2; }

/* dst = src[start, start + n) widened to fp32 */
static void widen_span(const void *src, int64_t code, int64_t start, int64_t n, float *dst)
{
    if (code == TGN_DTYPE_F32) {
        memcpy(dst, (const float *)src + start, (size_t)n * sizeof *dst);
        return;
    }
    const uint16_t *p = (const uint16_t *)src + start;
    if (code == TGN_DTYPE_BF16)
        for (int64_t j = 0; j < n; ++j)
            dst[j] = tgn_bf16_to_f32(p[j]);
    else
        for (int64_t j = 0; j < n; ++j)
            dst[j] = tgn_f16_to_f32(p[j]);
}

/* out[start, start + n) = v rounded to code's dtype; returns whether v holds a NaN */
static int store_span(const float *v, int64_t n, void *out, int64_t code, int64_t start)
{
    int nan = 0;
    if (code == TGN_DTYPE_F32) {
        for (int64_t j = 0; j < n; ++j)
            nan |= v[j] != v[j];
        memcpy((float *)out + start, v, (size_t)n * sizeof *v);
        return nan;
    }
    uint16_t *p = (uint16_t *)out + start;
    if (code == TGN_DTYPE_BF16)
        for (int64_t j = 0; j < n; ++j) {
            nan |= v[j] != v[j];
            p[j] = tgn_f32_to_bf16(v[j]);
        }
    else
        for (int64_t j = 0; j < n; ++j) {
            nan |= v[j] != v[j];
            p[j] = tgn_f32_to_f16(v[j]);
        }
    return nan;
}

static void multiply(float *restrict h, const float *restrict s, int64_t n)
{
    for (int64_t j = 0; j < n; ++j)
        h[j] = h[j] * s[j];
}

/* Full rows [i, i + n) of the job (tgn_team_rows' fn): 0, a count of rows left to the
 * caller (it stops at the first), or -1 (no scratch). */
static int64_t gated_block(const void *ctx, int64_t i, int64_t n)
{
    const gated_job_t *job = (const gated_job_t *)ctx;
    const tgn_rows_cfg_t *c = job->cfg;
    const int64_t d = c->hidden, groups = job->groups;
    float small[2 * SCRATCH], rms[MAX_STEP];
    float *h = d <= SCRATCH ? small : (float *)malloc(2 * (size_t)d * sizeof(float));
    if (!h)
        return -1;
    float *s = h + (d <= SCRATCH ? SCRATCH : d);
    const int64_t step = d > SCRATCH ? 1 : SCRATCH / d < MAX_STEP ? SCRATCH / d : MAX_STEP;
    const char *g = (const char *)job->g;
    const int64_t g_size = size_of(job->g_dtype);
    int64_t bad = 0;
    for (int64_t k = i * groups, end = (i + n) * groups; k < end && !bad; k += step) {
        const int64_t m = end - k < step ? end - k : step, e0 = k * d, len = m * d;
        if (tgn_gate_silu(g + e0 * g_size, job->g_dtype, len, s, 0) < 0) {
            bad = -1;
            break;
        }
        widen_span(job->x, c->x_dtype, e0, len, h);
        if (!job->after)
            multiply(h, s, len);
        bad = tgn_float_rows_f32(h, m, d, d, c->chunk, c->adds, c->n_adds, c->root, rms, 0, 0, 0, job->eps,
                                 TGN_TOTAL_AS_RMS, 0.0, 0, 0, 0, 0);
        if (bad)
            break; /* a NaN total (or no scratch: -1) */
        for (int64_t r = 0; r < m; ++r) {
            const float *w = job->w ? job->w + ((k + r) % groups) * d : 0;
            bad |= finalize_span_float(h + r * d, h + r * d, w, d, rms[r], c->flags, 0.0);
        }
        if (job->after)
            multiply(h, s, len);
        bad |= store_span(h, len, job->y, c->y_dtype, e0);
    }
    if (h != small)
        free(h);
    return bad;
}

int64_t tgn_gated_rows(const tgn_rows_cfg_t *c, const void *x, const void *g, int64_t g_dtype, void *y,
                       int64_t rows, const void *w, double eps, int64_t groups, int64_t after, int64_t threads)
{
    if (rows <= 0)
        return 0;
    if (c->exact || groups < 1 || !c->chunk)
        return -1; /* float plans only */
    float *made = 0;
    if (w) {
        tgn_rows_cfg_t whole = *c;
        whole.hidden = c->hidden * groups;
        made = (float *)malloc((size_t)whole.hidden * sizeof(float));
        if (!made)
            return -1;
        tgn_narrow_weight(&whole, w, made); /* w widened, + offset, rounded to w_round */
    }
    gated_job_t job = {.cfg = c, .x = x, .g = g, .y = y, .w = made, .eps = eps, .g_dtype = g_dtype,
                       .groups = groups, .after = after != 0};
    int64_t result = tgn_team_rows(gated_block, &job, rows, c->grain, threads);
    free(made);
    return result;
}
