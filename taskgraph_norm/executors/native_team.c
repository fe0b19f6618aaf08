/* A two-thread team for the forward's row kernels: the caller and one worker
 * thread share one call's rows (taskgraph_norm/executors/direct.py).
 *
 * Why in C: handing work to a Python thread and waiting for it costs about 100 us
 * on a 2-core VM (waking a thread that sleeps on a condition variable, then the
 * GIL), as long as the kernel takes on 64-256 rows of 4096.  Here the hand-off is
 * an atomic counter the two threads claim rows from:
 *
 *   the caller posts the job (a generation number, under a mutex so a sleeping
 *   worker is never missed), then claims `grain` rows at a time from `next` and
 *   runs them; the worker, spinning for SPIN_NS after its last job or woken from
 *   its condition variable, claims from the same counter; once every row is
 *   claimed the caller closes the job and returns when the worker is out of it
 *   (so the worker never touches a job whose caller has returned).
 *
 * The caller never waits for the worker to wake: a worker that is asleep, or
 * descheduled on a busy machine, simply claims fewer rows (or none).  Every row is
 * computed by the same kernel whichever thread claims it, so the bits do not
 * depend on the split (tests/test_native_team.py).  One caller at a time owns the
 * worker (`owner`); another thread that calls meanwhile runs all its rows itself.
 *
 * Fork: the worker thread does not exist in a forked child; pthread_atfork resets
 * the team there, and the child's first call starts its own worker.
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
} job_t;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static atomic_int owner;           /* 1 while a caller holds the team */
static atomic_int started;         /* the worker thread exists */
static atomic_uint_fast64_t posted; /* generation of the job posted last */
static const job_t *volatile job;  /* read after `posted` (acquire) */
static atomic_int open_job;        /* the posted job may be claimed from */
static atomic_int inside;          /* the worker is between its check of open_job and leaving */
static atomic_int_fast64_t next;    /* the first row not yet claimed */
static atomic_int_fast64_t result;   /* the sum of the blocks' return values */
static atomic_int failed;           /* a block returned -1 (no scratch) */
static atomic_int_fast64_t worker_rows; /* rows the worker ran, ever (tests read it) */

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
static int64_t claim(const job_t *j)
{
    int64_t ran = 0;
    for (;;) {
        int64_t i = atomic_fetch_add(&next, j->grain);
        if (i >= j->rows)
            return ran;
        int64_t n = j->rows - i < j->grain ? j->rows - i : j->grain;
        int64_t got = run_rows(j, i, n);
        if (got < 0)
            atomic_store(&failed, 1);
        else
            atomic_fetch_add(&result, got);
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
    }
    return 0;
}

static void reset_in_child(void)
{
    pthread_mutex_init(&mu, 0);
    pthread_cond_init(&cv, 0);
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

/* Runs the job's rows on the caller and the worker; the return value is the sum of
 * the kernel's (-1 when any block could not allocate its scratch). */
static int64_t run_team(job_t *j)
{
    if (j->rows <= j->grain || atomic_exchange(&owner, 1))
        return run_rows(j, 0, j->rows); /* too small to share, or the team is busy */
    if (!ensure_worker()) {
        atomic_store(&owner, 0);
        return run_rows(j, 0, j->rows);
    }
    atomic_store(&next, 0);
    atomic_store(&result, 0);
    atomic_store(&failed, 0);
    job = j;
    atomic_store(&open_job, 1);
    pthread_mutex_lock(&mu);
    atomic_fetch_add(&posted, 1);
    pthread_cond_signal(&cv);
    pthread_mutex_unlock(&mu);
    claim(j); /* returns once every row is claimed */
    atomic_store(&open_job, 0);
    while (atomic_load(&inside))
        relax(); /* the worker is inside its last block (at most `grain` rows) or leaving */
    int64_t got = atomic_load(&failed) ? -1 : atomic_load(&result);
    atomic_store(&owner, 0);
    return got;
}

/* tgn_float_rows_f32 over the team, `grain` rows per claim. */
int64_t tgn_float_rows_f32_team(const float *x, int64_t rows, int64_t hidden, int64_t row_stride, int64_t chunk,
                                const int64_t *adds, int64_t n_adds, int64_t root, float *total, float *y,
                                int64_t y_stride, const float *w, double eps, int64_t flags, double offset,
                                const float *r, int64_t r_stride, float *h, int64_t h_stride, int64_t grain)
{
    job_t j = {0, x, rows, hidden, row_stride, chunk, adds, n_adds, root, total, y, y_stride, w, eps, flags,
               offset, r, r_stride, h, h_stride, grain < 1 ? 1 : grain};
    return run_team(&j);
}

/* tgn_exact_rows_f32 over the team, `grain` rows per claim. */
int64_t tgn_exact_rows_f32_team(const float *x, int64_t rows, int64_t hidden, int64_t row_stride, double *pair,
                                float *y, int64_t y_stride, const float *w, double eps, int64_t flags,
                                double offset, const float *r, int64_t r_stride, float *h, int64_t h_stride,
                                int64_t grain)
{
    job_t j = {1, x, rows, hidden, row_stride, 0, 0, 0, 0, pair, y, y_stride, w, eps, flags,
               offset, r, r_stride, h, h_stride, grain < 1 ? 1 : grain};
    return run_team(&j);
}

/* How many rows the worker thread has run since the process (or forked child)
 * started: the tests check that the team really shares. */
int64_t tgn_team_worker_rows(void) { return atomic_load(&worker_rows); }
