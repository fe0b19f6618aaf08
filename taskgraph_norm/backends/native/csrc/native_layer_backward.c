/* LayerNorm's float backward in C (backends/native/layer_grads.py): the torch form of
 * kernels/layer_backward.py (the torch-ops backend's layer_backward) row by row, with
 * the row in cache, bit for bit (tests/test_native_layer_backward.py compares them).
 *
 * Per row, with the forward's mean and den = sqrt(var / D + eps) (fp32) and every step
 * an IEEE fp32 operation:
 *
 *   x_hat = (x - mean) / den                  (the forward's deviation, then a division)
 *   g     = dy * w                            (dy without a weight)
 *   mg    = plan_sum(g) / D                   the forward's leaves and ADDs (native_layer.c's
 *   mgx   = plan_sum(g * x_hat) / D           tgn_layer_plan_sum): batch-invariant; an exact
 *                                             plan: the exact sums (of g, of the fp64
 *                                             products g x_hat), each mean rounded once
 *                                             (native_layer_exact.c)
 *   dx    = ((g - mg) - x_hat * mgx) / den    rounded to x's dtype
 *
 * and the weight and bias gradients' rows, dy * x_hat and dy, summed over each block of
 * TGN_BACKWARD_ROW_BLOCK rows by pairwise halving over the rows, the block sums merged
 * as kernels.merge_blocks_ merges them (kernels.layer_backward.column_sum_blocks): one
 * node of `width` floats holds both (dW's values, then db's), merged element by element,
 * so each keeps its own order.  The rows are shared by native_team.c's team
 * (tgn_team_rows_dw, the RMSNorm backward's merge of the parts' block sums), so the
 * bits do not depend on the threads.  bf16 and fp16 rows are widened to fp32 and dx
 * rounded back (native_half.h's c10 formulas); the weight (x's dtype or fp32) is widened
 * once per call.  A row with a non-finite statistic or row sum, a NaN in dx, and a
 * non-finite value of dW or db are counted: the caller then gives the call the
 * torch-ops backend's bits (C's NaNs need not be torch's).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native_half.h"
#include "tgn_native.h"

#ifdef __FAST_MATH__
#error "native_layer_backward.c must not be compiled with -ffast-math"
#endif

typedef struct {
    const void *x, *dy;
    void *dx;
    const float *w, *mean, *den;
    int64_t hidden, chunk;
    const int64_t *adds;
    int64_t n_adds, root, exact, code, want_w, want_b, width, tree; /* tree: tgn_layer_tree */
} layer_bw_t;

enum { HALF = (TGN_BACKWARD_ROW_BLOCK + 1) / 2 };

/* One fp32 row: dx into dxr (NULL: none) and, with t, the row's dW/db terms into t (added
 * to t's values with `add`).  s: 3 * hidden floats of scratch, buf and slots the plan
 * sum's.  Returns how many things the caller must redo (0 or more). */
static int64_t bw_row(const layer_bw_t *c, const float *x, const float *dy, float mean, float den, float *dxr,
                      float *t, int add, float *s, float *buf, float *slots)
{
    const int64_t d = c->hidden;
    const float fd = (float)(double)d;
    float *restrict xh = s, *restrict g = s + d, *restrict p = s + 2 * d;
    int64_t bad = !(isfinite(mean) && isfinite(den) && den > 0.0f);
    for (int64_t j = 0; j < d; ++j)
        xh[j] = (x[j] - mean) / den;
    if (dxr) {
        if (c->w)
            for (int64_t j = 0; j < d; ++j)
                g[j] = dy[j] * c->w[j];
        else
            memcpy(g, dy, (size_t)d * sizeof(float));
        float mg, mgx;
        if (c->exact) { /* the exact sums of g and of the fp64 products g x_hat, each mean rounded once */
            double t1, t2, u1, u2;
            const int ok = tgn_exact_pair_f32(g, 0, d, &t1, &t2) && tgn_exact_pair_f32(g, xh, d, &u1, &u2);
            mg = ok ? tgn_mean_exact_f32(t1, t2, d) : NAN;
            mgx = ok ? tgn_mean_exact_f32(u1, u2, d) : NAN;
        } else {
            mg = tgn_layer_plan_sum(g, d, c->chunk, c->adds, c->n_adds, c->root, buf, slots, c->tree) / fd;
            for (int64_t j = 0; j < d; ++j)
                p[j] = g[j] * xh[j];
            mgx = tgn_layer_plan_sum(p, d, c->chunk, c->adds, c->n_adds, c->root, buf, slots, c->tree) / fd;
        }
        bad += !(isfinite(mg) && isfinite(mgx));
        int nan = 0;
        for (int64_t j = 0; j < d; ++j) {
            float v = ((g[j] - mg) - xh[j] * mgx) / den;
            nan |= v != v;
            dxr[j] = v;
        }
        bad += nan;
    }
    if (t) {
        float *restrict tw = t, *restrict tb = t + (c->want_w ? d : 0);
        if (c->want_w) {
            if (add)
                for (int64_t j = 0; j < d; ++j)
                    tw[j] = tw[j] + dy[j] * xh[j];
            else
                for (int64_t j = 0; j < d; ++j)
                    tw[j] = dy[j] * xh[j];
        }
        if (c->want_b) {
            if (add)
                for (int64_t j = 0; j < d; ++j)
                    tb[j] = tb[j] + dy[j];
            else
                memcpy(tb, dy, (size_t)d * sizeof(float));
        }
    }
    return bad;
}

/* Rows [i0, i0 + n) (i0 a multiple of the row block): dx and, with dw, each block's sum
 * pushed in order onto dw (the team's callback). */
static int64_t bw_rows(const void *ctx, int64_t i0, int64_t n, tgn_dw_stack_t *dw)
{
    const layer_bw_t *c = (const layer_bw_t *)ctx;
    const int64_t d = c->hidden, narrow = c->code != TGN_DTYPE_F32, w = c->width;
    const int64_t n_chunks = (d + c->chunk - 1) / c->chunk;
    const int64_t need = c->chunk / 2 + 1 + n_chunks + c->n_adds + d * (narrow ? 6 : 3) + (dw ? (HALF - 1) * w : 0);
    float *work = tgn_thread_scratch(need);
    if (!work)
        return -1;
    float *buf = work, *slots = buf + c->chunk / 2 + 1, *s = slots + n_chunks + c->n_adds;
    float *xs = s + 3 * d, *dys = xs + d, *dxs = dys + d, *half_rows = s + d * (narrow ? 6 : 3);
    int64_t bad = 0;
    for (int64_t b0 = i0; b0 < i0 + n; b0 += TGN_BACKWARD_ROW_BLOCK) {
        const int64_t in_block = i0 + n - b0 < TGN_BACKWARD_ROW_BLOCK ? i0 + n - b0 : TGN_BACKWARD_ROW_BLOCK;
        const int64_t h = (in_block + 1) / 2;
        float *lo[HALF];
        if (dw) { /* row q < h is kept in lo[q], row q >= h added to lo[q - h] as it is made */
            if (!(lo[0] = (float *)malloc((size_t)w * sizeof(float))))
                return -1;
            for (int64_t q = 1; q < h; ++q)
                lo[q] = half_rows + (q - 1) * w;
        }
        for (int64_t i = b0; i < b0 + in_block; ++i) {
            const int64_t q = i - b0;
            const float *xr = (const float *)c->x + i * d, *dyr = (const float *)c->dy + i * d;
            float *dxr = c->dx ? (float *)c->dx + i * d : 0;
            if (narrow) {
                tgn_widen_span(c->x, c->code, i * d, d, xs);
                tgn_widen_span(c->dy, c->code, i * d, d, dys);
                xr = xs, dyr = dys, dxr = c->dx ? dxs : 0;
            }
            bad += bw_row(c, xr, dyr, c->mean[i], c->den[i], dxr, dw ? lo[q < h ? q : q - h] : 0, q >= h, s, buf,
                          slots);
            if (narrow && c->dx)
                tgn_layer_narrow(dxs, c->code, (uint16_t *)c->dx + i * d, d);
        }
        if (!dw)
            continue;
        tgn_dw_halve(lo, h, w);
        tgn_dw_push(dw, (tgn_dw_node_t){0, b0 / TGN_BACKWARD_ROW_BLOCK, lo[0]}, w, 0);
    }
    return bad;
}

int64_t tgn_layer_backward(const void *x, const void *dy, void *dx, const void *w, const float *mean,
                           const float *den, int64_t rows, int64_t hidden, int64_t chunk, const int64_t *adds,
                           int64_t n_adds, int64_t root, int64_t exact, int64_t x_dtype, int64_t w_dtype,
                           int64_t want_w, int64_t want_b, float *dwb, int64_t grain, int64_t threads)
{
    if (rows <= 0)
        return 0;
    if (hidden < 1 || chunk < 1)
        return -2;
    float *made = 0;
    const float *wf = (const float *)w;
    if (w && w_dtype != TGN_DTYPE_F32) {
        if (!(made = (float *)malloc((size_t)hidden * sizeof(float))))
            return -1;
        tgn_widen_span(w, w_dtype, 0, hidden, made);
        wf = made;
    }
    want_w = dwb && want_w, want_b = dwb && want_b;
    layer_bw_t c = {.x = x, .dy = dy, .dx = dx, .w = wf, .mean = mean, .den = den, .hidden = hidden,
                    .chunk = chunk, .adds = adds, .n_adds = n_adds, .root = root, .exact = exact, .code = x_dtype,
                    .want_w = want_w, .want_b = want_b, .width = (want_w + want_b) * hidden,
                    .tree = tgn_layer_tree(adds, n_adds, hidden, chunk, root)};
    int64_t result = tgn_team_rows_dw(bw_rows, &c, rows, c.width, c.width ? dwb : 0, grain, threads);
    free(made);
    return result;
}
