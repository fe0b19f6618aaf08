"""The exact domain's kernels (docs/exact.md; ``kernels`` re-exports them).

A partial sum in the exact domain is a pair ``(S1, S2)`` stored in the last dim
(shape ``(..., 2)``, fp64): two Demmel-Nguyen folds.  Fold 1 rounds every square
``v`` to the grid of ``ulp(sigma1)``; the remainder ``r = v - q1`` (exact) is
rounded to the finer grid of ``ulp(sigma2)``.  Every partial sum of either fold is
a multiple of its grid unit far below ``2**53`` units, so every addition is exact
and the pair is the same for any merge order, chunking or topology.  The pair is
combined once, in FINALIZE.
"""

from __future__ import annotations

import torch

from . import _squares

__all__ = ["EXACT_CHANNELS", "rowmax_sq", "rowmax_sq_whole", "maximum", "exact_scale", "sumsq_exact",
           "combine_exact"]

EXACT_CHANNELS = 2


def rowmax_sq(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Per-row maximum of the squares of ``x[..., start:stop]`` in fp64 (NaN wins)."""
    s = _squares(x, start, stop, torch.float64)
    return torch.amax(s, dim=-1, keepdim=True)


def rowmax_sq_whole(x: torch.Tensor) -> torch.Tensor:
    """Per-row maximum of the squares of the whole row, in fp64 (NaN wins).

    The same value as the MAX merge of :func:`rowmax_sq` over any chunking of the
    row: squaring is monotone in ``|x|`` (and fp64 rounding is monotone), so the
    largest square is the square of the largest magnitude.  One pass over ``x``
    in its own dtype, instead of one over its fp64 squares.
    """
    # amax and amin, not aminmax: aminmax is not vectorised on CPU (10x slower here).
    hi = torch.amax(x, dim=-1, keepdim=True)
    lo = torch.amin(x, dim=-1, keepdim=True)
    magnitude = torch.maximum(hi.to(torch.float64), lo.to(torch.float64).neg())
    return magnitude * magnitude


def maximum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise maximum; exact, so the merge order of maxima never matters."""
    return torch.maximum(a, b)


def _pow2_at_least(bound: torch.Tensor) -> torch.Tensor:
    """The smallest power of two ``>= bound`` for positive finite ``bound``."""
    mantissa, exponent = torch.frexp(bound)
    # bound = mantissa * 2**exponent with mantissa in [0.5, 1): an exact power of
    # two has mantissa 0.5 and needs no rounding up.
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
    return torch.ldexp(torch.ones_like(bound), exponent)


def exact_scale(row_max: torch.Tensor, hidden_size: int) -> torch.Tensor:
    """The two pre-rounding scales ``(sigma1, sigma2)`` per row, shape ``(..., 2)``.

    ``sigma1 = 2**ceil(log2(2 D M))`` bounds every fold-1 partial sum;
    ``sigma2 = 2**ceil(log2(D ulp(sigma1)))`` bounds the sum of the fold-1
    remainders (each at most ``ulp(sigma1) / 2``).  A zero row gets
    ``sigma1 = 1``.  A row with no finite scale (an Inf or NaN square, or an fp64
    row with ``2 D M`` above ``2**1023``, whose ``sigma1`` would round up to inf)
    gets ``sigma1 = sigma2 = 0``: pre-rounding becomes the identity and the Inf or
    NaN reaches the sum as it does in torch's kernel.  (Only fp64 rows reach such
    bounds: an fp32 square is below ``2**256``.)
    """
    bound = row_max * (2.0 * hidden_size)
    # sigma1 must be finite too: a bound above 2**1023 (fp64 rows near the top of
    # the range) would round up to 2**1024 = inf, and (v + inf) - inf is NaN.
    finite = torch.isfinite(bound) & (bound <= 2.0**1023)
    safe = torch.where(finite & (row_max > 0), bound, torch.ones_like(bound))
    sigma1 = _pow2_at_least(safe)
    sigma2 = _pow2_at_least(sigma1 * (hidden_size * 2.0**-52))
    zero = torch.zeros_like(sigma1)
    return torch.cat([torch.where(finite, sigma1, zero), torch.where(finite, sigma2, zero)], dim=-1)


def _preround(v: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return (v + sigma) - sigma


def sumsq_exact(x: torch.Tensor, start: int, stop: int, sigmas: torch.Tensor) -> torch.Tensor:
    """The exact pair ``(S1, S2)`` of the squares of ``x[..., start:stop]``, ``(..., 2)``.

    Every addition here and in any later merge is exact, so the order inside the
    chunk is irrelevant and ``torch.sum`` (the fastest) is used for both folds.
    """
    sigma1, sigma2 = sigmas[..., :1], sigmas[..., 1:]
    v = _squares(x, start, stop, torch.float64)
    q1 = _preround(v, sigma1)
    # v - q1 is exact (Sterbenz-style: q1 is v rounded to a coarser grid).  Rows with
    # no scale (Inf/NaN) keep everything in fold 1: inf - inf must not become NaN.
    r = torch.where(sigma1 > 0, v - q1, torch.zeros_like(v))
    q2 = _preround(r, sigma2)
    return torch.cat(
        [torch.sum(q1, dim=-1, keepdim=True), torch.sum(q2, dim=-1, keepdim=True)], dim=-1
    )


def combine_exact(total: torch.Tensor) -> torch.Tensor:
    """``S1 + S2`` of an exact pair in fp64: the one rounding of the exact domain."""
    return total[..., :1] + total[..., 1:]
