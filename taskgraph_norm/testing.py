"""Bitwise comparison helpers, for tests and for users checking invariance themselves.

Floating-point equality is the wrong tool for invariance claims: ``==`` says
``-0.0 == 0.0`` and ``nan != nan``.  These helpers compare the raw bits.
"""

from __future__ import annotations

import torch

__all__ = ["bits", "bits_equal", "assert_bits_equal", "count_bit_differences"]

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
