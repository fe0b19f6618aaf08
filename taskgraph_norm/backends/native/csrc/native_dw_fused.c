/* The exact weight gradient fused into the backward (native_team.c's
 * tgn_backward_exact_dw_f32_team, ops/exact_weight.py through backends/registry.py):
 * each thread adds the products dy * (x / rms) of the row blocks it runs into a state
 * of its own right after their dx, while the rows are in its cache; the threads'
 * states are then added into the call's state and normalised (by slabs of columns the
 * team's threads share once every row has run: native_team_jobs.c).  On the host build
 * the dx pass also gathers the block's bounds of |dy| and |x| as it reads the rows, so
 * the folds need no pass of their own for them (native_dw.c's tgn_dw_block, `given`).
 * The digits are integer sums, so the state does not depend on which thread ran which
 * rows, nor on the blocks or the bounds (tests/test_exact_dw_fused.py and
 * tests/test_exact_dw_backward.py compare it with the separate accumulate).
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native_dw.h"
#include "native_quotient.h"
#include "tgn_native.h"

#define DW_STATE_ROWS (DW_DIGITS + 3) /* the digits, then the NaN, +inf and -inf counts */

/* The threads' states of one call, kept for the next: zero between calls (the merge
 * zeroes the rows it reads).  One call at a time holds them; a call that finds them
 * held, or needs more than the 2^26 words (512 MiB) kept at most, makes its own. */
#define POOL_MAX_WORDS (INT64_C(1) << 26)
static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;
static int64_t *pool;
static int64_t pool_words;
static int pool_busy;

int64_t *tgn_dw_states_take(int64_t words, int *from_pool)
{
    *from_pool = 0;
    if (words > POOL_MAX_WORDS)
        return (int64_t *)calloc((size_t)words, sizeof(int64_t));
    pthread_mutex_lock(&pool_mu);
    if (!pool_busy && pool_words < words) {
        free(pool);
        pool = (int64_t *)calloc((size_t)words, sizeof(int64_t));
        pool_words = pool ? words : 0;
    }
    if (!pool_busy && pool) {
        pool_busy = 1;
        *from_pool = 1;
    }
    pthread_mutex_unlock(&pool_mu);
    return *from_pool ? pool : (int64_t *)calloc((size_t)words, sizeof(int64_t));
}

void tgn_dw_states_give(int64_t *states, int from_pool)
{
    if (!from_pool) {
        free(states);
        return;
    }
    pthread_mutex_lock(&pool_mu);
    pool_busy = 0;
    pthread_mutex_unlock(&pool_mu);
}

/* In a forked child (native_team.c's pthread_atfork handler): the parent's states may
 * be half-made by a thread that does not exist here; start without them. */
void tgn_dw_states_reset_in_child(void)
{
    pthread_mutex_init(&pool_mu, 0);
    pool = 0;
    pool_words = 0;
    pool_busy = 0;
}

/* state (DW_STATE_ROWS rows of `hidden`, not normalised) += the exact products of
 * `rows` contiguous rows of dy and x / rms[i], in blocks of DW_BLOCK rows (span: see
 * native_dw.h); `given`: bounds of |dy| and |x| over all the rows (tgn_dw_block's), or
 * NULL.  Returns 0, or -2 (tgn_dw_block's). */
int64_t tgn_exact_dw_add_rows(const float *dy, const float *x, const float *rms, int64_t rows, int64_t hidden,
                              int64_t *state, int *span, const uint32_t *given)
{
    for (int64_t i0 = 0; i0 < rows; i0 += DW_BLOCK) {
        int64_t nr = rows - i0 < DW_BLOCK ? rows - i0 : DW_BLOCK;
        if (tgn_dw_block(dy + i0 * hidden, hidden, x + i0 * hidden, hidden, rms + i0, nr, hidden, state, hidden,
                         span, given) < 0)
            return -2;
    }
    return 0;
}

/* n int64 words of dst zeroed with non-temporal stores where a vector is aligned (the
 * caller fences): a fresh state's digit rows the sum did not reach, which nothing reads
 * soon (the carried sum is read when the next backward merges into it), written past
 * the caches instead of evicting what the caller runs next. */
static void zero_streamed(int64_t *dst, int64_t n)
{
#if TGN_QUOTIENT_LANES > 1
    const int64_t per = (int64_t)(sizeof(TGN_QV) / sizeof *dst);
    const TGN_QV zero = TGN_Q_SET1(0.0f); /* all bits zero */
    int64_t j = 0;
    for (; j < n && ((uintptr_t)(dst + j) % sizeof(TGN_QV)) != 0; ++j)
        dst[j] = 0;
    for (; j + per <= n; j += per)
        TGN_Q_STREAM((float *)(dst + j), zero);
    for (; j < n; ++j)
        dst[j] = 0;
#else
    memset(dst, 0, (size_t)n * sizeof *dst);
#endif
}

/* Columns [0, n) of the n_states threads' states (each DW_STATE_ROWS rows of row stride
 * `stride`, thread p's at p * DW_STATE_ROWS * stride, the rows its span names) into
 * state (the same row stride), then normalised: how 1 adds them to state (a normal
 * form), how 2 writes state whole with their sum (its memory held anything before),
 * how 0 adds nothing.  Either way the threads' rows are zeroed as they are read.  The
 * columns are independent: a slab of them at a time (state and states offset by its
 * first column) gives each column what the whole call would.  rows (with how 2): the
 * digit rows that may be nonzero after, and whether a NaN or infinity was counted.
 * Returns the count of columns whose top digit overflowed. */
int64_t tgn_exact_dw_merge(int64_t *state, int64_t n, int64_t stride, int64_t *states, int64_t n_states,
                           int (*spans)[3], int how, int *rows)
{
    int span[3] = {DW_DIGITS, -1, 0};
    for (int64_t p = 0; p < n_states; ++p) {
        span[0] = spans[p][0] < span[0] ? spans[p][0] : span[0];
        span[1] = spans[p][1] > span[1] ? spans[p][1] : span[1];
        span[2] |= spans[p][2];
    }
    for (int r = 0; r < DW_STATE_ROWS; ++r) {
        int counts = r >= DW_DIGITS, written = how != 2;
        int64_t *restrict dst = state + r * stride;
        for (int64_t p = 0; p < n_states; ++p) {
            if (counts ? !spans[p][2] : r < spans[p][0] || r > spans[p][1])
                continue;
            int64_t *restrict src = states + (p * DW_STATE_ROWS + r) * stride;
            if (!written)
                memcpy(dst, src, (size_t)n * sizeof *src);
            else if (how)
                for (int64_t j = 0; j < n; ++j)
                    dst[j] += src[j];
            written = 1;
            memset(src, 0, (size_t)n * sizeof *src);
        }
        if (!written)
            zero_streamed(dst, n);
    }
    tgn_store_fence();
    int64_t over = how ? tgn_dw_normalize(state, n, stride, span) : 0;
    if (rows)
        memcpy(rows, span, sizeof span);
    return over;
}
