/* LayerNorm's float rows in C (backends/native/layer.py): the torch-ops backend's
 * float plan (backends/torch_ops/layer.py, kernels/layer.py's finalize_layer) row by
 * row, with the row in cache, bit for bit (tests/test_native_layer.py compares them):
 *
 *   s    = the plan's sum of x.to(fp32)          pairwise leaves, then the ADDs in order
 *   mean = s / D                                 (fp32; D rounded to fp32, a tensor divisor)
 *   d    = x - mean,  v = d * d                  each rounded once
 *   var  = the plan's sum of v                   the same leaves and ADDs
 *   den  = sqrt(var / D + eps)                   (eps rounded to fp32; the fp64 root of
 *                                                 an fp32 value, rounded: the IEEE one)
 *   y    = ((x - mean) / den) * w + b            w, b when given; rounded to x's dtype
 *
 * The leaves are tgn_chunk_sums_f32's (native.c: eight full power-of-two chunks at a
 * time where the build has the vector form) and this file's scalar halving for the
 * rest, the order of kernels.pairwise_halving_: while L > 1, h = ceil(L / 2), element
 * k < L - h becomes s[k] + s[k + h].  The squares are formed first (v), so their sum
 * is tgn_chunk_sums_f32 of v: the same bits as the forward's squares network, which
 * rounds each square before adding a pair.  The quotient is native_quotient.h's (IEEE
 * division's bits).  bf16 and fp16 rows are widened into fp32 scratch (an exact bf16 row
 * with its exponents' span), run through the same steps and rounded back (native_half.h's
 * c10 formulas; bf16's rounding fused into the quotient's loop, the same integer steps
 * per lane); the weight and bias, of x's dtype or fp32, are read as fp32: bf16 ones
 * widened lane by lane as the last pass loads them, fp16 ones once per call.
 *
 * A row whose y holds a NaN (a NaN or Inf input, den = 0, a NaN weight or bias, an
 * infinite one against a zero quotient or an opposite infinity) is counted and the
 * caller gives the whole call the torch-ops backend's bits (C's NaNs need not have
 * torch's signs and payloads).  The rows are shared by native_team.c's team
 * (tgn_team_rows): every row is computed the same way whichever thread runs it.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native_half.h"
#include "native_quotient.h"
#include "tgn_native.h"

#ifdef __FAST_MATH__
#error "native_layer.c must not be compiled with -ffast-math"
#endif

typedef struct {
    const void *x;
    void *y;
    int64_t hidden, chunk;
    const int64_t *adds;
    int64_t n_adds, root, code, exact, tree; /* tree: tgn_layer_tree, once per call */
    const void *w, *b; /* fp32, or bf16 with wbf */
    int wbf;
    float eps;
    float *mean, *den;
} layer_job_t;

/* kernels.pairwise_halving_ of src[0, length) (length >= 1), buf holding length / 2 + 1 values. */
static float halve(const float *src, int64_t length, float *buf)
{
    if (length == 1)
        return src[0];
    int64_t half = (length + 1) / 2;
    for (int64_t k = 0; k < length - half; ++k)
        buf[k] = src[k] + src[k + half];
    if (length & 1)
        buf[half - 1] = src[half - 1];
    for (length = half; length > 1; length = half) {
        half = (length + 1) / 2;
        float *restrict lo = buf;
        const float *restrict hi = buf + half;
        for (int64_t k = 0; k < length - half; ++k)
            lo[k] += hi[k];
    }
    return buf[0];
}

/* The plan's sum of v[0, hidden) (v is not changed): each chunk's leaf into slots
 * (n_chunks + n_adds values), then the ADDs; buf holds chunk / 2 + 1 values.  The
 * backward's row sums (native_layer_backward.c) are this too. */
/* The rest of that sum once chunks [0, from) are in slots: each later chunk halved (tail:
 * chunk from's first value), then the ADDs; the total.  tree (tgn_layer_tree): the ADDs
 * run as vectors (tgn_adds_tree_f32: the same additions), else as the loop of triples. */
static float sum_from(const float *tail, int64_t from, int64_t hidden, int64_t chunk, const int64_t *adds,
                      int64_t n_adds, int64_t root, float *buf, float *slots, int64_t tree)
{
    const int64_t n_chunks = (hidden + chunk - 1) / chunk;
    for (int64_t k = from; k < n_chunks; ++k) {
        const int64_t at = k * chunk;
        slots[k] = halve(tail + (at - from * chunk), hidden - at < chunk ? hidden - at : chunk, buf);
    }
    if (tree) {
        tgn_adds_tree_f32(slots, n_chunks);
        return slots[root];
    }
    for (int64_t t = 0; t < n_adds; ++t)
        slots[adds[3 * t]] = slots[adds[3 * t + 1]] + slots[adds[3 * t + 2]];
    return slots[root];
}

float tgn_layer_plan_sum(const float *v, int64_t hidden, int64_t chunk, const int64_t *adds, int64_t n_adds,
                         int64_t root, float *buf, float *slots, int64_t tree)
{
    const int64_t n_full = hidden / chunk, from = n_full ? tgn_chunk_sums_f32(v, chunk, n_full, slots) : 0;
    return sum_from(v + from * chunk, from, hidden, chunk, adds, n_adds, root, buf, slots, tree);
}

int64_t tgn_layer_tree(const int64_t *adds, int64_t n_adds, int64_t hidden, int64_t chunk, int64_t root)
{
    return tgn_tree_vectors(adds, n_adds, (hidden + chunk - 1) / chunk, root);
}

static float plan_sum(const layer_job_t *c, const float *v, float *buf, float *slots)
{
    return tgn_layer_plan_sum(v, c->hidden, c->chunk, c->adds, c->n_adds, c->root, buf, slots, c->tree);
}

#if TGN_QUOTIENT_LANES == 16
/* the lanes' unsigned minimum, and its reduction */
#define MIN_U32(a, b) _mm512_min_epu32((a), (b))
#define MIN_ALL(v) _mm512_reduce_min_epu32(v)
typedef __m512i tgn_qi_t;
#define QI_SET1 _mm512_set1_epi32
#define QI_OF(v) _mm512_castps_si512(v)
#define QI_AND _mm512_and_si512
#define QI_SUB _mm512_sub_epi32
#elif TGN_QUOTIENT_LANES == 8
#define MIN_U32(a, b) _mm256_min_epu32((a), (b))
typedef __m256i tgn_qi_t;
#define QI_SET1 _mm256_set1_epi32
#define QI_OF(v) _mm256_castps_si256(v)
#define QI_AND _mm256_and_si256
#define QI_SUB _mm256_sub_epi32
static inline uint32_t MIN_ALL(__m256i v)
{
    uint32_t o[8], m = UINT32_MAX;
    memcpy(o, &v, sizeof o);
    for (int k = 0; k < 8; ++k)
        m = o[k] < m ? o[k] : m;
    return m;
}
#endif

/* q rounded to bf16 lane by lane into y: tgn_f32_to_bf16's formula (native_half.h), the
 * same integer operations on each lane, so the same bits as narrowing afterwards. */
#if TGN_QUOTIENT_LANES == 16
static inline void store_bf16(uint16_t *y, __m512 q) { (void)tgn_store_bf16x16(y, q); }
#elif TGN_QUOTIENT_LANES == 8
static inline void store_bf16(uint16_t *y, __m256 q)
{
    const __m256i u = _mm256_castps_si256(q);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), odd), 16);
    /* (r < 2^16: packus's unsigned saturation never bites) */
    _mm_storeu_si128((__m128i *)y, _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}
#endif

/* Lanes of p (TGN_QUOTIENT_LANES values) widened to fp32: fp32 as they are, or bf16
 * (wbf: the weight and bias arrive in bf16) shifted into fp32's top half, exactly. */
#if TGN_QUOTIENT_LANES == 16
static inline __m512 load_wb(const void *p, int64_t j, const int wbf)
{
    if (!wbf)
        return _mm512_loadu_ps((const float *)p + j);
    const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + j));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#define ANY_NAN(q) ((int)_mm512_cmp_ps_mask((q), (q), _CMP_UNORD_Q))
#elif TGN_QUOTIENT_LANES == 8
static inline __m256 load_wb(const void *p, int64_t j, const int wbf)
{
    if (!wbf)
        return _mm256_loadu_ps((const float *)p + j);
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + j));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#define ANY_NAN(q) _mm256_movemask_ps(_mm256_cmp_ps((q), (q), _CMP_UNORD_Q))
#endif

static inline float scalar_wb(const void *p, int64_t j, const int wbf)
{
    return wbf ? tgn_bf16_to_f32(((const uint16_t *)p)[j]) : ((const float *)p)[j];
}

/* y = ((x - mean) / den) * w + b over one row (w, b NULL or of fp32, or of bf16 with
 * wbf), into fp32 y, or with bf16 rounded into the bf16 row y (the narrowing pass
 * fused); returns 1 when a quotient is NaN (a NaN or an infinite weight or bias: the
 * caller checks mean and den, so nothing else makes one).  ranged: every x - mean is
 * +-0 or at least 2^-50 in magnitude (squares() says), so with den in range the
 * quotient needs no range check (native_quotient.h: |x - mean| <= sqrt(D) den <= 2^60). */
static inline __attribute__((always_inline)) int finish_vectors(const float *x, void *yv, const void *w,
                                                                const void *b, int64_t n, float mean, float den,
                                                                const int ranged, const int bf16, const int wbf)
{
    float *y = (float *)yv;
    uint16_t *yh = (uint16_t *)yv;
    int64_t j = 0;
    int nan = 0;
#if TGN_QUOTIENT_LANES > 1
    if (tgn_quotient_rms_in_range(den)) {
        const tgn_q_div_t dv = tgn_q_setup(den);
        const TGN_QV m = TGN_Q_SET1(mean);
        for (; j + TGN_QUOTIENT_LANES <= n; j += TGN_QUOTIENT_LANES) {
            TGN_QV a = TGN_Q_SUB(TGN_Q_LOAD(x + j), m);
            TGN_QV q = ranged ? tgn_q_vec_ranged(&dv, a) : tgn_q_vec(&dv, a);
            if (w)
                q = TGN_Q_MUL(q, load_wb(w, j, wbf));
            if (b)
                q = TGN_Q_ADD(q, load_wb(b, j, wbf));
            if (w || b)
                nan |= ANY_NAN(q);
            if (bf16)
                store_bf16(yh + j, q);
            else
                TGN_Q_STORE(y + j, q);
        }
    }
#else
    (void)ranged;
#endif
    for (; j < n; ++j) {
        float q = (x[j] - mean) / den;
        if (w)
            q = q * scalar_wb(w, j, wbf);
        if (b)
            q = q + scalar_wb(b, j, wbf);
        nan |= q != q;
        if (bf16)
            yh[j] = tgn_f32_to_bf16(q);
        else
            y[j] = q;
    }
    return nan != 0;
}

static int finish_row(const float *x, void *y, const void *w, const void *b, int64_t n, float mean, float den,
                      int ranged, int bf16, int wbf)
{
    ranged = ranged && n < ((int64_t)1 << 38);
#define FINISH(r, h)                                                        \
    (wbf ? finish_vectors(x, y, w, b, n, mean, den, (r), (h), 1)           \
         : finish_vectors(x, y, w, b, n, mean, den, (r), (h), 0))
    if (bf16)
        return ranged ? FINISH(1, 1) : FINISH(0, 1);
    return ranged ? FINISH(1, 0) : FINISH(0, 0);
#undef FINISH
}

/* sq = (x - mean)^2 (square) or x - mean, each difference and square rounded once;
 * returns 1 when no difference is tiny (nonzero, below 2^-50 in magnitude: tgn_q_vec_ranged's range). */
static inline __attribute__((always_inline)) int deviations(const float *x, float mean, float *sq, int64_t n,
                                                            const int square)
{
    int64_t j = 0;
    uint32_t low = UINT32_MAX; /* the smallest |x - mean| bits less one (0 wraps) */
#if TGN_QUOTIENT_LANES > 1
    const TGN_QV m = TGN_Q_SET1(mean);
    const tgn_qi_t mag = QI_SET1(0x7fffffff), one = QI_SET1(1);
    tgn_qi_t lo = QI_SET1(-1);
    for (; j + TGN_QUOTIENT_LANES <= n; j += TGN_QUOTIENT_LANES) {
        TGN_QV v = TGN_Q_SUB(TGN_Q_LOAD(x + j), m);
        lo = MIN_U32(lo, QI_SUB(QI_AND(QI_OF(v), mag), one));
        TGN_Q_STORE(sq + j, square ? TGN_Q_MUL(v, v) : v);
    }
    low = MIN_ALL(lo);
#endif
    for (; j < n; ++j) {
        float v = x[j] - mean;
        uint32_t u = (tgn_bits_of(v) & 0x7fffffffu) - 1u;
        low = u < low ? u : low;
        sq[j] = square ? v * v : v;
    }
    return low >= TGN_Q_LO - 1u;
}

static int squares(const float *x, float mean, float *sq, int64_t n) { return deviations(x, mean, sq, n, 1); }

/* The plan's sum of the squared deviations (x - mean)^2 as plan_sum(squares()) gives it,
 * with the leading groups of eight full chunks formed and summed in one pass
 * (tgn_chunk_sqdev_f32) and the rest from the squares; NaN where that form does not
 * run.  The caller needs no range test of the deviations for |mean| >= 2^-26: each
 * x - mean is then +-0 or at least 2^-50 in magnitude (finish_vectors' ranged).  If
 * ulp(x) >= 2^-50, both operands are multiples of 2^-50 (ulp(mean) >= 2^-49), so is
 * their difference; otherwise |x| < 2^-27 and |x - mean| >= 2^-26 - 2^-27. */
static float variance_fused(const layer_job_t *c, const float *x, float mean, float *buf, float *slots, float *sq)
{
    const int64_t d = c->hidden, n_full = d / c->chunk;
    const int64_t done = n_full >= 8 ? tgn_chunk_sqdev_f32(x, mean, c->chunk, n_full, slots) : 0;
    if (!done)
        return NAN;
    const int64_t start = done * c->chunk;
    if (start < d)
        squares(x + start, mean, sq, d - start);
    return sum_from(sq, done, d, c->chunk, c->adds, c->n_adds, c->root, buf, slots, c->tree);
}

/* An exact plan's mean and variance total of one row (native_layer_exact.c: the torch
 * form's exact pairs, the mean correctly rounded, the total rounded once: from an exact
 * plain sum where a bf16 row's span (tgn_widen_bf16_span; else -1) allows, else from one a
 * bound proves, else the pair); dev: the deviations' scratch.  Returns 0 for a row the
 * torch ops must take (no scale: an Inf or a NaN; a mean at the end of the range). */
static int exact_stats(const float *x, int64_t d, int64_t span, float *dev, float *mean, float *var, int *ranged)
{
    double t1, t2;
    if (!(span >= 0 && tgn_mean_span_f32(x, d, (uint32_t)span, mean)) && !tgn_mean_total_f32(x, d, mean)) {
        if (!tgn_exact_pair_f32(x, 0, d, &t1, &t2))
            return 0;
        *mean = tgn_mean_exact_f32(t1, t2, d);
        if (!isfinite(*mean))
            return 0;
    }
    if (fabsf(*mean) >= 0x1p-26f) { /* no range test (variance_fused says why), no row of deviations */
        *ranged = 1;
        if (tgn_dev_total_f32(x, *mean, d, var))
            return 1; /* (the pair's rounding, proved from a plain sum) */
        if (!tgn_exact_dev_pair_f32(x, *mean, d, &t1, &t2))
            return 0;
    } else {
        *ranged = deviations(x, *mean, dev, d, 0);
        if (!tgn_exact_pair_f32(dev, dev, d, &t1, &t2))
            return 0;
    }
    *var = tgn_round_pair_f32(t1, t2);
    return 1;
}

/* One fp32 row x into y (fp32, or with bf16 the bf16 row); sq: hidden values of scratch;
 * span: exact_stats'.  Returns 1 for a NaN row (or, exact, a row left to torch ops). */
static int layer_row(const layer_job_t *c, const float *x, void *y, float *buf, float *slots, float *sq,
                     int64_t i, int bf16, int64_t span)
{
    const int64_t d = c->hidden;
    float mean, var;
    int ranged;
    if (c->exact) {
        if (!exact_stats(x, d, span, sq, &mean, &var, &ranged))
            return 1;
    } else {
        mean = plan_sum(c, x, buf, slots) / (float)d;
        var = fabsf(mean) >= 0x1p-26f ? variance_fused(c, x, mean, buf, slots, sq) : NAN;
        ranged = 1; /* (see variance_fused) */
        if (var != var) { /* a tiny mean, a NaN, no vector form: the squares formed first */
            ranged = squares(x, mean, sq, d);
            var = plan_sum(c, sq, buf, slots);
        }
    }
    const float den = (float)sqrt((double)(var / (float)d + c->eps));
    if (c->mean)
        c->mean[i] = mean;
    if (c->den)
        c->den[i] = den;
    /* finite mean: every x finite; finite den > 0: every x - mean finite, so is each
     * quotient: a NaN in y comes from a weight or bias that is NaN or infinite, and
     * finish_row reports it (an overflow to Inf has IEEE's bits, torch's) */
    if (!(isfinite(mean) && isfinite(den) && den > 0.0f))
        return 1;
    return finish_row(x, y, c->w, c->b, d, mean, den, ranged, bf16, c->wbf);
}

void tgn_layer_narrow(const float *s, int64_t code, uint16_t *y, int64_t n)
{
    if (code == TGN_DTYPE_BF16)
        for (int64_t j = 0; j < n; ++j)
            y[j] = tgn_f32_to_bf16(s[j]);
    else
        for (int64_t j = 0; j < n; ++j)
            y[j] = tgn_f32_to_f16(s[j]);
}

/* Each thread's scratch for a job that needs at most LOCAL_FLOATS values (a row of 4096
 * bf16 values needs about 12.5K): no malloc and free per call, which a one-row call
 * shows.  A thread runs one job of this file at a time (the team's callback returns
 * before the next starts), so the scratch is never shared. */
enum { LOCAL_FLOATS = 16384 };
static _Thread_local float local_work[LOCAL_FLOATS];

/* Rows [i, i + n) of the job (the team's callback); returns the NaN rows, -1: no scratch. */
static int64_t layer_rows(const void *ctx, int64_t i, int64_t n)
{
    const layer_job_t *c = (const layer_job_t *)ctx;
    const int64_t d = c->hidden, narrow = c->code != TGN_DTYPE_F32, n_chunks = (d + c->chunk - 1) / c->chunk;
    const int64_t need = c->chunk / 2 + 1 + n_chunks + c->n_adds + d * (narrow ? 3 : 1);
    float *work = need <= LOCAL_FLOATS ? local_work : (float *)malloc((size_t)need * sizeof(float));
    if (!work)
        return -1;
    float *buf = work, *slots = buf + c->chunk / 2 + 1, *sq = slots + n_chunks + c->n_adds;
    int64_t bad = 0;
    for (int64_t end = i + n; i < end; ++i) {
        if (!narrow) {
            bad += layer_row(c, (const float *)c->x + i * d, (float *)c->y + i * d, buf, slots, sq, i, 0, -1);
            continue;
        }
        float *xs = sq + d, *ys = xs + d;
        const int64_t span = c->exact && c->code == TGN_DTYPE_BF16
                                 ? (int64_t)tgn_widen_bf16_span((const uint16_t *)c->x + i * d, d, xs) : -1;
        if (span < 0)
            tgn_widen_span(c->x, c->code, i * d, d, xs);
        const int bf16 = c->code == TGN_DTYPE_BF16; /* (rounded to bf16 as the quotients are made) */
        bad += layer_row(c, xs, bf16 ? (void *)((uint16_t *)c->y + i * d) : ys, buf, slots, sq, i, bf16, span);
        if (!bf16)
            tgn_layer_narrow(ys, c->code, (uint16_t *)c->y + i * d, d);
    }
    if (work != local_work)
        free(work);
    return bad;
}

int64_t tgn_layer_rows(const void *x, void *y, int64_t rows, int64_t hidden, int64_t chunk, const int64_t *adds,
                       int64_t n_adds, int64_t root, int64_t exact, const void *w, const void *b, double eps,
                       float *mean, float *den, int64_t x_dtype, int64_t w_dtype, int64_t grain, int64_t threads)
{
    if (rows <= 0)
        return 0;
    if (hidden < 1 || chunk < 1)
        return -2;
    /* an fp16 weight and bias widened once (bf16 ones are widened lane by lane as
     * finish_row loads them, exactly: the same values) */
    float *made = 0;
    if (w_dtype == TGN_DTYPE_F16 && (w || b)) {
        made = (float *)malloc(2 * (size_t)hidden * sizeof(float));
        if (!made)
            return -1;
        if (w)
            tgn_widen_span(w, w_dtype, 0, hidden, made);
        if (b)
            tgn_widen_span(b, w_dtype, 0, hidden, made + hidden);
    }
    layer_job_t c = {.x = x, .y = y, .hidden = hidden, .chunk = chunk, .adds = adds, .n_adds = n_adds,
                     .root = root, .exact = exact, .code = x_dtype, .w = made && w ? made : w,
                     .b = made && b ? made + hidden : b, .wbf = w_dtype == TGN_DTYPE_BF16, .eps = (float)eps,
                     .mean = mean, .den = den, .tree = tgn_layer_tree(adds, n_adds, hidden, chunk, root)};
    const int64_t result = tgn_team_rows(layer_rows, &c, rows, grain, threads);
    free(made);
    return result;
}
