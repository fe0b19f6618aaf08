"""LayerNorm on the Triton backend: the forward as one kernel per call
(:mod:`.layer_kernels`), with the torch-ops backend's bits.

:class:`TritonLayer` is the Triton backend's LayerNorm half (the registry's
``TritonBackend`` inherits it in place of :class:`~..base.NoLayerKernel`): a float
plan with pairwise leaves and the builder's tree, a left fold or one chunk, and every
exact plan (over whole rows: the order does not matter), on fp32, bf16 or fp16 rows
(CUDA tensors; CPU tensors in Triton's interpreter), gives ``y`` and, with
``stats``, each row's ``mean`` and ``den``.  Rows the kernel flags (a non-finite
total, mean or ``den``, a zero ``den``) and rows whose ``y`` holds a NaN are computed
again by torch ops (:func:`..torch_ops.layer.run_layer`); a residual plan's ``h = x +
residual`` is the torch op, then the kernel runs on ``h``.  The backward of the same
plans and inputs runs on Triton too (:mod:`.layer_backward`).
"""

from __future__ import annotations

import struct
import threading
from typing import TYPE_CHECKING, Any

import torch

from ... import kernels
from ...errors import ExecutionError
from ..base import LayerForward
from ..torch_ops import layer as _torch_layer
from . import layer_backward as _backward
from .layout import KernelShape, float_layout, kernel_shape, next_pow2
from .runner import MAX_BLOCK, _check_input, _kernels, _num_warps, _rows, _table, interpreting, quiet_numpy

if TYPE_CHECKING:
    from ...graph import Graph
    from ...lowering import Plan

__all__ = ["TritonLayer", "layer_launch_spec", "run_triton_layer"]


def run_triton_layer(plan: Plan, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                     eps: float, out: torch.Tensor | None = None, stats: bool = False) -> LayerForward:
    """``y`` of a checked ``x`` (and ``mean``, ``den`` with ``stats``) by the Triton
    kernel; flagged rows by torch ops.

    Raises
    ------
    ExecutionError
        for a plan no kernel runs (native leaves, a ``cat`` merge), an fp64 input, a
        CPU tensor without ``TRITON_INTERPRET=1``.
    """
    if plan.norm != "layer":
        raise ExecutionError(f"the Triton LayerNorm kernels run LayerNorm plans, got norm={plan.norm!r}")
    shape = kernel_shape(plan)
    interpret = interpreting()
    _check_input(x, plan, interpret)
    d = plan.hidden_size
    x2 = _rows(x, d)
    rows = x2.shape[0]
    y = out if out is not None and out.is_contiguous() else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    y2 = y.view(-1, d)
    mean = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    den = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows:
        flags = torch.empty(rows, dtype=torch.int8, device=x.device)
        w = None if weight is None else weight.contiguous()
        b = None if bias is None else bias.contiguous()
        with quiet_numpy(interpret):
            _launch(shape, x2, y2, w, b, mean, den, flags, eps, interpret)
        bad = ((flags != 0) | torch.isnan(y2).any(dim=-1)).nonzero()[:, 0]
        if len(bad):
            fixed = _torch_layer.run_layer(plan, x2[bad], weight, bias, eps, stats=True)
            y2[bad] = fixed.y
            assert fixed.mean is not None and fixed.den is not None
            mean[bad], den[bad] = fixed.mean, fixed.den
    if y is not out and (out is not None or not x.is_contiguous()):
        y = (out if out is not None else torch.empty_like(x)).copy_(y)  # the input's (or out's) layout
    if not stats:
        return LayerForward(y, None, None)
    stat_shape = (*x.shape[:-1], 1)
    return LayerForward(y, mean.view(stat_shape), den.view(stat_shape))


def layer_launch_spec(shape: KernelShape, has_weight: bool, has_bias: bool,
                      interpret: bool = False) -> tuple[str, dict[str, Any], int]:
    """``(kernel name, compile-time arguments, num_warps)`` of one launch (the dtypes of
    x, the weight, the bias and y are the pointers' own, read by the kernel)."""
    block = min(next_pow2(shape.hidden_size), MAX_BLOCK)
    constants: dict[str, Any] = dict(D=shape.hidden_size, BLOCK=block, HAS_W=has_weight, HAS_B=has_bias)
    if shape.kind == "exact":
        constants.update(LOG_BLOCK=block.bit_length() - 1, FOLDS=interpret)
        return "layer_exact_kernel", constants, _num_warps(block)
    name, width = float_layout(shape, block, constants, ("layer_tree_kernel", "layer_linear_kernel"))
    return name, constants, _num_warps(width)


def _launch(shape: KernelShape, x2: torch.Tensor, y2: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None,
            mean: torch.Tensor, den: torch.Tensor, flags: torch.Tensor, eps: float, interpret: bool) -> None:
    name, constants, warps = layer_launch_spec(shape, w is not None, b is not None, interpret)
    eps32: float = struct.unpack("f", struct.pack("f", eps))[0]  # torch rounds a Python eps to fp32
    kernel = getattr(_kernels(interpret, "layer_kernels"), name)
    table = [] if shape.kind == "exact" else [_table(shape, x2.device)]
    kernel[(x2.shape[0],)](x2, y2, w if w is not None else y2, b if b is not None else y2, *table,
                           mean, den, flags, x2.stride(0), y2.stride(0), eps32, num_warps=warps,
                           enable_fp_fusion=False, **constants)


class TritonLayer:
    """The Triton backend's LayerNorm methods (see the module doc)."""

    name: str

    def layer_reasons(self, plan: Plan) -> list[str]:
        """Why the Triton kernels do not run a LayerNorm plan: never for a reason of its
        own (the plans no kernel runs, ``native`` leaves or a ``cat`` merge, are refused by
        ``kernel_shape`` as RMSNorm's are)."""
        return []

    def layer_forward(
        self, graph: Graph, plan: Plan, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
        eps: float, *, out: torch.Tensor | None = None, residual: torch.Tensor | None = None,
        residual_out: torch.Tensor | None = None, stats: bool = False, cancel: threading.Event | None = None,
    ) -> LayerForward:
        """The kernel (after the residual add, a torch op); a call that records a
        gradient runs torch ops, whose operations autograd sees."""
        h = x
        if residual is not None:
            h = kernels.residual_add(x, residual, out=residual_out)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h, weight, bias)):
            return _torch_layer.run_layer(plan, h, weight, bias, eps, out=out, stats=stats, cancel=cancel)
        return run_triton_layer(plan, h, weight, bias, eps, out, stats)

    def layer_backward(
        self, plan: Plan, dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor,
        den: torch.Tensor, *, input_grad: bool, weight_grad: bool, bias_grad: bool,
        weight_dtype: torch.dtype | None = None, bias_dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """The Triton kernels' ``(dx, dW, db)`` (:mod:`.layer_backward`); the rows they flag,
        and a ``dW`` or ``db`` holding a NaN, computed again by torch ops (whose NaNs they
        then carry).  A call the kernels do not take (:func:`.layer_backward.supports_layer_backward`:
        an fp64 operand, no rows) runs the torch-ops backend's backward: the same bits."""
        kwargs: dict[str, Any] = dict(weight_dtype=weight_dtype, bias_dtype=bias_dtype)
        if not _backward.supports_layer_backward(plan, dy, x, weight, mean, den):
            return _torch_layer.layer_backward(plan, dy, x, weight, mean, den, input_grad=input_grad,
                                               weight_grad=weight_grad, bias_grad=bias_grad, **kwargs)
        dx, dw, db, bad = _backward.run_layer_backward(plan, dy, x, weight, mean, den, input_grad=input_grad,
                                                       weight_grad=weight_grad, bias_grad=bias_grad, **kwargs)
        if dx is not None and len(bad):
            fixed = _torch_layer.layer_backward(plan, dy[bad], x[bad], weight, mean[bad], den[bad], input_grad=True,
                                                weight_grad=False, bias_grad=False)[0]
            assert fixed is not None
            dx[bad] = fixed
        redo_w = dw is not None and bool(torch.isnan(dw).any())
        redo_b = db is not None and bool(torch.isnan(db).any())
        if redo_w or redo_b:
            _, fixed_w, fixed_b = _torch_layer.layer_backward(plan, dy, x, weight, mean, den, input_grad=False,
                                                              weight_grad=redo_w, bias_grad=redo_b, **kwargs)
            dw, db = fixed_w if redo_w else dw, fixed_b if redo_b else db
        return dx, dw, db
