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
 *
 * llama's bf16 rows with a weight (Mamba2's and Qwen3-Next's modules in bf16) take the
 * shortest loop, finish_llama_bf16: the roundings kept in fp32 lanes, one NaN test at
 * the end, y rounded by vcvtneps2bf16 where it is exact, and with the gate after the
 * norm silu gathered from the table in the loop itself (no s scratch).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native_finalize.h"
#include "native_half.h"
#include "tgn_native.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

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
    int w_nan;      /* whether w holds a NaN */
    double eps;
    int64_t g_dtype, groups, after;
    int64_t tree; /* tgn_rows_tree_flag(cfg), once per call */
} gated_job_t;

static inline int64_t size_of(int64_t code) { return code == TGN_DTYPE_F32 ? 4 : 2; }

/* The scalar form of one element's FINALIZE, gate after and store: q = h / rms (IEEE
 * division: the quotient tgn_quotient_row_f32_to and llama_row form), llama's rounding
 * of it to x's dtype, the product with the weight and its rounding, the gate, and y. */
static inline int finish1(float h, float s, const float *w, int64_t j, float rms, int64_t flags, int after,
                          int64_t y_code, void *y, int64_t at)
{
    const int f16 = (flags & TGN_ROUND_F16) != 0;
    float q = h / rms;
    int nan = q != q;
    if (flags & TGN_ROUND_QUOTIENT)
        q = round_llama(q, f16);
    if (w) {
        q = q * w[j];
        if (flags & TGN_ROUND_PRODUCT) {
            nan |= q != q;
            q = round_llama(q, f16);
        }
    }
    if (after)
        q = q * s;
    nan |= q != q;
    if (y_code == TGN_DTYPE_F32)
        ((float *)y)[at] = q;
    else
        ((uint16_t *)y)[at] = y_code == TGN_DTYPE_BF16 ? tgn_f32_to_bf16(q) : tgn_f32_to_f16(q);
    return nan;
}

#if defined(__AVX512F__)
static inline __m256i to_narrow(__m512 v, int f16)
{
    return f16 ? _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC) : tgn_bf16x16(v);
}

static inline __m512 from_narrow(__m256i b, int f16)
{
    return f16 ? _mm512_cvtph_ps(b) : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}
#endif

#if defined(__AVX512F__)
#define LANES_GATHER 1
#else
#define LANES_GATHER 0
#endif

#if defined(__AVX512F__)
/* fp32 lanes rounded to bf16 and widened back: from_narrow(tgn_bf16x16(v)) without the
 * narrowing (the same integer formula; the low half cleared instead of shifted out). */
static inline __m512 keep_bf16(__m512 v)
{
    __m512i u = _mm512_castps_si512(v);
    __mmask16 odd = _mm512_test_epi32_mask(u, _mm512_set1_epi32(0x10000)); /* bf16's last bit */
    u = _mm512_mask_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), odd, u, _mm512_set1_epi32(0x8000));
    return _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xFFFF0000u)));
}

/* llama's bf16 rows (x, y bf16) with a weight that holds no NaN (the caller tests it once
 * a call): finish_lanes with one NaN test, at the end.  h holds no NaN (its row's total
 * would be one), so a NaN made on the way is the default NaN (0/0, inf/inf, inf * 0),
 * which the roundings keep (their carry reaches the exponent only for a payload of eight
 * leading ones) and every later product keeps: the last value is NaN exactly when one
 * on the way was.  y's rounding and that test: tgn_store_bf16x16 (native_half.h). */
INLINE int64_t finish_llama_bf16(const float *h, const float *s, const float *w, int64_t n, float rms, int after,
                                 const uint16_t *g, const float *table, uint16_t *y, int *nan)
{
    const __m512 r = _mm512_set1_ps(rms);
    __mmask16 unordered = 0;
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
        __m512 q = keep_bf16(_mm512_div_ps(_mm512_loadu_ps(h + j), r));
        q = keep_bf16(_mm512_mul_ps(q, _mm512_loadu_ps(w + j)));
        if (after && g)
            q = _mm512_mul_ps(q, _mm512_i32gather_ps(
                                     _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(g + j))), table, 4));
        else if (after)
            q = _mm512_mul_ps(q, _mm512_loadu_ps(s + j));
        unordered |= tgn_store_bf16x16(y + j, q);
    }
    *nan = unordered != 0;
    return j;
}

/* finish_row's sixteen-lane loop with its options as arguments: inlined with constant
 * ones (finish_row's common cases), each becomes one loop without a branch. */
INLINE int64_t finish_lanes(const float *h, const float *s, const float *w, int64_t n, float rms, int f16,
                            int narrow_q, int narrow_p, int after, int narrow_y, int y16, void *y, int64_t at,
                            int *nan)
{
    const __m512 r = _mm512_set1_ps(rms);
    __mmask16 unordered = 0;
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
        __m512 q = _mm512_div_ps(_mm512_loadu_ps(h + j), r);
        unordered |= _mm512_cmp_ps_mask(q, q, _CMP_UNORD_Q);
        if (narrow_q)
            q = from_narrow(to_narrow(q, f16), f16);
        if (w) {
            q = _mm512_mul_ps(q, _mm512_loadu_ps(w + j));
            if (narrow_p) {
                unordered |= _mm512_cmp_ps_mask(q, q, _CMP_UNORD_Q);
                q = from_narrow(to_narrow(q, f16), f16);
            }
        }
        if (after)
            q = _mm512_mul_ps(q, _mm512_loadu_ps(s + j));
        unordered |= _mm512_cmp_ps_mask(q, q, _CMP_UNORD_Q);
        if (narrow_y)
            _mm256_storeu_si256((__m256i *)((uint16_t *)y + at + j), to_narrow(q, y16));
        else
            _mm512_storeu_ps((float *)y + at + j, q);
    }
    *nan = unordered != 0;
    return j;
}
#endif

/* One group row: finish1 on each of its n elements (sixteen lanes at a time where the
 * build has AVX-512: the same operations, each lane's own); returns whether a NaN was met. */
static int finish_row(const float *h, const float *s, const float *w, int64_t n, float rms, int64_t flags,
                      int after, int64_t y_code, int fast, const uint16_t *g, void *y, int64_t at)
{
    int64_t j = 0;
    int nan = 0;
#if defined(__AVX512F__)
    const int f16 = (flags & TGN_ROUND_F16) != 0, narrow_q = (flags & TGN_ROUND_QUOTIENT) != 0;
    const int narrow_p = w && (flags & TGN_ROUND_PRODUCT), narrow_y = y_code != TGN_DTYPE_F32;
    const int y16 = y_code == TGN_DTYPE_F16;
    if (fast && g)
        j = finish_llama_bf16(h, 0, w, n, rms, 1, g, tgn_silu_table(0), (uint16_t *)y + at, &nan);
    else if (fast)
        j = after ? finish_llama_bf16(h, s, w, n, rms, 1, 0, 0, (uint16_t *)y + at, &nan)
                  : finish_llama_bf16(h, s, w, n, rms, 0, 0, 0, (uint16_t *)y + at, &nan);
    else if (w && !f16 && narrow_q && narrow_p && narrow_y && !y16) /* llama's bf16 rows with a weight */
        j = after ? finish_lanes(h, s, w, n, rms, 0, 1, 1, 1, 1, 0, y, at, &nan)
                  : finish_lanes(h, s, w, n, rms, 0, 1, 1, 0, 1, 0, y, at, &nan);
    else
        j = finish_lanes(h, s, w, n, rms, f16, narrow_q, narrow_p, after, narrow_y, y16, y, at, &nan);
#endif
    for (; j < n; ++j)
        nan |= finish1(h[j], s[j], w, j, rms, flags, after, y_code, y, at + j);
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
    /* llama's bf16 rows with a NaN-free weight: finish_llama_bf16; with the gate after
     * and bf16 rows of whole vectors, it reads silu from the table itself */
    const int fast = job->w && !job->w_nan && c->flags == (TGN_ROUND_QUOTIENT | TGN_ROUND_PRODUCT) &&
                     c->x_dtype == TGN_DTYPE_BF16 && c->y_dtype == TGN_DTYPE_BF16;
    const int direct = LANES_GATHER && fast && job->after && job->g_dtype == TGN_DTYPE_BF16 && d % 16 == 0;
    int64_t bad = 0;
    for (int64_t k = i * groups, end = (i + n) * groups; k < end && !bad; k += step) {
        const int64_t m = end - k < step ? end - k : step, e0 = k * d, len = m * d;
        if (!direct && tgn_gate_silu(g + e0 * g_size, job->g_dtype, len, s, 0) < 0) {
            bad = -1;
            break;
        }
        tgn_widen_span(job->x, c->x_dtype, e0, len, h);
        if (!job->after)
            multiply(h, s, len);
        bad = tgn_float_rows_f32(h, m, d, d, c->chunk, c->adds, c->n_adds, c->root, rms, 0, 0, 0, job->eps,
                                 TGN_TOTAL_AS_RMS | job->tree, 0.0, 0, 0, 0, 0);
        if (bad)
            break; /* a NaN total (or no scratch: -1) */
        for (int64_t r = 0; r < m; ++r) {
            const float *w = job->w ? job->w + ((k + r) % groups) * d : 0;
            bad |= finish_row(h + r * d, s + r * d, w, d, rms[r], c->flags, (int)job->after, c->y_dtype, fast,
                              direct ? (const uint16_t *)job->g + e0 + r * d : 0, job->y, e0 + r * d);
        }
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
    int w_nan = 0;
    if (w) {
        tgn_rows_cfg_t whole = *c;
        whole.hidden = c->hidden * groups;
        made = (float *)malloc((size_t)whole.hidden * sizeof(float));
        if (!made)
            return -1;
        tgn_narrow_weight(&whole, w, made); /* w widened, + offset, rounded to w_round */
        for (int64_t j = 0; j < whole.hidden; ++j)
            w_nan |= made[j] != made[j];
    }
    gated_job_t job = {.cfg = c, .x = x, .g = g, .y = y, .w = made, .w_nan = w_nan, .eps = eps, .g_dtype = g_dtype,
                       .groups = groups, .after = after != 0, .tree = tgn_rows_tree_flag(c)};
    int64_t result = tgn_team_rows(gated_block, &job, rows, c->grain, threads);
    free(made);
    return result;
}
