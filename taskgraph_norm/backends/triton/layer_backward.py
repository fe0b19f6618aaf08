"""LayerNorm's backward on Triton: ``dx`` in the forward kernel's order, ``dW`` and ``db`` in row blocks.

:func:`run_layer_backward` computes what the torch-ops backend's
:func:`~..torch_ops.layer.layer_backward` computes (``kernels.layer_backward``'s op order),
with the same bits, for float32, bfloat16 and float16 inputs and every LayerNorm plan the
forward's kernels run (:func:`.runner.supports`):

* ``dx``: one program per row (``layer_backward_kernels.layer_dx_tree_kernel``,
  ``layer_dx_linear_kernel``, ``layer_dx_exact_kernel``): the row's ``sum(g)`` and
  ``sum(g * x_hat)`` through the forward kernel's placement (:mod:`.layout`) and folds,
  or exactly, each mean correctly rounded;
* ``dW`` and ``db``: one program per (block of ``kernels.ROW_BLOCK`` rows, column tile)
  writes the block's sums (``layer_dwb_blocks_kernel``, both in one read of ``dy``);
  the block sums are merged by ``kernels.merge_blocks_`` itself, on the device, as the
  RMSNorm backward's ``dW`` (:mod:`.backward`).

Rows whose ``dx`` the kernel cannot give torch's bits for (a non-finite sum, ``mean``
or ``den``, a zero ``den``, a NaN in ``dx``) come back flagged: the caller
(:meth:`.layer.TritonLayer.layer_backward`) finishes them, as it does a ``dW`` or
``db`` holding a NaN.
"""

from __future__ import annotations

from typing import Any

import torch

from ... import kernels
from ...errors import ExecutionError
from ...lowering import Plan
from .backward import DTYPES, _tail_table, dw_launch_spec, dx_launch_spec
from .layout import KernelShape, kernel_shape
from .runner import _kernels, _table, available, interpreting, quiet_numpy, supports

__all__ = ["layer_dw_launch_spec", "layer_dx_launch_spec", "run_layer_backward", "supports_layer_backward"]

Grads = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]


def supports_layer_backward(plan: Plan, dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
                            mean: torch.Tensor, den: torch.Tensor) -> bool:
    """True when :func:`run_layer_backward` runs this call: triton installed, a LayerNorm
    plan the forward's kernels run, fp32/bf16/fp16 ``x``, ``dy`` and weight, fp32 ``mean``
    and ``den`` of ``(rows, 1)``, at least one row, and CUDA tensors (CPU ones under
    ``TRITON_INTERPRET=1``)."""
    if x.device.type != "cuda" and not (x.device.type == "cpu" and interpreting()):
        return False
    f32 = torch.float32
    return (plan.norm == "layer" and x.dtype in DTYPES and dy.dtype in DTYPES and mean.dtype == f32
            and den.dtype == f32 and (weight is None or weight.dtype in DTYPES) and x.dim() == 2
            and x.shape[0] > 0 and dy.shape == x.shape and mean.shape == den.shape == (x.shape[0], 1)
            and x.shape[1] == plan.hidden_size and available() and supports(plan))


def layer_dx_launch_spec(shape: KernelShape, has_weight: bool, interpret: bool) -> tuple[str, dict[str, Any], int]:
    """``(kernel name, compile-time arguments, num_warps)`` of ``dx``'s launch: the layout
    of RMSNorm's ``dx`` launch (:func:`.backward.dx_launch_spec`), LayerNorm's kernel."""
    name, constants, warps = dx_launch_spec(shape, has_weight, 0.0, interpret)
    del constants["OFFSET"]  # (LayerNorm's weight has no offset)
    return "layer_" + name, constants, warps


def layer_dw_launch_spec(hidden: int, want_w: bool, want_b: bool) -> tuple[str, dict[str, Any], int]:
    """``(kernel name, compile-time arguments, num_warps)`` of the ``dW``/``db`` block sums'
    launch: the row blocks and column tiles of RMSNorm's ``dW`` (:func:`.backward.dw_launch_spec`)."""
    _, constants, warps = dw_launch_spec(hidden, False)
    del constants["LLAMA"]
    constants.update(WANT_W=want_w, WANT_B=want_b)
    return "layer_dwb_blocks_kernel", constants, warps


def _module(interpret: bool) -> Any:
    _kernels(interpret, "layer_kernels")  # its helpers first (the backward's kernels call them)
    return _kernels(interpret, "layer_backward_kernels")


def _input_grad(plan: Plan, x: torch.Tensor, dy: torch.Tensor, w: torch.Tensor | None, mean: torch.Tensor,
                den: torch.Tensor, interpret: bool) -> tuple[torch.Tensor, torch.Tensor]:
    shape = kernel_shape(plan)
    name, constants, warps = layer_dx_launch_spec(shape, w is not None, interpret)
    dx = torch.empty_like(x)
    flags = torch.empty(x.shape[0], dtype=torch.int8, device=x.device)
    table = [] if shape.kind == "exact" else [_table(shape, x.device)]
    kernel = getattr(_module(interpret), name)
    kernel[(x.shape[0],)](x, dy, dx, w if w is not None else x, mean, den, *table, flags, x.stride(0),
                          dy.stride(0), dx.stride(0), num_warps=warps, enable_fp_fusion=False, **constants)
    return dx, flags


def _param_grads(x: torch.Tensor, dy: torch.Tensor, mean: torch.Tensor, den: torch.Tensor, want_w: bool,
                 want_b: bool, interpret: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The fp32 ``dW`` and ``db`` (``None`` where not asked), merged over the row blocks."""
    rows, hidden = x.shape
    n_full, tail = divmod(rows, kernels.ROW_BLOCK)
    blocks = n_full + (tail > 0)
    dw = torch.empty(blocks, hidden, dtype=torch.float32, device=x.device) if want_w else None
    db = torch.empty(blocks, hidden, dtype=torch.float32, device=x.device) if want_b else None
    name, constants, warps = layer_dw_launch_spec(hidden, want_w, want_b)
    grid = (blocks, -(-hidden // constants["BLOCK_N"]))
    kernel = getattr(_module(interpret), name)
    kernel[grid](x, dy, mean, den, _tail_table(tail or kernels.ROW_BLOCK, x.device),
                 dw if dw is not None else db, db if db is not None else dw, n_full, x.stride(0), dy.stride(0),
                 num_warps=warps, enable_fp_fusion=False, **constants)
    return (None if dw is None else kernels.merge_blocks_(dw)), (None if db is None else kernels.merge_blocks_(db))


def run_layer_backward(
    plan: Plan, dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor,
    den: torch.Tensor, *, input_grad: bool, weight_grad: bool, bias_grad: bool,
    weight_dtype: torch.dtype | None = None, bias_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """``(dx, dW, db, flagged rows)`` of 2-D ``dy`` and ``x`` (``(rows, D)``, rows >= 1) with
    the forward's ``(rows, 1)`` fp32 ``mean`` and ``den``, by the Triton kernels (``None``
    where not asked); ``dW``/``db`` cast to ``weight_dtype``/``bias_dtype`` (default
    ``x``'s dtype).  The flagged rows' ``dx`` is not torch's, nor is a ``dW`` or ``db``
    holding a NaN (the caller finishes them).

    Raises :class:`ExecutionError` for a call :func:`supports_layer_backward` refuses.
    """
    if not supports_layer_backward(plan, dy, x, weight, mean, den):
        raise ExecutionError(
            f"the triton LayerNorm backward runs LayerNorm plans with pairwise leaves and a tree, left-fold or "
            f"one-chunk merge (or exact), fp32/bf16/fp16 (rows, {plan.hidden_size}) x and dy with fp32 (rows, 1) "
            f"mean and den, on CUDA tensors or CPU ones under TRITON_INTERPRET=1; got x {x.dtype} "
            f"{list(x.shape)} on {x.device.type}, dy {dy.dtype} {list(dy.shape)}, mean {mean.dtype}, "
            f"den {den.dtype}")
    interpret = interpreting()
    x, dy, mean, den = (t.contiguous() for t in (x, dy, mean, den))
    w = None if weight is None else weight.reshape(-1).contiguous()
    dx = dw = db = None
    bad = torch.empty(0, dtype=torch.long, device=x.device)
    with quiet_numpy(interpret):
        if input_grad:
            dx, flags = _input_grad(plan, x, dy, w, mean, den, interpret)
            bad = flags.nonzero()[:, 0]
        if weight_grad or bias_grad:
            dw, db = _param_grads(x, dy, mean, den, weight_grad, bias_grad, interpret)
    return (dx, None if dw is None else dw.to(weight_dtype or x.dtype),
            None if db is None else db.to(bias_dtype or x.dtype), bad)
