# mypy: ignore-errors
# (Triton's language, not typed Python: triton ships no type information, and its
# kernel parameters take no annotations but tl.constexpr.)
"""Triton kernels of the certified plans: the reference's operations, one row per program.

Every kernel computes one row's total, then FINALIZE (``kernels.finalize``):

    mean = total / D + eps        fp32, IEEE division (``div_rn``), eps rounded to fp32 by the caller
    rms  = sqrt(fp64(mean))       an IEEE fp64 root (``sqrt.rn.f64``), rounded to fp32
    y    = x_acc / rms            IEEE division (no rsqrt, no reciprocal)
    llama: y = y.to(x.dtype)      (casting_mode="llama": the quotient rounded to x's dtype)
    y    = y * (w + OFFSET)       a separate multiply (no fma), the weight made in fp32
                                  (llama: in y's dtype, the promoted one of w and x)
    store y in y's dtype          one rounding (none for an fp32 or fp64 y)

With a residual (``HAS_R``) every load of ``x`` is ``h = x + r`` rounded to x's
dtype (fp16 and bf16 added in fp32, as torch adds them), and the FINALIZE pass
writes ``h`` out.  Every thread's FINALIZE waits for the row's total, which needs
every load of the sum, so ``h`` may overwrite ``x`` or ``r``.

Launches pass ``enable_fp_fusion=False``: with contraction on, ``x*x + y*y`` and
``x*x + sigma`` could become fmas, each with one rounding instead of two.

The row's flag is set when its total is not finite (an Inf or NaN input, an fp32
overflow) or its rms is zero (a zero row with ``eps = 0``): which NaN an operation
returns depends on the hardware, so the caller gives those rows the reference
interpreter's bits.

Dtypes are read from the pointers (``ptr.dtype.element_ty``: a compile-time value),
so each combination of x, weight and y dtypes is its own compiled kernel.

This file is loaded by :mod:`.runner` once per mode (compiled, or Triton's
interpreter under ``TRITON_INTERPRET=1``), as two module objects.  So it calls
only ``triton.language`` builtins and its own functions: the library's own
``@jit`` helpers (``tl.sum``, ``tl.max``, ``tl.zeros``, ``tl.cdiv``...) were
decorated in whichever mode was in force when triton was first imported, and
fail in the other one.
"""

import triton
import triton.language as tl

# The block shapes come from .layout, whose docstring says why the folds below
# perform the plan's additions and no others.


@triton.jit
def _fold_halves(s):
    """``(R, 2W) -> (R, W)``: ``b[:, i] + b[:, i + W]`` (a pairwise halving step)."""
    r: tl.constexpr = s.shape[0]
    w: tl.constexpr = s.shape[1] // 2
    a, b = tl.split(tl.permute(tl.reshape(s, [r, 2, w]), [0, 2, 1]))
    return a + b


@triton.jit
def _fold_pairs(p):
    """``(2N,) -> (N,)``: ``p[2i] + p[2i + 1]`` (a level of the builder's tree)."""
    n: tl.constexpr = p.shape[0] // 2
    a, b = tl.split(tl.reshape(p, [n, 2]))
    return a + b


@triton.jit
def _widen(v):
    """A value as fp32: exact for bf16 and fp16, rounded to nearest for fp64 (as
    ``w.to(torch.float32)``).  bf16 is widened with integer ops: Triton's
    interpreter flushes bf16 subnormals to zero in ``.to(tl.float32)``.
    (One ``return`` after a static ``if``: the compiler types every ``return`` of a
    function, even one a static branch skips.)"""
    if v.dtype == tl.bfloat16:
        wide = ((v.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
    else:
        wide = v.to(tl.float32)
    return wide


@triton.jit
def _bf16_bits(y):
    """fp32 -> bf16 bits (in an int32), round to nearest even, written out: Triton's
    interpreter truncates in ``.to(tl.bfloat16)``, the GPU rounds; integer ops give
    both the same bits (those of torch's conversion; a NaN becomes torch's scalar
    ``0x7FC0``)."""
    u = y.to(tl.int32, bitcast=True)
    r = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
    return tl.where(y != y, 0x7FC0, r)


@triton.jit
def _rounded(v, like):
    """fp32 ``v`` rounded to the element type of pointer ``like`` and widened back
    (exactly): ``v.to(dtype)`` of torch, kept in fp32.  The identity for fp32."""
    if like.dtype.element_ty == tl.bfloat16:
        r = (_bf16_bits(v) << 16).to(tl.float32, bitcast=True)
    else:
        r = v.to(like.dtype.element_ty).to(tl.float32)
    return r


@triton.jit
def _store(ptr, v, mask):
    """Store ``v`` (fp32, or fp64 for an fp64 ``ptr``) in ``ptr``'s dtype, rounded once."""
    if ptr.dtype.element_ty == tl.bfloat16:
        tl.store(ptr, _bf16_bits(v).to(tl.int16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr, v.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_h(x_row, r_row, offs, mask, HAS_R: tl.constexpr):
    """The row's values at ``offs`` in fp32 (``other``: +0): ``x``, or with a residual
    ``h = x + r`` rounded to x's dtype (``kernels.residual_add``: fp16 and bf16 are
    added in fp32 and rounded once, as torch does)."""
    v = _widen(tl.load(x_row + offs, mask=mask, other=0.0))
    if HAS_R:
        v = _rounded(v + _widen(tl.load(r_row + offs, mask=mask, other=0.0)), x_row)
    return v


@triton.jit
def _placed(table_ptr, first, ROWS: tl.constexpr, CW: tl.constexpr, D: tl.constexpr, NATURAL: tl.constexpr):
    """The columns of ``x`` in the ``ROWS * CW`` slots of ``ROWS`` chunks from chunk
    ``first`` (as :mod:`.layout` places them for the folds), and which slots hold one."""
    slots = first * CW + tl.arange(0, ROWS * CW)
    if NATURAL:
        cols = slots
        valid = slots < D
    else:
        cols = tl.load(table_ptr + slots)
        valid = cols >= 0
    return cols, valid


@triton.jit
def _leaf_squares(x_row, r_row, table_ptr, first, ROWS: tl.constexpr, CW: tl.constexpr,
                  D: tl.constexpr, NATURAL: tl.constexpr, HAS_R: tl.constexpr):
    """The squares of ``ROWS`` chunks from chunk ``first``, placed for the folds, ``(ROWS, CW)``."""
    slots = first * CW + tl.arange(0, ROWS * CW)
    if NATURAL:
        v = _load_h(x_row, r_row, slots, slots < D, HAS_R)
    else:
        cols = tl.load(table_ptr + slots)
        v = _load_h(x_row, r_row, cols, cols >= 0, HAS_R)
    return tl.reshape(v * v, [ROWS, CW])


@triton.jit
def _leaf_sums(s, LOG_C: tl.constexpr):
    """Pairwise leaves: ``(R, CW)`` squares -> ``(R,)`` chunk sums."""
    for _ in tl.static_range(LOG_C):
        s = _fold_halves(s)
    return tl.reshape(s, [s.shape[0]])


@triton.jit
def _times_weight(y, w_ptr, y_row, cols, mask, LLAMA: tl.constexpr, OFFSET: tl.constexpr):
    """``y * (w + OFFSET)`` (``kernels.finalize_weight``): the weight made in fp32, or
    with ``LLAMA`` in y's dtype (the promoted dtype of w and x: its fp32 sum rounded
    there; an fp64 y multiplies in fp64).  ``OFFSET`` is already rounded as torch
    rounds the scalar (the caller's); ``0.0`` adds nothing (a -0 weight keeps its sign)."""
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    if y_row.dtype.element_ty == tl.float64:
        w64 = w.to(tl.float64)
        if OFFSET != 0.0:
            w64 = w64 + tl.full([], OFFSET, tl.float64)
        product = y.to(tl.float64) * w64
    else:
        wv = _widen(w)
        if OFFSET != 0.0:
            wv = wv + tl.full([], OFFSET, tl.float32)
            if LLAMA:
                wv = _rounded(wv, y_row)
        product = y * wv
    return product


@triton.jit
def _finalize_row(x_row, r_row, h_row, y_row, w_ptr, flag_ptr, total, eps,
                  D: tl.constexpr, BLOCK: tl.constexpr, HAS_W: tl.constexpr, HAS_R: tl.constexpr,
                  LLAMA: tl.constexpr, OFFSET: tl.constexpr):
    """FINALIZE of one row from its fp32 ``total`` (see the module docstring)."""
    mean = tl.math.div_rn(total, tl.full([], D, tl.float32)) + eps
    rms = tl.sqrt(mean.to(tl.float64)).to(tl.float32)
    # A zero rms (a zero row with eps = 0) makes 0/0 NaNs, whose bits are the hardware's.
    bad = (total != total) | (tl.abs(total) == float("inf")) | (rms == 0.0)
    tl.store(flag_ptr, bad.to(tl.int8))
    for start in tl.range(0, D, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < D
        xv = _load_h(x_row, r_row, cols, mask, HAS_R)
        if HAS_R:
            _store(h_row + cols, xv, mask)
        y = tl.math.div_rn(xv, tl.broadcast_to(rms, [BLOCK]))
        if LLAMA:
            y = _rounded(y, x_row)  # (x / rms).to(x.dtype)
        if HAS_W:
            y = _times_weight(y, w_ptr, y_row, cols, mask, LLAMA, OFFSET)
        _store(y_row + cols, y, mask)


@triton.jit
def float_tree_kernel(x_ptr, r_ptr, h_ptr, y_ptr, w_ptr, table_ptr, flag_ptr,
                      x_stride, r_stride, h_stride, y_stride, eps,
                      D: tl.constexpr, NW: tl.constexpr, CW: tl.constexpr, LOG_C: tl.constexpr,
                      LOG_N: tl.constexpr, NATURAL: tl.constexpr, BLOCK: tl.constexpr,
                      HAS_W: tl.constexpr, HAS_R: tl.constexpr, LLAMA: tl.constexpr, OFFSET: tl.constexpr):
    """Pairwise leaves and the builder's tree (or one chunk): the whole row in registers."""
    row = tl.program_id(0).to(tl.int64)
    x_row, r_row = x_ptr + row * x_stride, r_ptr + row * r_stride
    s = _leaf_squares(x_row, r_row, table_ptr, 0, NW, CW, D, NATURAL, HAS_R)
    p = _leaf_sums(s, LOG_C)
    for _ in tl.static_range(LOG_N):
        p = _fold_pairs(p)
    total = tl.reshape(p, [])
    _finalize_row(x_row, r_row, h_ptr + row * h_stride, y_ptr + row * y_stride, w_ptr, flag_ptr + row,
                  total, eps, D, BLOCK, HAS_W, HAS_R, LLAMA, OFFSET)


@triton.jit
def float_linear_kernel(x_ptr, r_ptr, h_ptr, y_ptr, w_ptr, table_ptr, flag_ptr,
                        x_stride, r_stride, h_stride, y_stride, eps,
                        D: tl.constexpr, N: tl.constexpr, CW: tl.constexpr, LOG_C: tl.constexpr,
                        NATURAL: tl.constexpr, BLOCK: tl.constexpr, HAS_W: tl.constexpr,
                        HAS_R: tl.constexpr, LLAMA: tl.constexpr, OFFSET: tl.constexpr):
    """Pairwise leaves and a left fold ``((p0 + p1) + p2) + ...``, chunk by chunk."""
    row = tl.program_id(0).to(tl.int64)
    x_row, r_row = x_ptr + row * x_stride, r_ptr + row * r_stride
    total = tl.reshape(_leaf_sums(_leaf_squares(x_row, r_row, table_ptr, 0, 1, CW, D, NATURAL, HAS_R), LOG_C), [])
    for k in tl.range(1, N):
        leaf = _leaf_sums(_leaf_squares(x_row, r_row, table_ptr, k, 1, CW, D, NATURAL, HAS_R), LOG_C)
        total = total + tl.reshape(leaf, [])
    _finalize_row(x_row, r_row, h_ptr + row * h_stride, y_ptr + row * y_stride, w_ptr, flag_ptr + row,
                  total, eps, D, BLOCK, HAS_W, HAS_R, LLAMA, OFFSET)
@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


@triton.jit
def _exact_reduce(p, LOG: tl.constexpr, MAX: tl.constexpr, FOLDS: tl.constexpr):
    """Sum (or max) of a ``2**LOG`` block.  Every addition in the exact domain is
    exact and max is exact, so any order gives the same bits: ``tl.reduce`` when
    compiled; ``LOG`` vectorised folds in the interpreter (``FOLDS``), whose
    ``tl.reduce`` calls the combine function once per element, in Python."""
    if FOLDS:
        for _ in tl.static_range(LOG):
            a, b = tl.split(tl.reshape(p, [p.shape[0] // 2, 2]))
            if MAX:
                p = tl.maximum(a, b)
            else:
                p = a + b
        return tl.reshape(p, [])
    elif MAX:
        return tl.reduce(p, 0, _max)
    else:
        return tl.reduce(p, 0, _add)


@triton.jit
def _store_grad(ptr, v, mask, nan):
    """Store a gradient ``v`` (as :func:`_store`) and return ``nan`` with a 1 in each lane
    where ``v`` is NaN (the backward's flag: which NaN is the hardware's)."""
    _store(ptr, v, mask)
    return tl.maximum(nan, ((v != v) & mask).to(tl.int32))


@triton.jit
def _store_flag(flag_ptr, bad, nan, LOG: tl.constexpr, FOLDS: tl.constexpr):
    """A row's flag: ``bad``, or a NaN seen by :func:`_store_grad` in one of ``nan``'s
    ``2**LOG`` lanes."""
    bad = bad | (_exact_reduce(nan, LOG, True, FOLDS) != 0)
    tl.store(flag_ptr, bad.to(tl.int8))


@triton.jit
def _row_block(tail_ptr, n_full, D: tl.constexpr, RB: tl.constexpr, BLOCK_N: tl.constexpr):
    """The backward's ``(block of RB rows, column tile)`` program ``(program_id(0),
    program_id(1))``: ``(blk, cols, rows, row_ok, col_ok, mask)``, with slot ``p`` of the
    block holding its row ``p`` (a full block, ``blk < n_full``) or row ``tail[p]`` (the
    last, shorter block, placed as ``kernels.pairwise_halving_`` adds it; ``-1``: none)."""
    blk = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    slots = tl.arange(0, RB)
    in_block = tl.where(blk < n_full, slots, tl.load(tail_ptr + slots))
    row_ok = in_block >= 0
    col_ok = cols < D
    return blk, cols, blk * RB + in_block, row_ok, col_ok, row_ok[None, :] & col_ok[:, None]


@triton.jit
def _store_block_sum(out_ptr, t, mask, blk, cols, col_ok, D: tl.constexpr, LOG_RB: tl.constexpr):
    """Row ``blk`` of ``out``: the ``(BLOCK_N, RB)`` tile ``t`` summed over its rows by
    pairwise halving (``-0.0`` where ``mask`` is off: it adds nothing)."""
    t = tl.where(mask, t, -0.0)
    for _ in tl.static_range(LOG_RB):
        t = _fold_halves(t)
    tl.store(out_ptr + blk * D + cols, tl.reshape(t, [t.shape[0]]), mask=col_ok)


@triton.jit
def _pow2_at_least(bound):
    """The smallest power of two ``>= bound`` for a positive normal fp64 ``bound``
    (``kernels._pow2_at_least``): ``bound`` itself when its mantissa is zero, else
    the next binade."""
    b = bound.to(tl.int64, bitcast=True)
    exponent = b & 0x7FF0000000000000
    up = tl.where((b & 0x000FFFFFFFFFFFFF) == 0, b, exponent + 0x0010000000000000)
    return up.to(tl.float64, bitcast=True)


@triton.jit
def exact_kernel(x_ptr, r_ptr, h_ptr, y_ptr, w_ptr, flag_ptr, x_stride, r_stride, h_stride, y_stride, eps,
                 D: tl.constexpr, BLOCK: tl.constexpr, LOG_BLOCK: tl.constexpr, HAS_W: tl.constexpr,
                 HAS_R: tl.constexpr, LLAMA: tl.constexpr, OFFSET: tl.constexpr, FOLDS: tl.constexpr):
    """The exact domain over whole rows (``kernels.rowmax_sq_whole``, ``exact_scale``,
    ``sumsq_exact``, ``combine_exact``): every addition is exact, so the blocks and
    lanes may add in any order."""
    row = tl.program_id(0).to(tl.int64)
    x_row, r_row = x_ptr + row * x_stride, r_ptr + row * r_stride
    top = tl.full([BLOCK], 0.0, tl.float64)
    for start in tl.range(0, D, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        xv = _load_h(x_row, r_row, cols, cols < D, HAS_R).to(tl.float64)
        top = tl.maximum(top, tl.abs(xv))
    magnitude = _exact_reduce(top, LOG_BLOCK, True, FOLDS)
    bound = (magnitude * magnitude) * (2.0 * D)
    # fp32 squares are below 2**256, so only an Inf or NaN row has no finite scale;
    # its flag sends it to the reference.
    scaled = bound <= 8.98846567431158e307  # 2**1023: sigma1 would round up to inf
    sigma1 = _pow2_at_least(tl.where(scaled & (bound > 0), bound, 1.0))
    sigma2 = _pow2_at_least(sigma1 * (D * 2.220446049250313e-16))  # D * 2**-52
    s1 = tl.full([BLOCK], 0.0, tl.float64)
    s2 = tl.full([BLOCK], 0.0, tl.float64)
    for start in tl.range(0, D, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        xv = _load_h(x_row, r_row, cols, cols < D, HAS_R).to(tl.float64)
        v = xv * xv
        q1 = (v + sigma1) - sigma1
        s1 += q1
        s2 += ((v - q1) + sigma2) - sigma2
    total64 = _exact_reduce(s1, LOG_BLOCK, False, FOLDS) + _exact_reduce(s2, LOG_BLOCK, False, FOLDS)
    ok = scaled & (total64 == total64)
    total = tl.where(ok, total64, float("nan")).to(tl.float32)
    _finalize_row(x_row, r_row, h_ptr + row * h_stride, y_ptr + row * y_stride, w_ptr, flag_ptr + row,
                  total, eps, D, BLOCK, HAS_W, HAS_R, LLAMA, OFFSET)
