"""The correctly rounded fp64 square root in torch ops.

torch's CPU fp64 ``sqrt`` is not correctly rounded (about 1.3% of random values
differ from IEEE ``sqrt`` by one ulp), and which values differ depends on the CPU it
runs on, so an fp64 row's ``rms`` taken with it differs between machines.  Here it is
the starting point, and an exact residual test moves it to the IEEE root:

1. ``t = f * 4**k`` with ``f`` in ``[1, 4)`` (``frexp``; the scalings are exact), so
   ``r = sqrt(f)`` lies in ``[1, 2)`` and nothing below can underflow or overflow.
2. The IEEE root of ``f`` is ``up = nextafter(r, +)`` where ``sqrt(f)`` lies above the
   midpoint ``m = (r + up) / 2``, that is where ``f > r * up + (up - r)**2 / 4``.
   ``f - r * up`` is a multiple of ``2**-104`` (``f``'s ulp is at least ``2**-52``;
   ``r`` and ``up`` are multiples of ``2**-52``), larger than ``(up - r)**2 / 4``
   (at most ``2**-104``, when ``r`` is 2, and then the multiple is ``2**-102``), so the
   test is ``f - r * up > 0``: with ``r * up = p + e`` exactly (Dekker's product, plain
   multiplies and adds) and ``f - p`` exact (Sterbenz: ``p`` is within a few ulps of
   ``f``), the sign of ``RN((f - p) - e)``.  Likewise the root is ``down =
   nextafter(r, 0)`` where ``f - r * down <= 0``.  (No root is a midpoint.)
3. Two rounds of step 2 correct a start up to two ulps off; the root is scaled back by
   ``2**k`` (exact: a power of two built from its bits).

Zero, negative, infinite and NaN inputs keep ``torch.sqrt``'s value, which is exact
for them.  ``tests/test_kernels.py`` compares the result with NumPy's (IEEE) root on
random values of every scale, subnormals, binade edges and squares and their
neighbours, and checks that the start alone differs.  Under compile, the product's
steps must not be fused into an fma (inductor's CPU code is built with
``-ffp-contract=off``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["split", "sqrt_fp64"]

#: Dekker's splitter for a 53-bit significand: ``2**27 + 1``.
_SPLITTER = 134217729.0


def split(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Veltkamp's split of fp64 ``v``: ``(hi, lo)``, ``hi + lo = v`` exactly, each of at most
    26 significant bits (so products of halves are exact); ``|v|`` below ``2**996``."""
    g = v * _SPLITTER
    hi = g - (g - v)
    return hi, v - hi


def _product(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p, e)``: ``p = RN(a * b)`` and ``a * b = p + e`` exactly (no underflow or overflow)."""
    ah, al = split(a)
    bh, bl = split(b)
    p = a * b
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def _round_root(f: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """One round of step 2 above: ``r``, or its neighbour nearer to ``sqrt(f)``."""
    up = torch.nextafter(r, torch.full_like(r, 4.0))
    down = torch.nextafter(r, torch.zeros_like(r))
    p, e = _product(r, up)
    higher = (f - p) - e > 0
    p, e = _product(r, down)
    lower = (f - p) - e <= 0
    return torch.where(higher, up, torch.where(lower, down, r))


def sqrt_fp64(t: torch.Tensor) -> torch.Tensor:
    """The IEEE (correctly rounded) square root of the fp64 tensor ``t``, elementwise,
    on any device."""
    if t.dtype != torch.float64:
        raise TypeError(f"sqrt_fp64 takes float64, not {t.dtype}")
    return _rooted(t, torch.sqrt)


def _rooted(t: torch.Tensor, start: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """:func:`sqrt_fp64` from ``start(f)``, a root of ``f`` at most two ulps off (the tests
    give it deliberately wrong ones)."""
    root = torch.sqrt(t)
    ordinary = (t > 0) & (t < float("inf"))
    m, e = torch.frexp(torch.where(ordinary, t, torch.ones_like(t)))  # t = m * 2**e, m in [0.5, 1)
    k = torch.div(e - 1, 2, rounding_mode="floor")  # t = f * 4**k, f = m * 2**(e - 2k) in [1, 4)
    f = torch.where(e - 2 * k == 1, m * 2.0, m * 4.0)
    r = start(f)
    for _ in range(2):
        r = _round_root(f, r)
    scale = ((k.to(torch.int64) + 1023) << 52).view(torch.float64)  # 2**k, k in [-538, 511]
    return torch.where(ordinary, r * scale, root)
