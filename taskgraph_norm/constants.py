"""Every constant that decides the bits, a layout the C kernels share with Python, or
when threads share a call's work: each defined here, once.

This module imports nothing (not torch, nothing of ours): the IR's builders read it,
and ``setup.py`` executes this file on its own at build time to write the C header
``backends/native/csrc/tgn_constants.h`` (``#define TGN_<NAME> <value>`` for every
integer here, and ``TGN_CONSTANTS(X)``, the list of their names), which the C sources
include instead of defining their own.  The built extension reports the same values
(its ``constants()``, from ``tgn_constants``); the loader refuses a build whose values differ from these, and
``tests/test_constants.py`` checks both, and that no other file defines one of these
names with a literal.

Each constant's docstring says what it decides.
"""

from __future__ import annotations

from typing import Final

NATIVE_ABI: Final = 28
"""The version of the native extension's entry points (``tgn_native.h``'s prototypes
and ``native_module.c``'s functions that wrap them: their names, arguments and
meaning, and the values below).  The loader refuses a build that reports another, so
a build left from an older install is never called with new arguments.  Bump it with
any change to those prototypes or to the module's functions."""

BACKWARD_ROW_BLOCK: Final = 32
"""Rows per block of the float weight gradient's merge: ``dW`` sums each block of
this many rows pairwise, then merges the blocks in order (``kernels.backward``, the
native backward, the Triton backward and the weight-gradient graph of
``topologies``).  A constant, never the batch's: it decides ``dW``'s bits; the native
team's grain is a multiple of it."""

EXACT_DIGIT_BITS: Final = 32
"""Bits per digit of the exact sum's state: balanced radix-``2**32`` digits in int64
(``kernels.exact_sum``, the C and Triton exact dW kernels)."""

EXACT_BASE_EXPONENT: Final = -320
"""The exact state's unit is ``2**-320``: below the quantum (``2**-298``) of every
product of two fp32 values, so every product is a whole number of units."""

EXACT_DIGITS: Final = 19
"""Digits of the exact state (rows ``0..18``; rows 19 to 21 count NaN, +inf and -inf
products): ``19 * 32`` bits from ``2**-320`` reach past the largest product's
``2**256`` with room for :data:`EXACT_TOP_LIMIT`."""

EXACT_TOP_LIMIT: Final = 1 << 40
"""The top digit's bound in a valid exact state: ``|value| < 2**(40 + 256)``, i.e.
at least ``2**40`` products of the largest fp32 magnitude; past it the sum raises
``ExactSumOverflowError`` instead of wrapping."""

EXACT_DW_ROW_BLOCK: Final = 64
"""Rows the exact dW kernels (C and Triton) fold at once: with :data:`EXACT_DW_FOLD_L`
it keeps a block's sum of pre-rounded products below ``2**53`` units, so every
addition of a fold is exact."""

EXACT_DW_FOLD_L: Final = EXACT_DW_ROW_BLOCK.bit_length()
"""``log2(EXACT_DW_ROW_BLOCK) + 1``: a fold's scale is ``2**(ceil(log2 M) + L)`` for a
block's largest remaining magnitude ``M`` (docs/training.md); each fold lowers the
largest remainder by at least ``2**(53 - L)``."""

EXACT_DW_MIN_SCALE: Final = -246
"""The smallest fold scale ``s`` of the exact dW kernels: ``2**(s - 52) = 2**-298``, the
quantum of every product, so the fold at this scale leaves nothing."""

EXACT_DW_MAX_FOLDS: Final = 32
"""Folds an exact dW block may take: 13 cover every product (``(263 + 298) / 46 + 1``);
reaching this many is a bug, reported as an error, not a hang."""

EXACT_DW_TILE: Final = 32
"""Columns of the C exact dW kernel's tile; when threads share the columns, each
takes a multiple of it."""

ROUND_QUOTIENT: Final = 1
"""FINALIZE flag (``casting_mode="llama"`` on bf16 or fp16 rows): round the quotient
``x / rms`` to the row's dtype (bf16, or fp16 with :data:`ROUND_F16`) before the weight."""

ROUND_PRODUCT: Final = 2
"""FINALIZE flag (llama, a weight of the row's dtype): round the product with the weight
to that dtype too."""

ROUND_F16: Final = 16
"""FINALIZE flag, with :data:`ROUND_QUOTIENT`: llama's roundings are to fp16 (fp16
rows), not bf16."""

TOTAL_AS_RMS: Final = 4
"""Float rows' flag: after FINALIZE the kernel leaves each row's rms, not its total,
in ``total`` (what the backward keeps)."""

TOTAL_ROUNDED: Final = 32
"""Exact fp32 rows' flag: the caller reads each row's pair only as the fp32 value of
its fp64 sum, so the kernel may leave that value and 0 as the pair where a plain sum
proves it (native_exact.c).  Never changes a bit of what the caller reads."""

STREAM_STORES: Final = 8
"""FINALIZE flag: write ``y`` with non-temporal stores (vectors aligned to their width;
the rest as usual).  Never changes a bit, only where the written lines go."""

TREE_ADDS: Final = 64
"""Float rows' flag that only C sets (native_team_jobs.c's tgn_rows_call, native_gated.c),
once ``tgn_tree_vectors`` has checked that the plan's ADD merges are the pairwise tree
the ``tree`` topology lowers to (level after level, ``slots[n + k] = slots[2k] +
slots[2k + 1]``) over 16 chunks or more (shorter rows keep the loop of triples): the
kernel then runs those same additions as vectors.  An entry point Python calls with
flags clears it.  Never changes a bit."""

STREAM_BYTES: Final = 16 << 20
"""Output bytes from which the direct path's FINALIZE (and the native backward's
``dx``) writes with non-temporal stores: a store that misses the caches reads its line
in before writing it, and a streamed one does not, but a streamed output is not left in
the caches, and a store that streams over a line still held dirty in a cache (the
buffer a loop writes again, a fresh output on a recycled heap block) pays to evict it.
On the 2-core VM the docs measure (2 MiB of L2 per core, and an L3 that keeps 8 MiB
outputs) ordinary stores were faster up to 8 MiB and streaming ones from 16 MiB
(docs/performance.md, "Streaming stores").  Never changes a bit."""

HUGE_BYTES: Final = 32 << 20
"""Fresh outputs of at least this many bytes are advised as huge-page candidates before
anything writes them (glibc's largest dynamic mmap threshold: blocks this big are
always fresh mmaps, and one faulted in 4 KiB pages costs ms).  Never changes a bit."""

DTYPE_F32: Final = 0
"""The direct path's code for float32 in its configuration (``rows_config``'s
``x_dtype``, ``y_dtype``, ``w_dtype``, ``w_round``): a layout C and Python share."""

DTYPE_BF16: Final = 1
"""The direct path's code for bfloat16 (see :data:`DTYPE_F32`)."""

DTYPE_F16: Final = 2
"""The direct path's code for float16 (see :data:`DTYPE_F32`)."""

SPLIT_NUMEL: Final = 1 << 16
"""Elements from which a native call (the forward's direct path, the native
backward) shares its rows among torch's threads.  The split never changes a bit (the
tests run both sides of it); it decides only when threads start."""

TEAM_GRAIN: Final = 1 << 16
"""Elements per block of the forward's rows a thread steals from another's part once
its own is done (16 rows of 4096).  Each block costs its atomics and, for a streamed
output, a store fence: at 4 rows of 4096 they took 3-9% of a (1024, 4096) or (4096,
4096) call on 2 threads (docs/performance.md, "How the rows are shared").  Never
changes a bit: every row is computed by the same kernel whichever thread runs it."""

SPLIT_PRODUCTS: Final = 1 << 16
"""Products per exact dW call from which torch's threads share the columns (in
multiples of :data:`EXACT_DW_TILE`).  Never changes the state: columns are independent."""


GATE_EXP_TERMS: Final = 14
"""Terms of the gate's ``exp(r)`` series (``1 + r + ... + r**13/13!`` for ``|r| <= ln2/2``,
by Horner's rule from the last term): ``kernels.gate`` and ``csrc/native_gate.c`` evaluate
the same operations, so ``silu(gate)`` has the same bits on both."""

GATE_EXP_CLAMP: Final = 700
"""``-gate`` is clamped to ``[-GATE_EXP_CLAMP, GATE_EXP_CLAMP]`` before the exponential:
``exp`` stays a normal fp64 number, and ``g / (1 + exp(-g))`` is already ``g`` or a
signed zero in fp32 at either end."""
