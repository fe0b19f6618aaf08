/* What the exact weight gradient's two files (native_dw.c: the accumulate,
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

#endif /* TGN_NATIVE_DW_H */
