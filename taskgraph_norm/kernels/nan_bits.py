"""NaN bits that do not depend on where a value sits (``kernels`` re-exports them).

torch's CPU casts and bf16 arithmetic write a NaN one way in their vectorised loops
and another in the scalar loop that ends a tensor (or a thread's share of it): an
fp16 NaN widened to fp32 keeps its sign and payload in the first (IEEE's widening,
F16C's) and becomes 0x7FFFFFFF in the second; a bf16 sum or product that is NaN is
0xFFFF in the first and 0x7FC0 in the second.  Which elements the scalar loop gets
depends on the tensor's length and thread split, not on the row, so these give every
element the vector loops' bits (CUDA's casts treat every element alike).

Under a ``torch.func`` transform (a wrapped tensor: ``vmap``'s batched values cannot
steer a Python branch) the fix is applied without first asking whether a NaN is there:
the same bits.
"""

from __future__ import annotations

import torch

__all__ = ["widen", "widen_into", "bf16_nans"]

_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def _widen_nans(out: torch.Tensor, src: torch.Tensor) -> None:
    if src.dtype == torch.float16 and out.dtype == torch.float32 and out.device.type == "cpu":
        nan = out.isnan()
        if _wrapped(out):  # (torch.func: no data-dependent branch; values only, outside autograd)
            with torch.no_grad():
                d = out.detach()
                d.copy_(torch.where(nan, src.detach().to(torch.float64).to(torch.float32), d))
        elif bool(nan.any()):
            out[nan] = src[nan].to(torch.float64).to(torch.float32)  # fp64's widening keeps them everywhere


def widen(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, an fp16 NaN widened to fp32 keeping its sign and payload."""
    out = t.to(dtype)
    if out is not t:
        _widen_nans(out, t)
    return out


def widen_into(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dst.copy_(src)`` (same shape), an fp16 NaN widened as :func:`widen` does."""
    dst.copy_(src)
    _widen_nans(dst, src)
    return dst


def bf16_nans(t: torch.Tensor) -> torch.Tensor:
    """``t`` (in place), each NaN of a bf16 result of torch's arithmetic made 0xFFFF,
    as its vector loops and every fp32-to-bf16 cast make it."""
    if t.dtype == torch.bfloat16 and t.device.type == "cpu":
        nan = t.isnan()
        if _wrapped(t):  # (torch.func: no data-dependent branch)
            with torch.no_grad():
                t.detach().view(torch.int16).masked_fill_(nan, -1)
        elif bool(nan.any()):
            t.view(torch.int16).masked_fill_(nan, -1)  # bits 0xFFFF
    return t
