/* The jobs the team (native_team.c) runs: each kind's rows (tgn_team_job_rows: the
 * float and exact forward rows, the backward with its weight-gradient merge, the exact
 * weight gradient, the bf16/fp16 rows, any row kernel), and the entry points that make
 * a job and hand it to tgn_team_run (backends/native/team.py, direct.py, grads.py).
 * Every row is computed by the same kernel whichever thread runs it, so the bits do
 * not depend on the split (tests/test_native_team.py). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native_team.h"
#include "tgn_native.h"

/* dw: the stack a backward's blocks are pushed onto; who: the running thread's index
 * in the job (its own state in a fused exact dW). */
int64_t tgn_team_job_rows(const job_t *j, int64_t i, int64_t n, tgn_dw_stack_t *dw, int64_t who)
{
    if (j->kind == JOB_NARROW)
        return tgn_narrow_rows(j->narrow, i, n);
    if (j->kind == JOB_FN)
        return j->fn(j->ctx, i, n);
    if (j->kind == JOB_FN_DW)
        return j->fn_dw(j->ctx, i, n, dw);
    const float *r = j->r ? j->r + i * j->r_stride : 0;
    float *h = j->h ? j->h + i * j->h_stride : 0;
    float *y = j->y ? j->y + i * j->y_stride : 0;
    if (j->kind == JOB_EXACT_DW) /* columns [i, i + n): each column's state is one thread's */
        return j->bw_rms ? tgn_exact_dw_rows_f32(j->bw_dy + i, j->dw_dy_stride, j->x + i, j->row_stride, j->bw_rms,
                                                 j->dw_rows, n, j->dw_state + i, j->dw_stride)
                         : tgn_exact_dw_f32(j->bw_dy + i, j->dw_dy_stride, j->x + i, j->row_stride, j->dw_rows, n,
                                            j->dw_state + i, j->dw_stride);
    if (j->kind == JOB_BACKWARD) /* i is a multiple of the grain, so of the row block */
        return tgn_backward_rows_f32(j->x + i * j->hidden, j->bw_dy + i * j->hidden, j->w, j->bw_rms + i, n,
                                     j->hidden, j->chunk, j->adds, j->n_adds, j->root, j->bw_exact,
                                     j->bw_dx ? j->bw_dx + i * j->hidden : 0, i / TGN_BACKWARD_ROW_BLOCK, dw,
                                     (j->flags & TGN_STREAM_STORES) != 0,
                                     j->bw_states ? j->bw_states + who * TGN_EXACT_STATE_WORDS(j->hidden) : 0,
                                     j->bw_states ? j->bw_spans[who] : 0);
    if (j->kind == JOB_EXACT)
        return tgn_exact_rows_f32(j->x + i * j->row_stride, n, j->hidden, j->row_stride,
                                  j->total ? (double *)j->total + 2 * i : 0, y, j->y_stride, j->w, j->eps,
                                  j->flags, j->offset, r, j->r_stride, h, j->h_stride);
    return tgn_float_rows_f32(j->x + i * j->row_stride, n, j->hidden, j->row_stride, j->chunk, j->adds,
                              j->n_adds, j->root, j->total ? (float *)j->total + i : 0, y, j->y_stride, j->w,
                              j->eps, j->flags, j->offset, r, j->r_stride, h, j->h_stride);
}

/* The stacks of a backward's weight-gradient merge for `threads` threads (two per
 * part: a team has at most `threads` parts, the own worker's 2), into *n; NULL: no memory. */
static tgn_dw_stack_t *new_stacks(int64_t threads, int64_t *n)
{
    *n = 2 * (threads < 2 ? 2 : threads < MAX_PARTS ? threads : MAX_PARTS);
    tgn_dw_stack_t *stacks = (tgn_dw_stack_t *)malloc((size_t)*n * sizeof *stacks);
    for (int64_t k = 0; stacks && k < *n; ++k)
        stacks[k].n = 0;
    return stacks;
}

/* Onto part 0's front stack: each part's front nodes, then its back's (whose top is
 * the leftmost); folded into dw (`width` values) when the run succeeded; the stacks freed. */
static int64_t merge_stacks(const job_t *j, tgn_dw_stack_t *stacks, int64_t n_stacks, int64_t result,
                            int64_t width, float *dw)
{
    tgn_dw_stack_t *all = &stacks[0];
    for (int64_t p = 0; result >= 0 && p < j->n_parts; ++p) {
        tgn_dw_stack_t *front = &stacks[2 * p], *back = &stacks[2 * p + 1];
        for (int64_t e = 0; p > 0 && e < front->n; ++e)
            tgn_dw_push(all, front->node[e], width, 0);
        if (p > 0)
            front->n = 0;
        while (back->n > 0)
            tgn_dw_push(all, back->node[--back->n], width, 0);
    }
    if (result >= 0)
        result += tgn_dw_finish(all, width, dw);
    for (int64_t k = 0; k < n_stacks; ++k)
        tgn_dw_free(&stacks[k]);
    free(stacks);
    return result;
}

/* Runs job j on `threads` threads and, with dw, merges the nodes its blocks push (onto
 * stacks made here) and folds them into dw (`width` values); -1: no memory for them. */
static int64_t run_merged(job_t *j, int64_t threads, int64_t width, float *dw)
{
    int64_t n_stacks = 0;
    tgn_dw_stack_t *stacks = 0;
    if (dw && !(stacks = new_stacks(threads, &n_stacks)))
        return -1;
    j->bw_stacks = stacks;
    int64_t result = tgn_team_run(j, threads);
    return dw ? merge_stacks(j, stacks, n_stacks, result, width, dw) : result;
}

static int64_t whole_blocks(int64_t grain)
{
    grain = grain < 1 ? 1 : grain;
    return (grain + TGN_BACKWARD_ROW_BLOCK - 1) / TGN_BACKWARD_ROW_BLOCK * TGN_BACKWARD_ROW_BLOCK;
}

/* The backward's job (both entries below): blocks of `grain` rows rounded up to
 * whole row blocks; non-temporal stores for a dx of TGN_STREAM_BYTES or more. */
static job_t backward_job(const float *x, const float *dy, const float *w, const float *rms, int64_t rows,
                          int64_t hidden, int64_t chunk, const int64_t *adds, int64_t n_adds, int64_t root,
                          int64_t exact, float *dx, int64_t grain)
{
    grain = whole_blocks(grain);
    job_t j = {.kind = JOB_BACKWARD, .x = x, .rows = rows, .hidden = hidden, .row_stride = hidden, .chunk = chunk,
               .adds = adds, .n_adds = n_adds, .root = root, .w = w, .grain = grain, .bw_dy = dy, .bw_rms = rms,
               .bw_dx = dx, .bw_exact = exact,
               .flags = dx && rows * hidden * (int64_t)sizeof(float) >= TGN_STREAM_BYTES ? TGN_STREAM_STORES : 0};
    return j;
}

/* tgn_backward_rows_f32 on `threads` threads (ops/backward.py), in blocks of `grain`
 * rows, rounded up to a multiple of the backward's row block (each block sum is one
 * thread's), and, with dw, the weight gradient: the block sums merged as
 * kernels.merge_blocks_ merges them (native_backward.c), the parts' nodes pushed in
 * order onto one stack here and folded into dw.  A dx of TGN_STREAM_BYTES or more is
 * written with non-temporal stores, as the forward's output is.  Returns the rows with
 * a non-finite s or k plus the values of dw that are not finite, or -1 when a block
 * had no scratch. */
int64_t tgn_backward_rows_f32_team(const float *x, const float *dy, const float *w, const float *rms,
                                   int64_t rows, int64_t hidden, int64_t chunk, const int64_t *adds,
                                   int64_t n_adds, int64_t root, int64_t exact, float *dx, float *dw,
                                   int64_t grain, int64_t threads)
{
    if (rows <= 0)
        return 0;
    job_t j = backward_job(x, dy, w, rms, rows, hidden, chunk, adds, n_adds, root, exact, dx, grain);
    return run_merged(&j, threads, hidden, dw);
}

int64_t tgn_team_rows_dw(tgn_rows_dw_fn_t fn, const void *ctx, int64_t rows, int64_t width, float *out,
                         int64_t grain, int64_t threads)
{
    if (rows <= 0)
        return 0;
    job_t j = {.kind = JOB_FN_DW, .rows = rows, .hidden = width, .grain = whole_blocks(grain), .fn_dw = fn,
               .ctx = ctx};
    return run_merged(&j, threads, width, out);
}

/* The fused exact dW's finish phase (the team's threads share it by slabs of columns):
 * the threads' states merged into the call's state, normalised and, fresh with dw,
 * rounded; each column's digits are its own, so the slabs give the whole call's bits. */
typedef struct {
    int64_t *state, *states, n_states, hidden, slab, fresh;
    int (*spans)[3];
    float *dw;
    atomic_int_fast64_t over;
} dw_finish_t;

/* Columns below this many in a slab would cost more in claims than they save. */
#define DW_FINISH_MIN_SLAB 512

static void dw_finish_slab(void *ctx, const void *job, int64_t slab)
{
    dw_finish_t *f = (dw_finish_t *)ctx;
    const job_t *j = (const job_t *)job;
    int64_t c0 = slab * f->slab, n = f->hidden - c0 < f->slab ? f->hidden - c0 : f->slab;
    int ok = !atomic_load(&j->failed) && !atomic_load(&j->result), used[3];
    int64_t over = tgn_exact_dw_merge(f->state + c0, n, f->hidden, f->states + c0, f->n_states, f->spans,
                                      !ok ? 0 : f->fresh ? 2 : 1, used);
    if (over)
        atomic_fetch_add(&f->over, over);
    else if (ok && f->fresh && f->dw)
        tgn_exact_round_rows_f32(f->state + c0, n, f->hidden, 0, f->dw + c0, used[0], used[1], used[2]);
}

/* tgn_backward_rows_f32_team's dx (or none) with the exact weight gradient instead of
 * the float one: each thread adds the exact products dy * (x / rms) of its row blocks
 * into a state of its own right after their dx (native_dw_fused.c), and the states are
 * added into `state` (a normal (22, hidden) state), which is then normalised: by slabs
 * of columns that the team's threads claim once every row block has run (the job's
 * finish phase, dw_finish_slab; a call on one thread runs them all).  With
 * `fresh`, state's memory holds anything: it is written whole with this call's sum
 * alone (zero where nothing was added).  With `dw` (and `fresh`), the state's sums
 * correctly rounded to fp32 (tgn_exact_round_f32) are written into it, from the rows
 * the sum reached.  When a row is not finite (the return value counts them, as
 * tgn_backward_rows_f32_team's) or on an error, nothing is added to `state` (a fresh
 * one is zeroed) and dw is not written.  Returns those rows, -1 (no scratch), -2 (no
 * convergence) or -3 (a column overflowed: the caller raises). */
int64_t tgn_backward_exact_dw_f32_team(const float *x, const float *dy, const float *w, const float *rms,
                                       int64_t rows, int64_t hidden, int64_t chunk, const int64_t *adds,
                                       int64_t n_adds, int64_t root, int64_t exact, float *dx, int64_t *state,
                                       int64_t grain, int64_t threads, int64_t fresh, float *dw)
{
    if (rows <= 0)
        return 0;
    threads = threads < 1 ? 1 : threads < MAX_PARTS ? threads : MAX_PARTS;
    int64_t n_states = threads < 2 ? 1 : threads; /* every thread index a team gives is below it */
    int from_pool;
    int64_t *states = tgn_dw_states_take(n_states * TGN_EXACT_STATE_WORDS(hidden), &from_pool);
    int64_t result = -1, over = 0;
    if (states) {
        int spans[MAX_PARTS][3];
        for (int64_t t = 0; t < n_states; ++t) {
            spans[t][0] = TGN_EXACT_DIGITS;
            spans[t][1] = -1;
            spans[t][2] = 0;
        }
        /* two slabs a thread (whole 8-column groups for the rounding), at least DW_FINISH_MIN_SLAB wide */
        int64_t slab = (hidden + 2 * threads - 1) / (2 * threads);
        slab = slab < DW_FINISH_MIN_SLAB ? DW_FINISH_MIN_SLAB : (slab + 7) / 8 * 8;
        dw_finish_t f = {.state = state, .states = states, .n_states = n_states, .hidden = hidden, .slab = slab,
                         .fresh = fresh, .spans = spans, .dw = dw};
        job_t j = backward_job(x, dy, w, rms, rows, hidden, chunk, adds, n_adds, root, exact, dx, grain);
        j.bw_states = states;
        j.bw_spans = spans;
        j.finish = dw_finish_slab;
        j.finish_ctx = &f;
        j.n_slabs = (hidden + slab - 1) / slab;
        result = tgn_team_run(&j, threads);
        over = atomic_load(&f.over);
        tgn_dw_states_give(states, from_pool);
    }
    if (result != 0 && fresh) /* nothing added: a fresh state is zero */
        memset(state, 0, (size_t)TGN_EXACT_STATE_WORDS(hidden) * sizeof *state);
    return result != 0 ? result : over ? -3 : 0;
}

/* tgn_exact_dw_f32 (rms NULL: xh is x_hat) or tgn_exact_dw_rows_f32 (xh is x, divided
 * by rms[i] per row) on `threads` threads, in blocks of `grain` columns (a multiple of
 * the kernel's tile is best): columns are independent, each block's state is made by
 * one thread, so the state does not depend on the split.  Returns how many columns
 * overflowed, or a block's negative code (-1: no scratch). */
int64_t tgn_exact_dw_f32_team(const float *dy, int64_t dy_stride, const float *xh, int64_t xh_stride,
                              const float *rms, int64_t rows, int64_t cols, int64_t *state, int64_t stride,
                              int64_t grain, int64_t threads)
{
    if (rows <= 0 || cols <= 0)
        return 0;
    job_t j = {.kind = JOB_EXACT_DW, .x = xh, .rows = cols, .row_stride = xh_stride, .grain = grain, .bw_dy = dy,
               .bw_rms = rms, .dw_rows = rows, .dw_dy_stride = dy_stride, .dw_state = state, .dw_stride = stride};
    return tgn_team_run(&j, threads);
}

/* The direct path's call (direct.py): one configuration's constants, set once, and the
 * per-call pointers; the same arguments as native_module.c's `rows_call` (the fast entry
 * from Python).  total NULL: the rows' totals are not kept; else `total_flags` is added
 * to the flags (TGN_TOTAL_AS_RMS for float rows, TGN_TOTAL_ROUNDED for exact ones).
 * fp32 rows with an fp32 weight run the row kernels as they are; a weight of another
 * dtype (or one llama rounds, or an fp32 one with an offset beside narrow rows) is made
 * in fp32 first, once per call, and bf16/fp16 rows go through native_narrow.c.  An
 * output of TGN_STREAM_BYTES or more (fp32, bf16 or fp16) is written with non-temporal
 * stores (TGN_STREAM_STORES), unless `mapped`: y is a fresh output of TGN_HUGE_BYTES or
 * more, a fresh mapping whose pages fault in as the rows are written, which ordinary
 * stores wrote 10-24% faster (docs/performance.md, "Streaming stores"). */
int64_t tgn_rows_call(const tgn_rows_cfg_t *c, const void *x, void *y, int64_t rows, const void *w,
                      double eps, void *total, const void *r, void *h, int64_t threads, int64_t mapped)
{
    if (rows <= 0)
        return 0;
    int64_t d = c->hidden;
    int64_t flags = ((c->flags | (total ? c->total_flags : 0)) & ~(int64_t)TGN_TREE_ADDS) | tgn_rows_tree_flag(c);
    const float *wf = (const float *)w;
    float *made = 0;
    double offset = c->offset;
    const int narrow = c->x_dtype != TGN_DTYPE_F32 || c->y_dtype != TGN_DTYPE_F32;
    /* (native_narrow.c takes its weight with the offset added: RN(w + offset) in fp32,
     * the value the fp32 kernels' FINALIZE multiplies by) */
    if (w && (c->w_dtype != TGN_DTYPE_F32 || c->w_round != TGN_DTYPE_F32 || (narrow && offset != 0.0))) {
        made = (float *)malloc((size_t)d * sizeof(float));
        if (!made)
            return -1;
        tgn_narrow_weight(c, w, made); /* the offset included */
        wf = made;
        offset = 0.0;
    }
    int64_t result;
    if (!narrow) {
        if (y && !mapped && rows * d * (int64_t)sizeof(float) >= TGN_STREAM_BYTES)
            flags |= TGN_STREAM_STORES;
        job_t j = {.kind = c->exact ? JOB_EXACT : JOB_FLOAT, .x = (const float *)x, .rows = rows, .hidden = d,
                   .row_stride = d, .chunk = c->chunk, .adds = c->adds, .n_adds = c->n_adds, .root = c->root,
                   .total = total, .y = (float *)y, .y_stride = d, .w = wf, .eps = eps, .flags = flags,
                   .offset = offset, .r = (const float *)r, .r_stride = d, .h = (float *)h, .h_stride = d,
                   .grain = c->grain};
        result = tgn_team_run(&j, threads);
    } else {
        if (y && !mapped && rows * d * (c->y_dtype == TGN_DTYPE_F32 ? 4 : 2) >= TGN_STREAM_BYTES)
            flags |= TGN_STREAM_STORES;
        tgn_narrow_t n = {.cfg = c, .x = x, .r = r, .y = y, .h = h, .w = wf,
                          .w_clean = tgn_narrow_weight_clean(wf, d), .eps = eps, .flags = flags, .total = total};
        job_t j = {.kind = JOB_NARROW, .rows = rows, .grain = c->grain, .narrow = &n};
        result = tgn_team_run(&j, threads);
    }
    free(made);
    return result;
}

/* Any row kernel's rows on the team (native_layer.c's LayerNorm rows): fn(ctx, i, n). */
int64_t tgn_team_rows(tgn_rows_fn_t fn, const void *ctx, int64_t rows, int64_t grain, int64_t threads)
{
    if (rows <= 0)
        return 0;
    job_t j = {.kind = JOB_FN, .rows = rows, .grain = grain, .fn = fn, .ctx = ctx};
    return tgn_team_run(&j, threads);
}
