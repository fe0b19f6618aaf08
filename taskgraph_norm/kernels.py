"""All torch numerics of taskgraph_norm, in one place.

Every function here is row-local: it reads and writes each row of ``(..., D)``
independently, with elementwise IEEE operations (add, multiply, divide, sqrt,
max) whose results do not depend on how many rows there are or how they are
vectorised.  The only exceptions are named for what they are: ``sumsq_native``
and ``catsum`` call ``torch.sum``, whose internal order is the backend's, and
``rms_norm_standard`` is torch's own kernel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "accumulation_dtype",
    "default_eps",
    "sumsq_pairwise",
    "sumsq_native",
    "sumsq_exact",
    "pairwise_halving_",
    "add",
    "accumulate",
    "catsum",
    "rowmax_sq",
    "maximum",
    "exact_scale",
    "finalize",
    "rms_norm_standard",
]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; fp32, fp16 and bf16 accumulate in fp32, as torch does."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_eps(dtype: torch.dtype) -> float:
    """What ``eps=None`` means in ``F.rms_norm``: the accumulation dtype's epsilon."""
    return torch.finfo(accumulation_dtype(dtype)).eps


def pairwise_halving_(s: torch.Tensor) -> torch.Tensor:
    """Sum the last dim of ``s`` by explicit halving, in place; returns ``s[..., :1]``.

    The order is fully specified: while the length ``L > 1``, with
    ``h = ceil(L / 2)``, element ``i < L - h`` becomes ``s[i] + s[i + h]``, and the
    middle element of an odd length is carried up unchanged.  The two halves never
    overlap, so each step is one elementwise add of disjoint slices.
    """
    length = s.shape[-1]
    while length > 1:
        half = (length + 1) // 2
        s[..., : length - half] += s[..., half:length]
        length = half
    return s[..., :1]


def _squares(x: torch.Tensor, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    chunk = x[..., start:stop].to(dtype)
    return chunk * chunk  # a fresh tensor: safe to reduce in place


def sumsq_pairwise(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Sum of squares of ``x[..., start:stop]`` per row, pairwise halving order."""
    return pairwise_halving_(_squares(x, start, stop, accumulation_dtype(x.dtype)))


def sumsq_native(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Sum of squares of ``x[..., start:stop]`` per row, ``torch.sum``'s own order.

    The chunk is made contiguous first so that a strided input reduces exactly
    like its contiguous copy.
    """
    s = _squares(x, start, stop, accumulation_dtype(x.dtype)).contiguous()
    return torch.sum(s, dim=-1, keepdim=True)


def add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Ordered binary merge ``a + b``."""
    return a + b


def accumulate(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """``acc += p`` over ``parts`` in the given (arrival) order, starting from zero.

    ``0 + p0`` is ``p0`` exactly for the non-negative partials of RMSNorm, so the
    first arrival is copied rather than added to a zero tensor.
    """
    acc = parts[0].clone()
    for part in parts[1:]:
        acc += part
    return acc


def catsum(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.sum(torch.cat(parts, -1), -1)``: the order inside is the backend's."""
    return torch.sum(torch.cat(list(parts), dim=-1), dim=-1, keepdim=True)


# --- exact domain (DESIGN.md section 5) -------------------------------------


def rowmax_sq(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Per-row maximum of the squares of ``x[..., start:stop]`` in fp64 (NaN wins)."""
    s = _squares(x, start, stop, torch.float64)
    return torch.amax(s, dim=-1, keepdim=True)


def maximum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise maximum; exact, so the merge order of maxima never matters."""
    return torch.maximum(a, b)


def exact_scale(row_max: torch.Tensor, hidden_size: int) -> torch.Tensor:
    """``sigma = 2 ** ceil(log2(2 * D * M))`` per row, in fp64.

    Rows whose maximum is zero get ``sigma = 1`` (every square pre-rounds to 0);
    rows whose maximum is Inf or NaN get ``sigma = 0``, so pre-rounding is the
    identity and the Inf or NaN reaches the sum as it would in torch's kernel.
    """
    bound = row_max * (2.0 * hidden_size)
    mantissa, exponent = torch.frexp(bound)
    # bound = mantissa * 2**exponent with mantissa in [0.5, 1): an exact power of two
    # has mantissa 0.5 and needs no rounding up.
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
    sigma = torch.ldexp(torch.ones_like(bound), exponent)
    sigma = torch.where(row_max == 0, torch.ones_like(sigma), sigma)
    return torch.where(torch.isfinite(bound), sigma, torch.zeros_like(sigma))


def sumsq_exact(
    x: torch.Tensor, start: int, stop: int, sigma: torch.Tensor, leaf: str
) -> torch.Tensor:
    """Pre-rounded fp64 sum of squares: ``q = (sigma + v) - sigma`` for every square.

    Every ``q`` and every partial sum is a multiple of ``ulp(sigma)`` far below
    ``2**53 * ulp(sigma)``, so every addition is exact and ``leaf`` only changes
    speed, never bits.
    """
    s = _squares(x, start, stop, torch.float64)
    s = (s + sigma) - sigma
    if leaf == "native":
        return torch.sum(s, dim=-1, keepdim=True)
    return pairwise_halving_(s)


# --- the end of every graph -----------------------------------------------------


def finalize(
    x: torch.Tensor,
    total: torch.Tensor,
    hidden_size: int,
    eps: float,
    weight: torch.Tensor | None,
) -> torch.Tensor:
    """``x / sqrt(total / D + eps) * w`` in the accumulation dtype, cast back.

    ``sqrt`` and ``/`` are correctly rounded on every IEEE backend and ``rsqrt``
    is not, so this form gives the same bits on every device.  An fp64 ``total``
    from the exact domain is rounded once to the accumulation dtype first.
    """
    dtype = accumulation_dtype(x.dtype)
    rms = torch.sqrt(total.to(dtype) / hidden_size + eps)
    y = x.to(dtype) / rms
    if weight is not None:
        y = y * weight.to(dtype)
    return y.to(x.dtype)


def rms_norm_standard(
    x: torch.Tensor, hidden_size: int, eps: float, weight: torch.Tensor | None
) -> torch.Tensor:
    """torch's own kernel, the report's baseline (its order is the backend's).

    torch's CPU kernel reduces a strided row in another order than a contiguous
    one, so the kernel sees a contiguous copy and the result is put back in the
    input's layout: every topology gives a strided input its contiguous copy's bits.
    """
    if x.is_contiguous():
        return F.rms_norm(x, (hidden_size,), weight, eps)
    y = F.rms_norm(x.contiguous(), (hidden_size,), weight, eps)
    return torch.empty_like(x).copy_(y)
