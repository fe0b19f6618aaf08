/* The compiled executor's float rows: whole rows of sums of squares, in C, in the
 * plan's order.  (The exact domain's rows are native_exact.c, FINALIZE, which both
 * run on each row while it is in cache, native_finalize.h; the float chunk sums
 * native_sums.c, the backward native_backward.c, the exact weight gradient
 * native_dw.c, FINALIZE's quotient native_quotient.h, the team that shares the rows
 * native_team.c, the extension module Python calls native_module.c.)
 *
 * tgn_float_rows_* is the C form of the torch ops it replaces (pairwise leaves and
 * ordered ADD merges), bit for bit (the tests compare it with the reference
 * interpreter), optionally followed, row by row, by FINALIZE (kernels.finalize) into
 * y.  The compile flags keep the expressions as written: no -ffast-math and
 * -ffp-contract=off.
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native_finalize.h"
#include "tgn_native.h"

#ifdef __FAST_MATH__
#error "native.c must not be compiled with -ffast-math"
#endif

/* --- the float domain: pairwise leaves and ordered ADD merges -------------------
 *
 * kernels.sumsq_pairwise per chunk (the halving order of kernels.pairwise_halving_:
 * while L > 1, h = ceil(L/2), s[i] += s[i + h] for i < L - h) and then the plan's ADD
 * triples (dst, a, b) in level order: slots[dst] = slots[a] + slots[b].  These
 * additions are not exact, so the order is the plan's, operation for operation;
 * each one is the same IEEE operation in the accumulation dtype as the torch ops'.
 * The scratch (chunk + slots values) is on the stack, or malloc'd when large (-1 is
 * returned if that fails).  The count of rows whose total is NaN is returned: C
 * does not keep an operand order for NaNs (which of two NaNs a sum returns), so
 * the caller gives those rows the reference interpreter's bits.
 */
/* The chunk sums of one row's full chunks into slots (native_sums.c: the halving
 * order above, vectorised; 0 when the chunk length has no specialised form). */
#define full_chunks_float tgn_full_chunks_f32
#define full_chunks_double tgn_full_chunks_f64
/* The tree topology's merges (TGN_TREE_ADDS): fp32 as vectors (native_sums.c), fp64 the
 * same additions in a loop (no caller gives fp64 rows the flag now). */
#define tree_adds_float tgn_adds_tree_f32
static inline void tree_adds_double(double *s, int64_t n)
{
    for (double *in = s; n > 1; in += n, n /= 2)
        for (int64_t k = 0; k < n / 2; ++k)
            in[n + k] = in[2 * k] + in[2 * k + 1];
}

/* Chunk sums per call of full_chunks for short rows (fewer than eight full chunks each,
 * which alone would miss the eight-chunk network): a block of BLOCK_CHUNKS / n_full rows
 * at a time, each chunk's sum the same whichever call forms it. */
#define BLOCK_CHUNKS 32

/* Each row's total is written to total[i] (its rms with TGN_TOTAL_AS_RMS); total may be
 * NULL when nobody reads them (the direct path without autograd).  So may the exact
 * kernel's pair. */
#define FLOAT_ROWS(NAME, T)                                                            \
    int64_t NAME(const T *x, int64_t rows, int64_t hidden, int64_t row_stride,           \
              int64_t chunk, const int64_t *adds, int64_t n_adds, int64_t root,       \
              T *total, FINALIZE_ARGS(T), RESIDUAL_ARGS(T))                                 \
    {                                                                                 \
        int64_t n_chunks = (hidden + chunk - 1) / chunk, nan_rows = 0, n_full = hidden / chunk; \
        /* tgn_tree_vectors held (the caller checked, tgn_rows_tree_flag) */          \
        const int tree = (flags & TGN_TREE_ADDS) != 0;                                \
        /* short rows of full chunks, one after another: a block's chunks in one call */ \
        int blocked = !r && row_stride == hidden && n_full * chunk == hidden && n_full < 8 && rows > 1; \
        const int64_t block = blocked ? BLOCK_CHUNKS / n_full : 0;                    \
        int64_t need = chunk + n_chunks + n_adds + block * n_full, pre_at = -block;  \
        T small[2048];                                                                \
        T *work = need <= 2048 ? small : (T *)malloc((size_t)need * sizeof(T));       \
        if (!work)                                                                    \
            return -1;                                                                \
        T *buf = work, *slots = work + chunk, *pre = slots + n_chunks + n_adds;       \
        for (int64_t i = 0; i < rows; ++i) {                                          \
            const T *row = x + i * row_stride;                                        \
            if (r)                                                                    \
                row = add_residual_##T(row, r + i * r_stride, h + i * h_stride, hidden); \
            if (blocked && i >= pre_at + block) {                                     \
                pre_at = i;                                                           \
                blocked = full_chunks_##T(row, chunk, (rows - i < block ? rows - i : block) * n_full, pre); \
            }                                                                         \
            int64_t c0 = n_full;                                                      \
            if (blocked)                                                              \
                memcpy(slots, pre + (i - pre_at) * n_full, (size_t)n_full * sizeof(T)); \
            else if (!full_chunks_##T(row, chunk, n_full, slots))                     \
                c0 = 0;                                                               \
            for (int64_t c = c0; c < n_chunks; ++c) {                                 \
                const T *src = row + c * chunk;                                       \
                int64_t length = hidden - c * chunk < chunk ? hidden - c * chunk : chunk; \
                if (length == 1) {                                                    \
                    slots[c] = src[0] * src[0];                                       \
                    continue;                                                         \
                }                                                                     \
                /* the first halving step straight from the squares */               \
                int64_t half = (length + 1) / 2;                                      \
                for (int64_t k = 0; k < length - half; ++k)                           \
                    buf[k] = src[k] * src[k] + src[k + half] * src[k + half];         \
                if (length & 1)                                                       \
                    buf[half - 1] = src[half - 1] * src[half - 1];                    \
                for (length = half; length > 1; length = half) {                      \
                    half = (length + 1) / 2;                                          \
                    T *restrict lo = buf;                                             \
                    const T *restrict hi = buf + half;                                \
                    for (int64_t k = 0; k < length - half; ++k)                       \
                        lo[k] += hi[k];                                               \
                }                                                                     \
                slots[c] = buf[0];                                                    \
            }                                                                         \
            if (tree)                                                                 \
                tree_adds_##T(slots, n_chunks);                                       \
            else                                                                      \
                for (int64_t t = 0; t < n_adds; ++t)                                  \
                    slots[adds[3 * t]] = slots[adds[3 * t + 1]] + slots[adds[3 * t + 2]]; \
            T tot = slots[root];                                                      \
            if (y && finalize_row_##T(row, y + i * y_stride, w, hidden, tot, eps,     \
                                      flags, offset, !r && i + 1 < rows ? row + row_stride : NULL)) \
                tot = NAN; /* a NaN the llama rounding left to the caller */          \
            else if (flags & TGN_TOTAL_AS_RMS)                                        \
                tot = (T)sqrt((double)(tot / (T)(double)hidden + (T)eps));            \
            if (total)                                                                \
                total[i] = tot;                                                       \
            nan_rows += tot != tot;                                                   \
        }                                                                             \
        if (work != small)                                                            \
            free(work);                                                               \
        if (flags & TGN_STREAM_STORES)                                                \
            tgn_store_fence();                                                        \
        return nan_rows;                                                              \
    }

FLOAT_ROWS(tgn_float_rows_f32, float)
FLOAT_ROWS(tgn_float_rows_f64, double)

/* A version number the loader checks, so a library left from an older install is
 * never used. */
int tgn_native_abi(void) { return TGN_NATIVE_ABI; }

/* The values this library was built with, which the loader checks too. */
#define TGN_CONSTANT_ENTRY(name) {#name, TGN_##name},
const tgn_constant_t tgn_constants[] = {TGN_CONSTANTS(TGN_CONSTANT_ENTRY){0, 0}};
#undef TGN_CONSTANT_ENTRY

#ifdef TGN_BUILD_CPU
/* The host variant (setup.py builds it with -march=native): the features of the CPU
 * that built it, read from the file by loader.py (cpu_features.parse_marker) before
 * it is loaded, so it is loaded only on a CPU that has all of them. */
const char tgn_build_cpu[] = "tgn-build-cpu:" TGN_BUILD_CPU;
#endif
