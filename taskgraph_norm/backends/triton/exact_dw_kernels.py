# mypy: ignore-errors
# (Triton's language, not typed Python: see kernels.py.)
"""Triton kernels of the exact weight gradient: ``state += sum over rows of dy * b``.

The state is ``kernels/exact_sum``'s: an int64 ``(22, N)`` tensor, rows ``0..18``
the digits of a radix-``2**32`` fixed-point number per column (digit ``k`` weighs
``2**(32 k - 320)``), rows ``19..21`` the counts of NaN, +inf and -inf products.
The route is ``backends/native/csrc/native_dw.c``'s ``tgn_exact_dw_f32`` (whose comment has the
exactness argument in full), per program one tile of ``BN`` columns over ``groups``
blocks of ``RB`` rows:

    p = fp64(dy) * fp64(b)                 exact: two fp32 values (bf16/fp16 widened first)
    a NaN or infinite p is counted in rows 19..21, then taken as 0
    M = max |p| per column
    while some M > 0 (a fold):
        s = ceil(log2 M) + L (at least SMIN), sigma = 2**s, L = log2(RB) + 1
        q = (p + sigma) - sigma;  p -= q;  S = sum of q over the block's rows;  M = max |p|
        S is an integer number of units 2**(s - 53), below 2**53: into the digits

Every ``q`` and every partial sum of them is exact (Demmel-Nguyen pre-rounding:
``|p| <= 2**(s-1)``, Sterbenz; ``RB <= 2**(L-1)`` rows keep ``|S| < 2**53`` units), so
the row reductions may add in any order (``tl.reduce``), and the digit contributions
are integers: each program adds its ``(22, BN)`` int64 contributions to the state
with ``tl.atomic_add``, whose order does not matter (integer addition).  The state
is then normalised (``normalize_kernel``), and the normal form is unique: the same
bits as the torch form and the C kernel, whatever the split into blocks.

``FROM_X``: ``b`` is ``x`` and the kernel makes ``x_hat = (x / rms)`` rounded to x's
dtype, as ``ops.exact_weight._x_hat`` does (IEEE division, ``div_rn``; then widened).

Launches pass ``enable_fp_fusion=False`` (no contraction of ``p + sigma``; there is
no product in a fold to fuse, but the launch flags are the other kernels').  Loaded
by :mod:`.exact_dw` once per mode, after the forward's kernels module of that mode,
whose ``@jit`` helpers it calls as ``fwd.<name>``.
"""

import sys

import triton
import triton.language as tl

fwd = sys.modules[__name__.replace("._exact_dw_kernels_", "._kernels_")]


@triton.jit
def _fold_rows(t, MAX: tl.constexpr):
    """``(2R, C) -> (R, C)``: rows ``i`` and ``i + R`` combined (a sum or a max)."""
    r: tl.constexpr = t.shape[0] // 2
    c: tl.constexpr = t.shape[1]
    a, b = tl.split(tl.permute(tl.reshape(t, [2, r, c]), [1, 2, 0]))
    if MAX:
        out = tl.maximum(a, b)
    else:
        out = a + b
    return out


@triton.jit
def _over_rows(t, LOG_RB: tl.constexpr, MAX: tl.constexpr, FOLDS: tl.constexpr):
    """``(RB, C) -> (C,)``: the sum (or max) over the rows; exact here, so any order
    (``tl.reduce`` compiled; vectorised folds in the interpreter, whose ``tl.reduce``
    calls the combine function per element)."""
    if FOLDS:
        for _ in tl.static_range(LOG_RB):
            t = _fold_rows(t, MAX)
        out = tl.reshape(t, [t.shape[1]])
    elif MAX:
        out = tl.reduce(t, 0, fwd._max)
    else:
        out = tl.reduce(t, 0, fwd._add)
    return out


@triton.jit
def _pow2(e):
    """``2.0**e`` (fp64) for int64 ``e`` in fp64's normal range, from its bits."""
    return ((e + 1023) << 52).to(tl.float64, bitcast=True)


@triton.jit
def _scale(m, L: tl.constexpr, SMIN: tl.constexpr):
    """``s = ceil(log2 m) + L``, at least ``SMIN`` (``m = 0`` gives ``SMIN``), from the
    bits of fp64 ``m >= 0`` (normal: every value here is a multiple of ``2**-298``)."""
    bits = m.to(tl.int64, bitcast=True)
    e = ((bits >> 52) & 0x7FF) - 1023
    s = e + ((bits & 0xFFFFFFFFFFFFF) != 0).to(tl.int64) + L
    return tl.maximum(s, SMIN)


@triton.jit
def _low32(v):
    """``v mod 2**32`` in ``[0, 2**32)`` (``>>`` of a signed int is arithmetic: floor)."""
    return v - ((v >> 32) << 32)


@triton.jit
def _add_units(acc, d, total, s):
    """``acc`` (digits ``d`` by columns) += ``total * 2**(s - 53)``, an integer number
    of those units below ``2**53`` in magnitude, per column (``dw_add_units`` in C)."""
    m = (total * _pow2(53 - s)).to(tl.int64)  # exact: times a power of two, an integer
    shift = s + 267  # s - 53 - BASE_EXPONENT, at least 21
    k = shift >> 5
    o = shift & 31
    lo = _low32(m) << o  # below 2**63
    hi = (m >> 32) * (tl.full(o.shape, 1, tl.int64) << o)  # |hi| < 2**52 (a product: hi may be negative)
    lo_digit = _low32(lo)
    mid = (lo >> 32) + _low32(hi)
    top = hi >> 32
    k2 = k[None, :]
    acc += tl.where(d == k2, lo_digit[None, :], 0)
    acc += tl.where(d == k2 + 1, mid[None, :], 0)
    acc += tl.where(d == k2 + 2, top[None, :], 0)
    return acc


@triton.jit
def _count_specials(p, acc, d, LOG_RB: tl.constexpr, FOLDS: tl.constexpr):
    """Count the block's NaN, +inf and -inf products into digits rows 19, 20, 21 of
    ``acc``; returns ``(p with them zeroed, acc)``."""
    nan = _over_rows((p != p).to(tl.int64), LOG_RB, False, FOLDS)
    pos = _over_rows((p == float("inf")).to(tl.int64), LOG_RB, False, FOLDS)
    neg = _over_rows((p == float("-inf")).to(tl.int64), LOG_RB, False, FOLDS)
    acc += tl.where(d == 19, nan[None, :], 0)
    acc += tl.where(d == 20, pos[None, :], 0)
    acc += tl.where(d == 21, neg[None, :], 0)
    p = tl.where((p - p) == 0, p, 0.0)  # p - p is NaN exactly for a NaN or infinite p
    return p, acc


@triton.jit
def exact_dw_kernel(dy_ptr, b_ptr, rms_ptr, state_ptr, flag_ptr, rows, groups, dy_stride, b_stride,
                    N: tl.constexpr, RB: tl.constexpr, LOG_RB: tl.constexpr, L: tl.constexpr,
                    BN: tl.constexpr, LOG_BN: tl.constexpr, FROM_X: tl.constexpr, MAX_FOLDS: tl.constexpr,
                    SMIN: tl.constexpr, FOLDS: tl.constexpr):
    """Blocks ``program_id(0) * groups ...`` (+ ``groups``) of ``RB`` rows, columns of tile
    ``program_id(1)``: their exact column sums of ``dy * b`` into ``state``.  ``flag``
    is raised if a block needed more than ``MAX_FOLDS`` folds (impossible: see C).
    ``L = LOG_RB + 1`` (a smaller one is the tests' negative control: inexact sums);
    ``SMIN``: the smallest scale, ``2**(SMIN - 52) = 2**-298``, every product's grid."""
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    col_ok = cols < N
    d = tl.arange(0, 32)[:, None]  # the state's rows (22 of them) by columns
    acc = tl.full([32, BN], 0, tl.int64)
    unfinished = 0
    first = tl.program_id(0).to(tl.int64) * groups
    for g in tl.range(0, groups):
        r = (first + g) * RB + tl.arange(0, RB)
        row_ok = r < rows
        mask = row_ok[:, None] & col_ok[None, :]
        a = fwd._widen(tl.load(dy_ptr + r[:, None] * dy_stride + cols[None, :], mask=mask, other=0.0))
        b = fwd._widen(tl.load(b_ptr + r[:, None] * b_stride + cols[None, :], mask=mask, other=0.0))
        if FROM_X:
            rms = tl.load(rms_ptr + r, mask=row_ok, other=1.0)
            b = fwd._rounded(tl.math.div_rn(b, tl.broadcast_to(rms[:, None], [RB, BN])), b_ptr)
            b = tl.where(mask, b, 0.0)  # the padding's 0 / rms is NaN for a zero rms
        p = a.to(tl.float64) * b.to(tl.float64)
        special = _over_rows(((p - p) != 0).to(tl.int32), LOG_RB, True, FOLDS)
        if fwd._exact_reduce(special, LOG_BN, True, FOLDS) != 0:
            p, acc = _count_specials(p, acc, d, LOG_RB, FOLDS)
        m = _over_rows(tl.abs(p), LOG_RB, True, FOLDS)
        live = fwd._exact_reduce((m > 0).to(tl.int32), LOG_BN, True, FOLDS)
        folds = 0
        while (live != 0) & (folds < MAX_FOLDS):
            s = _scale(m, L, SMIN)
            sigma = _pow2(s)[None, :]
            q = (p + sigma) - sigma
            p = p - q
            acc = _add_units(acc, d, _over_rows(q, LOG_RB, False, FOLDS), s)
            m = _over_rows(tl.abs(p), LOG_RB, True, FOLDS)
            live = fwd._exact_reduce((m > 0).to(tl.int32), LOG_BN, True, FOLDS)
            folds += 1
        unfinished = tl.maximum(unfinished, live)
    tl.atomic_add(state_ptr + d * N + cols[None, :], acc, mask=(d < 22) & col_ok[None, :] & (acc != 0),
                  sem="relaxed")
    tl.atomic_max(flag_ptr, unfinished, mask=unfinished != 0, sem="relaxed")


@triton.jit
def normalize_kernel(state_ptr, flag_ptr, N: tl.constexpr, BN: tl.constexpr, LOG_BN: tl.constexpr,
                     FOLDS: tl.constexpr):
    """The balanced form of the digits of ``BN`` columns, in place, as
    ``kernels.exact_sum.normalize_`` (the same carries, digit by digit); counts the
    columns whose top digit passes ``2**40`` into ``flag_ptr``."""
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    ok = cols < N
    carry = tl.full([BN], 0, tl.int64)
    half = tl.full([BN], 1 << 31, tl.int64)
    for k in tl.static_range(18):
        v = tl.load(state_ptr + k * N + cols, mask=ok, other=0) + carry
        carry = (v + half) >> 32
        tl.store(state_ptr + k * N + cols, v - (carry << 32), mask=ok)
    top = tl.load(state_ptr + 18 * N + cols, mask=ok, other=0) + carry
    tl.store(state_ptr + 18 * N + cols, top, mask=ok)
    limit = tl.full([BN], 1 << 40, tl.int64)
    over = fwd._exact_reduce(((top > limit) | (top < -limit)).to(tl.int32), LOG_BN, False, FOLDS)
    tl.atomic_add(flag_ptr, over, mask=over != 0, sem="relaxed")
