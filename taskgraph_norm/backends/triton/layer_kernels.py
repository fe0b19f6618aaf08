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


# --- exact plans: every addition exact (docs/exact.md), so any order gives the same bits ---


@triton.jit
def _two_sum(a, b):
    """``(s, e)``: ``s = fl(a + b)`` and ``a + b = s + e`` exactly (Knuth; fp64)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


@triton.jit
def _sgn(v):
    return tl.where(v > 0, 1.0, tl.where(v < 0, -1.0, 0.0))


@triton.jit
def _sign6(t0, t1, t2, t3, t4, t5):
    """The exact sign of ``t0 + ... + t5`` (fp64): ``kernels.layer._expansion`` (Shewchuk's
    Grow-Expansion, one term at a time) unrolled, then the sign of its last nonzero
    component."""
    c0 = t0
    q, c0 = _two_sum(t1, c0)
    c1 = q
    q, c0 = _two_sum(t2, c0)
    q, c1 = _two_sum(q, c1)
    c2 = q
    q, c0 = _two_sum(t3, c0)
    q, c1 = _two_sum(q, c1)
    q, c2 = _two_sum(q, c2)
    c3 = q
    q, c0 = _two_sum(t4, c0)
    q, c1 = _two_sum(q, c1)
    q, c2 = _two_sum(q, c2)
    q, c3 = _two_sum(q, c3)
    c4 = q
    q, c0 = _two_sum(t5, c0)
    q, c1 = _two_sum(q, c1)
    q, c2 = _two_sum(q, c2)
    q, c3 = _two_sum(q, c3)
    q, c4 = _two_sum(q, c4)
    sign = _sgn(c0)
    sign = tl.where(c1 != 0, _sgn(c1), sign)
    sign = tl.where(c2 != 0, _sgn(c2), sign)
    sign = tl.where(c3 != 0, _sgn(c3), sign)
    sign = tl.where(c4 != 0, _sgn(c4), sign)
    return tl.where(q != 0, _sgn(q), sign)


@triton.jit
def _side(s1, s2, mid, D: tl.constexpr):
    """The sign of ``s1 + s2 - mid * D``, exactly (``kernels.layer._side`` without a half):
    ``mid`` split by Veltkamp into two halves of <= 26 bits, ``D`` into two integers."""
    p = mid * 134217729.0  # 2**27 + 1
    hi = p - (p - mid)
    lo = mid - hi
    d_lo: tl.constexpr = D % 67108864  # 2**26
    d_hi: tl.constexpr = D - D % 67108864
    return _sign6(s1, s2, -(hi * d_hi), -(hi * d_lo), -(lo * d_hi), -(lo * d_lo))


@triton.jit
def _next32(c, up: tl.constexpr):
    """``torch.nextafter(c, +-inf)`` of a finite fp32 ``c`` (towards +inf when ``up``), by its bits."""
    b = c.to(tl.int32, bitcast=True)
    if up:
        n = tl.where(c == 0, 1, tl.where(c > 0, b + 1, b - 1))
    else:
        n = tl.where(c == 0, -2147483647, tl.where(c > 0, b - 1, b + 1))  # 0x80000001: -(smallest)
    return n.to(tl.float32, bitcast=True)


@triton.jit
def _mean_exact(s1, s2, D: tl.constexpr):
    """``(s1 + s2) / D`` correctly rounded to fp32, ties to even (``kernels.layer.mean_exact``)."""
    c = ((s1 + s2) / tl.full([], D, tl.float64)).to(tl.float32)  # fp64 division: IEEE (div.rn.f64)
    up = _next32(c, True)
    down = _next32(c, False)
    wide = c.to(tl.float64)
    above = _side(s1, s2, (wide + up.to(tl.float64)) * 0.5, D)
    below = _side(s1, s2, (wide + down.to(tl.float64)) * 0.5, D)
    even = (c.to(tl.int32, bitcast=True) & 1) == 0
    out = tl.where(above > 0, up, c)
    out = tl.where(above == 0, tl.where(even, c, up), out)
    out = tl.where(below < 0, down, out)
    return tl.where(below == 0, tl.where(even, c, down), out)


@triton.jit
def _round_pair32(s1, s2):
    """``s1 + s2`` correctly rounded to fp32 (``kernels.layer.round_pair``): the fp64 sum
    made round-to-odd from its TwoSum error, then rounded once."""
    s, e = _two_sum(s1, s2)
    b = s.to(tl.int64, bitcast=True)
    toward = tl.where((e > 0) == (s > 0), b + 1, b - 1)  # away from zero when e has s's sign
    fix = (tl.abs(s) < float("inf")) & (e != 0) & ((b & 1) == 0)
    return tl.where(fix, toward.to(tl.float64, bitcast=True), s).to(tl.float32)


@triton.jit
def _scales(m, D: tl.constexpr):
    """``kernels.exact_scale``: ``(sigma1, sigma2)`` of a row maximum ``m`` (fp64);
    zeros where there is no finite scale (the row is flagged)."""
    bound = m * (2.0 * D)
    finite = bound <= 8.98846567431158e307  # 2**1023 (false for NaN)
    sigma1 = fwd._pow2_at_least(tl.where(finite & (m > 0), bound, 1.0))
    sigma2 = fwd._pow2_at_least(sigma1 * (D * 2.220446049250313e-16))  # D * 2**-52
    return tl.where(finite, sigma1, 0.0), tl.where(finite, sigma2, 0.0)


@triton.jit
def _terms(x_row, cols, mask, mean, CENTERED: tl.constexpr):
    """fp64 terms at ``cols``: ``x`` (the mean's), or ``(x - mean)**2`` with ``x - mean``
    rounded in fp32 (the variance's; exact in fp64); 0 where masked."""
    v = fwd._widen(tl.load(x_row + cols, mask=mask, other=0.0))
    if CENTERED:
        d = (v - mean).to(tl.float64)
        t = d * d
    else:
        t = v.to(tl.float64)
    return tl.where(mask, t, 0.0)


@triton.jit
def _exact_pair(x_row, mean, D: tl.constexpr, BLOCK: tl.constexpr, LOG_BLOCK: tl.constexpr,
                FOLDS: tl.constexpr, CENTERED: tl.constexpr):
    """One reduction's exact pair ``(S1, S2)`` over the whole row: the row maximum, the
    scales, the terms pre-rounded on their grids and summed."""
    top = tl.full([BLOCK], 0.0, tl.float64)
    for start in tl.range(0, D, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        top = tl.maximum(top, tl.abs(_terms(x_row, cols, cols < D, mean, CENTERED)))
    sigma1, sigma2 = _scales(fwd._exact_reduce(top, LOG_BLOCK, True, FOLDS), D)
    s1 = tl.full([BLOCK], 0.0, tl.float64)
    s2 = tl.full([BLOCK], 0.0, tl.float64)
    for start in tl.range(0, D, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        v = _terms(x_row, cols, cols < D, mean, CENTERED)
        q1 = (v + sigma1) - sigma1
        s1 += q1
        s2 += ((v - q1) + sigma2) - sigma2
    return fwd._exact_reduce(s1, LOG_BLOCK, False, FOLDS), fwd._exact_reduce(s2, LOG_BLOCK, False, FOLDS)


@triton.jit
def layer_exact_kernel(x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, den_ptr, flag_ptr, x_stride, y_stride, eps,
                       D: tl.constexpr, BLOCK: tl.constexpr, LOG_BLOCK: tl.constexpr, HAS_W: tl.constexpr,
                       HAS_B: tl.constexpr, FOLDS: tl.constexpr):
    """Exact plans over whole rows: the correctly rounded mean of the exact ``sum(x)``,
    the exact sum of the squared deviations rounded once, then the float FINALIZE."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    zero = tl.full([], 0.0, tl.float32)
    s1, s2 = _exact_pair(x_row, zero, D, BLOCK, LOG_BLOCK, FOLDS, False)
    mean = _mean_exact(s1, s2, D)
    v1, v2 = _exact_pair(x_row, mean, D, BLOCK, LOG_BLOCK, FOLDS, True)
    var = _round_pair32(v1, v2)
    total = (s1 + s2).to(tl.float32)
    _finish_row(x_row, y_ptr + row * y_stride, w_ptr, b_ptr, mean_ptr + row, den_ptr + row, flag_ptr + row,
                total, mean, var, eps, D, BLOCK, HAS_W, HAS_B)
