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
 *
 * What the team runs (each job kind's rows, and the entry points that make the jobs)
 * is native_team_jobs.c; the job itself, native_team.h.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#include "native_team.h"
#include "tgn_native.h"

#define MAX_BLOCKS (INT64_C(1) << 31)

#define SPIN_NS 50000 /* how long an idle worker spins before it sleeps (back-to-back calls) */
#define WAIT_SPIN_NS 20000 /* how long a caller spins for the worker's last block before it sleeps */

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

/* A block's (or a lone run's) return value into the job: a negative one as its failure
 * (-1: no scratch; the exact dW: -2, no convergence), else added to its result. */
static inline void record(job_t *j, int64_t got)
{
    if (got < 0)
        atomic_store(&j->failed, (int)got);
    else
        atomic_fetch_add(&j->result, got);
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
        got = tgn_team_job_rows(j, i, n, &own, who);
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
        got = tgn_team_job_rows(j, i, n, j->bw_stacks ? &j->bw_stacks[2 * p] : 0, who);
    }
    record(j, got);
    atomic_fetch_add(&j->blocks_done, 1); /* (after its result: run_finish reads it) */
    return n;
}

/* The job's finish phase on this thread (one that ran the job, done claiming blocks):
 * wait until every block has run (the other threads' last blocks; yielding now and
 * then, for a preempted one), then claim slabs until none is left. */
static void run_finish(job_t *j)
{
    if (!j->finish)
        return;
    for (int spins = 0; atomic_load(&j->blocks_done) < j->n_blocks; ++spins) {
        relax();
        if ((spins & 1023) == 1023)
            sched_yield();
    }
    for (int64_t s; (s = atomic_fetch_add(&j->next_slab, 1)) < j->n_slabs;)
        j->finish(j->finish_ctx, j, s);
}

/* The job's rows on the calling thread alone, then every slab of its finish phase. */
static int64_t run_alone(job_t *j)
{
    int64_t got = tgn_team_job_rows(j, 0, j->rows, j->bw_stacks, 0);
    if (!j->finish)
        return got;
    record(j, got); /* (the finish phase reads it; the job's result starts at 0) */
    for (int64_t s = 0; s < j->n_slabs; ++s)
        j->finish(j->finish_ctx, j, s);
    return got;
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
        if (atomic_load(&open_job)) {
            atomic_fetch_add(&worker_rows, claim(job, 1));
            run_finish(job);
        }
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
    run_finish(j);
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
    j->n_blocks = blocks;
}

/* Runs the job's rows on `threads` threads (the caller's included): in torch's OpenMP
 * team when there is one, else on the caller and this file's worker. */
int64_t tgn_team_run(job_t *j, int64_t threads)
{
    if (j->grain < 1)
        j->grain = 1;
    j->n_parts = 1; /* (a backward's stacks: part 0's unless split) */
    if (threads < 2 || j->rows <= j->grain)
        return run_alone(j); /* one thread, or too small to share */
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
        return run_alone(j); /* the team is busy with another caller's rows */
    if (!ensure_worker()) {
        atomic_store(&owner, 0);
        return run_alone(j);
    }
    split(j, parts, 2);
    job = j;
    atomic_store(&open_job, 1);
    pthread_mutex_lock(&mu);
    atomic_fetch_add(&posted, 1);
    pthread_cond_signal(&cv);
    pthread_mutex_unlock(&mu);
    claim(j, 0); /* returns once no block is left */
    run_finish(j);
    atomic_store(&open_job, 0);
    wait_for_worker_to_leave();
    atomic_store(&owner, 0);
    return atomic_load(&j->failed) ? atomic_load(&j->failed) : atomic_load(&j->result);
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
