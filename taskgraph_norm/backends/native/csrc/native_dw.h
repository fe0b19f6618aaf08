/* What the exact weight gradient's files (native_dw.c: the accumulate, with its paths
 * native_dw_measured.c and native_dw_direct.c; native_dw_fused.c: inside the backward;
 * native_dw_round.c: the state rounded) share: the short names of the constants
 * taskgraph_norm/constants.py defines (tgn_constants.h) and exact powers of two. */
#ifndef TGN_NATIVE_DW_H
#define TGN_NATIVE_DW_H

#include <stdint.h>
#include <string.h>

#include "tgn_native.h"

#define INLINE static inline __attribute__((always_inline))

/* Short names of the values taskgraph_norm/constants.py defines (tgn_constants.h). */
#define DW_DIGITS TGN_EXACT_DIGITS
#define DW_BASE TGN_EXACT_BASE_EXPONENT
#define DW_BLOCK TGN_EXACT_DW_ROW_BLOCK
#define DW_L TGN_EXACT_DW_FOLD_L /* ceil(log2(DW_BLOCK)) + 1 */
#define DW_SMIN TGN_EXACT_DW_MIN_SCALE /* 2^(DW_SMIN - 52) = 2^-298: the coarsest grid of that fold */
#define DW_TILE TGN_EXACT_DW_TILE
/* Tiles whose column bounds (or products, dw_run_measured) one pass along the rows
 * takes: 4 KiB of each input row at a time (sequential reads); the panel (512 KiB of
 * inputs, or of products) then stays in L2 for its tiles' folds. */
#define DW_PANEL 32
#define DW_TOP_LIMIT TGN_EXACT_TOP_LIMIT
#define DW_MAX_FOLDS TGN_EXACT_DW_MAX_FOLDS /* (263 + 298) / 46 + 1 = 13 folds cover every product */

/* 2^e for e in fp64's normal range, from its bits (exact; no libm call in the loop). */
static inline double dw_pow2(int e)
{
    uint64_t bits = (uint64_t)(e + 1023) << 52;
    double d;
    memcpy(&d, &bits, sizeof d);
    return d;
}

/* native_dw.c's pieces the fused backward (native_dw_fused.c) runs: span[0..1] are the
 * lowest and highest digit rows written, span[2] is set when a NaN or infinite product
 * was counted (rows DW_DIGITS.. of the state). */
int64_t tgn_dw_block(const float *dyb, int64_t dy_stride, const float *bb, int64_t b_stride, const float *rb,
                     int64_t nr, int64_t cols, int64_t *state, int64_t stride, int *span, const uint32_t *given);
int64_t tgn_dw_normalize(int64_t *state, int64_t cols, int64_t stride, int *span);

#endif /* TGN_NATIVE_DW_H */
