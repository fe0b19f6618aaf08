/* The team that shares one forward call's rows (taskgraph_norm/executors/team.py,
 * direct.py): `threads` threads claim blocks of `grain` rows from an atomic counter
 * and run them with the row kernels.  Every row is computed by the same kernel
 * whichever thread claims it, so the bits do not depend on the split
 * (tests/test_native_team.py).  The threads are:
 *
 * - torch's own OpenMP team, when team.py hands us its runtime's GOMP_parallel
 *   (tgn_team_use_openmp): our rows run on the threads torch's ops run on, with no
 *   second pool fighting torch's spinning OpenMP threads for the cores;
 * - otherwise, and always in a forked child (where the parent's OpenMP runtime can
 *   hang), the caller and one worker thread of this file's own.  Handing work to a
 *   Python thread costs about 100 us on a 2-core VM; here the caller posts the job
 *   (a generation number, under a mutex so a sleeping worker is never missed) and
 *   starts claiming at once; the worker, spinning for SPIN_NS after its last job or
 *   woken from its condition variable, claims from the same counter.  Once every row
 *   is claimed the caller closes the job and returns when the worker is out of it
 *   (so the worker never touches a job whose caller has returned), spinning briefly
 *   and then sleeping, so that a preempted worker can run on the caller's core.  One
 *   caller at a time owns the worker (`owner`); another thread that calls meanwhile
 *   runs all its rows itself.
 *
 * Fork: the worker thread does not exist in a forked child; pthread_atfork resets
 * the team there (and leaves OpenMP), and the child's first call starts its own worker.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>

int64_t tgn_float_rows_f32(const float *x, int64_t rows, int64_t hidden, int64_t row_stride, int64_t chunk,
                           const int64_t *adds, int64_t n_adds, int64_t root, float *total, float *y,
                           int64_t y_stride, const float *w, double eps, int64_t flags, double offset,
                           const float *r, int64_t r_stride, float *h, int64_t h_stride);
int64_t tgn_exact_rows_f32(const float *x, int64_t rows, int64_t hidden, int64_t row_stride, double *pair,
                           float *y, int64_t y_stride, const float *w, double eps, int64_t flags,
                           double offset, const float *r, int64_t r_stride, float *h, int64_t h_stride);

#define SPIN_NS 50000 /* how long an idle worker spins before it sleeps (back-to-back calls) */
#define WAIT_SPIN_NS 20000 /* how long a caller spins for the worker's last block before it sleeps */

typedef struct {
    int exact; /* tgn_exact_rows_f32, else tgn_float_rows_f32 */
    const float *x;
    int64_t rows, hidden, row_stride, chunk;
    const int64_t *adds;
    int64_t n_adds, root;
    void *total; /* float per row, or a double pair per row (exact) */
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
    atomic_int_fast64_t next;   /* the first row not yet claimed */
    atomic_int_fast64_t result; /* the sum of the blocks' return values */
    atomic_int failed;          /* a block returned -1 (no scratch) */
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

static int64_t run_rows(const job_t *j, int64_t i, int64_t n)
{
    const float *r = j->r ? j->r + i * j->r_stride : 0;
    float *h = j->h ? j->h + i * j->h_stride : 0;
    float *y = j->y ? j->y + i * j->y_stride : 0;
    if (j->exact)
        return tgn_exact_rows_f32(j->x + i * j->row_stride, n, j->hidden, j->row_stride,
                                  (double *)j->total + 2 * i, y, j->y_stride, j->w, j->eps, j->flags,
                                  j->offset, r, j->r_stride, h, j->h_stride);
    return tgn_float_rows_f32(j->x + i * j->row_stride, n, j->hidden, j->row_stride, j->chunk, j->adds,
                              j->n_adds, j->root, (float *)j->total + i, y, j->y_stride, j->w, j->eps,
                              j->flags, j->offset, r, j->r_stride, h, j->h_stride);
}

/* Claim and run blocks of the job until none is left; returns the rows run. */
static int64_t claim(job_t *j)
{
    int64_t ran = 0;
    for (;;) {
        int64_t i = atomic_fetch_add(&j->next, j->grain);
        if (i >= j->rows)
            return ran;
        int64_t n = j->rows - i < j->grain ? j->rows - i : j->grain;
        int64_t got = run_rows(j, i, n);
        if (got < 0)
            atomic_store(&j->failed, 1);
        else
            atomic_fetch_add(&j->result, got);
        ran += n;
    }
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
            atomic_fetch_add(&worker_rows, claim(job));
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
    int64_t ran = claim((job_t *)arg);
    if (!is_caller)
        atomic_fetch_add(&worker_rows, ran);
}

/* Runs the job's rows on `threads` threads (the caller's included): in torch's OpenMP
 * team when there is one, else on the caller and this file's worker. */
static int64_t run_team(job_t *j, int64_t threads)
{
    if (threads < 2 || j->rows <= j->grain)
        return run_rows(j, 0, j->rows); /* one thread, or too small to share */
    gomp_parallel_t omp = gomp_parallel;
    if (omp && !atomic_load(&forked)) {
        int64_t blocks = (j->rows + j->grain - 1) / j->grain;
        is_caller = 1;
        omp(omp_body, j, (unsigned)(threads < blocks ? threads : blocks), 0);
        is_caller = 0;
        return atomic_load(&j->failed) ? -1 : atomic_load(&j->result);
    }
    if (atomic_exchange(&owner, 1))
        return run_rows(j, 0, j->rows); /* the team is busy with another caller's rows */
    if (!ensure_worker()) {
        atomic_store(&owner, 0);
        return run_rows(j, 0, j->rows);
    }
    job = j;
    atomic_store(&open_job, 1);
    pthread_mutex_lock(&mu);
    atomic_fetch_add(&posted, 1);
    pthread_cond_signal(&cv);
    pthread_mutex_unlock(&mu);
    claim(j); /* returns once every row is claimed */
    atomic_store(&open_job, 0);
    wait_for_worker_to_leave();
    atomic_store(&owner, 0);
    return atomic_load(&j->failed) ? -1 : atomic_load(&j->result);
}

/* tgn_float_rows_f32 on `threads` threads, `grain` rows per claim; returns the sum
 * of the kernel's return values (-1 when a block could not allocate its scratch). */
int64_t tgn_float_rows_f32_team(const float *x, int64_t rows, int64_t hidden, int64_t row_stride, int64_t chunk,
                                const int64_t *adds, int64_t n_adds, int64_t root, float *total, float *y,
                                int64_t y_stride, const float *w, double eps, int64_t flags, double offset,
                                const float *r, int64_t r_stride, float *h, int64_t h_stride, int64_t grain,
                                int64_t threads)
{
    job_t j = {0, x, rows, hidden, row_stride, chunk, adds, n_adds, root, total, y, y_stride, w, eps, flags,
               offset, r, r_stride, h, h_stride, grain < 1 ? 1 : grain};
    return run_team(&j, threads);
}

/* tgn_exact_rows_f32 on `threads` threads, `grain` rows per claim. */
int64_t tgn_exact_rows_f32_team(const float *x, int64_t rows, int64_t hidden, int64_t row_stride, double *pair,
                                float *y, int64_t y_stride, const float *w, double eps, int64_t flags,
                                double offset, const float *r, int64_t r_stride, float *h, int64_t h_stride,
                                int64_t grain, int64_t threads)
{
    job_t j = {1, x, rows, hidden, row_stride, 0, 0, 0, 0, pair, y, y_stride, w, eps, flags,
               offset, r, r_stride, h, h_stride, grain < 1 ? 1 : grain};
    return run_team(&j, threads);
}

/* How many rows threads other than the callers have run since the process (or
 * forked child) started: the tests check that the rows really are shared. */
int64_t tgn_team_worker_rows(void) { return atomic_load(&worker_rows); }

/* Whether the teams run in torch's OpenMP runtime now. */
int tgn_team_openmp(void) { return gomp_parallel && !atomic_load(&forked); }

/* Run the teams in torch's OpenMP runtime: `fn` is its GOMP_parallel (libgomp's
 * entry, which LLVM's and Intel's runtimes export too), found by native.py in the
 * runtime torch already loaded; NULL goes back to this file's worker thread.
 * Returns whether the OpenMP team is in use (never in a forked child). */
int tgn_team_use_openmp(void *fn)
{
    pthread_once(&at_fork_once, register_at_fork); /* before the first OpenMP job, too */
    gomp_parallel = (gomp_parallel_t)fn;
    return tgn_team_openmp();
}
