"""When a call must go through the ``torch.library`` ops rather than straight to the kernel.

The direct kernel (:mod:`taskgraph_norm.backends.native.direct`) reads data pointers and
keeps per-thread buffers: it must only ever see real tensors, and it records no
gradient.  So a call goes through the ops when something needs them:

* a gradient to record (grad mode on, and ``x`` or the weight requires grad);
* a ``torch.func`` transform (``grad``, ``vmap``, ``jvp``...): the kernels' ``autograd.Function``;
* forward-mode AD (``torch.autograd.forward_ad``): ``x`` or the weight carries a
  tangent, which only that ``autograd.Function`` (its ``jvp``) carries on;
* tracing: ``torch.compile`` (dynamo), ``torch.export``, ``make_fx``, ``torch.jit.trace``:
  dynamo is seen by :func:`torch.compiler.is_compiling`, the others by a fake or
  functional tensor (any tensor subclass), an active dispatch mode, or the jit
  tracing state.

Everything else (no grad, real tensors, nothing tracing) may take the direct path.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch.autograd import forward_ad as _forward_ad

from ..checks import PLAIN_TENSORS as _PLAIN

__all__ = ["DIRECT", "DTENSOR_FACES", "EAGER", "TRACED", "dtensor_face", "dual", "forward_ad_active", "jit_tracing", "needs_op", "route", "tracing"]

#: Where a call goes: straight to the kernel, its kernels under eager autograd, or the op.
DIRECT, EAGER, TRACED = 0, 1, 2


def jit_tracing() -> bool:
    """Whether ``torch.jit.trace`` is tracing (its sizes are tensors)."""
    return torch._C._get_tracing_state() is not None


def tracing(x: torch.Tensor) -> bool:
    """Whether ``x`` is being traced (or is not a plain tensor): its data must not be read."""
    return (
        type(x) not in _PLAIN
        or torch._C._len_torch_dispatch_stack() > 0
        or torch._C._get_tracing_state() is not None
    )


def forward_ad_active() -> bool:
    """Whether a forward-mode AD level is open (``forward_ad.dual_level``, which
    ``torch.func.jvp`` opens too): a plain int read."""
    return _forward_ad._current_level >= 0


def dual(*tensors: torch.Tensor | None) -> bool:
    """Whether one of ``tensors`` carries a forward-mode tangent at the open level."""
    if _forward_ad._current_level < 0:
        return False
    unpack: Any = _forward_ad.unpack_dual  # (untyped in torch)
    return any(t is not None and unpack(t).tangent is not None for t in tensors)


# (bound once: route() runs on every call, and each attribute lookup shows on a 5 us call)
_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack
_jit_state = torch._C._get_tracing_state
_functorch_active = torch._C._are_functorch_transforms_active
_grad_enabled = torch.is_grad_enabled


def route(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None = None) -> int:
    """:data:`TRACED` when a tracer looks, :data:`EAGER` when eager autograd records a
    gradient, :data:`DIRECT` otherwise (see the module doc).  ``bias``: a third tensor
    of the call (LayerNorm's bias), looked at in the same pass."""
    if _is_compiling():
        return TRACED  # constant-folded by dynamo: nothing below is traced
    if (type(x) not in _PLAIN or _dispatch_modes() > 0 or _jit_state() is not None
            or (weight is not None and type(weight) not in _PLAIN)
            or (bias is not None and type(bias) not in _PLAIN)):
        return TRACED  # (tracing(x), inline)
    if _functorch_active():
        return EAGER  # torch.func (grad, vmap...): the kernels' autograd.Function and its vmap rule
    if _forward_ad._current_level >= 0 and dual(x, weight, bias):
        return EAGER  # forward AD: the autograd.Function's jvp (the kernel would drop the tangent)
    if _grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)
                            or (bias is not None and bias.requires_grad)):
        return EAGER
    return DIRECT


def needs_op(x: torch.Tensor, weight: torch.Tensor | None) -> bool:
    """Whether a call on ``x`` (and ``weight``) must go through the ops rather than
    straight to the kernel."""
    return route(x, weight) != DIRECT


#: The DTensor faces by name (``"normalize"``, ``"rms_module"``, ``"layer_norm"``,
#: ``"layer_module"``, ``"gated"``), loaded on the first DTensor call by the loader that
#: :mod:`taskgraph_norm.distributed` sets (its ``dtensor`` module).  A face hands a call
#: with a DTensor to them (docs/distributed.md, "DTensor").
DTENSOR_FACES: dict[str, Callable[..., Any]] = {}
DTENSOR_LOADER: list[Callable[[], dict[str, Callable[..., Any]]]] = []
#: Where torch keeps the DTensor class (public since torch 2.5): looked up, never
#: imported here (a DTensor exists only once one of them is imported).
_DTENSOR_MODULES = ("torch.distributed.tensor", "torch.distributed._tensor")


def dtensor_face(name: str, *tensors: object) -> Callable[..., Any] | None:
    """The DTensor face ``name`` when one of ``tensors`` is a DTensor, else ``None``."""
    for module in _DTENSOR_MODULES:
        cls = getattr(sys.modules.get(module), "DTensor", None)
        if cls is not None:
            break
    else:
        return None
    if not any(isinstance(t, cls) for t in tensors):
        return None
    if not DTENSOR_FACES and DTENSOR_LOADER:
        DTENSOR_FACES.update(DTENSOR_LOADER[0]())
    return DTENSOR_FACES.get(name)
