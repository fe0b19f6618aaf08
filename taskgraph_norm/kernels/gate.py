"""The gate's elementwise numerics: ``silu`` with the same bits wherever an element sits.

torch's own ``F.silu`` (and ``torch.sigmoid``) give an element different bits on the
vectorised path than on the scalar tail a loop ends with (``exp_u20`` against
``std::exp``: about 4% of fp32 elements), and where a loop's tail falls depends on
the tensor's size and the thread count: a gated row's bits would then depend on the
batch.  :func:`silu` evaluates ``g / (1 + exp(-g))`` in fp64 from additions,
multiplications, one division and an exponent built from bits, all correctly rounded
IEEE operations, and rounds the result once: the same bits for an element wherever
it is and however the loop is split (``tests/test_gated.py``).
"""

from __future__ import annotations

import math

import torch

from ..constants import GATE_EXP_CLAMP, GATE_EXP_TERMS

__all__ = ["COEFFICIENTS", "gate_product", "silu", "silu_sigmoid"]

#: ``ln 2`` split in two (fdlibm's ``ln2HI``/``ln2LO``): ``n * LN2_HI`` is exact for
#: ``|n| < 2**21``, so ``t - n * LN2_HI - n * LN2_LO`` reduces ``t`` to ``|r| <= ln2/2``.
LN2_HI = 6.93147180369123816490e-01
LN2_LO = 1.90821492927058770002e-10
INV_LN2 = 1.44269504088896338700e00
#: ``exp(r)`` for ``|r| <= ln2/2`` as Taylor's series to ``r**13 / 13!`` (relative error
#: under ``2**-52`` before the fp64 roundings), by Horner's rule (constants.GATE_EXP_TERMS).
EXP_TERMS = GATE_EXP_TERMS
#: ``1 / k!`` for ``k < EXP_TERMS``, each the correctly rounded fp64 quotient (``k!`` is
#: exact in fp64); csrc/native_gate.c divides the same exact integers at compile time.
COEFFICIENTS: tuple[float, ...] = tuple(1 / math.factorial(k) for k in range(EXP_TERMS))
#: ``-g`` is clamped to ``[-CLAMP, CLAMP]`` (constants.GATE_EXP_CLAMP).
CLAMP = float(GATE_EXP_CLAMP)


def _exp_fp64(t: torch.Tensor) -> torch.Tensor:
    """``exp(t)`` of fp64 ``t`` in ``[-CLAMP, CLAMP]`` from IEEE operations only."""
    n = torch.nan_to_num(torch.round(t * INV_LN2))
    r = (t - n * LN2_HI) - n * LN2_LO
    p = torch.full_like(r, COEFFICIENTS[-1])
    for c in reversed(COEFFICIENTS[:-1]):  # Horner: ((c13 r + c12) r + ...) r + c0
        p = p * r + c
    scale = ((n.to(torch.int64) + 1023) << 52).view(torch.float64)  # 2**n, exactly
    return p * scale


def silu_sigmoid(g: torch.Tensor, dtype: torch.dtype, sigmoid: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(g / (1 + exp(-g)), 1 / (1 + exp(-g)) or None)``, each rounded once to ``dtype``
    (fp32 or fp64) from fp64: position-invariant bits (``csrc/native_gate.c`` gives the same)."""
    gd = g.to(torch.float64)
    e = _exp_fp64(torch.clamp(-gd, -CLAMP, CLAMP)) + 1.0
    return (gd / e).to(dtype), ((1.0 / e).to(dtype) if sigmoid else None)


def gate_product(g: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(v.float() * silu(g))`` rounded to ``dtype`` (fp32, bf16, fp16; a bf16 or fp16 NaN
    is 0xFFFF, whatever torch's cast made of it): the gate applied to ``v`` in fp32, as
    ``csrc/native_gate.c`` does in one pass."""
    out = (v.to(torch.float32) * silu(g, torch.float32)).to(dtype)
    if out.element_size() == 2:
        nan = out.isnan()
        if bool(nan.any()):
            out.view(torch.int16).masked_fill_(nan, -1)
    return out


def silu(g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``g * sigmoid(g)`` rounded once to ``dtype`` (fp32 or fp64): position-invariant bits."""
    return silu_sigmoid(g, dtype)[0]
