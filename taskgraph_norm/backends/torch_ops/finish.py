"""FINALIZE for the compiled executor: what one call multiplies by and how it rounds.

:func:`finish_for` reads a plan's casting mode and offset once per call and says
what the tiles do after the sum of squares: the weight the torch ops multiply by
(``kernels.finalize_weight``, offset included), the weight and flags the native
C FINALIZE takes (or ``None`` where C cannot give ``kernels.finalize``'s bits: fp64
rows, an fp64 product), and the output dtype; its dtype-only
part, :func:`finish_rule`, is what the native direct path reads too.
:func:`finalize_tile` is ``kernels.finalize``'s op sequence written into a tile's
preallocated buffers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ... import caches, kernels
from ..native import loader as _native
from ...lowering import Plan
from .workspace import Views

__all__ = ["Finish", "Rule", "finalize_tile", "finish_for", "finish_rule"]


@dataclass(frozen=True, slots=True)
class Finish:
    """FINALIZE's parameters for one call.

    ``weight``: what the torch ops multiply by (``None``: no weight), in the
    accumulation dtype or narrower (exact there), or in the promoted dtype for
    ``llama``.  ``c_weight``/``c_flags``: the contiguous fp32 weight and the
    flags of the native FINALIZE, ``c_flags=None`` where it does not run it.
    ``llama``: the quotient is cast to ``x``'s dtype before the weight.
    """

    eps: float
    out_dtype: torch.dtype
    weight: torch.Tensor | None
    llama: bool
    c_weight: torch.Tensor | None
    c_flags: int | None


def _weight_for(weight: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    # y * w.to(acc): a bf16 weight multiplies exactly in acc as it is; a wider one must
    # be rounded to acc first, or the product would be computed wider; an fp16 one is
    # widened once here (kernels.widen: torch's mixed product would widen its NaNs by
    # position).
    if weight.dtype == acc or weight.dtype == torch.bfloat16:
        return weight
    return kernels.widen(weight, acc)


def _llama_flags(x_dtype: torch.dtype, product: torch.dtype) -> int | None:
    if x_dtype == torch.float32:
        return 0 if product == torch.float32 else None  # fp32 rows: the cast is the identity
    if x_dtype not in (torch.bfloat16, torch.float16):
        return None
    rounding = _native.ROUND_QUOTIENT | (_native.ROUND_F16 if x_dtype == torch.float16 else 0)
    if product == torch.float32:
        return rounding
    if product == x_dtype:
        return rounding | _native.ROUND_PRODUCT
    return None


class Rule(NamedTuple):
    """What FINALIZE does for one casting mode, input dtype and weight dtype.

    ``out_dtype``: what it returns.  ``weight_dtype``: the dtype ``w + offset`` is made
    in (``kernels.finalize_weight``; ``None``: no weight).  ``flags``: the native
    FINALIZE's flags, ``None`` where C cannot give ``kernels.finalize``'s bits.
    """

    out_dtype: torch.dtype
    llama: bool
    weight_dtype: torch.dtype | None
    flags: int | None


@functools.lru_cache(maxsize=64)
def finish_rule(casting_mode: str, x_dtype: torch.dtype, w_dtype: torch.dtype | None) -> Rule:
    """FINALIZE's :class:`Rule` (the part of :func:`finish_for` that depends on dtypes
    only; the direct path reads it once per dtype pair)."""
    acc = kernels.accumulation_dtype(x_dtype)
    out_dtype = kernels.output_dtype(x_dtype, w_dtype, casting_mode)
    llama = casting_mode == "llama" and w_dtype is not None
    flags = _llama_flags(x_dtype, out_dtype) if llama else 0
    if acc != torch.float32:
        flags = None  # fp64 keeps torch's FINALIZE (its CPU sqrt is not IEEE; native/loader.py)
    weight_dtype = None if w_dtype is None else out_dtype if llama else acc
    return Rule(out_dtype, llama, weight_dtype, flags)


def finish_for(plan: Plan, x_dtype: torch.dtype, weight: torch.Tensor | None, eps: float, native: bool) -> Finish:
    """FINALIZE's parameters for one call of ``plan`` on ``x_dtype`` input (the
    effective weight ``w + offset`` is made here once, not per tile)."""
    rule = finish_rule(plan.casting_mode, x_dtype, None if weight is None else weight.dtype)
    acc = kernels.accumulation_dtype(x_dtype)
    w: torch.Tensor | None = None
    if weight is not None:
        assert rule.weight_dtype is not None
        if rule.llama or plan.offset:
            w = kernels.finalize_weight(weight, rule.weight_dtype, plan.offset)
        else:
            w = _weight_for(weight, acc)
    c_weight = w.to(acc).contiguous() if native and w is not None and rule.flags is not None else None
    return Finish(eps, rule.out_dtype, w, rule.llama, c_weight, rule.flags)


@functools.lru_cache(maxsize=64)
def _hidden_divisor(hidden_size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(float(hidden_size), dtype=dtype, device=device)


def finalize_tile(
    plan: Plan, v: Views, xt: torch.Tensor, total: torch.Tensor, yt: torch.Tensor, fin: Finish, x_in_ybuf: bool,
) -> None:
    """kernels.finalize's op sequence, written into preallocated buffers.  A
    narrower x is divided as ``x.to(acc)`` held in ybuf (``x_in_ybuf``: already there)."""
    rms = v.rms
    # As in kernels.finalize: divide by a tensor (CUDA would multiply by the
    # reciprocal of a host scalar) and take the square root in fp64.
    divisor = _hidden_divisor(plan.hidden_size, rms.dtype, rms.device)
    if total is rms:
        rms.div_(divisor)
    elif total.dtype == rms.dtype:
        torch.div(total, divisor, out=rms)
    else:
        rms.copy_(total)  # the exact sum's one rounding to the accumulation dtype
        rms.div_(divisor)
    rms.add_(fin.eps)
    if rms.dtype == torch.float64:
        rms.copy_(kernels.sqrt_fp64(rms))
    else:
        rms.copy_(rms.double().sqrt_())
    if v.ybuf is not None:
        y = v.ybuf
    elif yt.dtype == rms.dtype:
        y = yt
    else:  # llama's wider product (an fp64 weight): the quotient needs its own buffer
        y = torch.empty(xt.shape, dtype=rms.dtype, device=xt.device)
    if y is yt:
        torch.div(xt, rms, out=y)
    else:
        if not x_in_ybuf or y is not v.ybuf:
            kernels.widen_into(y, xt)
        y.div_(rms)
    if fin.llama:
        assert fin.weight is not None
        # (x / rms).to(x.dtype), then the product in the promoted dtype.
        kernels.bf16_nans(torch.mul(kernels.widen(y.to(xt.dtype), yt.dtype), fin.weight, out=yt))
        return
    if fin.weight is not None:
        y.mul_(fin.weight)
    if y is not yt:
        yt.copy_(y)


caches.register(_hidden_divisor.cache_clear)
caches.register(finish_rule.cache_clear)
