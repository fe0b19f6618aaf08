/* The team that shares one forward call's rows (backends/native/team.py,
 * direct.py): `threads` threads run blocks of `grain` rows with the row kernels.
 * Every row is computed by the same kernel whichever thread runs it, so the bits do
 * not depend on the split (tests/test_native_team.py).
 *
 * Who runs which rows: thread t owns the t-th of `threads` contiguous parts of the
 * rows (the split torch's at::parallel_for makes, so each core finds in its own cache
 * the rows torch's previous op left there, and its own rows of the last call), and
 * runs its blocks front to back; a thread done with its part steals the other parts'
 * blocks from their backs, one at a time, so a thread that wakes late (an idle
 * OpenMP thread asleep, a preempted one) delays nobody.  Each part is one atomic word
 * (front and back block, 32 bits each) changed by compare-and-swap.  Owned parts,
 * rather than one shared counter of blocks, keep each row on the core whose cache
 * holds it (docs/performance.md, "How the rows are shared").
 *
 * The threads are:
 *
 * - torch's own OpenMP team, when team.py hands us its runtime's GOMP_parallel and
 *   omp_get_thread_num (tgn_team_use_openmp): our rows run on the threads torch's ops
 *   run on, with no second pool fighting torch's spinning OpenMP threads for the cores;
 * - otherwise, and always in a forked child (where the parent's OpenMP runtime can
 *   hang), the caller (part 0) and one worker thread of this file's own (part 1).
 *   Handing work to a Python thread costs about 100 us on a 2-core VM; here the caller
 *   posts the job (a generation number, under a mutex so a sleeping worker is never
 *   missed) and starts on its part at once; the worker, spinning for SPIN_NS after its
 *   last job or woken from its condition variable, joins.  Once no block is left
 *   the caller closes the job and returns when the worker is out of it (so the
 *   worker never touches a job whose caller has returned), spinning briefly and then
 *   sleeping, so that a preempted worker can run on the caller's core.  One caller at
 *   a time owns the worker (`owner`); another thread that calls meanwhile runs all its
 *   rows itself.
 *
 * Fork: the worker thread does not exist in a forked child; pthread_atfork resets
 * the team there (and leaves OpenMP), and the child's first call starts its own worker.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#include "tgn_native.h"

/* One part of a job's blocks: front (low 32 bits) and back (high 32 bits), the blocks
 * [front, back) not yet taken; a cache line each, so the owners do not share one. */
typedef struct {
    _Alignas(64) atomic_uint_fast64_t span;
    atomic_int_fast64_t back_next; /* the backward: the next block taken from the back to push */
} part_t;

#define MAX_PARTS 64 /* more threads than this steal only */
#define MAX_BLOCKS (INT64_C(1) << 31)

#define SPIN_NS 50000 /* how long an idle worker spins before it sleeps (back-to-back calls) */
#define WAIT_SPIN_NS 20000 /* how long a caller spins for the worker's last block before it sleeps */

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
} job_t;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;      /* the worker sleeps on it */
static pthread_cond_t left_cv = PTHREAD_COND_INITIALIZER; /* a caller waits on it for the worker to leave */
static atomic_int caller_waits;    /* a caller sleeps on left_cv */
static atomic_int owner;           /* 1 while a caller holds the team */
static atomic_int started;         /* the worker thread exists */
static atomic_uint_fast64_t posted; /* generation of the job posted last */
static job_t *volatile job;        /* read after `posted` (acquire) */
static atomic_int open_job;        /* the posted job may be claimed from */
static atomic_int inside;          /* the worker is between its check of open_job and leaving */
static atomic_int_fast64_t worker_rows; /* rows threads other than the caller ran, ever (tests read it) */

/* torch's OpenMP runtime, when it has one (tgn_team_use_openmp): GOMP_parallel. */
typedef void (*gomp_parallel_t)(void (*)(void *), void *, unsigned, unsigned);
static gomp_parallel_t gomp_parallel;
static int (*omp_thread_num)(void);
static atomic_int forked;          /* this process is a forked child: OpenMP may hang here */
static _Thread_local int is_caller; /* set on the calling thread during an OpenMP job */

static inline void relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static int64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* dw: the stack a backward's blocks are pushed onto; who: the running thread's index
 * in the job (its own state in a fused exact dW). */
static int64_t run_rows(const job_t *j, int64_t i, int64_t n, tgn_dw_stack_t *dw, int64_t who)
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

/* Runs one block of part p (mine: from its front, else from its back); returns its rows.
 * A backward's blocks from a part's front go on the part's front stack; one taken from
 * its back makes its nodes on a stack of its own, waits until the blocks after it taken
 * from that back are pushed (by their threads, each one block), and pushes its nodes
 * there from the back. */
static int64_t run_block(job_t *j, int64_t block, int64_t p, int mine, int64_t who)
{
    int64_t i = block * j->grain;
    int64_t n = j->rows - i < j->grain ? j->rows - i : j->grain;
    int64_t got;
    if (j->bw_stacks && !mine) {
        tgn_dw_stack_t own;
        own.n = 0;
        got = run_rows(j, i, n, &own, who);
        atomic_int_fast64_t *next = &j->parts[p].back_next;
        for (int spins = 0; atomic_load(next) != block; ++spins) {
            relax();
            if ((spins & 1023) == 1023)
                sched_yield(); /* the thread before may be preempted */
        }
        tgn_dw_stack_t *back = &j->bw_stacks[2 * p + 1];
        while (own.n > 0)
            tgn_dw_push(back, own.node[--own.n], j->hidden, 1);
        atomic_store(next, block - 1);
    } else {
        got = run_rows(j, i, n, j->bw_stacks ? &j->bw_stacks[2 * p] : 0, who);
    }
    if (got < 0)
        atomic_store(&j->failed, (int)got); /* -1: no scratch (the exact dW: -2, no convergence) */
    else
        atomic_fetch_add(&j->result, got);
    return n;
}

static inline uint64_t span_of(uint64_t front, uint64_t back) { return front | back << 32; }

/* Run part `own`'s blocks from its front, then steal the other parts' blocks from
 * their backs until none is left; returns the rows run.  `own` >= n_parts: steal only. */
static int64_t claim(job_t *j, int64_t own)
{
    int64_t ran = 0;
    for (int64_t k = 0; k < j->n_parts; ++k) {
        int64_t p = own < j->n_parts ? (own + k) % j->n_parts : k;
        atomic_uint_fast64_t *span = &j->parts[p].span;
        uint64_t s = atomic_load(span);
        for (;;) {
            uint64_t front = s & 0xffffffffu, back = s >> 32;
            if (front >= back)
                break;
            int mine = p == own;
            uint64_t taken = mine ? front : back - 1;
            if (!atomic_compare_exchange_weak(span, &s, mine ? span_of(front + 1, back) : span_of(front, back - 1)))
                continue; /* s now holds the part's new span */
            ran += run_block(j, (int64_t)taken, p, mine, own);
            s = atomic_load(span);
        }
    }
    return ran;
}

static void *worker(void *unused)
{
    (void)unused;
    uint_fast64_t seen = atomic_load(&posted);
    for (;;) {
        int64_t until = now_ns() + SPIN_NS;
        for (int spins = 0; atomic_load(&posted) == seen; ++spins) {
            relax();
            if ((spins & 255) == 255 && now_ns() > until) {
                pthread_mutex_lock(&mu);
                while (atomic_load(&posted) == seen)
                    pthread_cond_wait(&cv, &mu);
                pthread_mutex_unlock(&mu);
            }
        }
        seen = atomic_load(&posted);
        /* Dekker's handshake (sequentially consistent atomics): either this thread
         * sees the job closed and never touches it, or the caller sees `inside`
         * and waits until this thread has left the job. */
        atomic_store(&inside, 1);
        if (atomic_load(&open_job))
            atomic_fetch_add(&worker_rows, claim(job, 1));
        atomic_store(&inside, 0);
        if (atomic_load(&caller_waits)) {
            pthread_mutex_lock(&mu);
            pthread_cond_signal(&left_cv);
            pthread_mutex_unlock(&mu);
        }
    }
    return 0;
}

static void reset_in_child(void)
{
    atomic_store(&forked, 1);
    pthread_mutex_init(&mu, 0);
    pthread_cond_init(&cv, 0);
    pthread_cond_init(&left_cv, 0);
    atomic_store(&caller_waits, 0);
    atomic_store(&owner, 0);
    atomic_store(&started, 0);
    atomic_store(&open_job, 0);
    atomic_store(&inside, 0);
    atomic_store(&worker_rows, 0);
    tgn_dw_states_reset_in_child();
}

static pthread_once_t at_fork_once = PTHREAD_ONCE_INIT;
static void register_at_fork(void) { pthread_atfork(0, 0, reset_in_child); }

/* Starts the worker if it is not running; 0 if it cannot be started. */
static int ensure_worker(void)
{
    if (atomic_load(&started))
        return 1;
    pthread_once(&at_fork_once, register_at_fork);
    pthread_attr_t attr;
    pthread_t thread;
    if (pthread_attr_init(&attr))
        return 0;
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    int ok = pthread_create(&thread, &attr, worker, 0) == 0;
    pthread_attr_destroy(&attr);
    if (ok)
        atomic_store(&started, 1);
    return ok;
}

/* The worker is inside its last block (at most `grain` rows) or leaving: spin a
 * little, then sleep until it leaves.  Sleeping matters on a busy machine: the worker
 * may have been preempted inside its block (by torch's spinning OpenMP threads, say),
 * and a caller spinning on the other core would keep it from running there. */
static void wait_for_worker_to_leave(void)
{
    int64_t until = now_ns() + WAIT_SPIN_NS;
    for (int spins = 0; atomic_load(&inside); ++spins) {
        relax();
        if ((spins & 255) == 255 && now_ns() > until) {
            pthread_mutex_lock(&mu);
            atomic_store(&caller_waits, 1);
            while (atomic_load(&inside))
                pthread_cond_wait(&left_cv, &mu);
            atomic_store(&caller_waits, 0);
            pthread_mutex_unlock(&mu);
            return;
        }
    }
}

static void omp_body(void *arg)
{
    job_t *j = (job_t *)arg;
    int64_t ran = claim(j, is_caller ? 0 : j->thread_num());
    if (!is_caller)
        atomic_fetch_add(&worker_rows, ran);
}

/* Splits the job's blocks into n_parts contiguous parts (part t: blocks
 * [t B / n, (t + 1) B / n), as at::parallel_for splits a range). */
static void split(job_t *j, part_t *parts, int64_t n_parts)
{
    int64_t blocks = (j->rows + j->grain - 1) / j->grain;
    for (int64_t t = 0; t < n_parts; ++t) {
        atomic_init(&parts[t].span, span_of((uint64_t)(t * blocks / n_parts), (uint64_t)((t + 1) * blocks / n_parts)));
        atomic_init(&parts[t].back_next, (int_fast64_t)((t + 1) * blocks / n_parts - 1));
    }
    j->parts = parts;
    j->n_parts = n_parts;
}

/* Runs the job's rows on `threads` threads (the caller's included): in torch's OpenMP
 * team when there is one, else on the caller and this file's worker. */
static int64_t run_team(job_t *j, int64_t threads)
{
    if (j->grain < 1)
        j->grain = 1;
    j->n_parts = 1; /* (a backward's stacks: part 0's unless split) */
    if (threads < 2 || j->rows <= j->grain)
        return run_rows(j, 0, j->rows, j->bw_stacks, 0); /* one thread, or too small to share */
    if ((j->rows + j->grain - 1) / j->grain > MAX_BLOCKS)
        j->grain = ((j->rows + MAX_BLOCKS - 1) / MAX_BLOCKS + TGN_BACKWARD_ROW_BLOCK - 1) / TGN_BACKWARD_ROW_BLOCK
                   * TGN_BACKWARD_ROW_BLOCK; /* block numbers fit 32 bits (and stay whole row blocks) */
    int64_t blocks = (j->rows + j->grain - 1) / j->grain;
    part_t parts[MAX_PARTS];
    gomp_parallel_t omp = gomp_parallel; /* read once: tgn_team_use_openmp may change them */
    j->thread_num = omp_thread_num;
    if (omp && j->thread_num && !atomic_load(&forked)) {
        int64_t team = threads < blocks ? threads : blocks;
        split(j, parts, team < MAX_PARTS ? team : MAX_PARTS);
        is_caller = 1;
        omp(omp_body, j, (unsigned)team, 0);
        is_caller = 0;
        return atomic_load(&j->failed) ? atomic_load(&j->failed) : atomic_load(&j->result);
    }
    if (atomic_exchange(&owner, 1))
        return run_rows(j, 0, j->rows, j->bw_stacks, 0); /* the team is busy with another caller's rows */
    if (!ensure_worker()) {
        atomic_store(&owner, 0);
        return run_rows(j, 0, j->rows, j->bw_stacks, 0);
    }
    split(j, parts, 2);
    job = j;
    atomic_store(&open_job, 1);
    pthread_mutex_lock(&mu);
    atomic_fetch_add(&posted, 1);
    pthread_cond_signal(&cv);
    pthread_mutex_unlock(&mu);
    claim(j, 0); /* returns once no block is left */
    atomic_store(&open_job, 0);
    wait_for_worker_to_leave();
    atomic_store(&owner, 0);
    return atomic_load(&j->failed) ? atomic_load(&j->failed) : atomic_load(&j->result);
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
    int64_t n_stacks = 0;
    tgn_dw_stack_t *stacks = 0;
    if (dw && !(stacks = new_stacks(threads, &n_stacks)))
        return -1;
    job_t j = backward_job(x, dy, w, rms, rows, hidden, chunk, adds, n_adds, root, exact, dx, grain);
    j.bw_stacks = stacks;
    int64_t result = run_team(&j, threads);
    return dw ? merge_stacks(&j, stacks, n_stacks, result, hidden, dw) : result;
}

int64_t tgn_team_rows_dw(tgn_rows_dw_fn_t fn, const void *ctx, int64_t rows, int64_t width, float *out,
                         int64_t grain, int64_t threads)
{
    if (rows <= 0)
        return 0;
    int64_t n_stacks = 0;
    tgn_dw_stack_t *stacks = 0;
    if (out && !(stacks = new_stacks(threads, &n_stacks)))
        return -1;
    job_t j = {.kind = JOB_FN_DW, .rows = rows, .hidden = width, .grain = whole_blocks(grain), .fn_dw = fn,
               .ctx = ctx, .bw_stacks = stacks};
    int64_t result = run_team(&j, threads);
    return out ? merge_stacks(&j, stacks, n_stacks, result, width, out) : result;
}

/* tgn_backward_rows_f32_team's dx (or none) with the exact weight gradient instead of
 * the float one: each thread adds the exact products dy * (x / rms) of its row blocks
 * into a state of its own right after their dx (native_dw_fused.c), and the states are
 * added into `state` (a normal (22, hidden) state), which is then normalised.  When a
 * row is not finite (the return value counts them, as tgn_backward_rows_f32_team's)
 * or on an error, nothing is added to `state`.  Returns those rows, -1 (no scratch),
 * -2 (no convergence) or -3 (a column overflowed: the caller raises). */
int64_t tgn_backward_exact_dw_f32_team(const float *x, const float *dy, const float *w, const float *rms,
                                       int64_t rows, int64_t hidden, int64_t chunk, const int64_t *adds,
                                       int64_t n_adds, int64_t root, int64_t exact, float *dx, int64_t *state,
                                       int64_t grain, int64_t threads)
{
    if (rows <= 0)
        return 0;
    threads = threads < 1 ? 1 : threads < MAX_PARTS ? threads : MAX_PARTS;
    int64_t n_states = threads < 2 ? 1 : threads; /* every thread index a team gives is below it */
    int from_pool;
    int64_t *states = tgn_dw_states_take(n_states * TGN_EXACT_STATE_WORDS(hidden), &from_pool);
    if (!states)
        return -1;
    int spans[MAX_PARTS][3];
    for (int64_t t = 0; t < n_states; ++t) {
        spans[t][0] = TGN_EXACT_DIGITS;
        spans[t][1] = -1;
        spans[t][2] = 0;
    }
    job_t j = backward_job(x, dy, w, rms, rows, hidden, chunk, adds, n_adds, root, exact, dx, grain);
    j.bw_states = states;
    j.bw_spans = spans;
    int64_t result = run_team(&j, threads);
    int64_t over = tgn_exact_dw_merge(state, hidden, states, n_states, spans, result == 0);
    tgn_dw_states_give(states, from_pool);
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
    return run_team(&j, threads);
}

/* The direct path's call (direct.py): one configuration's constants, set once, and
 * the per-call pointers; the same arguments as native_module.c's `rows_call` (the fast
 * entry from Python).  total NULL: the rows' totals are not kept; else `total_flags` is
 * added to the flags (TGN_TOTAL_AS_RMS for float rows).  fp32 rows with an fp32 weight
 * run the row kernels as they are; a weight of another dtype (or one llama rounds) is
 * made in fp32 first, once per call, and bf16/fp16 rows go through native_narrow.c.
 * An output of TGN_STREAM_BYTES or more (fp32, bf16 or fp16) is written with
 * non-temporal stores (TGN_STREAM_STORES). */
int64_t tgn_rows_call(const tgn_rows_cfg_t *c, const void *x, void *y, int64_t rows, const void *w,
                      double eps, void *total, const void *r, void *h, int64_t threads)
{
    if (rows <= 0)
        return 0;
    int64_t d = c->hidden, flags = c->flags | (total ? c->total_flags : 0);
    const float *wf = (const float *)w;
    float *made = 0;
    double offset = c->offset;
    if (w && (c->w_dtype != TGN_DTYPE_F32 || c->w_round != TGN_DTYPE_F32)) {
        made = (float *)malloc((size_t)d * sizeof(float));
        if (!made)
            return -1;
        tgn_narrow_weight(c, w, made); /* the offset included */
        wf = made;
        offset = 0.0;
    }
    int64_t result;
    if (c->x_dtype == TGN_DTYPE_F32 && c->y_dtype == TGN_DTYPE_F32) {
        if (y && rows * d * (int64_t)sizeof(float) >= TGN_STREAM_BYTES)
            flags |= TGN_STREAM_STORES;
        job_t j = {.kind = c->exact ? JOB_EXACT : JOB_FLOAT, .x = (const float *)x, .rows = rows, .hidden = d,
                   .row_stride = d, .chunk = c->chunk, .adds = c->adds, .n_adds = c->n_adds, .root = c->root,
                   .total = total, .y = (float *)y, .y_stride = d, .w = wf, .eps = eps, .flags = flags,
                   .offset = offset, .r = (const float *)r, .r_stride = d, .h = (float *)h, .h_stride = d,
                   .grain = c->grain};
        result = run_team(&j, threads);
    } else {
        if (y && rows * d * (c->y_dtype == TGN_DTYPE_F32 ? 4 : 2) >= TGN_STREAM_BYTES)
            flags |= TGN_STREAM_STORES;
        tgn_narrow_t n = {.cfg = c, .x = x, .r = r, .y = y, .h = h, .w = wf, .eps = eps, .offset = offset,
                          .flags = flags, .total = total};
        job_t j = {.kind = JOB_NARROW, .rows = rows, .grain = c->grain, .narrow = &n};
        result = run_team(&j, threads);
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
    return run_team(&j, threads);
}

/* How many rows threads other than the callers have run since the process (or
 * forked child) started: the tests check that the rows really are shared. */
int64_t tgn_team_worker_rows(void) { return atomic_load(&worker_rows); }

/* Whether the teams run in torch's OpenMP runtime now. */
int tgn_team_openmp(void) { return gomp_parallel && omp_thread_num && !atomic_load(&forked); }

/* Run the teams in torch's OpenMP runtime: `parallel` is its GOMP_parallel (libgomp's
 * entry, which LLVM's and Intel's runtimes export too) and `thread_num` its
 * omp_get_thread_num, found by team.py in the runtime torch already loaded; NULL goes
 * back to this file's worker thread.  Returns whether the OpenMP team is in use
 * (never in a forked child). */
int tgn_team_use_openmp(void *parallel, void *thread_num)
{
    pthread_once(&at_fork_once, register_at_fork); /* before the first OpenMP job, too */
    gomp_parallel = parallel && thread_num ? (gomp_parallel_t)parallel : 0;
    omp_thread_num = parallel && thread_num ? (int (*)(void))thread_num : 0;
    return tgn_team_openmp();
}
