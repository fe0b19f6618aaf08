"""The ``torch.library`` ops of the ``taskgraph_norm`` namespace, with fake and autograd rules.

Three ops, each a schema of tensors and plain numbers/strings (the configuration
travels as op arguments, never as a Python object that dynamo would trace)::

    taskgraph_norm::rms_norm(x, weight?, eps, chunk_size, topology, leaf, accumulate,
                             casting_mode, offset) -> (y, rms)
    taskgraph_norm::rms_norm_residual(x, residual, weight?, eps, ...) -> (y, h, rms)
    taskgraph_norm::rms_norm_backward(dy, x, weight?, rms, ..., weight_grad, output_mask)
                                     -> (dx, dW)

``rms`` (``(..., 1)``, the accumulation dtype) is what the backward needs of the
forward.  Registration is ``torch.library.Library(..., "DEF")``: ``define``, one
``CompositeExplicitAutograd`` kernel per op (it calls the pipeline on real
tensors), ``register_fake`` for shapes (FakeTensor, meta: a traced call never
reaches the kernels or their caches) and ``register_autograd`` for the backward
(docs/design.md, "The ops", says why this style and not ``custom_op``).

Forward-mode AD: the ops have no forward rule (``torch.library`` registers none), so
a call whose input carries a tangent is refused with a ``NotImplementedError`` that
names the faces which carry it (:class:`FuncRMSNorm`'s ``jvp``, reached through
``taskgraph_norm.ops.rms_norm``, ``tgn.RMSNorm`` and ``tgn.normalize_sync``), never
answered with a missing tangent.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import kernels
from ..kernels.backward import norm_tangent
from . import backward as _backward
from . import forward as _forward
from .routing import dual, forward_ad_active

__all__ = ["EagerRMSNorm", "FuncRMSNorm", "LIBRARY", "eager_apply", "residual_apply", "rms_vmap_dim", "rms_norm_op",
           "rms_norm_residual_op", "rms_norm_backward_op"]

_CONFIG = "int chunk_size, str topology, str leaf, str accumulate, str casting_mode, float offset"

# torch.library's functions are untyped: reached through Any, so mypy --strict stays on.
_library: Any = torch.library
_register_fake: Any = _library.register_fake

LIBRARY: Any = _library.Library("taskgraph_norm", "DEF")
LIBRARY.define(f"rms_norm(Tensor x, Tensor? weight, float eps, {_CONFIG}) -> (Tensor, Tensor)")
LIBRARY.define(
    f"rms_norm_residual(Tensor x, Tensor residual, Tensor? weight, float eps, {_CONFIG}) -> (Tensor, Tensor, Tensor)"
)
LIBRARY.define(
    f"rms_norm_backward(Tensor dy, Tensor x, Tensor? weight, Tensor rms, {_CONFIG}, str weight_grad, "
    "bool[2] output_mask) -> (Tensor, Tensor)"
)

LIBRARY.impl("rms_norm", _forward.forward_op, "CompositeExplicitAutograd")
LIBRARY.impl("rms_norm_residual", _forward.forward_residual, "CompositeExplicitAutograd")
LIBRARY.impl("rms_norm_backward", _backward.backward, "CompositeExplicitAutograd")
# The backward op is not differentiable itself: a double backward (create_graph=True)
# takes differentiable torch ops instead (_composite_grads below).
LIBRARY.impl("rms_norm_backward", _library.fallthrough_kernel, "Autograd")

rms_norm_op = torch.ops.taskgraph_norm.rms_norm.default
rms_norm_residual_op = torch.ops.taskgraph_norm.rms_norm_residual.default
rms_norm_backward_op = torch.ops.taskgraph_norm.rms_norm_backward.default


# --- fake (meta) implementations: shapes and dtypes only ---------------------------


def _rms_like(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(_forward.rms_shape(x), dtype=kernels.accumulation_dtype(x.dtype))


def _y_like(x: torch.Tensor, weight: torch.Tensor | None, casting_mode: str) -> torch.Tensor:
    """``y``'s fake: ``x``'s shape in FINALIZE's output dtype (llama with a weight: the promoted one)."""
    return torch.empty_like(x, dtype=kernels.output_dtype(x.dtype, None if weight is None else weight.dtype,
                                                          casting_mode))


def _rms_norm_fake(x: torch.Tensor, weight: torch.Tensor | None, eps: float, *config: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return _y_like(x, weight, config[4]), _rms_like(x)


def _rms_norm_residual_fake(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float, *config: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _y_like(x, weight, config[4]), torch.empty_like(x), _rms_like(x)


def _rms_norm_backward_fake(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, rms: torch.Tensor, *rest: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    # The kernel returns contiguous gradients whatever x's layout (a transposed x's dx
    # too): the fake says so, or a compiled backward's stride assert fails.
    mask = rest[-1]
    dx = x.new_empty(x.shape) if mask[0] else x.new_empty(0)
    dw = weight.new_empty(weight.shape) if mask[1] and weight is not None else x.new_empty(0)
    return dx, dw


for _name, _fake in (("rms_norm", _rms_norm_fake), ("rms_norm_residual", _rms_norm_residual_fake),
                     ("rms_norm_backward", _rms_norm_backward_fake)):
    _register_fake(f"taskgraph_norm::{_name}", _fake, lib=LIBRARY)


# --- autograd ----------------------------------------------------------------------


def _setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    x, weight = inputs[0], inputs[-8]
    ctx.config = inputs[-7:]  # eps, chunk_size, topology, leaf, accumulate, casting_mode, offset
    ctx.save_for_backward(x, weight, output[-1])
    ctx.mark_non_differentiable(output[-1])


def _grads(
    ctx: Any, dy: torch.Tensor, x_needs: bool, w_needs: bool, backward: Any = rms_norm_backward_op
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(dx, dW)`` of the normalisation (``None`` where not needed), by ``backward``
    (the op, or its kernel called directly from eager autograd)."""
    x, weight, rms = ctx.saved_tensors
    eps, *config = ctx.config
    if torch.is_grad_enabled():
        # create_graph=True (and torch.func.grad): a double backward needs differentiable ops.
        return _composite_grads(dy, x, weight, eps, x_needs, w_needs, config[4], config[5])
    dx, dw = backward(dy, x, weight, rms, *config, "float", [x_needs, w_needs])
    return (dx if x_needs else None), (dw if w_needs and weight is not None else None)


def _rms_norm_backward(ctx: Any, dy: torch.Tensor, _drms: torch.Tensor | None) -> tuple[Any, ...]:
    needs = ctx.needs_input_grad
    dx, dw = _grads(ctx, dy, needs[0], needs[1])
    return (dx, dw) + (None,) * 7


def _rms_norm_residual_backward(
    ctx: Any, dy: torch.Tensor, dh: torch.Tensor | None, _drms: torch.Tensor | None
) -> tuple[Any, ...]:
    needs = ctx.needs_input_grad
    dh_norm, dw = _grads(ctx, dy, needs[0] or needs[1], needs[2])
    if dh_norm is not None and dh is not None:
        dh_norm = dh_norm + dh
    elif dh_norm is None:
        dh_norm = dh
    dres = None if dh_norm is None or not needs[1] else dh_norm.to(ctx.residual_dtype)
    return (dh_norm if needs[0] else None, dres, dw) + (None,) * 7


def _setup_residual(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    y, h, rms = output
    _setup(ctx, (h,) + tuple(inputs[2:]), (y, rms))
    ctx.residual_dtype = inputs[1].dtype


def _composite_grads(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, eps: float, x_needs: bool, w_needs: bool,
    casting_mode: str = "torch", offset: float = 0.0,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The same gradients as differentiable torch ops (``torch.sum`` order): used only
    under ``create_graph=True`` (and ``torch.func``), so that the double backward exists.

    ``g = dy * (w + offset)``: the weight FINALIZE multiplied by
    (:func:`~taskgraph_norm.kernels.finalize_weight`), as the native backward's."""
    acc = kernels.accumulation_dtype(x.dtype)
    w_eff = None if weight is None else kernels.finalize_weight(weight, acc, offset)
    xa, g = kernels.grad_operands(x, dy, w_eff)
    rms = torch.sqrt(torch.mean(xa * xa, dim=-1, keepdim=True) + eps)
    x_hat = xa / rms
    dx = dw = None
    if x_needs:
        dx = ((g - x_hat * torch.mean(g * x_hat, dim=-1, keepdim=True)) / rms).to(x.dtype)
    if w_needs and weight is not None:
        if casting_mode == "llama":  # the weight multiplied x_hat rounded to x's dtype
            x_hat = x_hat.to(x.dtype).to(acc)
        dw = (dy.to(acc) * x_hat).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype).view(weight.shape)
    return dx, dw


_RMS_FACES = "taskgraph_norm.ops.rms_norm / rms_norm_residual, tgn.RMSNorm or tgn.normalize_sync"


def _register_autograd(name: str, backward: Any, setup_context: Any, faces: str = _RMS_FACES) -> None:
    """``torch.library.register_autograd``, with a forward-AD guard in front of its kernel.

    ``register_autograd`` is ``make_autograd_impl`` registered at the ``Autograd`` key
    (torch/library.py); its kernel runs a dual input's forward below autograd and
    silently drops the tangent, so the guard refuses such a call first, naming the
    ``faces`` that carry it."""
    op = getattr(torch.ops.taskgraph_norm, name).default
    autograd_kernel = torch._library.autograd.make_autograd_impl(
        op, torch._library.autograd.Info(backward, setup_context))
    faces = f"call {faces}, which support it"

    def guarded(keyset: Any, *args: Any) -> Any:
        if forward_ad_active() and dual(*(a for a in args if isinstance(a, torch.Tensor))):
            raise NotImplementedError(f"taskgraph_norm::{name} has no forward-mode AD rule (torch.library "
                                      f"registers none; forward_ad, torch.func.jvp, jacfwd, hessian): {faces}")
        if torch._C._are_functorch_transforms_active() and any(
                isinstance(a, torch.Tensor) and torch._C._functorch.is_gradtrackingtensor(a) for a in args):
            raise NotImplementedError(f"taskgraph_norm::{name}'s autograd rule does not run under torch.func's "
                                      f"grad transforms (grad, vjp, jacrev): {faces}")
        return autograd_kernel(keyset, *args)

    LIBRARY.impl(name, guarded, "Autograd", with_keyset=True)


_register_autograd("rms_norm", _rms_norm_backward, _setup)
_register_autograd("rms_norm_residual", _rms_norm_residual_backward, _setup_residual)


def rms_vmap_dim(in_dims: tuple[int | None, ...]) -> int:
    """The vmapped dim of ``x`` in ``in_dims`` (``x``, ``weight``, ...): only ``x`` may be
    batched (a batched weight is a different norm per sample)."""
    x_dim = in_dims[0]
    if x_dim is None or in_dims[1] is not None:
        raise NotImplementedError("vmap over taskgraph_norm's RMSNorm batches x only (a batched weight "
                                  "is a different norm per sample: call it per sample)")
    return x_dim


class EagerRMSNorm(torch.autograd.Function):
    """The op's forward and backward kernels under eager autograd, without the dispatcher.

    Same kernels, same bits as ``taskgraph_norm::rms_norm`` with its registered
    autograd; what it saves is the dispatcher's Python round trips (about 10x a
    (1, 4096) call: ``benchmarks/op_dispatch.py``).  Tracers never see it: under
    ``torch.compile``, ``torch.export`` or ``jit.trace`` the op is called instead.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, config: tuple[Any, ...]) -> torch.Tensor:
        # config: (eps, chunk_size, topology, leaf, accumulate, casting_mode, offset), one
        # argument (each argument of apply costs time on a small call)
        y, rms, ctx.pipe = _forward.forward_pipe(x, weight, *config)
        ctx.config = config
        ctx.save_for_backward(x, weight, rms)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
        needs = ctx.needs_input_grad
        if ctx.pipe is not None and not torch.is_grad_enabled():
            # the forward's pipeline (its options checked when it was built): no lookup
            x, weight, rms = ctx.saved_tensors
            dx, dw = _backward.pipe_backward(ctx.pipe, dy, x, weight, rms, needs[0], needs[1])
            return dx, dw, None
        dx, dw = _grads(ctx, dy.contiguous(), needs[0], needs[1], _backward.backward)
        return dx, dw, None


class FuncRMSNorm(torch.autograd.Function):
    """:class:`EagerRMSNorm` in the form ``torch.func`` transforms need (``setup_context``,
    a ``vmap`` rule): the same kernels and bits, used while a transform is active."""

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor | None, config: tuple[Any, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        return _forward.forward(x, weight, *config)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
        ctx.config, ctx.pipe = inputs[2], None
        ctx.save_for_backward(inputs[0], inputs[1], output[1])
        ctx.save_for_forward(inputs[0], inputs[1], output[1])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor, _drms: torch.Tensor | None) -> tuple[Any, ...]:
        return EagerRMSNorm.backward(ctx, dy)

    @staticmethod
    def jvp(ctx: Any, t_x: torch.Tensor | None, t_w: torch.Tensor | None, _t_config: Any) -> tuple[Any, ...]:
        # forward-mode AD (forward_ad, torch.func.jvp, jacfwd, hessian): y's tangent; rms has none
        x, weight = ctx.saved_tensors[:2]
        eps, _chunk, _topology, _leaf, _accumulate, casting_mode, offset = ctx.config
        return norm_tangent(x, weight, eps, t_x, t_w, casting_mode, offset), None

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, ...], x: torch.Tensor, weight: torch.Tensor | None,
             config: tuple[Any, ...]) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[int, int]]:
        # rows are independent: the vmapped dim becomes one more leading dim
        y, rms = _full_func_apply(x.movedim(rms_vmap_dim(in_dims), 0), weight, config)
        return (y, rms), (0, 0)


#: ``EagerRMSNorm.apply`` without ``Function.apply``'s Python prologue (functorch's dead
#: wrapper unwrapping, default-argument binding): the C ``apply`` itself, used when no
#: functorch transform is active (``torch.func``: then :class:`FuncRMSNorm`).
_c_apply: Any = super(torch.autograd.Function, EagerRMSNorm).apply
_full_func_apply: Any = FuncRMSNorm.apply


def eager_apply(x: torch.Tensor, weight: torch.Tensor | None, config: tuple[Any, ...]) -> torch.Tensor:
    """``EagerRMSNorm.apply(x, weight, config)``, by the shortest way that is correct:
    :class:`FuncRMSNorm` under a ``torch.func`` transform or an open forward-AD level."""
    if torch._C._are_functorch_transforms_active() or forward_ad_active():
        full: torch.Tensor = _full_func_apply(x, weight, config)[0]
        return full
    y: torch.Tensor = _c_apply(x, weight, config)
    return y


def residual_apply(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                   config: tuple[Any, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, h)`` of the residual op by differentiable pieces: ``h = x + residual`` (in
    ``x``'s dtype: the op's bits) as torch ops, ``y`` by :func:`eager_apply`.  For the
    transforms the op does not support (``torch.func``, forward-mode AD)."""
    h = _forward.residual_sum(x, residual)
    return eager_apply(h, weight, config), h
