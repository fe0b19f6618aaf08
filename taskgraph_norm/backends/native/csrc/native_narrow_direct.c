/* bf16 and fp16 rows without the fp32 scratch (native_narrow.c's tgn_narrow_rows takes
 * them where the plan allows, and gives what they cannot finish to its scratch path):
 *
 * - long rows (chunks of 64, 128 or 256 in whole groups of 8, the tree's merges), a row
 *   at a time: its sums widen x as they load it (tgn_narrow_chunks_f32) and FINALIZE
 *   widens it again, from L1, instead of writing 4 bytes a value of fp32 scratch and
 *   reading them twice: a smaller working set (x, y and the fp32 weight: 32 KiB for a
 *   row of 4096, with no 16 KiB of scratch beside them in a 48 KiB L1);
 * - short rows (fewer than 8 full chunks of 64, 128 or 256: QK-norm's), a step of
 *   TGN_NARROW_SHORT_STEP rows at a time: every chunk sum of the step from x at once,
 *   each row's merges, the step's rms and reciprocal pairs 16 rows a vector, then each
 *   row's FINALIZE from x.
 *
 * Both need no residual, a narrow y of x's dtype, a clean weight and no llama rounding.
 * The same values go through the same operations as on the scratch path, so the bits
 * are the same (tests/test_native_narrow.py).  A row with a tiny value (bf16) or an rms
 * outside the quotient's range (zero, infinite, NaN rows) goes to the scratch path,
 * which gives it the same bits or counts it.  The step's totals and divisors serve the
 * scratch path's short steps too. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "native_finalize.h"
#include "native_narrow.h"
#include "native_widen.h"
#include "tgn_native.h"

void tgn_narrow_divisors(const float *tot, int64_t m, int64_t d, double eps, float *rms, float *rcp)
{
    int64_t k = 0;
#if defined(LANES) && TGN_QUOTIENT_LANES == LANES
    const __m512 hidden = _mm512_set1_ps((float)(double)d), e = _mm512_set1_ps((float)eps);
    for (; k + LANES <= m; k += LANES) {
        __m512 mean = _mm512_add_ps(_mm512_div_ps(_mm512_loadu_ps(tot + k), hidden), e);
        __m256 lo = _mm512_cvtpd_ps(_mm512_sqrt_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(mean))));
        __m256 hi = _mm512_cvtpd_ps(_mm512_sqrt_pd(_mm512_cvtps_pd(_mm512_extractf32x8_ps(mean, 1))));
        _mm512_storeu_ps(rms + k, _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1));
    }
#endif
    for (; k < m; ++k)
        rms[k] = rms_of_total_float(tot[k], d, eps);
    tgn_q_pairs(rms, m, rcp);
}

int tgn_narrow_short_rows(const tgn_rows_cfg_t *c)
{
    const int64_t n_full = c->hidden / c->chunk;
    return n_full * c->chunk == c->hidden && n_full < 8 && c->n_adds < 16 - n_full; /* (work[16] below) */
}

int64_t tgn_narrow_step_totals(const tgn_rows_cfg_t *c, const float *pre, int64_t m, float *tot)
{
    const int64_t n_full = c->hidden / c->chunk;
    float work[16];
    int64_t nan = 0;
    for (int64_t k = 0; k < m; ++k) {
        const float *row = pre + k * n_full;
        float t;
        if (n_full == 1) {
            t = row[0];
        } else {
            memcpy(work, row, (size_t)n_full * sizeof(float));
            for (int64_t a = 0; a < c->n_adds; ++a)
                work[c->adds[3 * a]] = work[c->adds[3 * a + 1]] + work[c->adds[3 * a + 2]];
            t = work[c->root];
        }
        tot[k] = t;
        nan += t != t;
    }
    return nan;
}

#define DIRECT_SLOTS 2048 /* slots for n_full chunks and their n_full - 1 merges */

/* What both kinds of rows need of the call (an fp32 x with a weight made here has no
 * narrow values to widen: every row would be handed back) */
static int direct_call(const tgn_narrow_t *job)
{
    const tgn_rows_cfg_t *c = job->cfg;
    return !c->exact && !job->r && job->w_clean && c->y_dtype == c->x_dtype &&
           (c->x_dtype == TGN_DTYPE_BF16 || c->x_dtype == TGN_DTYPE_F16) &&
           !(job->flags & (TGN_ROUND_QUOTIENT | TGN_ROUND_PRODUCT)) &&
           (c->chunk == 64 || c->chunk == 128 || c->chunk == 256) && c->hidden % c->chunk == 0;
}

int tgn_narrow_direct_plan(const tgn_narrow_t *job)
{
#if defined(TGN_WIDEN32) && TGN_QUOTIENT_LANES == LANES
    const int64_t n_full = job->cfg->hidden / job->cfg->chunk;
    return direct_call(job) && (job->flags & TGN_TREE_ADDS) && n_full % 8 == 0 && 2 * n_full <= DIRECT_SLOTS;
#else
    (void)direct_call, (void)job;
    return 0;
#endif
}

int tgn_narrow_short_plan(const tgn_narrow_t *job)
{
#if defined(TGN_WIDEN32) && TGN_QUOTIENT_LANES == LANES
    return direct_call(job) && tgn_narrow_short_rows(job->cfg);
#else
    (void)job;
    return 0;
#endif
}

#if defined(TGN_WIDEN32) && TGN_QUOTIENT_LANES == LANES
/* FINALIZE of a clean row from x into y with the divisor dv */
static inline void direct_finalize(const uint16_t *x, int64_t d, int64_t code, const float *w, const tgn_q_div_t *dv,
                                   uint16_t *y, int stream, const uint16_t *next)
{
    const int bf16 = code == TGN_DTYPE_BF16;
    __m512i least = _mm512_setzero_si512(); /* (the sums checked the row) */
    for (int64_t j = 0; j < d; j += 2 * LANES) {
        if (next)
            __builtin_prefetch(next + j, 0, 3); /* one line: 32 narrow values */
        __m512 a0, a1;
        tgn_widen32(x + j, bf16, &a0, &a1, &least);
        clean_pair(a0, a1, w ? w + j : 0, dv, code, y + j, stream);
    }
}
#endif

int tgn_narrow_direct_row(const tgn_narrow_t *job, int64_t k, const uint16_t *next)
{
#if defined(TGN_WIDEN32) && TGN_QUOTIENT_LANES == LANES
    const tgn_rows_cfg_t *c = job->cfg;
    const int64_t d = c->hidden, code = c->x_dtype;
    const uint16_t *x = (const uint16_t *)job->x + k * d;
    float slots[DIRECT_SLOTS];
    int tiny = 1;
    if (!tgn_narrow_chunks_f32(x, code, c->chunk, d / c->chunk, slots, &tiny) || tiny)
        return -1;
    tgn_adds_tree_f32(slots, d / c->chunk);
    const float rms = rms_of_total_float(slots[c->root], d, job->eps); /* TGN_TOTAL_AS_RMS's value */
    if (!tgn_quotient_rms_in_range(rms))
        return -1;
    if (job->total)
        ((float *)job->total)[k] = rms;
    const tgn_q_div_t dv = tgn_q_setup(rms);
    uint16_t *y = (uint16_t *)job->y + k * d;
    direct_finalize(x, d, code, job->w, &dv, y, (job->flags & TGN_STREAM_STORES) && (uintptr_t)y % 64 == 0, next);
    return 0;
#else
    (void)job, (void)k, (void)next;
    return -1;
#endif
}

int tgn_narrow_short_step(const tgn_narrow_t *job, int64_t i, int64_t m)
{
#if defined(TGN_WIDEN32) && TGN_QUOTIENT_LANES == LANES
    const tgn_rows_cfg_t *c = job->cfg;
    const int64_t d = c->hidden, code = c->x_dtype, n_full = d / c->chunk;
    const uint16_t *x = (const uint16_t *)job->x + i * d;
    float pre[8 * TGN_NARROW_SHORT_STEP], rms[TGN_NARROW_SHORT_STEP], rcp[2 * TGN_NARROW_SHORT_STEP];
    int tiny = 1;
    if (m > TGN_NARROW_SHORT_STEP || !tgn_narrow_chunks_f32(x, code, c->chunk, n_full * m, pre, &tiny) || tiny ||
        tgn_narrow_step_totals(c, pre, m, rms))
        return -1; /* (a count of chunks not whole eights, a tiny value, a NaN total) */
    tgn_narrow_divisors(rms, m, d, job->eps, rms, rcp);
    for (int64_t k = 0; k < m; ++k)
        if (!tgn_quotient_rms_in_range(rms[k]))
            return -1;
    if (job->total)
        memcpy((float *)job->total + i, rms, (size_t)m * sizeof(float));
    uint16_t *y = (uint16_t *)job->y + i * d;
    const int stream = (job->flags & TGN_STREAM_STORES) && (uintptr_t)y % 64 == 0; /* (then every row's is) */
    for (int64_t k = 0; k < m; ++k) {
        const tgn_q_div_t dv = tgn_q_from_pair(rms[k], rcp + 2 * k);
        direct_finalize(x + k * d, d, code, job->w, &dv, y + k * d, stream, 0);
    }
    return 0;
#else
    (void)job, (void)i, (void)m;
    return -1;
#endif
}
