"""LayerNorm's numerics: the torch form of every LayerNorm op, the oracle the
backends are tested against (docs/design.md, "LayerNorm"; docs/exact.md).

``y = (x - mean) / sqrt(var + eps) * w + b`` over the last dim, in the accumulation
dtype ``acc`` (fp32 for fp32/bf16/fp16 ``x``, fp64 for fp64), cast once to
``x``'s dtype.  Two passes, never ``E[x^2] - E[x]^2``:

1. ``mean``: the row's ``SUM`` leaves (``x[a:b].to(acc)`` summed in the leaf's
   order) merged by the graph, then :func:`mean_float` (``total / D``, a tensor
   divisor) or :func:`mean_exact` (the exact pair's value over ``D``, correctly
   rounded once);
2. ``var * D``: the centered ``SUMSQ`` leaves over ``d * d`` with
   ``d = x[a:b].to(acc) - mean`` (:func:`deviations`: each ``d`` rounded once in
   ``acc``), merged by a DAG of the same shape;
3. :func:`finalize_layer`, whose docstring is the one statement of the op order.

Every function is row-local; ``*_native`` call ``torch.sum`` (the backend's order)
and :func:`layer_norm_standard` is torch's own kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import EXACT_CHANNELS, accumulation_dtype, finalize_rms, pairwise_halving_, rowmax_sq, sumsq_exact
from .sqrt import split

__all__ = [
    "LAYER_EPS",
    "deviations",
    "finalize_layer",
    "layer_norm_standard",
    "mean_exact",
    "mean_float",
    "round_pair",
    "rowmax_abs",
    "rowmax_centered",
    "sumsq_centered_exact",
    "sumsq_centered_native",
    "sumsq_centered_pairwise",
    "xsum_exact",
    "xsum_native",
    "xsum_pairwise",
]

#: What ``eps=None`` means for LayerNorm: ``F.layer_norm``'s (and ``nn.LayerNorm``'s) 1e-5.
LAYER_EPS = 1e-5


# --- the mean's leaves ------------------------------------------------------------


def xsum_pairwise(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Sum of ``x[..., start:stop].to(acc)`` per row, pairwise halving order."""
    chunk = x[..., start:stop].to(accumulation_dtype(x.dtype), copy=True)  # fresh: reduced in place
    return pairwise_halving_(chunk)


def xsum_native(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Sum of ``x[..., start:stop].to(acc)`` per row in ``torch.sum``'s order (of the
    contiguous chunk, so a strided input reduces like its contiguous copy)."""
    chunk = x[..., start:stop].to(accumulation_dtype(x.dtype)).contiguous()
    return torch.sum(chunk, dim=-1, keepdim=True)


def rowmax_abs(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Per-row maximum of ``|x[..., start:stop]|`` in fp64 (NaN wins): the exact SUM's
    row maximum (ROWMAX with ``power=1``)."""
    return torch.amax(x[..., start:stop].to(torch.float64).abs(), dim=-1, keepdim=True)


def _preround_pair(v: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The exact pair ``(S1, S2)`` of fp64 values ``v`` on the scales' two grids (as
    :func:`taskgraph_norm.kernels.sumsq_exact` does for squares): signed values work
    the same, since ``|v| <= M`` and ``sigma1 >= 2 D M``."""
    sigma1, sigma2 = sigmas[..., :1], sigmas[..., 1:]
    q1 = (v + sigma1) - sigma1
    r = torch.where(sigma1 > 0, v - q1, torch.zeros_like(v))  # exact; no NaN from inf - inf
    q2 = (r + sigma2) - sigma2
    return torch.cat([torch.sum(q1, dim=-1, keepdim=True), torch.sum(q2, dim=-1, keepdim=True)], dim=-1)


def xsum_exact(x: torch.Tensor, start: int, stop: int, sigmas: torch.Tensor) -> torch.Tensor:
    """The exact pair ``(S1, S2)`` of ``x[..., start:stop]``'s values (``(..., 2)``,
    fp64): every addition here and in any merge is exact, so ``torch.sum`` is used."""
    return _preround_pair(x[..., start:stop].to(torch.float64), sigmas)


# --- the mean -----------------------------------------------------------------------


def mean_float(total: torch.Tensor, hidden_size: int) -> torch.Tensor:
    """``total / D`` in ``total``'s dtype (a tensor divisor: CUDA turns division by a
    host scalar into a multiplication by its reciprocal, which rounds differently)."""
    return total / torch.full_like(total, hidden_size)


def _two_sum(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, e)`` with ``s = fl(a + b)`` and ``a + b = s + e`` exactly (Knuth)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _expansion(terms: list[torch.Tensor]) -> list[torch.Tensor]:
    """``terms``' exact sum as a nonoverlapping expansion, smallest component first
    (Shewchuk's Grow-Expansion, one term at a time): its sign is the sign of its
    last nonzero component, and the fl-sum of its components is the sum to ~1 ulp."""
    components: list[torch.Tensor] = []
    for term in terms:
        q, grown = term, []
        for c in components:
            q, e = _two_sum(q, c)
            grown.append(e)
        components = grown + [q]
    return components


def _sign(components: list[torch.Tensor]) -> torch.Tensor:
    """The sign (-1, 0, 1; NaN for a non-finite sum) of a nonoverlapping expansion."""
    sign = torch.sign(components[0])
    for c in components[1:]:
        sign = torch.where(c != 0, torch.sign(c), sign)
    return sign


def _times_d(a: torch.Tensor, hidden_size: int) -> list[torch.Tensor]:
    """``a * D`` as four fp64 products whose sum is exact (``a`` split by Veltkamp into
    two halves of <= 26 bits, ``D < 2**52`` into two integers of <= 26 bits)."""
    hi, lo = split(a)
    d_lo = float(hidden_size % (1 << 26))
    d_hi = float(hidden_size - hidden_size % (1 << 26))
    return [hi * d_hi, hi * d_lo, lo * d_hi, lo * d_lo]


def _side(total: torch.Tensor, mid: torch.Tensor, half: torch.Tensor | None, hidden_size: int) -> torch.Tensor:
    """The sign of ``S1 + S2 - (mid + half) * D``, exactly (``half`` a power of two or
    None): which side of the midpoint ``mid + half`` the exact quotient lies on."""
    terms = [total[..., :1], total[..., 1:]] + [-t for t in _times_d(mid, hidden_size)]
    if half is not None:
        terms.append(-(half * float(hidden_size)))  # exact: a power of two times D < 2**53
    return _sign(_expansion(terms))


def _pick(c: torch.Tensor, up: torch.Tensor, down: torch.Tensor, above: torch.Tensor,
          below: torch.Tensor, even: torch.Tensor) -> torch.Tensor:
    """Round to nearest, ties to even, from the candidate ``c``, its neighbours and
    the sides of the two midpoints around it (NaN sides keep ``c``)."""
    out = torch.where(above > 0, up, c)
    out = torch.where(above == 0, torch.where(even, c, up), out)
    out = torch.where(below < 0, down, out)
    return torch.where(below == 0, torch.where(even, c, down), out)


def mean_exact(total: torch.Tensor, hidden_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The exact pair's value ``(S1 + S2) / D`` correctly rounded to ``dtype`` (fp32 or
    fp64), ties to even: one rounding of the exact quotient, never two.

    The fp64 path alone is not enough: ``RN64(RN64(S1 + S2) / D)`` rounded to fp32
    double-rounds (``x = [1, 2**-24, 2**-70, 0]`` has ``S1 = 1 + 2**-24``,
    ``S2 = 2**-70``; the fp64 path lands on the fp32 midpoint ``(1 + 2**-24) / 4``
    and ties to even downwards, where the exact quotient rounds up).  So: a fp64
    candidate ``c`` (fp32: ``RN32(RN64(RN64(S1 + S2) / D))``; fp64: that plus one
    Newton step on the exact residual), within a fraction of an ulp of the exact
    quotient, then the exact sign of ``S1 + S2 - mid * D`` at the two midpoints
    around ``c`` (Veltkamp products and a Grow-Expansion: no rounding) says
    whether it moves to a neighbour or ties.  Rows with a non-finite or
    overflowing term keep the plain candidate (their mean is Inf or NaN anyway).
    """
    s1, s2 = total[..., :1], total[..., 1:]
    divisor = torch.full_like(s1, hidden_size)
    m0 = (s1 + s2) / divisor
    if dtype == torch.float32:
        c = m0.to(torch.float32)
        up = torch.nextafter(c, torch.full_like(c, float("inf")))
        down = torch.nextafter(c, torch.full_like(c, float("-inf")))
        wide = c.double()
        above = _side(total, (wide + up.double()) * 0.5, None, hidden_size)  # midpoints of
        below = _side(total, (wide + down.double()) * 0.5, None, hidden_size)  # 25 bits: exact
        even = (c.view(torch.int32) & 1) == 0
        return _pick(c, up, down, above, below, even)
    parts = _expansion([s1, s2] + [-t for t in _times_d(m0, hidden_size)])
    residual = parts[0]
    for part in parts[1:]:  # smallest first: the exact residual to about an ulp
        residual = residual + part
    c = m0 + residual / divisor
    c = torch.where(torch.isfinite(c), c, m0)
    up = torch.nextafter(c, torch.full_like(c, float("inf")))
    down = torch.nextafter(c, torch.full_like(c, float("-inf")))
    above = _side(total, c, (up - c) * 0.5, hidden_size)
    below = _side(total, c, (down - c) * 0.5, hidden_size)
    even = (c.view(torch.int64) & 1) == 0
    return _pick(c, up, down, above, below, even)


def round_pair(total: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``S1 + S2`` of an exact pair correctly rounded to ``dtype`` (fp32 or fp64), once.

    fp64: one IEEE addition is the correctly rounded sum.  fp32: the fp64 sum is
    made *round-to-odd* first (its inexactness kept in the last bit, from the
    TwoSum error), so the one rounding to fp32 is the correct one (Boldo and
    Melquiond: 53 >= 24 + 2 bits); plain ``fp64 -> fp32`` would round twice.
    """
    s, e = _two_sum(total[..., :1], total[..., 1:])
    if dtype == torch.float64:
        return s
    fix = torch.isfinite(s) & (e != 0) & ((s.view(torch.int64) & 1) == 0)
    odd = torch.nextafter(s, torch.where(e > 0, torch.full_like(s, float("inf")), torch.full_like(s, float("-inf"))))
    return torch.where(fix, odd, s).to(dtype)


# --- the variance's leaves -----------------------------------------------------------


def deviations(x: torch.Tensor, start: int, stop: int, mean: torch.Tensor) -> torch.Tensor:
    """``d = x[..., start:stop].to(acc) - mean``, each rounded once in ``acc`` (a fresh
    tensor).  ``mean`` is ``(..., 1)`` in ``acc``."""
    return x[..., start:stop].to(mean.dtype) - mean


def sumsq_centered_pairwise(x: torch.Tensor, start: int, stop: int, mean: torch.Tensor) -> torch.Tensor:
    """Sum of ``d * d`` over the chunk per row (``d``: :func:`deviations`), pairwise
    halving order, in ``acc``."""
    d = deviations(x, start, stop, mean)
    return pairwise_halving_(d * d)


def sumsq_centered_native(x: torch.Tensor, start: int, stop: int, mean: torch.Tensor) -> torch.Tensor:
    """Sum of ``d * d`` over the chunk per row, ``torch.sum``'s order."""
    d = deviations(x, start, stop, mean)
    return torch.sum((d * d).contiguous(), dim=-1, keepdim=True)


def rowmax_centered(x: torch.Tensor, start: int, stop: int, mean: torch.Tensor) -> torch.Tensor:
    """Per-row maximum of ``d * d`` over the chunk, in fp64 (exact for fp32 ``d``)."""
    d = deviations(x, start, stop, mean)
    return rowmax_sq(d, 0, d.shape[-1])


def sumsq_centered_exact(x: torch.Tensor, start: int, stop: int, mean: torch.Tensor,
                         sigmas: torch.Tensor) -> torch.Tensor:
    """The exact pair ``(S1, S2)`` of the squares ``d * d`` over the chunk (each square
    exact in fp64 for an fp32 ``d``; rounded once for fp64 rows)."""
    d = deviations(x, start, stop, mean)
    return sumsq_exact(d, 0, d.shape[-1], sigmas)


# --- the end ---------------------------------------------------------------------------


def finalize_layer(
    x: torch.Tensor,
    total: torch.Tensor,
    mean: torch.Tensor,
    hidden_size: int,
    eps: float,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """LayerNorm's FINALIZE, the one statement of its op order (``acc`` the
    accumulation dtype, every step an IEEE operation rounded in ``acc``):

    1. ``var_sum = total`` rounded once to ``acc`` (an exact pair: :func:`round_pair`);
    2. ``den = sqrt(var_sum / D + eps)``: a tensor divisor, the correctly rounded
       sqrt (:func:`taskgraph_norm.kernels.finalize_rms`, as RMSNorm's);
    3. ``d = x.to(acc) - mean`` (the same rounding as the variance's leaves);
    4. ``y = d / den`` (a division, not a multiply by ``rsqrt``);
    5. ``y = y * w.to(acc)`` when there is a weight;
    6. ``y = y + b.to(acc)`` when there is a bias;
    7. ``y.to(x.dtype)``.

    ``F.layer_norm`` multiplies by ``rsqrt`` (and may fuse), so it differs by a few ulp.
    """
    dtype = accumulation_dtype(x.dtype)
    var_sum = round_pair(total, dtype) if total.shape[-1] == EXACT_CHANNELS else total.to(dtype)
    den = finalize_rms(var_sum, hidden_size, eps, dtype)
    y = (x.to(dtype) - mean) / den
    if weight is not None:
        y = y * weight.to(dtype)
    if bias is not None:
        y = y + bias.to(dtype)
    return y.to(x.dtype)


def layer_norm_standard(x: torch.Tensor, hidden_size: int, eps: float, weight: torch.Tensor | None,
                        bias: torch.Tensor | None) -> torch.Tensor:
    """torch's own ``F.layer_norm`` (the baseline; its order is the backend's), on a
    contiguous copy of a strided input, put back in the input's layout."""
    if x.is_contiguous():
        return F.layer_norm(x, (hidden_size,), weight, bias, eps)
    y = F.layer_norm(x.contiguous(), (hidden_size,), weight, bias, eps)
    return torch.empty_like(x).copy_(y)
