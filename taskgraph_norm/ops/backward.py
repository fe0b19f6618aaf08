"""The real (non-fake) backward of the ops: ``dx`` in the forward's order, ``dW`` in blocks.

The math is :mod:`taskgraph_norm.kernels`' (the section "the backward"): ``dx``
needs each row's ``s = sum(g * xa)``, reduced through the forward graph's merge DAG,
so ``dx`` is batch-invariant by the forward's proof; ``dW`` sums ``dy * x_hat`` over
rows in fixed blocks of :data:`kernels.ROW_BLOCK` rows.  The work is the pipeline's
backend's (:meth:`taskgraph_norm.pipeline.Pipeline.backward`: one C pass on the
native backend, the Triton kernels on CUDA, torch ops otherwise; all the same bits,
which the tests compare).

``weight_grad`` names how ``dW`` merges over rows: ``"float"`` here; the exact,
micro-batch-invariant accumulator is :mod:`.exact_weight`'s.
"""

from __future__ import annotations

import torch

from .. import kernels, pipeline
from ..errors import ConfigError
from .forward import check_model_options

__all__ = ["WEIGHT_GRAD_MODES", "backward", "fused_exact_backward", "pipe_backward"]

#: How ``dW`` may merge over rows.
WEIGHT_GRAD_MODES = ("float",)


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
    if x.numel() == 0 or hidden == 0:
        empty = x.new_empty(0)
        dw0 = torch.zeros_like(weight) if w_grad and weight is not None else empty
        return (torch.zeros_like(x) if input_grad else empty), dw0
    pipe = pipeline.for_config(hidden, chunk_size, topology, leaf, accumulate, "auto", casting_mode, offset)
    dx, dw = pipe_backward(pipe, dy, x, weight, rms, input_grad, w_grad)
    if dx is None or dw is None:
        empty = x.new_empty(0)
        return (empty if dx is None else dx), (empty if dw is None else dw)
    return dx, dw


def fused_exact_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rms: torch.Tensor, chunk_size: int, topology: str,
    leaf: str, accumulate: str, casting_mode: str, offset: float, state: torch.Tensor, input_grad: bool,
    *, fresh: bool = False, rounded: bool = False, pipe: pipeline.Pipeline | None = None,
) -> tuple[bool, torch.Tensor | None, torch.Tensor | None]:
    """The backward of ``weight_grad="exact"`` in one pass where the backend has one:
    ``(done, dx, dW)``.  ``dx`` (when ``input_grad``) as :func:`backward` makes it, and
    ``sum over rows of dy * (x / rms)`` added to the exact ``state``
    (:meth:`.Pipeline.backward_exact_dw`; ``fresh`` as there); with ``rounded`` (and
    ``fresh``), ``dW``: the sums correctly rounded to fp32, in a new tensor made after
    ``dx``, as the float backward makes its ``dx`` and ``dW`` (a training loop's heap
    then takes the same blocks in both modes), else ``None``.  ``pipe``: the
    configuration's pipeline when the caller has it (the forward's).  ``(False, None,
    None)``, with nothing added, where the backend has no such pass."""
    hidden = x.shape[-1]
    if x.numel() == 0:
        return False, None, None
    if pipe is None:
        pipe = pipeline.for_config(hidden, chunk_size, topology, leaf, accumulate, "auto", casting_mode, offset)
    if x.dim() == 2 and dy.dim() == 2 and rms.dim() == 2:  # the common (rows, D) call: nothing to reshape
        x2, dy2, rms2 = x.contiguous(), dy.contiguous(), rms.contiguous()
    else:
        x2, dy2 = x.reshape(-1, hidden).contiguous(), dy.reshape(-1, hidden).contiguous()
        rms2 = rms.reshape(-1, 1).contiguous()
    dx = torch.empty_like(x2) if input_grad else None
    dw = torch.empty(hidden, dtype=torch.float32) if rounded and fresh else None
    if not pipe.backward_exact_dw(dy2, x2, weight if weight.dim() == 1 else weight.reshape(hidden), rms2, state, dx,
                                  fresh=fresh, rounded=dw):
        return False, None, None
    return True, dx if dx is None or dx.shape == x.shape else dx.view(x.shape), dw


def pipe_backward(
    pipe: pipeline.Pipeline, dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, rms: torch.Tensor,
    input_grad: bool, weight_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(dx, dW)`` (``None`` where not asked, or without a weight) of a non-empty ``x`` on
    the configuration's pipeline ``pipe``, whose options were checked when it was built:
    what :func:`backward` runs, and what eager autograd calls with the forward's pipeline."""
    hidden = x.shape[-1]
    two_d = x.dim() == 2
    x2 = x.contiguous() if two_d else x.reshape(-1, hidden).contiguous()
    dy2 = dy.contiguous() if two_d else dy.reshape(-1, hidden).contiguous()
    rms2 = rms.reshape(-1, 1).contiguous()
    w = None if weight is None else weight.reshape(hidden)
    # llama rounds x_hat to x's dtype before the weight: a wider accumulation sees it in dW
    round_x_hat = pipe.casting_mode == "llama" and kernels.accumulation_dtype(x.dtype) != x.dtype
    dx, dw = pipe.backward(dy2, x2, w, rms2, input_grad=input_grad, weight_grad=weight_grad and w is not None,
                           round_x_hat=round_x_hat)
    return (dx if dx is None or two_d else dx.view(x.shape)), (None if dw is None or weight is None
                                                                else dw.view(weight.shape))
