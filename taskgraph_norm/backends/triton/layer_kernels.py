# mypy: ignore-errors
# (Triton's language, not typed Python: see kernels.py.)
"""Triton kernels of LayerNorm's float plans: one row per program, both sums in the
plan's order, operation for operation (``kernels.layer``'s numerics):

    total = the SUM leaves of x (pairwise halving) merged by the plan's tree or left fold
    mean  = total / D                     fp32, IEEE division (``mean_float``)
    d     = x - mean                      rounded once (``deviations``)
    var   = the leaves of d * d merged the same way
    den   = sqrt(fp64(var / D + eps))     rounded to fp32 (``finalize_rms``)
    y     = d / den * w + b               a division, then a multiply and an add (no fma)
    store y in x's dtype                  one rounding

The row is placed for the folds as :mod:`.layout` says (``kernels.py``'s helpers do
the folds).  The padding of the ``x`` leaves is ``-0.0``, which adds nothing to any
value (``+0.0`` would turn a carried ``-0.0`` into ``+0.0``); the squares' is ``+0.0``.
The row's flag is set when a total, ``mean`` or ``den`` is not finite, or ``den`` is
zero: the caller gives those rows torch ops' bits (which NaN an operation returns is
the hardware's).  Launched with ``enable_fp_fusion=False``.  Loaded by :mod:`.runner`
after ``kernels.py`` in the same mode, whose helpers it calls through ``fwd``.
"""

import sys

import triton
import triton.language as tl

fwd = sys.modules[__name__.replace("._layer_kernels_", "._kernels_")]


@triton.jit
def _leaf_terms(x_row, table_ptr, mean, first, ROWS: tl.constexpr, CW: tl.constexpr, D: tl.constexpr,
                NATURAL: tl.constexpr, CENTERED: tl.constexpr):
    """``ROWS`` chunks from chunk ``first`` placed for the folds, ``(ROWS, CW)``: the
    values of ``x`` (``-0.0`` padding), or with ``CENTERED`` the squares of ``x - mean``
    (``+0.0`` padding)."""
    cols, valid = fwd._placed(table_ptr, first, ROWS, CW, D, NATURAL)
    v = fwd._widen(tl.load(x_row + cols, mask=valid, other=0.0))
    if CENTERED:
        d = v - mean
        t = tl.where(valid, d * d, 0.0)
    else:
        t = tl.where(valid, v, -0.0)
    return tl.reshape(t, [ROWS, CW])


@triton.jit
def _tree_total(x_row, table_ptr, mean, NW: tl.constexpr, CW: tl.constexpr, LOG_C: tl.constexpr,
                LOG_N: tl.constexpr, D: tl.constexpr, NATURAL: tl.constexpr, CENTERED: tl.constexpr):
    p = fwd._leaf_sums(_leaf_terms(x_row, table_ptr, mean, 0, NW, CW, D, NATURAL, CENTERED), LOG_C)
    for _ in tl.static_range(LOG_N):
        p = fwd._fold_pairs(p)
    return tl.reshape(p, [])


@triton.jit
def _linear_total(x_row, table_ptr, mean, N: tl.constexpr, CW: tl.constexpr, LOG_C: tl.constexpr,
                  D: tl.constexpr, NATURAL: tl.constexpr, CENTERED: tl.constexpr):
    total = tl.reshape(fwd._leaf_sums(_leaf_terms(x_row, table_ptr, mean, 0, 1, CW, D, NATURAL, CENTERED),
                                      LOG_C), [])
    for k in tl.range(1, N):
        leaf = fwd._leaf_sums(_leaf_terms(x_row, table_ptr, mean, k, 1, CW, D, NATURAL, CENTERED), LOG_C)
        total = total + tl.reshape(leaf, [])
    return total


@triton.jit
def _finish_row(x_row, y_row, w_ptr, b_ptr, mean_ptr, den_ptr, flag_ptr, total, mean, var, eps,
                D: tl.constexpr, BLOCK: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """``den``, the flag, the row's statistics and ``y`` (see the module docstring)."""
    den = tl.sqrt((tl.math.div_rn(var, tl.full([], D, tl.float32)) + eps).to(tl.float64)).to(tl.float32)
    bad = ((total != total) | (tl.abs(total) == float("inf")) | (var != var) | (tl.abs(var) == float("inf"))
           | (den == 0.0) | (den != den) | (tl.abs(mean) == float("inf")))
    tl.store(flag_ptr, bad.to(tl.int8))
    tl.store(mean_ptr, mean)
    tl.store(den_ptr, den)
    for start in tl.range(0, D, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < D
        d = fwd._widen(tl.load(x_row + cols, mask=mask, other=0.0)) - mean
        y = tl.math.div_rn(d, tl.broadcast_to(den, [BLOCK]))
        if HAS_W:
            y = y * fwd._widen(tl.load(w_ptr + cols, mask=mask, other=0.0))
        if HAS_B:
            y = y + fwd._widen(tl.load(b_ptr + cols, mask=mask, other=0.0))
        fwd._store(y_row + cols, y, mask)


@triton.jit
def layer_tree_kernel(x_ptr, y_ptr, w_ptr, b_ptr, table_ptr, mean_ptr, den_ptr, flag_ptr, x_stride, y_stride, eps,
                      D: tl.constexpr, NW: tl.constexpr, CW: tl.constexpr, LOG_C: tl.constexpr,
                      LOG_N: tl.constexpr, NATURAL: tl.constexpr, BLOCK: tl.constexpr, HAS_W: tl.constexpr,
                      HAS_B: tl.constexpr):
    """Pairwise leaves and the builder's tree (or one chunk), for both sums."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    zero = tl.full([], 0.0, tl.float32)
    total = _tree_total(x_row, table_ptr, zero, NW, CW, LOG_C, LOG_N, D, NATURAL, False)
    mean = tl.math.div_rn(total, tl.full([], D, tl.float32))
    var = _tree_total(x_row, table_ptr, mean, NW, CW, LOG_C, LOG_N, D, NATURAL, True)
    _finish_row(x_row, y_ptr + row * y_stride, w_ptr, b_ptr, mean_ptr + row, den_ptr + row, flag_ptr + row,
                total, mean, var, eps, D, BLOCK, HAS_W, HAS_B)


@triton.jit
def layer_linear_kernel(x_ptr, y_ptr, w_ptr, b_ptr, table_ptr, mean_ptr, den_ptr, flag_ptr, x_stride, y_stride,
                        eps, D: tl.constexpr, N: tl.constexpr, CW: tl.constexpr, LOG_C: tl.constexpr,
                        NATURAL: tl.constexpr, BLOCK: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """Pairwise leaves and a left fold ``((p0 + p1) + p2) + ...``, for both sums."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    zero = tl.full([], 0.0, tl.float32)
    total = _linear_total(x_row, table_ptr, zero, N, CW, LOG_C, D, NATURAL, False)
    mean = tl.math.div_rn(total, tl.full([], D, tl.float32))
    var = _linear_total(x_row, table_ptr, mean, N, CW, LOG_C, D, NATURAL, True)
    _finish_row(x_row, y_ptr + row * y_stride, w_ptr, b_ptr, mean_ptr + row, den_ptr + row, flag_ptr + row,
                total, mean, var, eps, D, BLOCK, HAS_W, HAS_B)
