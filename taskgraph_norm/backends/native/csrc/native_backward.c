/* The native backward of fp32 rows (ops/backward.py through backends/native/grads.py): each
 * row's input gradient and the weight gradient's row-block sums, the C form of
 * kernels.input_grad and kernels.weight_grad_float, bit for bit
 * (tests/test_ops.py compares them with the torch ops); and the rms of the forward's
 * row totals.  The forward's rows are native.c; the exact weight gradient native_dw.c.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef __FAST_MATH__
#error "the native kernels must not be compiled with -ffast-math"
#endif

#include "native_quotient.h"
#include "tgn_native.h"

/* --- the backward (kernels.py, "the backward"), fp32 rows ------------------------
 *
 * Per row, with r = rms[i] (the forward's):
 *   g  = dy * w                 (dy without a weight)
 *   s  = sum(g * x)             float: pairwise halving per chunk, then the plan's ADD
 *                               triples in order (the forward's DAG over the products);
 *                               exact: the two folds of kernels.sum_exact over the fp64
 *                               products (exact, so any order), S1 + S2 rounded to fp32
 *   k  = ((s / D) / r / r) / r
 *   dx = g / r - x * k
 * and, with a weight gradient, t = dy * (x / r) summed over each block of
 * TGN_BACKWARD_ROW_BLOCK rows by pairwise halving over the rows and the block sums
 * merged as kernels.merge_blocks_ merges them (kernels.weight_grad_float), streamed
 * (below: no scratch that grows with the rows).  Every operation is the torch ops'
 * IEEE fp32 (or fp64) operation in the same order (the quotients g / r and x / r
 * formed as FINALIZE's are, native_quotient.h: IEEE division's bits).  A row whose s or
 * k is not finite, and a value of the weight gradient that is not, are counted and the
 * caller recomputes everything with torch ops (NaN payloads).
 */

static float halve_in_place(float *restrict v, int64_t length)
{
    while (length > 1) {
        int64_t half = (length + 1) / 2;
        float *restrict lo = v;
        const float *restrict hi = v + half;
        for (int64_t k = 0; k < length - half; ++k)
            lo[k] += hi[k];
        length = half;
    }
    return v[0];
}

/* s = sum(g * x) by the plan's float DAG, g = dy * w (dy where w is NULL): the full
 * chunks' leaves summed as the products are formed (tgn_chunk_dots_f32), the products
 * of the rest written into p and halved there; tree (tgn_tree_vectors): the ADDs run as
 * vectors (tgn_adds_tree_f32, the same additions). */
static float row_dot_float(const float *dy, const float *w, const float *x, float *p, int64_t hidden, int64_t chunk,
                           const int64_t *adds, int64_t n_adds, int64_t root, float *slots, int tree)
{
    int64_t n_chunks = (hidden + chunk - 1) / chunk, c = tgn_chunk_dots_f32(dy, w, x, chunk, hidden / chunk, slots);
    if (w)
        for (int64_t j = c * chunk; j < hidden; ++j)
            p[j] = (dy[j] * w[j]) * x[j];
    else
        for (int64_t j = c * chunk; j < hidden; ++j)
            p[j] = dy[j] * x[j];
    for (; c < n_chunks; ++c) {
        int64_t length = hidden - c * chunk < chunk ? hidden - c * chunk : chunk;
        slots[c] = halve_in_place(p + c * chunk, length);
    }
    if (tree) {
        tgn_adds_tree_f32(slots, n_chunks);
        return slots[root];
    }
    for (int64_t t = 0; t < n_adds; ++t)
        slots[adds[3 * t]] = slots[adds[3 * t + 1]] + slots[adds[3 * t + 2]];
    return slots[root];
}

/* Returns NAN when the row has no finite scale. */
static float row_dot_exact(const float *g, const float *x, int64_t hidden)
{
    double m = 0.0;
    for (int64_t j = 0; j < hidden; ++j) {
        double a = fabs((double)g[j] * (double)x[j]);
        m = a > m ? a : m;
    }
    double s1, s2;
    if (!tgn_exact_scale(m, hidden, &s1, &s2))
        return NAN;
    double t1 = 0.0, t2 = 0.0;
    for (int64_t j = 0; j < hidden; ++j) {
        double v = (double)g[j] * (double)x[j];
        double q1 = (v + s1) - s1;
        double r = v - q1;
        t1 += q1;
        t2 += (r + s2) - s2;
    }
    return (float)(t1 + t2);
}

/* The exact weight gradient's bounds over rows (native_dw_direct.c's tile bounds, for
 * a whole block): the largest |dy| and |x| bits and the smallest nonzero ones less one,
 * as integers (a NaN's bits are above every number's; UINT32_MAX: no nonzero value). */
typedef struct {
    uint32_t top_dy, top_x, low_dy, low_x;
} row_tops_t;

static const row_tops_t NO_TOPS = {0, 0, UINT32_MAX, UINT32_MAX};

static inline void tops_add(row_tops_t *t, const row_tops_t *o)
{
    t->top_dy = o->top_dy > t->top_dy ? o->top_dy : t->top_dy;
    t->top_x = o->top_x > t->top_x ? o->top_x : t->top_x;
    t->low_dy = o->low_dy < t->low_dy ? o->low_dy : t->low_dy;
    t->low_x = o->low_x < t->low_x ? o->low_x : t->low_x;
}

static inline void tops_scalar(row_tops_t *t, float dy, float x)
{
    uint32_t u, v;
    memcpy(&u, &dy, sizeof u);
    memcpy(&v, &x, sizeof v);
    u &= 0x7fffffffu;
    v &= 0x7fffffffu;
    row_tops_t o = {u, v, u - 1u, v - 1u}; /* 0 - 1: UINT32_MAX */
    tops_add(t, &o);
}

/* dx = g / r - x k (dx non-NULL) and t = dy (x / r) into t (t non-NULL; added to t's
 * values instead with `add`), one pass over the row; with `tops` (the host build's
 * 16-lane vectors), the row's bounds too, from the values the pass loads.  stream:
 * dx's vectors with non-temporal stores where dx is aligned to one (the caller fences). */
static inline __attribute__((always_inline)) void dx_t_row(const float *dy, const float *w, const float *x,
                                                           float r, float k, float *dx, float *t, int add,
                                                           int64_t n, int stream, row_tops_t *tops,
                                                           const float *next_dy, const float *next_x)
{
    int64_t j = 0;
    row_tops_t row = NO_TOPS;
#if TGN_QUOTIENT_LANES > 1
    if (tgn_quotient_rms_in_range(r)) {
        const tgn_q_div_t d = tgn_q_setup(r);
        const TGN_QV kv = TGN_Q_SET1(k);
        const int nt = dx && stream && ((uintptr_t)dx % sizeof(TGN_QV)) == 0; /* (so is every dx + j) */
#if TGN_QUOTIENT_LANES == 16
        const __m512i abs_bits = _mm512_set1_epi32(0x7fffffff), one = _mm512_set1_epi32(1);
        __m512i top_dy = _mm512_setzero_si512(), top_x = top_dy;
        __m512i low_dy = _mm512_set1_epi32(-1), low_x = low_dy;
#endif
        for (; j + TGN_QUOTIENT_LANES <= n; j += TGN_QUOTIENT_LANES) {
            if (next_dy && j % 16 == 0) { /* the next row's lines into L2, for its dot product */
                __builtin_prefetch(next_dy + j, 0, 2);
                __builtin_prefetch(next_x + j, 0, 2);
            }
            TGN_QV dyv = TGN_Q_LOAD(dy + j), xv = TGN_Q_LOAD(x + j);
            if (dx) {
                TGN_QV g = w ? TGN_Q_MUL(dyv, TGN_Q_LOAD(w + j)) : dyv;
                TGN_QV v = TGN_Q_SUB(tgn_q_vec(&d, g), TGN_Q_MUL(xv, kv));
                if (nt)
                    TGN_Q_STREAM(dx + j, v);
                else
                    TGN_Q_STORE(dx + j, v);
            }
            if (t) {
                TGN_QV tv = TGN_Q_MUL(dyv, tgn_q_vec(&d, xv));
                TGN_Q_STORE(t + j, add ? TGN_Q_ADD(TGN_Q_LOAD(t + j), tv) : tv);
            }
#if TGN_QUOTIENT_LANES == 16
            if (tops) {
                __m512i a = _mm512_and_si512(_mm512_castps_si512(dyv), abs_bits);
                __m512i b = _mm512_and_si512(_mm512_castps_si512(xv), abs_bits);
                top_dy = _mm512_max_epu32(top_dy, a);
                top_x = _mm512_max_epu32(top_x, b);
                low_dy = _mm512_min_epu32(low_dy, _mm512_sub_epi32(a, one));
                low_x = _mm512_min_epu32(low_x, _mm512_sub_epi32(b, one));
            }
#endif
        }
#if TGN_QUOTIENT_LANES == 16
        if (tops) {
            row_tops_t v = {_mm512_reduce_max_epu32(top_dy), _mm512_reduce_max_epu32(top_x),
                            _mm512_reduce_min_epu32(low_dy), _mm512_reduce_min_epu32(low_x)};
            row = v;
        }
#endif
    }
#else
    (void)stream, (void)next_dy, (void)next_x;
#endif
    for (; j < n; ++j) {
        if (dx) {
            float g = w ? dy[j] * w[j] : dy[j];
            dx[j] = g / r - x[j] * k;
        }
        if (t) {
            float tv = dy[j] * (x[j] / r);
            t[j] = add ? t[j] + tv : tv;
        }
        if (tops)
            tops_scalar(&row, dy[j], x[j]);
    }
    if (tops)
        tops_add(tops, &row);
}

/* --- the weight gradient's merge, streamed -----------------------------------------
 *
 * kernels.merge_blocks_ sums the n block sums by adjacent pairs, level by level, an odd
 * last carried up: its node (level L, index i) is the sum of blocks
 * [i 2^L, min((i + 1) 2^L, n)), the sum left + right of its two children (the left
 * alone where the right is empty).  The same additions in the same order, kept to
 * O(log n) nodes (kernels.merge_blocks_streamed is the model; tests/test_backward_merge.py
 * compares both with merge_blocks_): blocks are pushed in order onto a stack, where a node meeting its
 * left sibling on top becomes their parent (tgn_dw_push); what is left is the binary
 * decomposition of [0, n), nodes of falling level, and the root is the last folded
 * into the ones below it, acc = node + acc (tgn_dw_finish): the nodes cut by n.  A
 * run of blocks that starts elsewhere (a thread's part of the rows) leaves the aligned
 * nodes of its range, which are pushed again in order onto the whole call's stack;
 * a run pushed from its back (the blocks other threads take from a part's end) merges
 * a node with its right sibling on top. */

/* Pushes `node` (data: a malloc'd row, owned by the stack from now on). */
void tgn_dw_push(tgn_dw_stack_t *s, tgn_dw_node_t node, int64_t hidden, int from_back)
{
    while (s->n > 0) {
        tgn_dw_node_t *top = &s->node[s->n - 1];
        tgn_dw_node_t *left = from_back ? &node : top, *right = from_back ? top : &node;
        if (top->level != node.level || right->index != left->index + 1 || left->index % 2)
            break;
        float *restrict a = left->data;
        const float *restrict b = right->data;
        for (int64_t j = 0; j < hidden; ++j)
            a[j] += b[j];
        free(right->data);
        node = (tgn_dw_node_t){left->level + 1, left->index / 2, a};
        --s->n;
    }
    s->node[s->n++] = node; /* at most 2 per level: TGN_DW_STACK suffices */
}

void tgn_dw_free(tgn_dw_stack_t *s)
{
    while (s->n > 0)
        free(s->node[--s->n].data);
}

/* Folds the stack of a whole call (nodes pushed from block 0 on, in order) into dw and
 * frees it; returns how many values of dw are not finite. */
int64_t tgn_dw_finish(tgn_dw_stack_t *s, int64_t hidden, float *dw)
{
    int64_t bad = 0;
    if (s->n == 0)
        return 0;
    const float *acc = s->node[s->n - 1].data;
    for (int64_t e = s->n - 2; e >= 0; --e) {
        float *a = s->node[e].data;
        float *out = e == 0 ? dw : a; /* (a itself: each value is read before it is written) */
        for (int64_t j = 0; j < hidden; ++j)
            out[j] = a[j] + acc[j];
        acc = out;
    }
    if (s->n == 1)
        memcpy(dw, acc, (size_t)hidden * sizeof(float));
    for (int64_t j = 0; j < hidden; ++j)
        bad += !isfinite(dw[j]);
    tgn_dw_free(s);
    return bad;
}

/* The rest of a block's pairwise halving over its rows, after the first step (row q >= h
 * added to row q - h as it was made): lo[0, length) halved into lo[0], `width` floats each. */
void tgn_dw_halve(float **lo, int64_t length, int64_t width)
{
    while (length > 1) {
        int64_t half = (length + 1) / 2;
        for (int64_t q = 0; q < length - half; ++q) {
            float *restrict a = lo[q];
            const float *restrict b = lo[q + half];
            for (int64_t j = 0; j < width; ++j)
                a[j] += b[j];
        }
        length = half;
    }
}

/* This thread's scratch of at least n floats, made once and kept (grown when a call
 * needs more; freed when the thread exits): the team calls the kernel once per block
 * of rows.  NULL when it cannot be allocated. */
static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
static int scratch_ok;
static void make_scratch_key(void) { scratch_ok = pthread_key_create(&scratch_key, free) == 0; }

float *tgn_thread_scratch(int64_t n)
{
    pthread_once(&scratch_once, make_scratch_key);
    if (!scratch_ok)
        return 0;
    int64_t *block = (int64_t *)pthread_getspecific(scratch_key); /* its size in floats, then them */
    if (!block || block[0] < n) {
        free(block);
        block = (int64_t *)malloc(sizeof(int64_t) + (size_t)n * sizeof(float));
        pthread_setspecific(scratch_key, block);
        if (!block)
            return 0;
        block[0] = n;
    }
    return (float *)(block + 1);
}

/* Rows [0, rows) of x and dy (row 0 starts block `first_block`): dx (or NULL; stream:
 * written with non-temporal stores) and, with `dw`, each block's sum pushed in order
 * onto the stack dw; with `xstate`, each block's exact products dy * (x / rms) added
 * into that unnormalised state after its dx, while its rows are in cache
 * (native_dw_fused.c; xspan: the digit rows written).  A block's scratch is 15 rows and its sum's (the halving's first
 * step adds the second half's rows as they are made). */
#define FUSED_DW_STREAM_ROWS 16

int64_t tgn_backward_rows_f32(const float *x, const float *dy, const float *w, const float *rms,
                              int64_t rows, int64_t hidden, int64_t chunk, const int64_t *adds,
                              int64_t n_adds, int64_t root, int64_t exact, float *dx, int64_t first_block,
                              tgn_dw_stack_t *dw, int64_t stream, int64_t *xstate, int *xspan)
{
    enum { HALF = (TGN_BACKWARD_ROW_BLOCK + 1) / 2 };
    int64_t n_chunks = (hidden + chunk - 1) / chunk, bad = 0;
    const int tree = !exact && tgn_tree_vectors(adds, n_adds, n_chunks, root);
    int64_t need = 2 * hidden + n_chunks + n_adds + (dw ? (HALF - 1) * hidden : 0);
    float *work = tgn_thread_scratch(need);
    if (!work)
        return -1;
    float *g = work, *p = work + hidden, *slots = p + hidden, *half_rows = slots + n_chunks + n_adds;
    const float fd = (float)(double)hidden;
    /* The fused exact dW's rows from memory (stream) run 16 at a time: the folds then find
     * the block's x and dy (512 KiB at 4096 wide) in L2, where 32 rows with their dx
     * overflowed a 1 MiB L2 (C call at 1024 x 4096 on two threads: 1323 -> 1269 us).  The
     * digits are integer sums, so the blocks do not change them; on rows held in L3 the
     * folds' per-block work cost more than it saved (64 x 4096: 119 -> 142 us), and a
     * float dW's blocks are its merge's. */
    const int64_t rb = xstate && !dw && stream ? FUSED_DW_STREAM_ROWS : TGN_BACKWARD_ROW_BLOCK;
    for (int64_t b0 = 0; b0 < rows; b0 += rb) {
        int64_t in_block = rows - b0 < rb ? rows - b0 : rb;
        /* the block's pairwise halving over its rows: row q < h is kept in lo[q], row
         * q >= h added to lo[q - h] as it is made (the first step), then the rest */
        int64_t h = (in_block + 1) / 2;
        float *lo[HALF];
        if (dw) {
            lo[0] = (float *)malloc((size_t)hidden * sizeof(float));
            if (!lo[0])
                return -1;
            for (int64_t q = 1; q < h; ++q)
                lo[q] = half_rows + (q - 1) * hidden;
        }
        /* the fused exact dW's bounds over the block, gathered by the dx pass (the host
         * build, every row's rms in the quotient's range: its vector loop runs) */
        row_tops_t block_tops = NO_TOPS;
        int tops = 0;
#if TGN_QUOTIENT_LANES == 16
        tops = xstate != 0;
        for (int64_t i = b0; tops && i < b0 + in_block; ++i)
            tops = tgn_quotient_rms_in_range(rms[i]);
#endif
        for (int64_t i = b0; i < b0 + in_block; ++i) {
            const float *xr = x + i * hidden, *dyr = dy + i * hidden;
            const float r = rms[i];
            float k = 0.0f;
            if (dx) {
                float s;
                if (exact) {
                    if (w)
                        for (int64_t j = 0; j < hidden; ++j)
                            g[j] = dyr[j] * w[j];
                    else
                        memcpy(g, dyr, (size_t)hidden * sizeof(float));
                    s = row_dot_exact(g, xr, hidden);
                } else { /* (g = dy w not kept: dx_t_row forms it again) */
                    s = row_dot_float(dyr, w, xr, p, hidden, chunk, adds, n_adds, root, slots, tree);
                }
                k = ((s / fd) / r / r) / r;
                if (!isfinite(s) || !isfinite(k))
                    ++bad;
            }
            int64_t q = i - b0;
            /* two calls, each with a constant `tops`: the inlined loop without the bounds'
             * instructions is the float backward's, unchanged */
            /* rows far larger than the caches (stream: dx of TGN_STREAM_BYTES or more) come from
             * memory: the next row's lines are fetched as this one goes (on rows in cache
             * the prefetches cost more than they save) */
            const int ahead = stream && i + 1 < rows;
            const float *ndy = ahead ? dyr + hidden : 0, *nx = ahead ? xr + hidden : 0;
            if (tops)
                dx_t_row(dyr, w, xr, r, k, dx ? dx + i * hidden : 0, dw ? lo[q < h ? q : q - h] : 0, q >= h,
                         hidden, stream, &block_tops, ndy, nx);
            else
                dx_t_row(dyr, w, xr, r, k, dx ? dx + i * hidden : 0, dw ? lo[q < h ? q : q - h] : 0, q >= h,
                         hidden, stream, 0, ndy, nx);
        }
        const uint32_t given[4] = {block_tops.top_dy, block_tops.top_x, block_tops.low_dy, block_tops.low_x};
        if (xstate && tgn_exact_dw_add_rows(dy + b0 * hidden, x + b0 * hidden, rms + b0, in_block, hidden, xstate,
                                            xspan, tops ? given : 0) < 0)
            return -2;
        if (!dw)
            continue;
        tgn_dw_halve(lo, h, hidden);
        tgn_dw_push(dw, (tgn_dw_node_t){0, first_block + b0 / TGN_BACKWARD_ROW_BLOCK, lo[0]}, hidden, 0);
    }
    if (stream)
        tgn_store_fence();
    return bad;
}

/* kernels.finalize_rms for fp32 rows: rms = sqrt(total / D + eps), the value FINALIZE
 * divides by (finalize_row_float's two lines); an exact pair (channels 2, fp64) is
 * combined and rounded to fp32 first, as kernels.combine_exact then .to(fp32). */
void tgn_rms_of_totals_f32(const void *total, int64_t rows, int64_t channels, int64_t hidden, double eps,
                           float *rms)
{
    for (int64_t i = 0; i < rows; ++i) {
        float t = channels == 2 ? (float)(((const double *)total)[2 * i] + ((const double *)total)[2 * i + 1])
                                : ((const float *)total)[i];
        float mean = t / (float)(double)hidden + (float)eps;
        rms[i] = (float)sqrt((double)mean);
    }
}
