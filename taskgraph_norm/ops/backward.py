"""The real (non-fake) backward of the ops: ``dx`` in the forward's order, ``dW`` in blocks.

The math is :mod:`taskgraph_norm.kernels`' (the section "the backward"): ``dx``
needs each row's ``s = sum(g * xa)``, reduced through the forward graph's merge DAG
(:mod:`taskgraph_norm.backends.torch_ops.rowsum`), so ``dx`` is batch-invariant by the
forward's proof; ``dW`` sums ``dy * x_hat`` over rows in fixed blocks of
:data:`kernels.ROW_BLOCK` rows.  Paths, all with the same bits (tests compare them):

* fp32 CPU, contiguous, a plan with native kernels: one C pass over the rows
  (``native_grads.backward_rows``), whose whole row blocks torch's threads share
  (``native_team.c``, as the forward's rows) from :data:`SPLIT_NUMEL` elements on;
  the block sums meet in the caller;
* CUDA tensors, triton installed, a plan the Triton kernels run: the Triton kernels
  (:func:`backward_triton`; CPU tensors under ``TRITON_INTERPRET=1`` only when
  :data:`TRITON_ON_CPU` is set, or called directly, as the tests do);
* anything else: the same math as torch ops (:func:`backward_torch`).

``weight_grad`` names how ``dW`` merges over rows: ``"float"`` (this version); the
slot is there for an exact, micro-batch-invariant accumulator.
"""

from __future__ import annotations

import torch

from .. import kernels, pipeline
from ..constants import SPLIT_NUMEL  # and two row blocks: the rows are shared among torch's threads
from ..errors import ConfigError, ExecutionError
from ..backends.native import grads as _native_grads
from ..backends.native import loader as _native
from ..backends.native import team as _team
from ..backends.torch_ops.rowsum import plan_row_sum, reference_row_sum
from ..backends.triton import backward as _triton
from ..graph import Op
from .forward import check_model_options

__all__ = ["TRITON_ON_CPU", "WEIGHT_GRAD_MODES", "backward", "backward_torch", "backward_triton", "row_dot"]

#: How ``dW`` may merge over rows.
WEIGHT_GRAD_MODES = ("float",)
#: Run the Triton kernels on CPU tensors too when ``TRITON_INTERPRET=1`` (tests only: slow).
TRITON_ON_CPU = False


def row_dot(pipe: pipeline.Pipeline, xa: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Each row's ``sum(g * xa)`` through the pipeline graph's DAG (``(rows, 1)``, or an
    exact pair ``(rows, 2)``), torch ops."""
    if Op.SCALE in pipe.graph.ops:
        return kernels.sum_exact(g.to(torch.float64) * xa.to(torch.float64))
    v = (g * xa).contiguous()
    if pipe.plan is not None:
        return plan_row_sum(pipe.plan, v)
    return reference_row_sum(pipe.graph, v)


def backward_torch(
    pipe: pipeline.Pipeline, dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
    rms: torch.Tensor, input_grad: bool, weight_grad: bool, offset: float = 0.0, round_x_hat: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(dx, dW)`` of 2-D ``dy``, ``x`` and ``(rows, 1)`` ``rms`` as torch ops (``None`` where not asked).

    ``offset``: the weight FINALIZE multiplied by was ``w + offset`` (``g = dy * (w + offset)``);
    ``round_x_hat``: ``casting_mode="llama"``, whose ``x_hat`` was rounded to ``x.dtype``
    before the weight multiplied it (``dW`` sums ``dy`` times that rounded value)."""
    dx = dw = None
    if input_grad:
        acc = kernels.accumulation_dtype(x.dtype)
        w_g = None if weight is None else kernels.finalize_weight(weight, acc, offset)
        xa, g = kernels.grad_operands(x, dy, w_g)
        dx = kernels.input_grad(xa, g, rms, row_dot(pipe, xa, g), x.dtype)
    if weight_grad and weight is not None:
        dw = kernels.weight_grad_float(x, dy, rms, weight.dtype, round_x_hat=round_x_hat)
    return dx, dw


def backward_triton(
    pipe: pipeline.Pipeline, dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
    rms: torch.Tensor, input_grad: bool, weight_grad: bool, offset: float = 0.0, round_x_hat: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """:func:`backward_torch`'s result (the same bits) by the Triton kernels
    (``backends/triton/backward.py``: CUDA tensors, or CPU tensors under
    ``TRITON_INTERPRET=1``).  The rows the kernels flag (a non-finite ``s`` or ``rms``,
    a zero ``rms``, a NaN in ``dx``) and a non-finite ``dW`` are computed again by
    :func:`backward_torch` on the CPU, whose NaNs they then carry."""
    if pipe.plan is None:
        raise ExecutionError("the triton backward runs a lowered plan; this pipeline has none")
    dx, dw, bad = _triton.run_backward(pipe.plan, dy, x, weight, rms, input_grad, weight_grad, offset, round_x_hat)
    cpu = torch.device("cpu")
    w_cpu = None if weight is None else weight.to(cpu)
    if dx is not None and len(bad):
        fixed, _ = backward_torch(pipe, dy[bad].to(cpu), x[bad].to(cpu), w_cpu, rms[bad].to(cpu), True, False, offset)
        assert fixed is not None
        dx[bad] = fixed.to(dx.device)
    if dw is not None and not bool(torch.isfinite(dw).all()):
        dw_cpu = kernels.weight_grad_float(x.to(cpu), dy.to(cpu), rms.to(cpu), dw.dtype, round_x_hat=round_x_hat)
        dw = dw_cpu.to(dw.device)
    return dx, dw


def _backward_native(
    pipe: pipeline.Pipeline, dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
    rms: torch.Tensor, input_grad: bool, weight_grad: bool, weight_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
    """The C pass, or ``None`` where it does not apply (the caller runs the torch ops).
    ``weight`` is what ``g = dy * weight`` multiplies by (``w + offset``, made in fp32);
    ``weight_dtype`` the parameter's own dtype, which ``dW`` takes."""
    plan = pipe.plan
    if (plan is None or x.dtype != torch.float32 or x.device.type != "cpu" or not _native.enabled()
            or not (plan.accumulate == "exact" or plan.leaf == "pairwise" and plan.merge in ("single", "tree", "adds"))
            or (weight is not None and (weight.dtype != torch.float32 or not weight.is_contiguous()))
            or not _native.available()):
        return None
    rows, hidden = x.shape
    dw_wanted = weight_grad and weight is not None
    dx = torch.empty_like(x) if input_grad else None
    n_blocks = -(-rows // kernels.ROW_BLOCK)
    blocks = torch.empty(n_blocks, hidden, dtype=torch.float32) if dw_wanted else None
    recipe = _native_grads.recipe_of(plan)
    exact = plan.accumulate == "exact"
    threads = _team.threads() if x.numel() >= SPLIT_NUMEL and n_blocks >= 2 else 1
    # Each thread runs whole row blocks (the blocks' sums do not depend on the split).
    bad = _native_grads.backward_rows(x, dy, weight, rms, recipe, dx, blocks, exact=exact, threads=threads,
                                      grain=kernels.ROW_BLOCK)
    if bad:
        return None  # a non-finite row: its NaNs' signs and payloads are torch's on the torch path
    dw = None
    if blocks is not None:
        dw = kernels.merge_blocks_(blocks)
        if weight_dtype is not None:
            dw = dw.to(weight_dtype)
        if not bool(torch.isfinite(dw).all()):
            return None
    return dx, dw


def backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, rms: torch.Tensor, chunk_size: int,
    topology: str, leaf: str, accumulate: str, casting_mode: str, offset: float, weight_grad: str,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, dW)`` for the op ``rms_norm_backward``; an output not asked for in
    ``output_mask`` is an empty tensor."""
    check_model_options(casting_mode, offset)
    if weight_grad not in WEIGHT_GRAD_MODES:
        raise ConfigError("weight_grad", weight_grad, " or ".join(repr(m) for m in WEIGHT_GRAD_MODES))
    input_grad, w_grad = bool(output_mask[0]), bool(output_mask[1]) and weight is not None
    hidden = x.shape[-1]
    empty = x.new_empty(0)
    if x.numel() == 0 or hidden == 0:
        dw0 = torch.zeros_like(weight) if w_grad and weight is not None else empty
        return (torch.zeros_like(x) if input_grad else empty), dw0
    pipe = pipeline.for_config(hidden, chunk_size, topology, leaf, accumulate, "auto", casting_mode, offset)
    x2, dy2 = x.reshape(-1, hidden).contiguous(), dy.reshape(-1, hidden).contiguous()
    rms2 = rms.reshape(-1, 1).contiguous()
    w = None if weight is None else weight.reshape(hidden)
    # llama rounds x_hat to x's dtype before the weight: a wider accumulation sees it in dW
    round_x_hat = casting_mode == "llama" and kernels.accumulation_dtype(x.dtype) != x.dtype
    found = None
    if _triton.supports_backward(pipe.plan, x2, dy2, w, rms2, on_cpu=TRITON_ON_CPU):
        found = backward_triton(pipe, dy2, x2, w, rms2, input_grad, w_grad, offset, round_x_hat)
    elif not round_x_hat:
        w_g = w if w is None or not offset else kernels.finalize_weight(w, torch.float32, offset).contiguous()
        found = _backward_native(pipe, dy2, x2, w_g, rms2, input_grad, w_grad, weight_dtype=None if w is None
                                 else w.dtype)
    dx, dw = found if found is not None else backward_torch(pipe, dy2, x2, w, rms2, input_grad, w_grad,
                                                             offset, round_x_hat)
    dx_out = empty if dx is None else dx.view(x.shape)
    dw_out = empty if dw is None or weight is None else dw.view(weight.shape)
    return dx_out, dw_out
