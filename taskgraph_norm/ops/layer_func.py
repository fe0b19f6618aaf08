"""LayerNorm under forward-mode AD and ``torch.func`` transforms.

The op ``taskgraph_norm::layer_norm`` has no forward rule (``torch.library`` registers
none) and its registered autograd does not run under ``torch.func``'s grad transforms;
its guard refuses both (:func:`taskgraph_norm.ops.library._register_autograd`).
:class:`FuncLayerNorm` is the op's kernel and backward in the form the transforms need:
``setup_context``, a ``jvp`` rule (forward AD, ``torch.func.jvp``, ``jacfwd``,
``hessian``) and a ``vmap`` rule (rows are independent: the vmapped dim becomes one more
leading dim, the same kernel and bits).  :func:`layer_apply` sends a call to it while a
transform is active or an input carries a tangent, and to the op otherwise.

The primal ``y`` is the kernel's (the bits of every other path).  The tangent is
:func:`taskgraph_norm.kernels.layer_backward.layer_tangent`: plain torch ops, so it is
batched under ``vmap`` and differentiable for higher orders; the gradients are the op's
(:func:`taskgraph_norm.ops.layer._layer_norm_backward`: the native backward, or the
differentiable composite under ``create_graph`` and ``torch.func``).
"""

from __future__ import annotations

from typing import Any

import torch

from ..kernels.layer_backward import layer_tangent
from .layer import _forward, _layer_norm_backward, _setup, layer_norm_op
from .routing import dual

__all__ = ["FuncLayerNorm", "layer_apply", "layer_jvp", "layer_vmap_dim"]


def layer_jvp(ctx: Any, t_x: torch.Tensor | None, t_w: torch.Tensor | None,
              t_b: torch.Tensor | None) -> tuple[torch.Tensor, None, None]:
    """The tangents of ``(y, mean, den)`` (the statistics are non-differentiable) of a
    LayerNorm ``autograd.Function`` whose ``ctx`` saved ``(x, weight, ...)`` for forward
    and whose ``ctx.config`` starts with ``eps``."""
    x, weight = ctx.saved_tensors[:2]
    return layer_tangent(x, weight, ctx.config[0], t_x, t_w, t_b), None, None


def layer_vmap_dim(in_dims: tuple[int | None, ...]) -> int:
    """The vmapped dim of ``x`` in ``in_dims`` (``x``, ``weight``, ``bias``, ...): only ``x``
    may be batched (a batched weight or bias is a different norm per sample)."""
    x_dim = in_dims[0]
    if x_dim is None or in_dims[1] is not None or in_dims[2] is not None:
        raise NotImplementedError("vmap over taskgraph_norm's LayerNorm batches x only (a batched weight or "
                                  "bias is a different norm per sample: call it per sample)")
    return x_dim


class FuncLayerNorm(torch.autograd.Function):
    """The op ``taskgraph_norm::layer_norm``'s kernel and backward with ``setup_context``,
    ``jvp`` and ``vmap``: used while a ``torch.func`` transform is active or an input
    carries a forward-mode tangent."""

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                config: tuple[Any, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # config: (eps, chunk_size, topology, leaf, accumulate); the op's kernel itself
        return _forward(x, weight, bias, *config)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
        x, weight, bias, config = inputs
        _setup(ctx, (x, weight, bias, *config), output)  # the op's: config, saved tensors
        ctx.save_for_forward(x, weight, bias, output[1], output[2])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor, _dmean: Any, _dden: Any) -> tuple[Any, ...]:
        return _layer_norm_backward(ctx, dy, None, None)[:3] + (None,)

    @staticmethod
    def jvp(ctx: Any, t_x: torch.Tensor | None, t_w: torch.Tensor | None, t_b: torch.Tensor | None,
            _t_config: Any) -> tuple[torch.Tensor, None, None]:
        return layer_jvp(ctx, t_x, t_w, t_b)

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, ...], x: torch.Tensor, weight: torch.Tensor | None,
             bias: torch.Tensor | None, config: tuple[Any, ...]) -> tuple[Any, tuple[int, int, int]]:
        return _apply(x.movedim(layer_vmap_dim(in_dims), 0), weight, bias, config), (0, 0, 0)


_apply: Any = FuncLayerNorm.apply
_functorch_active = torch._C._are_functorch_transforms_active


def layer_apply(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                config: tuple[Any, ...]) -> torch.Tensor:
    """``y`` of a checked call (``config``: ``(eps, chunk_size, topology, leaf, accumulate)``):
    :class:`FuncLayerNorm` under a ``torch.func`` transform or with a tangent on an input,
    else the op (autograd's registered rule; tracers keep it as one node)."""
    if not torch.compiler.is_compiling() and (_functorch_active() or dual(x, weight, bias)):
        y: torch.Tensor = _apply(x, weight, bias, config)[0]
        return y
    out: torch.Tensor = layer_norm_op(x, weight, bias, *config)[0]
    return out
