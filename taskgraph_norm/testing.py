"""Bitwise comparison helpers, for tests and for users checking invariance themselves.

Floating-point equality is the wrong tool for invariance claims: ``==`` says
``-0.0 == 0.0`` and ``nan != nan``.  These helpers compare the raw bits.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "assert_bits_equal",
    "bits",
    "bits_equal",
    "correctly_rounded_sumsq",
    "count_bit_differences",
]

_INT_VIEW = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits as a same-shaped integer tensor (NaN-safe, tells -0 from +0)."""
    return t.contiguous().view(_INT_VIEW[t.element_size()])


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when ``a`` and ``b`` have the same shape, dtype and bits."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a), bits(b))


def count_bit_differences(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many elements of same-shaped ``a`` and ``b`` differ in their bits."""
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"cannot compare {a.dtype}{list(a.shape)} with {b.dtype}{list(b.shape)}")
    return int((bits(a) != bits(b)).sum())


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, msg: str = "") -> None:
    """Raise AssertionError naming the first differing element unless the bits are equal."""
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        raise AssertionError(
            f"{msg}{': ' if msg else ''}shape/dtype differ: {actual.dtype}{list(actual.shape)} "
            f"vs {expected.dtype}{list(expected.shape)}"
        )
    diff = bits(actual) != bits(expected)
    if bool(diff.any()):
        idx = tuple(int(i) for i in diff.nonzero()[0])
        raise AssertionError(
            f"{msg}{': ' if msg else ''}{int(diff.sum())} of {diff.numel()} elements differ in "
            f"their bits; first at {idx}: {actual[idx].item()!r} vs {expected[idx].item()!r}"
        )


def _round_int_to_float(n: int, exponent: int, bits: int) -> float:
    """``n * 2**exponent`` (``n >= 0``) rounded to ``bits`` significant bits, ties to even."""
    excess = n.bit_length() - bits
    if excess > 0:
        q, r = divmod(n, 1 << excess)
        half = 1 << (excess - 1)
        if r > half or (r == half and q & 1):
            q += 1
        n, exponent = q, exponent + excess
    return math.ldexp(float(n), exponent)  # n has <= bits + 1 bits: exact


def correctly_rounded_sumsq(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-row ``sum(x**2)`` over the last dim, correctly rounded to ``dtype``.

    Squares of fp32/fp16/bf16 values are exact in fp64; they are summed as Python
    integers (exact) and rounded once, so this avoids the double rounding of
    ``float32(math.fsum(...))``.  Rows with Inf or NaN give ``inf`` / ``nan``.
    For fp64 ``x`` the squares themselves are rounded first.  Slow: for tests and
    benchmarks.  Subnormal results of ``dtype`` are not handled (the range here).
    """
    bits_of = {torch.float32: 24, torch.float64: 53, torch.float16: 11, torch.bfloat16: 8}[dtype]
    sq = x.double().square().reshape(-1, x.shape[-1]).tolist()
    out = []
    for row in sq:
        if any(math.isnan(v) for v in row):
            out.append(math.nan)
            continue
        if any(math.isinf(v) for v in row):
            out.append(math.inf)
            continue
        pairs = [math.frexp(v) for v in row if v != 0.0]
        if not pairs:
            out.append(0.0)
            continue
        emin = min(e for _, e in pairs) - 53
        total = sum(int(math.ldexp(m, 53)) << (e - 53 - emin) for m, e in pairs)
        out.append(_round_int_to_float(total, emin, bits_of))
    return torch.tensor(out, dtype=torch.float64).to(dtype).reshape(*x.shape[:-1], 1)
