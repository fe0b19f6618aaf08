# mypy: ignore-errors
# (Triton's language, not typed Python: see kernels.py.)
"""Triton kernels of the backward (``kernels``' section "the backward"), one row per program.

With ``xa = x`` widened to fp32, ``g = dy * (w + OFFSET)`` in fp32 (``kernels.grad_operands``
with ``kernels.finalize_weight``'s weight) and the forward's fp32 ``rms`` of the row:

    s  = the row's sum of g * xa     float plans: the forward kernel's placement and folds
                                     (tree, or a left fold over the chunks); exact plans:
                                     kernels.sum_exact of the fp64 products, rounded once
    k  = ((s / D) / rms / rms) / rms  four IEEE divisions (div_rn)
    dx = g / rms - xa * k             a division, a multiply and a subtraction (no fma:
                                     launches pass enable_fp_fusion=False), x's dtype

and ``dW``'s block sums (``kernels.weight_grad_float``): one program per (block of
``ROW_BLOCK`` rows, column tile) sums ``dy * (xa / rms)`` (llama: ``xa / rms`` rounded
to x's dtype first) over the block's rows by pairwise halving; the caller merges the
block sums (``kernels.merge_blocks_``).

Padding is ``-0.0``, not ``+0``: the products here may be ``-0`` (the forward's squares
never are), and ``-0`` is the one value with ``v + (-0) == v`` for every ``v``, ``-0``
included; so a carried element keeps its sign as the reference's carried element does.

A row's flag is set when its ``s`` is not finite, its ``rms`` is zero or not finite, or
one of its ``dx`` values is NaN (which NaN is the hardware's): the caller gives those
rows the CPU torch path's bits.

Loaded by :mod:`.backward` once per mode, after the forward's kernels module of the
same mode, whose ``@jit`` helpers it calls as ``fwd.<name>`` (decorated in this mode).
"""

import sys

import triton
import triton.language as tl

fwd = sys.modules[__name__.replace("._backward_kernels_", "._kernels_")]


@triton.jit
def _grad_g(dy_row, w_ptr, cols, mask, HAS_W: tl.constexpr, OFFSET: tl.constexpr):
    """``g = dy * (w + OFFSET)`` in fp32 at ``cols`` (``dy`` without a weight); 0 where masked."""
    g = fwd._widen(tl.load(dy_row + cols, mask=mask, other=0.0))
    if HAS_W:
        w = fwd._widen(tl.load(w_ptr + cols, mask=mask, other=0.0))
        if OFFSET != 0.0:
            w = w + tl.full([], OFFSET, tl.float32)
        g = g * w
    return g


@triton.jit
def _leaf_products(x_row, dy_row, w_ptr, table_ptr, first, ROWS: tl.constexpr, CW: tl.constexpr,
                   D: tl.constexpr, NATURAL: tl.constexpr, HAS_W: tl.constexpr, OFFSET: tl.constexpr):
    """``g * xa`` of ``ROWS`` chunks from chunk ``first``, placed for the folds, ``(ROWS, CW)``,
    ``-0.0`` in the padding."""
    cols, mask = fwd._placed(table_ptr, first, ROWS, CW, D, NATURAL)
    xv = fwd._widen(tl.load(x_row + cols, mask=mask, other=0.0))
    v = tl.where(mask, _grad_g(dy_row, w_ptr, cols, mask, HAS_W, OFFSET) * xv, -0.0)
    return tl.reshape(v, [ROWS, CW])


@triton.jit
def _input_grad_row(x_row, dy_row, dx_row, w_ptr, rms_ptr, flag_ptr, total,
                    D: tl.constexpr, BLOCK: tl.constexpr, LOG_BLOCK: tl.constexpr, HAS_W: tl.constexpr,
                    OFFSET: tl.constexpr, FOLDS: tl.constexpr):
    """``dx`` of one row from its fp32 ``s`` (``total``), and the row's flag."""
    rms = tl.load(rms_ptr)
    k = tl.math.div_rn(total, tl.full([], D, tl.float32))
    k = tl.math.div_rn(tl.math.div_rn(tl.math.div_rn(k, rms), rms), rms)
    bad = (total != total) | (tl.abs(total) == float("inf")) | (rms == 0.0) | (rms != rms) | (rms == float("inf"))
    nan = tl.full([BLOCK], 0, tl.int32)
    rms_b = tl.broadcast_to(rms, [BLOCK])
    for start in tl.range(0, D, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < D
        xv = fwd._widen(tl.load(x_row + cols, mask=mask, other=0.0))
        g = _grad_g(dy_row, w_ptr, cols, mask, HAS_W, OFFSET)
        nan = fwd._store_grad(dx_row + cols, tl.math.div_rn(g, rms_b) - xv * k, mask, nan)
    fwd._store_flag(flag_ptr, bad, nan, LOG_BLOCK, FOLDS)


@triton.jit
def dx_tree_kernel(x_ptr, dy_ptr, dx_ptr, w_ptr, rms_ptr, table_ptr, flag_ptr, x_stride, dy_stride, dx_stride,
                   D: tl.constexpr, NW: tl.constexpr, CW: tl.constexpr, LOG_C: tl.constexpr,
                   LOG_N: tl.constexpr, NATURAL: tl.constexpr, BLOCK: tl.constexpr, LOG_BLOCK: tl.constexpr,
                   HAS_W: tl.constexpr, OFFSET: tl.constexpr, FOLDS: tl.constexpr):
    """Pairwise leaves and the builder's tree (or one chunk), as ``float_tree_kernel``."""
    row = tl.program_id(0).to(tl.int64)
    x_row, dy_row = x_ptr + row * x_stride, dy_ptr + row * dy_stride
    p = fwd._leaf_sums(_leaf_products(x_row, dy_row, w_ptr, table_ptr, 0, NW, CW, D, NATURAL, HAS_W, OFFSET),
                       LOG_C)
    for _ in tl.static_range(LOG_N):
        p = fwd._fold_pairs(p)
    _input_grad_row(x_row, dy_row, dx_ptr + row * dx_stride, w_ptr, rms_ptr + row, flag_ptr + row,
                    tl.reshape(p, []), D, BLOCK, LOG_BLOCK, HAS_W, OFFSET, FOLDS)


@triton.jit
def dx_linear_kernel(x_ptr, dy_ptr, dx_ptr, w_ptr, rms_ptr, table_ptr, flag_ptr, x_stride, dy_stride, dx_stride,
                     D: tl.constexpr, N: tl.constexpr, CW: tl.constexpr, LOG_C: tl.constexpr,
                     NATURAL: tl.constexpr, BLOCK: tl.constexpr, LOG_BLOCK: tl.constexpr,
                     HAS_W: tl.constexpr, OFFSET: tl.constexpr, FOLDS: tl.constexpr):
    """Pairwise leaves and a left fold over the chunks, as ``float_linear_kernel``."""
    row = tl.program_id(0).to(tl.int64)
    x_row, dy_row = x_ptr + row * x_stride, dy_ptr + row * dy_stride
    leaf = _leaf_products(x_row, dy_row, w_ptr, table_ptr, 0, 1, CW, D, NATURAL, HAS_W, OFFSET)
    total = tl.reshape(fwd._leaf_sums(leaf, LOG_C), [])
    for k in tl.range(1, N):
        leaf = _leaf_products(x_row, dy_row, w_ptr, table_ptr, k, 1, CW, D, NATURAL, HAS_W, OFFSET)
        total = total + tl.reshape(fwd._leaf_sums(leaf, LOG_C), [])
    _input_grad_row(x_row, dy_row, dx_ptr + row * dx_stride, w_ptr, rms_ptr + row, flag_ptr + row,
                    total, D, BLOCK, LOG_BLOCK, HAS_W, OFFSET, FOLDS)


@triton.jit
def dx_exact_kernel(x_ptr, dy_ptr, dx_ptr, w_ptr, rms_ptr, flag_ptr, x_stride, dy_stride, dx_stride,
                    D: tl.constexpr, BLOCK: tl.constexpr, LOG_BLOCK: tl.constexpr, HAS_W: tl.constexpr,
                    OFFSET: tl.constexpr, FOLDS: tl.constexpr):
    """``s`` exactly (``kernels.sum_exact`` of the fp64 products ``g * xa``, which are exact:
    two fp32 factors), as ``exact_kernel`` sums squares; every addition is exact, so the
    lanes and tiles may add in any order."""
    row = tl.program_id(0).to(tl.int64)
    x_row, dy_row = x_ptr + row * x_stride, dy_ptr + row * dy_stride
    top = tl.full([BLOCK], 0.0, tl.float64)
    for start in tl.range(0, D, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < D
        xv = fwd._widen(tl.load(x_row + cols, mask=mask, other=0.0)).to(tl.float64)
        v = _grad_g(dy_row, w_ptr, cols, mask, HAS_W, OFFSET).to(tl.float64) * xv
        top = tl.maximum(top, tl.abs(v))
    magnitude = fwd._exact_reduce(top, LOG_BLOCK, True, FOLDS)
    bound = magnitude * (2.0 * D)
    # fp32 products are below 2**256: only an Inf or NaN row has no finite scale (flagged).
    scaled = bound <= 8.98846567431158e307  # 2**1023
    sigma1 = fwd._pow2_at_least(tl.where(scaled & (bound > 0), bound, 1.0))
    sigma2 = fwd._pow2_at_least(sigma1 * (D * 2.220446049250313e-16))  # D * 2**-52
    s1 = tl.full([BLOCK], 0.0, tl.float64)
    s2 = tl.full([BLOCK], 0.0, tl.float64)
    for start in tl.range(0, D, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < D
        xv = fwd._widen(tl.load(x_row + cols, mask=mask, other=0.0)).to(tl.float64)
        v = _grad_g(dy_row, w_ptr, cols, mask, HAS_W, OFFSET).to(tl.float64) * xv
        q1 = (v + sigma1) - sigma1
        s1 += q1
        s2 += ((v - q1) + sigma2) - sigma2
    total64 = fwd._exact_reduce(s1, LOG_BLOCK, False, FOLDS) + fwd._exact_reduce(s2, LOG_BLOCK, False, FOLDS)
    total = tl.where(scaled & (total64 == total64), total64, float("nan")).to(tl.float32)
    _input_grad_row(x_row, dy_row, dx_ptr + row * dx_stride, w_ptr, rms_ptr + row, flag_ptr + row,
                    total, D, BLOCK, LOG_BLOCK, HAS_W, OFFSET, FOLDS)


@triton.jit
def dw_blocks_kernel(x_ptr, dy_ptr, rms_ptr, tail_ptr, out_ptr, n_full, x_stride, dy_stride,
                     D: tl.constexpr, RB: tl.constexpr, LOG_RB: tl.constexpr, BLOCK_N: tl.constexpr,
                     LLAMA: tl.constexpr):
    """Block ``program_id(0)``'s sum of ``dy * x_hat`` over its rows, columns of tile
    ``program_id(1)``: pairwise halving over the rows (``kernels.pairwise_halving_``),
    as folds of an ``(BLOCK_N, RB)`` tile whose slot ``p`` holds the block's row ``p``
    (a full block) or row ``tail[p]`` (the last, shorter block; ``-1``: ``-0.0``)."""
    blk, cols, rows, row_ok, col_ok, mask = fwd._row_block(tail_ptr, n_full, D, RB, BLOCK_N)
    rms = tl.load(rms_ptr + rows, mask=row_ok, other=1.0)
    xv = fwd._widen(tl.load(x_ptr + rows[None, :] * x_stride + cols[:, None], mask=mask, other=0.0))
    x_hat = tl.math.div_rn(xv, tl.broadcast_to(rms[None, :], [BLOCK_N, RB]))
    if LLAMA:
        x_hat = fwd._rounded(x_hat, x_ptr)  # casting_mode="llama": x_hat rounded to x's dtype
    dy = fwd._widen(tl.load(dy_ptr + rows[None, :] * dy_stride + cols[:, None], mask=mask, other=0.0))
    fwd._store_block_sum(out_ptr, dy * x_hat, mask, blk, cols, col_ok, D, LOG_RB)
