"""The backward's Triton launches: ``dx`` in the forward kernel's order, ``dW`` in row blocks.

:func:`run_backward` computes what ``ops.backward.backward_torch`` computes
(``kernels``' section "the backward"), with the same bits, for float32, bfloat16 and
float16 inputs, every plan the forward's kernels run (:func:`.runner.supports`):

* ``dx``: one program per row (``backward_kernels.dx_tree_kernel``,
  ``dx_linear_kernel``, ``dx_exact_kernel``), the row's ``sum(g * xa)`` through the
  forward kernel's placement (:mod:`.layout`) and folds, or exactly;
* ``dW``: one program per (block of ``kernels.ROW_BLOCK`` rows, column tile) writes
  the block's sum (``dw_blocks_kernel``); the block sums are merged by
  ``kernels.merge_blocks_`` itself, on the device: its adjacent-pair additions are
  elementwise IEEE adds, the same bits on every device, in ``log2(blocks)`` torch ops.

Rows whose ``dx`` a kernel cannot give the CPU's bits for (a non-finite ``s`` or
``rms``, a zero ``rms``, a NaN in ``dx``) come back flagged: the caller finishes them
(``ops.backward.backward_triton``), as it does a non-finite ``dW``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from ... import caches, kernels
from ...errors import ExecutionError
from ...lowering import Plan
from .layout import KernelShape, float_layout, halving_positions, kernel_shape, next_pow2
from .runner import (MAX_BLOCK, _kernels, _num_warps, _offset_in, _table, available, interpreting, quiet_numpy,
                     supports)

__all__ = ["DTYPES", "dw_launch_spec", "dx_launch_spec", "run_backward", "supports_backward"]

#: The input dtypes the backward kernels run (``dy`` may be any of them too).
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: Columns of one ``dW`` program's tile.
DW_BLOCK_N = 64


def supports_backward(plan: Plan | None, x: torch.Tensor, dy: torch.Tensor, weight: torch.Tensor | None,
                      rms: torch.Tensor, *, on_cpu: bool = False) -> bool:
    """True when :func:`run_backward` runs this call: triton installed, a plan the forward's
    kernels run, fp32/bf16/fp16 ``x``, ``dy`` and weight, an fp32 ``rms``, and a CUDA
    tensor (or, with ``on_cpu``, a CPU tensor under ``TRITON_INTERPRET=1``)."""
    if x.device.type == "cuda":
        pass
    elif not (on_cpu and x.device.type == "cpu" and interpreting()):
        return False
    return (plan is not None and x.dtype in DTYPES and dy.dtype in DTYPES and rms.dtype == torch.float32
            and (weight is None or weight.dtype in DTYPES) and available() and supports(plan))


def dx_launch_spec(shape: KernelShape, has_weight: bool, offset: float, interpret: bool) -> tuple[str, dict[str, Any], int]:
    """``(kernel name, compile-time arguments, num_warps)`` of ``dx``'s launch."""
    d = shape.hidden_size
    block = min(next_pow2(d), MAX_BLOCK)
    offset_in = _offset_in(offset, torch.float32) if has_weight and offset else 0.0  # finalize_weight's, in fp32
    constants: dict[str, Any] = dict(D=d, BLOCK=block, LOG_BLOCK=block.bit_length() - 1, HAS_W=has_weight,
                                     OFFSET=offset_in, FOLDS=interpret)
    if shape.kind == "exact":
        return "dx_exact_kernel", constants, _num_warps(block)
    name, width = float_layout(shape, block, constants, ("dx_tree_kernel", "dx_linear_kernel"))
    return name, constants, _num_warps(width)


def dw_launch_spec(hidden: int, round_x_hat: bool) -> tuple[str, dict[str, Any], int]:
    """``(kernel name, compile-time arguments, num_warps)`` of the ``dW`` block sums' launch."""
    rb = kernels.ROW_BLOCK
    constants = dict(D=hidden, RB=rb, LOG_RB=rb.bit_length() - 1, BLOCK_N=min(next_pow2(hidden), DW_BLOCK_N),
                     LLAMA=round_x_hat)
    return "dw_blocks_kernel", constants, 4


@functools.lru_cache(maxsize=64)
def _tail_table(length: int, device: torch.device) -> torch.Tensor:
    """Slot ``p`` of a block of ``length < ROW_BLOCK`` rows: the row there (``-1``: none),
    so that the folds add what ``pairwise_halving_`` adds over the rows."""
    table = [-1] * kernels.ROW_BLOCK
    for i, p in enumerate(halving_positions(length, kernels.ROW_BLOCK)):
        table[p] = i
    return torch.tensor(table, dtype=torch.int32, device=device)


def _input_grad(plan: Plan, x: torch.Tensor, dy: torch.Tensor, w: torch.Tensor | None, rms: torch.Tensor,
                offset: float, interpret: bool) -> tuple[torch.Tensor, torch.Tensor]:
    shape = kernel_shape(plan)
    name, constants, warps = dx_launch_spec(shape, w is not None, offset, interpret)
    dx = torch.empty_like(x)
    flags = torch.empty(x.shape[0], dtype=torch.int8, device=x.device)
    pointers = [x, dy, dx, w if w is not None else x, rms]
    if shape.kind != "exact":
        pointers.append(_table(shape, x.device))
    kernel = getattr(_kernels(interpret, "backward_kernels"), name)
    kernel[(x.shape[0],)](*pointers, flags, x.stride(0), dy.stride(0), dx.stride(0), num_warps=warps,
                          enable_fp_fusion=False, **constants)
    return dx, flags


def _weight_grad(x: torch.Tensor, dy: torch.Tensor, rms: torch.Tensor, dtype: torch.dtype, round_x_hat: bool,
                 interpret: bool) -> torch.Tensor:
    rows, hidden = x.shape
    rb = kernels.ROW_BLOCK
    n_full, tail = divmod(rows, rb)
    blocks = torch.empty(n_full + (tail > 0), hidden, dtype=torch.float32, device=x.device)
    name, constants, warps = dw_launch_spec(hidden, round_x_hat)
    grid = (blocks.shape[0], -(-hidden // constants["BLOCK_N"]))
    kernel = getattr(_kernels(interpret, "backward_kernels"), name)
    kernel[grid](x, dy, rms, _tail_table(tail or rb, x.device), blocks, n_full, x.stride(0), dy.stride(0),
                 num_warps=warps, enable_fp_fusion=False, **constants)
    return kernels.merge_blocks_(blocks).to(dtype)


def run_backward(
    plan: Plan, dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, rms: torch.Tensor,
    input_grad: bool, weight_grad: bool, offset: float = 0.0, round_x_hat: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """``(dx, dW, flagged rows)`` of 2-D ``dy`` and ``x`` (``(rows, D)``, unit column
    stride) and ``(rows, 1)`` fp32 ``rms``, by the Triton kernels (``None`` where not
    asked; ``dW`` also without a weight).  ``offset`` and ``round_x_hat`` as in
    ``ops.backward.backward_torch``.  The flagged rows' ``dx`` is not the reference's;
    a ``dW`` that is not finite is not either (the caller finishes both).

    Raises :class:`ExecutionError` for a plan the kernels do not run, an fp64 input,
    a CPU tensor outside ``TRITON_INTERPRET=1``.
    """
    interpret = interpreting()
    kernel_shape(plan)  # raises ExecutionError for a plan no kernel runs
    if x.dtype not in DTYPES or dy.dtype not in DTYPES or rms.dtype != torch.float32:
        raise ExecutionError(f"the triton backward runs float32, bfloat16 and float16 x and dy with an fp32 rms, "
                             f"not x {x.dtype}, dy {dy.dtype}, rms {rms.dtype}")
    if x.device.type != "cuda" and not (x.device.type == "cpu" and interpret):
        raise ExecutionError("the triton backward runs CUDA tensors, or CPU ones under TRITON_INTERPRET=1")
    if x.dim() != 2 or x.shape[-1] != plan.hidden_size or dy.shape != x.shape or rms.shape != (x.shape[0], 1):
        raise ExecutionError(f"the backward takes (rows, {plan.hidden_size}) x and dy and (rows, 1) rms; got "
                             f"{list(x.shape)}, {list(dy.shape)}, {list(rms.shape)}")
    x, dy, rms = (t.contiguous() for t in (x, dy, rms))
    w = None if weight is None else weight.reshape(-1).contiguous()
    dx = dw = None
    bad = torch.empty(0, dtype=torch.long, device=x.device)
    if x.shape[0] == 0:
        dw0 = torch.zeros_like(w) if weight_grad and w is not None else None
        return (torch.empty_like(x) if input_grad else None), dw0, bad
    with quiet_numpy(interpret):
        if input_grad:
            dx, flags = _input_grad(plan, x, dy, w, rms, offset, interpret)
            bad = flags.nonzero()[:, 0]
        if weight_grad and w is not None:
            dw = _weight_grad(x, dy, rms, w.dtype, round_x_hat, interpret)
    return dx, dw, bad


caches.register(_tail_table.cache_clear)
