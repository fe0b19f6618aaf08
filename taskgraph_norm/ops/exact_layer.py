"""LayerNorm's ``weight_grad="exact"``: ``dW`` and ``db`` as exact, order-free sums over rows.

:class:`ExactWeightLayerNorm` runs the op ``taskgraph_norm::layer_norm`` forward (the
same ``y`` bits as every other path) and a backward whose ``dx`` is the float backward's
(the op ``layer_norm_backward``: its row sums in the forward's merge order) and whose

* ``dW`` is this call's exact ``sum over rows of dy * x_hat``, and
* ``db`` this call's exact ``sum over rows of dy``,

each correctly rounded to its parameter's dtype and returned to autograd like any
gradient.  ``dy`` is widened to fp32 (exactly) and ``x_hat`` is the forward's
normalised value before the weight, ``(x.to(fp32) - mean) / den`` rounded to fp32
(:func:`taskgraph_norm.kernels.layer_backward.layer_x_hat`, step 4 of
:func:`~taskgraph_norm.kernels.layer.finalize_layer`): each product of two fp32 values
is exact, so the sum is the exact sum of the very terms the float ``dW`` adds in its
fixed row-block order.  The accumulation into ``weight.grad`` and ``bias.grad`` across
backward calls is RMSNorm's (:mod:`taskgraph_norm.ops.exact_weight`: each parameter's
:class:`~.exact_weight.GradWatch` hooks and the carry of
:data:`~taskgraph_norm.ops.exact_grad.exact_grads`), so the grads after the same rows in
any micro-batching and order are the same bits, and
``tgn.distributed.all_reduce_exact_grads`` reduces both across ranks.

Under ``create_graph=True`` the exact values carry the composite gradients' derivatives
(:func:`taskgraph_norm.ops.layer.composite_grads`).  Under forward-mode AD and the
``torch.func`` transforms it does what RMSNorm's exact weight gradient does
(:class:`~.exact_weight.ExactWeightRMSNorm`): the float mode's tangent
(:func:`~.layer_func.layer_jvp`), ``vmap`` over ``x``'s rows, ``torch.func.grad`` with
respect to the weight and bias returning this call's exact sums, and a clear
``NotImplementedError`` where ``vmap`` would need one exact sum per sample (``jacrev``,
``hessian`` or per-sample gradients with respect to the weight or bias).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError
from ..kernels import accumulation_dtype
from ..kernels.layer_backward import layer_x_hat
from .exact_grad import ExactSum
from .exact_weight import GradWatch, exact_value, grad_wanted, plain_tensor, watch_param
from .layer import composite_grads, layer_norm_backward_op, layer_norm_op
from .layer_func import layer_jvp, layer_vmap_dim

__all__ = ["ExactWeightLayerNorm", "exact_layer_apply"]

Watches = tuple[GradWatch | None, GradWatch | None]


def _call_sums(dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, den: torch.Tensor, hidden: int,
               want_w: bool, want_b: bool) -> tuple[ExactSum | None, ExactSum | None]:
    """This call's exact ``sum of dy * x_hat`` (``want_w``) and ``sum of dy`` (``want_b``)."""
    dy, x, mean, den = plain_tensor(dy), plain_tensor(x), plain_tensor(mean), plain_tensor(den)
    with torch._C._DisableFuncTorch():
        dy2 = dy.reshape(-1, hidden).to(torch.float32)
        dw = db = None
        if want_w:
            x_hat = layer_x_hat(x.reshape(-1, hidden), mean.reshape(-1, 1), den.reshape(-1, 1))
            dw = ExactSum(hidden, x.device).add_products(dy2, x_hat.to(torch.float32))
        if want_b:
            db = ExactSum(hidden, x.device).add_values(dy2)
        return dw, db


def _rounded(total: ExactSum, param: torch.Tensor, watch: GradWatch | None, composite: torch.Tensor | None
             ) -> torch.Tensor:
    """``total`` rounded to ``param``'s dtype and shape, handed to ``param``'s hooks (and
    differentiable as ``composite`` under ``create_graph``)."""
    with torch._C._DisableFuncTorch():
        value = total.result(param.dtype).view(param.shape)
    if watch is not None:
        watch.pending_add(total, value)
    return value if composite is None else exact_value(composite.view(param.shape), value)


class ExactWeightLayerNorm(torch.autograd.Function):
    """LayerNorm whose ``dW`` and ``db`` are this call's exact sums, correctly rounded."""

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: tuple[Any, ...],
                watches: Watches) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # config: (eps, chunk_size, topology, leaf, accumulate)
        y, mean, den = layer_norm_op(x, weight, bias, *config)
        return y, mean, den

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
        ctx.config, ctx.watches = inputs[3], inputs[4]
        ctx.save_for_backward(inputs[0], inputs[1], inputs[2], output[1], output[2])
        ctx.save_for_forward(inputs[0], inputs[1], inputs[2], output[1], output[2])
        ctx.mark_non_differentiable(output[1], output[2])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor, _dmean: Any, _dden: Any) -> tuple[Any, ...]:
        x, weight, bias, mean, den = ctx.saved_tensors
        eps, *config = ctx.config
        want_x = bool(ctx.needs_input_grad[0])
        want_w = grad_wanted(ctx, 1)
        want_b = bias is not None and grad_wanted(ctx, 2)
        dx = cw = cb = None
        if torch.is_grad_enabled():  # create_graph=True: differentiable ops
            dx, cw, cb = composite_grads(dy, x, weight, eps, (want_x, want_w, want_b))
        elif want_x:
            dx = layer_norm_backward_op(dy.contiguous(), x, weight, bias, mean, den, *config,
                                        [True, False, False])[0]
        if not (want_w or want_b):  # (no sum to form: nor its plain tensors, which vmap has not)
            return dx, None, None, None, None
        total_w, total_b = _call_sums(dy, x, mean, den, x.shape[-1], want_w, want_b)
        watch_w, watch_b = ctx.watches
        dw = None if total_w is None else _rounded(total_w, weight, watch_w, cw)
        db = None if total_b is None else _rounded(total_b, bias, watch_b, cb)
        return dx, dw, db, None, None

    @staticmethod
    def jvp(ctx: Any, t_x: torch.Tensor | None, t_w: torch.Tensor | None, t_b: torch.Tensor | None,
            *_rest: Any) -> tuple[torch.Tensor, None, None]:
        return layer_jvp(ctx, t_x, t_w, t_b)  # the float mode's tangent: dW's sum is not in it

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, ...], x: torch.Tensor, weight: torch.Tensor,
             bias: torch.Tensor | None, config: tuple[Any, ...], watches: Watches) -> tuple[Any, tuple[int, int, int]]:
        # x's rows only; a gradient of the weight or bias under vmap (jacrev, per-sample
        # gradients) cannot form one exact sum per sample: plain_tensor says so
        return _apply(x.movedim(layer_vmap_dim(in_dims), 0), weight, bias, config, watches), (0, 0, 0)


_apply: Any = ExactWeightLayerNorm.apply


def exact_layer_apply(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: tuple[Any, ...],
                      params: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
    """LayerNorm of 2-D-or-more ``x`` over its last dim with ``weight`` and ``bias`` (the
    parameters ``params`` themselves, or their flattened views) whose gradients are this
    call's exact sums, accumulated exactly into each parameter's ``grad``."""
    dtypes = {x.dtype, weight.dtype} | ({bias.dtype} if bias is not None else set())
    if torch.float64 in dtypes or accumulation_dtype(x.dtype) != torch.float32:
        raise ConfigError("weight_grad", "exact", "fp32, bf16 or fp16 inputs and parameters (the exact "
                          "accumulator sums products of fp32 values; docs/layernorm.md)")
    param_w, param_b = params
    watches = (watch_param(param_w), None if param_b is None else watch_param(param_b))
    y: torch.Tensor = _apply(x, weight, bias, config, watches)[0]
    return y
