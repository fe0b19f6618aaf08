"""LayerNorm's ``torch.library`` ops, with fake rules and a registered autograd::

    taskgraph_norm::layer_norm(x, weight?, bias?, eps, chunk_size, topology, leaf, accumulate)
                              -> (y, mean, den)
    taskgraph_norm::layer_norm_backward(dy, x, weight?, mean, den, chunk_size, topology, leaf,
                                        accumulate, bool[3] output_mask) -> (dx, dW, db)

``mean`` and ``den = sqrt(var / D + eps)`` (``(..., 1)``, the accumulation dtype) are
what the backward needs of the forward.  Both kernels call the LayerNorm pipeline
(:mod:`taskgraph_norm.pipeline.layer`), so the ops give the bits every face gives;
``torch.compile(fullgraph=True)`` and ``torch.export`` keep them as opaque nodes.

The backward (:mod:`taskgraph_norm.kernels.layer_backward`): ``dx``'s two row sums in
the forward's merge order (batch-invariant), ``dW`` and ``db`` over fixed row blocks.
Under ``create_graph=True`` it is taken by differentiable torch ops instead (their
``torch.sum`` order), so that second derivatives exist.  The op has no forward-mode
AD rule (torch.library registers none) and its autograd rule does not run under
``torch.func``'s grad transforms: a call with a tangent, or under ``grad``/``jacrev``,
is refused with a ``NotImplementedError`` naming the faces, which carry both through
:class:`taskgraph_norm.ops.layer_func.FuncLayerNorm` (the same kernels and bits).
"""

from __future__ import annotations

from typing import Any

import torch

from .. import kernels
from ..kernels.layer_backward import composite_x_hat
from ..pipeline.layer import layer_pipeline
from ..pipeline.layer_checks import check_layer_input
from .library import LIBRARY, _register_autograd

__all__ = ["layer_norm_backward_op", "layer_norm_op"]

_CONFIG = "int chunk_size, str topology, str leaf, str accumulate"

_library: Any = torch.library

LIBRARY.define(f"layer_norm(Tensor x, Tensor? weight, Tensor? bias, float eps, {_CONFIG}) -> (Tensor, Tensor, Tensor)")
LIBRARY.define(f"layer_norm_backward(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor den, "
               f"{_CONFIG}, bool[3] output_mask) -> (Tensor, Tensor, Tensor)")


def _stats_shape(x: torch.Tensor) -> tuple[int, ...]:
    return (*x.shape[:-1], 1) if x.dim() else (1,)


def _forward(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, chunk_size: int,
    topology: str, leaf: str, accumulate: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hidden = x.shape[-1] if x.dim() else 1
    check_layer_input(x, hidden, weight, bias)
    pipe = layer_pipeline(max(hidden, 1), chunk_size, topology, leaf, accumulate)
    acc = kernels.accumulation_dtype(x.dtype)
    if hidden == 0 or x.numel() == 0:
        empty = x.new_empty(_stats_shape(x), dtype=acc)
        return torch.empty_like(x), empty, empty.clone()
    y, mean, den = pipe.forward(x, weight, bias, eps, stats=True)
    assert mean is not None and den is not None
    return y, mean, den


def _backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, mean: torch.Tensor,
    den: torch.Tensor, chunk_size: int, topology: str, leaf: str, accumulate: str, output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hidden = x.shape[-1]
    rows = x.numel() // hidden if hidden else 0
    want_w = bool(output_mask[1]) and weight is not None
    want_b = bool(output_mask[2]) and bias is not None
    dx = dw = db = None
    if hidden and rows:
        pipe = layer_pipeline(hidden, chunk_size, topology, leaf, accumulate)
        dx, dw, db = pipe.backward(
            dy.reshape(rows, hidden).contiguous(), x.reshape(rows, hidden), weight, mean.reshape(rows, 1),
            den.reshape(rows, 1), input_grad=bool(output_mask[0]), weight_grad=want_w, bias_grad=want_b,
            weight_dtype=None if weight is None else weight.dtype, bias_dtype=None if bias is None else bias.dtype)
    dx_out = dx.view(x.shape) if dx is not None else (torch.zeros_like(x) if output_mask[0] else x.new_empty(0))
    dw_out = dw if dw is not None else (torch.zeros_like(weight) if want_w and weight is not None else x.new_empty(0))
    db_out = db if db is not None else (torch.zeros_like(bias) if want_b and bias is not None else x.new_empty(0))
    return dx_out, dw_out, db_out


LIBRARY.impl("layer_norm", _forward, "CompositeExplicitAutograd")
LIBRARY.impl("layer_norm_backward", _backward, "CompositeExplicitAutograd")
LIBRARY.impl("layer_norm_backward", _library.fallthrough_kernel, "Autograd")

layer_norm_op = torch.ops.taskgraph_norm.layer_norm.default
layer_norm_backward_op = torch.ops.taskgraph_norm.layer_norm_backward.default


def _forward_fake(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                  *config: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    acc = kernels.accumulation_dtype(x.dtype)
    return (torch.empty_like(x), x.new_empty(_stats_shape(x), dtype=acc), x.new_empty(_stats_shape(x), dtype=acc))


def _backward_fake(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   *rest: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mask = rest[-1]
    dx = x.new_empty(x.shape) if mask[0] else x.new_empty(0)
    dw = weight.new_empty(weight.shape) if mask[1] and weight is not None else x.new_empty(0)
    db = bias.new_empty(bias.shape) if mask[2] and bias is not None else x.new_empty(0)
    return dx, dw, db


_library.register_fake("taskgraph_norm::layer_norm", _forward_fake, lib=LIBRARY)
_library.register_fake("taskgraph_norm::layer_norm_backward", _backward_fake, lib=LIBRARY)


def composite_grads(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, eps: float, needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """LayerNorm's gradients as differentiable torch ops (``torch.sum``'s order), for a
    double backward (``create_graph=True``): the same formula as the kernels."""
    acc = kernels.accumulation_dtype(x.dtype)
    hidden = x.shape[-1]
    x_hat, den = composite_x_hat(x, eps)
    dya = dy.to(acc)
    dx = dw = db = None
    if needs[0]:
        g = dya if weight is None else dya * weight.to(acc)
        dx = ((g - g.mean(dim=-1, keepdim=True) - x_hat * (g * x_hat).mean(dim=-1, keepdim=True)) / den).to(x.dtype)
    if needs[1] and weight is not None:
        dw = (dya * x_hat).reshape(-1, hidden).sum(0).to(weight.dtype)
    if needs[2]:
        db = dya.reshape(-1, hidden).sum(0)
    return dx, dw, db


def _setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    x, weight, bias, eps = inputs[:4]
    ctx.config = (eps, *inputs[4:])
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, bias, output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])


def _layer_norm_backward(ctx: Any, dy: torch.Tensor, _dmean: Any, _dden: Any) -> tuple[Any, ...]:
    x, weight, bias, mean, den = ctx.saved_tensors
    needs = ctx.needs_input_grad
    eps, *config = ctx.config
    if torch.is_grad_enabled():
        dx, dw, db = composite_grads(dy, x, weight, eps, (needs[0], needs[1], needs[2]))
        if db is not None and bias is not None:
            db = db.to(bias.dtype)
    else:
        dx, dw, db = layer_norm_backward_op(dy, x, weight, bias, mean, den, *config,
                                            [needs[0], needs[1], needs[2]])
    return ((dx if needs[0] else None), (dw if needs[1] and weight is not None else None),
            (db if needs[2] and bias is not None else None)) + (None,) * 5


# (guarded: a tangent or a torch.func grad transform is refused, never dropped; the faces
# carry them by taskgraph_norm.ops.layer_func.FuncLayerNorm)
_register_autograd("layer_norm", _layer_norm_backward, _setup,
                   faces="tgn.layer_norm_sync, tgn.layer_norm or tgn.LayerNorm")
