"""``weight_grad="exact"``: the weight gradient as an exact, order-free sum over tokens.

:class:`ExactWeightRMSNorm` is the norm under eager autograd with the forward's
kernels (the same ``y`` bits as every other path) and a backward whose input
gradient is the float backward's (``dx`` through the forward's merge DAG) and whose
weight gradient is not returned to autograd at all: each backward adds
``dy * x_hat`` of its rows, exactly, to the parameter's accumulator
(:data:`taskgraph_norm.ops.exact_grad.exact_grads`) and writes
``weight.grad`` as the correctly rounded total in the weight's dtype.  ``x_hat`` is
the forward's normalised value without the weight, with the bits
``normalize(x, None)`` gives (``(x / rms)`` rounded to ``x``'s dtype); for fp32
``x`` the accumulator forms it itself (``accumulate_normalized``), so no ``x_hat``
tensor is written.

So ``weight.grad`` after the same rows in 1, 2, 8 or N micro-batches, in any order,
is the same bits; ``tgn.distributed.all_reduce_exact_grads`` extends that across
data-parallel ranks (docs/training.md).
"""

from __future__ import annotations

from typing import Any

import torch

from .. import kernels
from ..errors import ConfigError
from ..backends.triton import exact_dw as triton_dw
from .exact_grad import exact_grads
from . import backward as _backward
from . import forward as _forward

__all__ = ["ExactWeightRMSNorm", "exact_apply"]


class ExactWeightRMSNorm(torch.autograd.Function):
    """RMSNorm whose weight gradient goes to the parameter's exact accumulator."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, config: tuple[Any, ...],
                param: torch.Tensor) -> torch.Tensor:
        # config: (eps, chunk_size, topology, leaf, accumulate, casting_mode, offset)
        y, rms = _forward.forward(x, weight, *config)
        ctx.config, ctx.param = config, param
        ctx.save_for_backward(x, weight, rms)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
        x, weight, rms = ctx.saved_tensors
        eps, *config = ctx.config
        dy = dy.contiguous()
        dx = None
        if ctx.needs_input_grad[0]:
            float_backward: Any = _backward.backward
            dx, _ = float_backward(dy, x, weight, rms, *config, "float", [True, False])
        if ctx.needs_input_grad[1]:
            param = ctx.param
            shape = (-1, *param.shape)
            on_triton = triton_dw.runs(x)
            if rms.dtype == torch.float32 and (x.dtype == torch.float32 or on_triton):
                # x_hat = x / rms (rounded to x's dtype): normalize(x, None)'s bits, formed by
                # the accumulator's kernel (C on CPU fp32; Triton on CUDA, which widens dy itself)
                dy_rows = dy.reshape(shape) if on_triton else dy.reshape(shape).to(torch.float32)
                exact_grads.accumulate_normalized(param, dy_rows, x.reshape(shape), rms.reshape(-1))
            else:
                exact_grads.accumulate(param, dy.reshape(shape).to(torch.float32), _x_hat(x, rms).reshape(shape))
            exact_grads.finish(param)
        return dx, None, None, None  # the weight's gradient is written by the accumulator


def _x_hat(x: torch.Tensor, rms: torch.Tensor) -> torch.Tensor:
    """``(x / rms)`` rounded to ``x``'s dtype (bf16, fp16), as fp32 ``(rows, D)``:
    ``normalize(x, None)``'s bits (FINALIZE without a weight)."""
    hidden = x.shape[-1]
    rows = x.numel() // hidden
    x2, r2 = x.reshape(rows, hidden), rms.reshape(rows, 1)
    return (x2.to(kernels.accumulation_dtype(x.dtype)) / r2).to(x.dtype).to(torch.float32)


def exact_apply(x: torch.Tensor, weight: torch.Tensor, config: tuple[Any, ...],
                param: torch.Tensor) -> torch.Tensor:
    """The norm of ``x`` with ``weight`` (``param`` itself, or its flattened view) whose
    gradient goes exactly into ``param``'s accumulator."""
    if x.dtype == torch.float64 or param.dtype == torch.float64:
        raise ConfigError("weight_grad", "exact", "fp32, bf16 or fp16 inputs and weights (the exact "
                          "accumulator sums products of fp32 values; docs/training.md)")
    if param not in exact_grads:
        exact_grads.register(param)
    y: torch.Tensor = ExactWeightRMSNorm.apply(x, weight, config, param)  # type: ignore[no-untyped-call]
    return y
