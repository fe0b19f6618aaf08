# mypy: ignore-errors
# (Triton's language, not typed Python: see kernels.py.)
"""Triton kernels of LayerNorm's backward (``kernels.layer_backward``'s numerics), one row
per program for ``dx``, one (row block, column tile) per program for ``dW`` and ``db``.

With the forward's fp32 ``mean`` and ``den`` of the row, every step an IEEE operation in
fp32 (launches pass ``enable_fp_fusion=False``: no fma):

    x_hat = (x - mean) / den              a subtraction, then a division (div_rn)
    g     = dy * w                        (dy without a weight)
    mg    = sum(g) / D                    float plans: the forward kernel's placement and
    mgx   = sum(g * x_hat) / D            folds (tree, or a left fold over the chunks);
                                          exact plans: the exact pair of the fp64 terms
                                          (g * x_hat is exact in fp64), its mean correctly
                                          rounded (``layer_kernels._mean_exact``)
    dx    = ((g - mg) - x_hat * mgx) / den    stored in x's dtype, rounded once

and the block sums of ``dW = sum over rows of dy * x_hat`` and ``db = sum over rows of
dy`` (``kernels.layer_backward.column_sum_blocks``): pairwise halving over a block of
``ROW_BLOCK`` rows; the caller merges the blocks (``kernels.merge_blocks_``).

The padding of every placed or folded value is ``-0.0`` (the terms may be ``-0``; ``-0``
is the one value that adds nothing to any value).  A row's flag is set when a sum,
``mean`` or ``den`` is not finite, ``den`` is zero, or a ``dx`` value is NaN (which NaN
is the hardware's): the caller gives those rows torch ops' bits.

Loaded by :mod:`.layer_backward` once per mode, after ``kernels.py`` and
``layer_kernels.py`` of the same mode, whose ``@jit`` helpers it calls as ``fwd.<name>``
and ``lay.<name>``.
"""

import sys

import triton
import triton.language as tl

fwd = sys.modules[__name__.replace("._layer_backward_kernels_", "._kernels_")]
lay = sys.modules[__name__.replace("._layer_backward_kernels_", "._layer_kernels_")]


@triton.jit
def _operands(x_row, dy_row, w_ptr, cols, mask, mean, den, HAS_W: tl.constexpr):
    """``(g, x_hat)`` in fp32 at ``cols`` (``den``: broadcast to ``cols``' shape)."""
    x_hat = tl.math.div_rn(fwd._widen(tl.load(x_row + cols, mask=mask, other=0.0)) - mean, den)
    g = fwd._widen(tl.load(dy_row + cols, mask=mask, other=0.0))
    if HAS_W:
        g = g * fwd._widen(tl.load(w_ptr + cols, mask=mask, other=0.0))
    return g, x_hat


@triton.jit
def _leaf_terms(x_row, dy_row, w_ptr, table_ptr, mean, den, first, ROWS: tl.constexpr, CW: tl.constexpr,
                D: tl.constexpr, NATURAL: tl.constexpr, HAS_W: tl.constexpr):
    """``g`` and ``g * x_hat`` of ``ROWS`` chunks from chunk ``first``, placed for the folds,
    each ``(ROWS, CW)`` with ``-0.0`` in the padding."""
    cols, valid = fwd._placed(table_ptr, first, ROWS, CW, D, NATURAL)
    g, x_hat = _operands(x_row, dy_row, w_ptr, cols, valid, mean, tl.broadcast_to(den, [ROWS * CW]), HAS_W)
    return (tl.reshape(tl.where(valid, g, -0.0), [ROWS, CW]),
            tl.reshape(tl.where(valid, g * x_hat, -0.0), [ROWS, CW]))


@triton.jit
def _dx_row(x_row, dy_row, dx_row, w_ptr, flag_ptr, mean, den, s_g, s_gx, mg, mgx,
            D: tl.constexpr, BLOCK: tl.constexpr, LOG_BLOCK: tl.constexpr, HAS_W: tl.constexpr,
            FOLDS: tl.constexpr):
    """``dx`` of one row from its means ``mg`` and ``mgx`` (``s_g``, ``s_gx``: the sums, for
    the flag), and the row's flag."""
    bad = ((s_g != s_g) | (tl.abs(s_g) == float("inf")) | (s_gx != s_gx) | (tl.abs(s_gx) == float("inf"))
           | (mean != mean) | (tl.abs(mean) == float("inf")) | (den == 0.0) | (den != den)
           | (den == float("inf")))
    nan = tl.full([BLOCK], 0, tl.int32)
    den_b = tl.broadcast_to(den, [BLOCK])
    for start in tl.range(0, D, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < D
        g, x_hat = _operands(x_row, dy_row, w_ptr, cols, mask, mean, den_b, HAS_W)
        nan = fwd._store_grad(dx_row + cols, tl.math.div_rn((g - mg) - x_hat * mgx, den_b), mask, nan)
    fwd._store_flag(flag_ptr, bad, nan, LOG_BLOCK, FOLDS)


@triton.jit
def _row_of(x_ptr, dy_ptr, mean_ptr, den_ptr, x_stride, dy_stride):
    """This program's row: ``(row, x_row, dy_row, mean, den)``."""
    row = tl.program_id(0).to(tl.int64)
    return row, x_ptr + row * x_stride, dy_ptr + row * dy_stride, tl.load(mean_ptr + row), tl.load(den_ptr + row)


@triton.jit
def _dx_of_sums(x_row, dy_row, dx_row, w_ptr, flag_ptr, mean, den, s_g, s_gx, D: tl.constexpr,
                BLOCK: tl.constexpr, LOG_BLOCK: tl.constexpr, HAS_W: tl.constexpr, FOLDS: tl.constexpr):
    """A float plan's ``dx`` from its two fp32 row sums: ``mg = s_g / D``, ``mgx = s_gx / D``
    (IEEE divisions, ``kernels.layer.mean_float``)."""
    d = tl.full([], D, tl.float32)
    _dx_row(x_row, dy_row, dx_row, w_ptr, flag_ptr, mean, den, s_g, s_gx, tl.math.div_rn(s_g, d),
            tl.math.div_rn(s_gx, d), D, BLOCK, LOG_BLOCK, HAS_W, FOLDS)


@triton.jit
def layer_dx_tree_kernel(x_ptr, dy_ptr, dx_ptr, w_ptr, mean_ptr, den_ptr, table_ptr, flag_ptr, x_stride, dy_stride,
                         dx_stride, D: tl.constexpr, NW: tl.constexpr, CW: tl.constexpr, LOG_C: tl.constexpr,
                         LOG_N: tl.constexpr, NATURAL: tl.constexpr, BLOCK: tl.constexpr,
                         LOG_BLOCK: tl.constexpr, HAS_W: tl.constexpr, FOLDS: tl.constexpr):
    """Pairwise leaves and the builder's tree (or one chunk), for both sums."""
    row, x_row, dy_row, mean, den = _row_of(x_ptr, dy_ptr, mean_ptr, den_ptr, x_stride, dy_stride)
    g, gx = _leaf_terms(x_row, dy_row, w_ptr, table_ptr, mean, den, 0, NW, CW, D, NATURAL, HAS_W)
    p_g = fwd._leaf_sums(g, LOG_C)
    p_gx = fwd._leaf_sums(gx, LOG_C)
    for _ in tl.static_range(LOG_N):
        p_g = fwd._fold_pairs(p_g)
        p_gx = fwd._fold_pairs(p_gx)
    s_g = tl.reshape(p_g, [])
    s_gx = tl.reshape(p_gx, [])
    _dx_of_sums(x_row, dy_row, dx_ptr + row * dx_stride, w_ptr, flag_ptr + row, mean, den, s_g, s_gx, D, BLOCK,
                LOG_BLOCK, HAS_W, FOLDS)


@triton.jit
def layer_dx_linear_kernel(x_ptr, dy_ptr, dx_ptr, w_ptr, mean_ptr, den_ptr, table_ptr, flag_ptr, x_stride,
                           dy_stride, dx_stride, D: tl.constexpr, N: tl.constexpr, CW: tl.constexpr,
                           LOG_C: tl.constexpr, NATURAL: tl.constexpr, BLOCK: tl.constexpr,
                           LOG_BLOCK: tl.constexpr, HAS_W: tl.constexpr, FOLDS: tl.constexpr):
    """Pairwise leaves and a left fold ``((p0 + p1) + p2) + ...``, for both sums."""
    row, x_row, dy_row, mean, den = _row_of(x_ptr, dy_ptr, mean_ptr, den_ptr, x_stride, dy_stride)
    g, gx = _leaf_terms(x_row, dy_row, w_ptr, table_ptr, mean, den, 0, 1, CW, D, NATURAL, HAS_W)
    s_g = tl.reshape(fwd._leaf_sums(g, LOG_C), [])
    s_gx = tl.reshape(fwd._leaf_sums(gx, LOG_C), [])
    for k in tl.range(1, N):
        g, gx = _leaf_terms(x_row, dy_row, w_ptr, table_ptr, mean, den, k, 1, CW, D, NATURAL, HAS_W)
        s_g = s_g + tl.reshape(fwd._leaf_sums(g, LOG_C), [])
        s_gx = s_gx + tl.reshape(fwd._leaf_sums(gx, LOG_C), [])
    _dx_of_sums(x_row, dy_row, dx_ptr + row * dx_stride, w_ptr, flag_ptr + row, mean, den, s_g, s_gx, D, BLOCK,
                LOG_BLOCK, HAS_W, FOLDS)


# --- exact plans: every addition exact, so any order gives the same bits ---


@triton.jit
def _exact_terms(x_row, dy_row, w_ptr, cols, mask, mean, den, HAS_W: tl.constexpr, PRODUCT: tl.constexpr):
    """fp64 terms at ``cols``: ``g`` (the first mean's), or with ``PRODUCT`` the exact
    product ``g * x_hat`` (two fp32 factors); 0 where masked."""
    g, x_hat = _operands(x_row, dy_row, w_ptr, cols, mask, mean, den, HAS_W)
    t = g.to(tl.float64)
    if PRODUCT:
        t = t * x_hat.to(tl.float64)
    return tl.where(mask, t, 0.0)


@triton.jit
def _exact_mean(x_row, dy_row, w_ptr, mean, den, D: tl.constexpr, BLOCK: tl.constexpr, LOG_BLOCK: tl.constexpr,
                HAS_W: tl.constexpr, FOLDS: tl.constexpr, PRODUCT: tl.constexpr):
    """``(the terms' mean correctly rounded to fp32, their sum in fp32)``: ``kernels.backward.sum_exact``'s
    pair (the row maximum, the scales, the terms pre-rounded on their grids and summed),
    then ``kernels.layer.mean_exact``.  The sum is NaN where the row has no finite scale."""
    den_b = tl.broadcast_to(den, [BLOCK])
    top = tl.full([BLOCK], 0.0, tl.float64)
    for start in tl.range(0, D, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        top = tl.maximum(top, tl.abs(_exact_terms(x_row, dy_row, w_ptr, cols, cols < D, mean, den_b, HAS_W,
                                                  PRODUCT)))
    sigma1, sigma2 = lay._scales(fwd._exact_reduce(top, LOG_BLOCK, True, FOLDS), D)
    s1 = tl.full([BLOCK], 0.0, tl.float64)
    s2 = tl.full([BLOCK], 0.0, tl.float64)
    for start in tl.range(0, D, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        v = _exact_terms(x_row, dy_row, w_ptr, cols, cols < D, mean, den_b, HAS_W, PRODUCT)
        q1 = (v + sigma1) - sigma1
        s1 += q1
        s2 += ((v - q1) + sigma2) - sigma2
    p1 = fwd._exact_reduce(s1, LOG_BLOCK, False, FOLDS)
    p2 = fwd._exact_reduce(s2, LOG_BLOCK, False, FOLDS)
    total = tl.where(sigma1 > 0, p1 + p2, float("nan")).to(tl.float32)
    return lay._mean_exact(p1, p2, D), total


@triton.jit
def layer_dx_exact_kernel(x_ptr, dy_ptr, dx_ptr, w_ptr, mean_ptr, den_ptr, flag_ptr, x_stride, dy_stride,
                          dx_stride, D: tl.constexpr, BLOCK: tl.constexpr, LOG_BLOCK: tl.constexpr,
                          HAS_W: tl.constexpr, FOLDS: tl.constexpr):
    """Exact plans over whole rows: each mean correctly rounded from its exact sum."""
    row, x_row, dy_row, mean, den = _row_of(x_ptr, dy_ptr, mean_ptr, den_ptr, x_stride, dy_stride)
    mg, s_g = _exact_mean(x_row, dy_row, w_ptr, mean, den, D, BLOCK, LOG_BLOCK, HAS_W, FOLDS, False)
    mgx, s_gx = _exact_mean(x_row, dy_row, w_ptr, mean, den, D, BLOCK, LOG_BLOCK, HAS_W, FOLDS, True)
    _dx_row(x_row, dy_row, dx_ptr + row * dx_stride, w_ptr, flag_ptr + row, mean, den, s_g, s_gx, mg, mgx,
            D, BLOCK, LOG_BLOCK, HAS_W, FOLDS)


@triton.jit
def layer_dwb_blocks_kernel(x_ptr, dy_ptr, mean_ptr, den_ptr, tail_ptr, dw_ptr, db_ptr, n_full, x_stride, dy_stride,
                            D: tl.constexpr, RB: tl.constexpr, LOG_RB: tl.constexpr, BLOCK_N: tl.constexpr,
                            WANT_W: tl.constexpr, WANT_B: tl.constexpr):
    """Block ``program_id(0)``'s sums of ``dy * x_hat`` (``WANT_W``) and of ``dy``
    (``WANT_B``) over its rows, columns of tile ``program_id(1)``: pairwise halving over
    the rows placed as ``kernels._row_block`` places them (as RMSNorm's ``dw_blocks_kernel``)."""
    blk, cols, rows, row_ok, col_ok, mask = fwd._row_block(tail_ptr, n_full, D, RB, BLOCK_N)
    dy = fwd._widen(tl.load(dy_ptr + rows[None, :] * dy_stride + cols[:, None], mask=mask, other=0.0))
    if WANT_W:
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        den = tl.load(den_ptr + rows, mask=row_ok, other=1.0)
        xv = fwd._widen(tl.load(x_ptr + rows[None, :] * x_stride + cols[:, None], mask=mask, other=0.0))
        x_hat = tl.math.div_rn(xv - tl.broadcast_to(mean[None, :], [BLOCK_N, RB]),
                               tl.broadcast_to(den[None, :], [BLOCK_N, RB]))
        fwd._store_block_sum(dw_ptr, dy * x_hat, mask, blk, cols, col_ok, D, LOG_RB)
    if WANT_B:
        fwd._store_block_sum(db_ptr, dy, mask, blk, cols, col_ok, D, LOG_RB)
