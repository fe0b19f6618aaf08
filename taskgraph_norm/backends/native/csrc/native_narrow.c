/* The direct path's bf16 and fp16 rows (direct.py, native_team_jobs.c's tgn_rows_call): the
 * fp32 row kernels of native.c, between a widening and a narrowing done here.
 *
 * A team block's rows go through fp32 scratch a few at a time (about SCRATCH values,
 * so the scratch stays in L1 while the kernel reads it twice and writes it once):
 *
 *   s = x.to(fp32)                       exact; with a residual, h = (x + r) rounded
 *                                        to x's dtype is written to h and s = h.to(fp32)
 *                                        (torch's bf16/fp16 add: an fp32 add, rounded)
 *   the fp32 kernel on s, y over s       (or straight into an fp32 y: llama with an
 *                                        fp32 weight)
 *   y = s rounded to y's dtype           round to nearest even
 *
 * which are the compiled executor's steps (widen, the same kernel, torch's cast), so the
 * bits are the same.  Every conversion is written twice: in plain C (the portable build;
 * c10's own bit formulas, so torch's scalar casts) and with AVX-512 / F16C where the
 * build has them (the same roundings, vectorised; tests/test_native_narrow.py compares
 * the two builds).  Neither gives torch's bits for a NaN (torch's scalar and vector
 * casts of a NaN differ), so a row with a NaN in its result is counted and the caller
 * runs the general path; every row with a NaN total is counted by the kernel already.
 * The conversions and the FINALIZE into a narrow y are in native_narrow.h; the rows that
 * skip the scratch (tgn_narrow_rows takes them first where the plan allows) in
 * native_narrow_direct.c.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native_finalize.h"
#include "native_narrow.h"
#include "native_widen.h"
#include "tgn_native.h"

/* fp32 values of scratch per step: 16 KiB, which leaves room in L1 for the rows'
 * narrow input and output; a longer row gets one row of malloc'd scratch. */
#define SCRATCH 4096
#define MAX_STEP 256 /* rows per step at most (short rows) */

/* s = x.to(fp32), n values; returns 1 when none of them is tiny (tiny_lanes) */
static int widen(const uint16_t *x, int64_t code, float *s, int64_t n)
{
    int64_t j = 0;
    int tiny = 0;
#if defined(LANES)
    if (code == TGN_DTYPE_BF16) {
        /* tiny_lanes on the bf16 bits themselves, 32 at a time (tgn_widen32): |x| bits (x <<
         * 16) in [1, TGN_Q_LO) is |b| in [1, TGN_Q_LO >> 16) (TGN_Q_LO's low half is 0), so
         * the least |b| - 1 (unsigned: a zero wraps to the top) decides, compared once at
         * the end. */
        __mmask32 t = 0;
#if defined(TGN_WIDEN32)
        __m512i least = _mm512_set1_epi16(-1);
        for (; j + 2 * LANES <= n; j += 2 * LANES) {
            __m512 lo, hi;
            tgn_widen32(x + j, 1, &lo, &hi, &least);
            _mm512_storeu_ps(s + j, lo);
            _mm512_storeu_ps(s + j + LANES, hi);
        }
        t = _mm512_cmplt_epu16_mask(least, _mm512_set1_epi16((short)((TGN_Q_LO >> 16) - 1)));
#endif
        for (; j + LANES <= n; j += LANES) {
            __m512 v = load_bf16(x + j);
            t |= tiny_lanes(v);
            _mm512_storeu_ps(s + j, v);
        }
        tiny = t != 0;
    } else {
        for (; j + LANES <= n; j += LANES)
            _mm512_storeu_ps(s + j, load_narrow(x + j, code));
    }
#endif
    for (; j < n; ++j) {
        s[j] = widen1(x + j, code);
        tiny |= tiny1(s[j]);
    }
    return !tiny;
}

/* h = (x + r) rounded to the narrow dtype, and s = h.to(fp32), n values; returns 1 when
 * none of them is tiny */
static int add_residual(const uint16_t *x, const uint16_t *r, uint16_t *h, int64_t code, float *s, int64_t n)
{
    int64_t j = 0;
    int tiny = 0;
#if defined(LANES)
    __mmask16 t = 0;
    for (; j + LANES <= n; j += LANES) {
        __m256i hv = round_narrow(_mm512_add_ps(load_narrow(x + j, code), load_narrow(r + j, code)), code);
        _mm256_storeu_si256((__m256i *)(h + j), hv);
        __m512 v = load_narrow(h + j, code);
        t |= tiny_lanes(v);
        _mm512_storeu_ps(s + j, v);
    }
    tiny = t != 0;
#endif
    for (; j < n; ++j) {
        h[j] = narrow1(widen1(x + j, code) + widen1(r + j, code), code);
        s[j] = widen1(h + j, code);
        tiny |= tiny1(s[j]);
    }
    return !tiny;
}

void tgn_narrow_weight(const tgn_rows_cfg_t *c, const void *w, float *out)
{
    /* widened, + offset, rounded to w_round: each step a loop of its own with no branch
     * inside (the compiler vectorises them: a per-element branch and call cost a bf16
     * single row more than its kernel), the same operations on each value as one loop */
    const float off = (float)c->offset; /* torch adds a Python offset to a tensor as its dtype's opmath: fp32 */
    const int64_t n = c->hidden;
    tgn_widen_span(w, c->w_dtype, 0, n, out);
    if (off != 0.0f)
        for (int64_t j = 0; j < n; ++j)
            out[j] = out[j] + off;
    if (c->w_round == TGN_DTYPE_BF16)
        for (int64_t j = 0; j < n; ++j)
            out[j] = tgn_bf16_to_f32(tgn_f32_to_bf16(out[j]));
    else if (c->w_round != TGN_DTYPE_F32)
        for (int64_t j = 0; j < n; ++j)
            out[j] = tgn_f16_to_f32(tgn_f32_to_f16(out[j]));
}

int tgn_narrow_weight_clean(const float *w, int64_t n)
{
    int ok = 1;
    for (int64_t j = 0; w && j < n; ++j) {
        uint32_t u = tgn_bits_of(w[j]) & 0x7fffffffu;
        ok &= u == 0 || (u >= 0x30800000u && u < 0x7f800000u); /* 2^-30 <= |v| < inf */
    }
    return ok;
}

/* The kernel over `n` rows of fp32 scratch s (row i of the call first), FINALIZE into y
 * (s itself, or fp32 rows of the output; NULL: the totals only, into total). */
static int64_t kernel(const tgn_narrow_t *job, float *s, int64_t n, float *y, void *total, int64_t flags)
{
    const tgn_rows_cfg_t *c = job->cfg;
    int64_t d = c->hidden;
    if (c->exact)
        return tgn_exact_rows_f32(s, n, d, d, (double *)total, y, d, job->w, job->eps, flags, 0.0, 0, 0, 0, 0);
    return tgn_float_rows_f32(s, n, d, d, c->chunk, c->adds, c->n_adds, c->root, (float *)total, y, d, job->w,
                              job->eps, flags, 0.0, 0, 0, 0, 0);
}

/* Totals of m short rows of s (fewer than 8 full chunks each, none partial): every
 * chunk sum of the step at once, eight chunks at a time (tgn_full_chunks_f32 over the
 * rows one after another, as FLOAT_ROWS's blocked rows take them), then each row's
 * merges (tgn_narrow_step_totals).  The same additions as the kernel's; returns the rows
 * whose total is NaN, or -2 where the chunk length has no such sums (the kernel then
 * runs). */
static int64_t short_totals(const tgn_rows_cfg_t *c, const float *s, int64_t m, float *tot)
{
    const int64_t n_full = c->hidden / c->chunk;
    float pre[7 * MAX_STEP];
    if (!tgn_narrow_short_rows(c) || !tgn_full_chunks_f32(s, c->chunk, n_full * m, pre))
        return -2;
    return tgn_narrow_step_totals(c, pre, m, tot);
}

/* Rows [i, i + m) of the step in s: the kernel's sums (each row's total, or exact pair),
 * then FINALIZE and the narrowing in one pass per row. */
static int64_t fused_step(const tgn_narrow_t *job, float *s, int64_t i, int64_t m, double *pairs, float *rmss,
                          int ranged, int clean, const uint16_t *ahead, int64_t ahead_rows)
{
    const tgn_rows_cfg_t *c = job->cfg;
    const int64_t d = c->hidden;
    if (!c->exact) { /* totals, then every row's rms and reciprocal pair at once */
        float *rms = job->total ? (float *)job->total + i : rmss, rcp[2 * MAX_STEP];
        int64_t bad = m > 1 ? short_totals(c, s, m, rms) : -2;
        if (bad == -2)
            bad = kernel(job, s, m, 0, rms, job->flags & ~(int64_t)TGN_TOTAL_AS_RMS);
        if (bad < 0)
            return bad;
        tgn_narrow_divisors(rms, m, d, job->eps, rms, rcp);
        for (int64_t k = 0; k < m; ++k)
            bad += finalize_narrow(s + k * d, job->w, d, rms[k], rcp + 2 * k, c->y_dtype,
                                   (uint16_t *)job->y + (i + k) * d, ranged, clean,
                                   k < ahead_rows ? ahead + k * d : 0, job->flags);
        return bad;
    }
    void *total = job->total ? (void *)((double *)job->total + 2 * i) : (void *)pairs;
    /* (the exact pairs read below only as (float)(p[0] + p[1]), unless the caller keeps them) */
    int64_t bad = kernel(job, s, m, 0, total, job->flags | (job->total ? 0 : TGN_TOTAL_ROUNDED));
    if (bad < 0)
        return bad;
    for (int64_t k = 0; k < m; ++k) {
        const double *p = (const double *)total + 2 * k;
        if (p[0] != p[0]) /* no scale, or a NaN: counted by the kernel */
            continue;
        float rms = rms_of_total_float((float)(p[0] + p[1]), d, job->eps); /* the pair's one rounding */
        bad += finalize_narrow(s + k * d, job->w, d, rms, 0, c->y_dtype, (uint16_t *)job->y + (i + k) * d, ranged,
                               clean, k < ahead_rows ? ahead + k * d : 0, job->flags);
    }
    return bad;
}

static int64_t scratch_rows(const tgn_narrow_t *job, int64_t i, int64_t n);

int64_t tgn_narrow_rows(const tgn_narrow_t *job, int64_t i, int64_t n)
{
    const int64_t d = job->cfg->hidden;
    int64_t bad = 0;
    if (tgn_narrow_direct_plan(job)) { /* long rows without the scratch (native_narrow_direct.c) */
        for (int64_t k = i; k < i + n && bad >= 0; ++k) {
            const uint16_t *next = k + 1 < i + n ? (const uint16_t *)job->x + (k + 1) * d : 0;
            if (tgn_narrow_direct_row(job, k, next) < 0) {
                int64_t got = scratch_rows(job, k, 1);
                bad = got < 0 ? got : bad + got;
            }
        }
    } else if (tgn_narrow_short_plan(job)) { /* short ones, a step at a time */
        for (int64_t k = i; k < i + n && bad >= 0; k += TGN_NARROW_SHORT_STEP) {
            const int64_t m = i + n - k < TGN_NARROW_SHORT_STEP ? i + n - k : TGN_NARROW_SHORT_STEP;
            if (tgn_narrow_short_step(job, k, m) < 0) {
                int64_t got = scratch_rows(job, k, m);
                bad = got < 0 ? got : bad + got;
            }
        }
    } else {
        return scratch_rows(job, i, n);
    }
    if (job->flags & TGN_STREAM_STORES)
        tgn_store_fence();
    return bad;
}

/* The rows through the fp32 scratch, a step of rows at a time */
static int64_t scratch_rows(const tgn_narrow_t *job, int64_t i, int64_t n)
{
    const tgn_rows_cfg_t *c = job->cfg;
    const int64_t d = c->hidden, code = c->x_dtype, narrow_y = c->y_dtype != TGN_DTYPE_F32;
    float small[SCRATCH];
    float *s = d <= SCRATCH ? small : (float *)malloc((size_t)d * sizeof(float));
    if (!s)
        return -1;
    const int64_t step = d > SCRATCH ? 1 : SCRATCH / d < MAX_STEP ? SCRATCH / d : MAX_STEP; /* rows per step */
    /* llama's roundings keep the kernel's own FINALIZE (into s, then narrowed) */
    const int fused = narrow_y && !(job->flags & (TGN_ROUND_QUOTIENT | TGN_ROUND_PRODUCT));
    const int clean = fused && job->w_clean;
    double pairs[2 * MAX_STEP];
    float rmss[MAX_STEP];
    int64_t bad = 0;
    for (int64_t end = i + n; i < end; i += step) {
        int64_t m = end - i < step ? end - i : step;
        const uint16_t *x = (const uint16_t *)job->x + i * d;
        int ranged = job->r ? add_residual(x, (const uint16_t *)job->r + i * d, (uint16_t *)job->h + i * d, code,
                                           s, m * d)
                            : widen(x, code, s, m * d);
        int64_t got;
        if (fused)
            got = fused_step(job, s, i, m, pairs, rmss, ranged, clean, x + m * d,
                             end - i - m < m ? end - i - m : m); /* the next step's x, fetched meanwhile */
        else {
            void *total = job->total ? (c->exact ? (void *)((double *)job->total + 2 * i)
                                                 : (void *)((float *)job->total + i)) : 0;
            /* (never streaming into the scratch) */
            got = kernel(job, s, m, narrow_y ? s : (float *)job->y + i * d, total,
                         narrow_y ? job->flags & ~(int64_t)TGN_STREAM_STORES : job->flags);
            for (int64_t k = 0; narrow_y && got >= 0 && k < m; ++k)
                got += narrow(s + k * d, c->y_dtype, (uint16_t *)job->y + (i + k) * d, d);
        }
        if (got < 0) {
            bad = got;
            break;
        }
        bad += got;
    }
    if (job->flags & TGN_STREAM_STORES)
        tgn_store_fence();
    if (s != small)
        free(s);
    return bad;
}
