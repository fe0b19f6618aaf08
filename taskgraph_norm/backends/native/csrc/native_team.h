/* What the team (native_team.c) and the jobs it runs (native_team_jobs.c) share: a
 * job, its parts, and the two calls between the files. */
#ifndef TGN_NATIVE_TEAM_H
#define TGN_NATIVE_TEAM_H

#include <stdatomic.h>
#include <stdint.h>

#include "tgn_native.h"

/* One part of a job's blocks: front (low 32 bits) and back (high 32 bits), the blocks
 * [front, back) not yet taken; a cache line each, so the owners do not share one. */
typedef struct {
    _Alignas(64) atomic_uint_fast64_t span;
    atomic_int_fast64_t back_next; /* the backward: the next block taken from the back to push */
} part_t;

#define MAX_PARTS 64 /* more threads than this steal only */

enum { JOB_FLOAT, JOB_EXACT, JOB_BACKWARD, JOB_EXACT_DW, JOB_NARROW, JOB_FN, JOB_FN_DW };

typedef struct {
    int kind; /* JOB_FLOAT: tgn_float_rows_f32; JOB_EXACT: tgn_exact_rows_f32; JOB_BACKWARD:
               * tgn_backward_rows_f32 (x, w, hidden, chunk, adds, n_adds, root and the
               * bw_ fields); JOB_EXACT_DW: the exact weight gradient, whose "rows" are
               * columns (x, row_stride, bw_dy, bw_rms and the dw_ fields); JOB_NARROW:
               * tgn_narrow_rows (narrow, rows) */
    const float *x;
    int64_t rows, hidden, row_stride, chunk;
    const int64_t *adds;
    int64_t n_adds, root;
    void *total; /* float per row, or a double pair per row (exact); NULL: not written */
    float *y;
    int64_t y_stride;
    const float *w;
    double eps;
    int64_t flags;
    double offset;
    const float *r;
    int64_t r_stride;
    float *h;
    int64_t h_stride;
    int64_t grain;
    int64_t n_parts;            /* the rows' blocks in n_parts contiguous parts */
    int (*thread_num)(void);    /* the OpenMP runtime's omp_get_thread_num, for this job */
    const float *bw_dy, *bw_rms;
    float *bw_dx;
    tgn_dw_stack_t *bw_stacks; /* the weight gradient's merge: part p's blocks from the front
                                * (its owner's) at 2p, those taken from its back at 2p + 1 */
    int64_t bw_exact;
    int64_t *bw_states; /* the fused exact dW (tgn_backward_exact_dw_f32_team): thread t's state
                         * at t * TGN_EXACT_STATE_WORDS(hidden), its span bw_spans[t] */
    int (*bw_spans)[3];
    int64_t dw_rows, dw_dy_stride, dw_stride;
    int64_t *dw_state;
    const tgn_narrow_t *narrow;
    tgn_rows_fn_t fn; /* JOB_FN: fn(ctx, i, n) runs the rows (tgn_team_rows) */
    tgn_rows_dw_fn_t fn_dw; /* JOB_FN_DW: fn_dw(ctx, i, n, dw) (tgn_team_rows_dw; hidden: the width) */
    const void *ctx;
    part_t *parts;
    atomic_int_fast64_t result; /* the sum of the blocks' return values */
    atomic_int failed;          /* a block's negative return (-1: no scratch), else 0 */
    /* A finish phase (the fused exact dW's merge of the threads' states): once every
     * block has run, the threads that ran the job claim its n_slabs slabs, each by
     * finish(finish_ctx, j, slab); NULL: none.  The blocks' count is n_blocks. */
    void (*finish)(void *ctx, const void *j, int64_t slab);
    void *finish_ctx;
    int64_t n_slabs, n_blocks;
    atomic_int_fast64_t blocks_done, next_slab;
} job_t;

/* Runs the job's rows on `threads` threads (the caller's included): in torch's OpenMP
 * team when there is one, else on the caller and native_team.c's worker. */
int64_t tgn_team_run(job_t *j, int64_t threads);

/* Rows [i, i + n) of the job, by its kind's kernel (native_team_jobs.c).  dw: the
 * stack a backward's blocks are pushed onto; who: the running thread's index in the
 * job (its own state in a fused exact dW). */
int64_t tgn_team_job_rows(const job_t *j, int64_t i, int64_t n, tgn_dw_stack_t *dw, int64_t who);

#endif /* TGN_NATIVE_TEAM_H */
