"""The weight of a gated, grouped RMSNorm: a product whose gradient is the library's.

:class:`GatedWeight` multiplies the normalised value ``n`` by ``(w + offset)`` in a
given dtype (FINALIZE's product) and returns, as ``dW``, the sum over rows of
``dm * n`` in the library's order: over fixed blocks of rows
(:func:`taskgraph_norm.kernels.layer_backward.column_sum_blocks`, the order of
``kernels.weight_grad_float``) for ``weight_grad="float"``, or exactly (an
:class:`~.exact_grad.ExactSum`, carried into ``weight.grad`` by the hooks of
:mod:`.exact_weight`) for ``weight_grad="exact"``.  The weight may be a view of the
parameter (``(groups, group_size)``); autograd hands its gradient back through the view.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import kernels
from ..errors import ConfigError
from ..kernels.layer_backward import column_sum_blocks
from .exact_grad import ExactSum
from .exact_weight import GradWatch, watch_param

__all__ = ["GatedWeight", "weight_product"]


class GatedWeight(torch.autograd.Function):
    """``widen(n, wide) * (w.to(wide) + offset)`` with the library's ``dW``."""

    @staticmethod
    def forward(n: torch.Tensor, weight: torch.Tensor, offset: float, wide: torch.dtype,
                watch: GradWatch | None) -> torch.Tensor:
        return kernels.bf16_nans(kernels.widen(n, wide) * kernels.finalize_weight(weight, wide, offset))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        ctx.offset, ctx.wide, ctx.watch = inputs[2], inputs[3], inputs[4]
        ctx.save_for_backward(inputs[0], inputs[1])
        ctx.save_for_forward(inputs[0], inputs[1])

    @staticmethod
    def backward(ctx: Any, dm: torch.Tensor) -> tuple[Any, ...]:
        n, weight = ctx.saved_tensors
        dn = dw = None
        if ctx.needs_input_grad[0]:
            dn = (dm * kernels.finalize_weight(weight, ctx.wide, ctx.offset)).to(n.dtype)
        if ctx.needs_input_grad[1]:
            cols = weight.numel()
            if ctx.watch is not None:
                total = ExactSum(cols, n.device).add_products(
                    dm.reshape(-1, cols).to(torch.float32), n.reshape(-1, cols).to(torch.float32))
                dw = total.result(weight.dtype).view(weight.shape)
                ctx.watch.pending_add(total, dw)
            else:
                acc = kernels.accumulation_dtype(ctx.wide)
                t = dm.to(acc).reshape(-1, cols) * kernels.widen(n, acc).reshape(-1, cols)
                dw = column_sum_blocks(t, weight.dtype).view(weight.shape)
        return dn, dw, None, None, None

    @staticmethod
    def jvp(ctx: Any, t_n: torch.Tensor | None, t_w: torch.Tensor | None, *_: Any) -> torch.Tensor:
        # forward-mode AD: the product rule, as torch ops (differentiable again)
        n, weight = ctx.saved_tensors
        parts = []
        if t_n is not None:
            parts.append(kernels.widen(t_n, ctx.wide) * kernels.finalize_weight(weight, ctx.wide, ctx.offset))
        if t_w is not None:
            parts.append(kernels.widen(n, ctx.wide) * kernels.widen(t_w, ctx.wide))
        return parts[0] if len(parts) == 1 else parts[0] + parts[1]

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, ...], n: torch.Tensor, weight: torch.Tensor, offset: float,
             wide: torch.dtype, watch: GradWatch | None) -> tuple[torch.Tensor, int]:
        if in_dims[1] is not None or in_dims[0] is None:
            raise NotImplementedError("vmap over taskgraph_norm's gated RMSNorm batches x and the gate only (a "
                                      "batched weight is a different norm per sample: call it per sample)")
        # the weight multiplies the trailing dims: the vmapped dim becomes one more leading dim
        return _apply(n.movedim(in_dims[0], 0), weight, offset, wide, watch), 0


_apply: Any = GatedWeight.apply


def weight_product(n: torch.Tensor, weight: torch.Tensor, offset: float, wide: torch.dtype,
                   exact_param: torch.Tensor | None = None) -> torch.Tensor:
    """``n * (weight + offset)`` in ``wide``; ``exact_param``: the parameter whose
    ``.grad`` accumulates this product's ``dW`` exactly (``weight_grad="exact"``)."""
    watch = None
    if exact_param is not None:
        if n.dtype == torch.float64 or exact_param.dtype == torch.float64 or wide == torch.float64:
            raise ConfigError("weight_grad", "exact", "fp32, bf16 or fp16 inputs and weights (the exact "
                              "accumulator sums products of fp32 values; docs/training.md)")
        watch = watch_param(exact_param)  # (None: no .grad to accumulate into; the float dW)
    y: torch.Tensor = _apply(n, weight, offset, wide, watch)
    return y
