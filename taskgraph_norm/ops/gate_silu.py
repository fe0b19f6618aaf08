"""The gate's ``silu`` as an ``autograd.Function``: reverse mode, forward mode, ``vmap``.

:class:`GateSilu` is ``silu(g)`` in the accumulation dtype with position-invariant bits
(:func:`taskgraph_norm.kernels.gate.silu_sigmoid`, in C where it runs: the same bits).
Its derivative ``s'(g) = sigmoid(g) * (1 + g * (1 - sigmoid(g)))`` is formed from the
same ``sigmoid``, by the backward (``dgate = ds * s'(g)``) and by the ``jvp`` rule
(forward AD, ``torch.func.jvp``, ``jacfwd``, ``hessian``: ``t_s = t_g * s'(g)``), as
torch ops: differentiable again for higher orders.  The ``vmap`` rule applies the
function to the batched tensor itself (it is elementwise: the same bits).

The C gate reads data pointers, so it only runs where nothing needs the graph or a
tangent of its result (:func:`native_ok`); elsewhere the torch ops give the same bits.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import kernels
from ..backends.base import allowed
from ..backends.native import gate as native_gate
from ..kernels.gate import silu_sigmoid
from .routing import dual

__all__ = ["GateSilu", "gate_silu", "is_wrapped", "native_ok", "real"]

is_wrapped: Any = torch._C._functorch.is_functorch_wrapped_tensor


def real(*tensors: torch.Tensor) -> bool:
    """Plain tensors with storage (not a torch.func wrapper, a fake or a subclass): what
    the C gate may read."""
    return all(type(t) is torch.Tensor and not is_wrapped(t) for t in tensors)


def native_ok(*tensors: torch.Tensor) -> bool:
    """Whether the C gate may compute from ``tensors``: plain tensors (:func:`real`) that
    carry no forward-mode tangent and whose graph no autograd records (its result has
    neither)."""
    return real(*tensors) and not dual(*tensors) and not (
        torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def _silu_sigmoid(g: torch.Tensor, acc: torch.dtype, sigmoid: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`~taskgraph_norm.kernels.gate.silu_sigmoid`, in C where it may run (the same bits)."""
    if acc == torch.float32 and "native" in allowed() and native_ok(g) and native_gate.runs(g):
        return native_gate.silu_sigmoid(g, sigmoid)
    return silu_sigmoid(g, acc, sigmoid)


def _slope(g: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``s'(g) = sigmoid(g) * ((1 - sigmoid(g)) * g + 1)`` in ``acc`` (elementwise IEEE
    operations on the position-invariant ``sigmoid``: position-invariant too)."""
    sig = _silu_sigmoid(g, acc, True)[1]
    assert sig is not None
    return sig * ((1.0 - sig) * kernels.widen(g, acc) + 1.0)


class GateSilu(torch.autograd.Function):
    """``silu(g)`` in ``acc`` with position-invariant bits, its derivative from the same
    ``sigmoid`` (the module doc)."""

    @staticmethod
    def forward(g: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
        return _silu_sigmoid(g, acc, False)[0]

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        ctx.acc = inputs[1]
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx: Any, ds: torch.Tensor) -> tuple[Any, ...]:
        (g,) = ctx.saved_tensors
        return (ds * _slope(g, ctx.acc)).to(g.dtype), None

    @staticmethod
    def jvp(ctx: Any, t_g: torch.Tensor, _t_acc: Any) -> torch.Tensor:
        (g,) = ctx.saved_tensors
        return kernels.widen(t_g, ctx.acc) * _slope(g, ctx.acc)

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, ...], g: torch.Tensor, acc: torch.dtype
             ) -> tuple[torch.Tensor, int | None]:
        return gate_silu(g, acc), in_dims[0]  # elementwise: the batched tensor as it is


gate_silu: Any = GateSilu.apply
