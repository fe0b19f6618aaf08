"""The real (non-fake) forward of the ops: ``y`` from the pipeline, and each row's ``rms``.

``y`` is the pipeline's (:func:`taskgraph_norm.pipeline.for_config`: graph, proof and
plan made once per configuration), so the ops give the bits every other face
gives.  The backward needs each row's ``rms = sqrt(total / D + eps)``, the value
FINALIZE divided by: fp32 CPU input gets it from the same native call that writes
``y`` (the direct kernel writes the row totals where it is told); any other input
gets ``y`` from the pipeline and the totals from the graph's order over the squares
(:func:`~taskgraph_norm.backends.torch_ops.rowsum.plan_row_sum`: the compiled executor's
operations, so the same totals; tests compare them with the reference's).
"""

from __future__ import annotations

import math

import torch

from .. import kernels, pipeline
from ..errors import ConfigError
from ..backends.native import grads as native_grads
from ..backends.torch_ops.rowsum import plan_row_sum, reference_row_sum
from ..graph import Op

__all__ = ["CASTING_MODES", "check_model_options", "forward", "forward_residual", "rms_shape"]

#: The casting modes the ops run (kernels.finalize defines each).
CASTING_MODES = kernels.CASTING_MODES


def check_model_options(casting_mode: str, offset: float) -> None:
    """Reject a casting mode or offset FINALIZE does not define."""
    if casting_mode not in CASTING_MODES:
        raise ConfigError("casting_mode", casting_mode, " or ".join(repr(m) for m in CASTING_MODES))
    if not math.isfinite(offset):
        raise ConfigError("offset", offset, "a finite float")


def rms_shape(x: torch.Tensor) -> tuple[int, ...]:
    """The shape of the per-row ``rms``: ``x``'s with the last dim 1."""
    return (*x.shape[:-1], 1)


def row_totals(pipe: pipeline.Pipeline, x: torch.Tensor) -> torch.Tensor:
    """Each row's sum of squares in the pipeline graph's order, ``(rows, 1)`` (or an
    exact pair ``(rows, 2)``), for a 2-D ``x``."""
    exact = Op.SCALE in pipe.graph.ops
    xa = x.to(torch.float64 if exact else kernels.accumulation_dtype(x.dtype))
    squares = (xa * xa).contiguous()
    if pipe.plan is not None:
        return plan_row_sum(pipe.plan, squares)
    return reference_row_sum(pipe.graph, squares)


def forward(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, chunk_size: int, topology: str,
    leaf: str, accumulate: str, casting_mode: str, offset: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, rms)`` of ``x`` (``(..., D)``): ``y`` as ``normalize_sync`` gives it, ``rms``
    in the accumulation dtype, shape ``(..., 1)``."""
    check_model_options(casting_mode, offset)
    hidden = x.shape[-1] if x.dim() else 0
    if x.numel() == 0 or hidden == 0:
        out_dtype = kernels.output_dtype(x.dtype, None if weight is None else weight.dtype, casting_mode)
        return (torch.empty_like(x, dtype=out_dtype),
                x.new_empty(rms_shape(x), dtype=kernels.accumulation_dtype(x.dtype)))
    pipe = pipeline.for_config(hidden, chunk_size, topology, leaf, accumulate, "auto", casting_mode, offset)
    if x.dtype is torch.float32 and x.is_cpu:
        found = _forward_direct(pipe, x, weight, eps, hidden)
        if found is not None:
            return found
    x_checked, w_checked, e = pipe.check(x, weight, eps)
    y = pipe.run(x_checked, w_checked, e)
    total = row_totals(pipe, x.reshape(-1, hidden))
    return y, kernels.finalize_rms(total, hidden, e, kernels.accumulation_dtype(x.dtype)).view(rms_shape(x))


def _forward_direct(
    pipe: pipeline.Pipeline, x: torch.Tensor, weight: torch.Tensor | None, eps: float, hidden: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(y, rms)`` from one direct native call (fp32 CPU), or ``None`` where it does not apply."""
    direct = pipe.direct()
    if direct is None or pipe.plan is None:
        return None
    exact = pipe.plan.accumulate == "exact"
    total = torch.empty(x.numel() // hidden, 2 if exact else 1, dtype=torch.float64 if exact else torch.float32)
    y = direct(x, weight, eps, None, None, None, total)
    if y is None:
        return None
    # a float plan's kernel wrote each row's rms itself; an exact pair becomes its rms here
    rms = native_grads.rms_of_totals(total, hidden, eps) if exact else total
    return y, rms if x.dim() == 2 else rms.view(rms_shape(x))


def residual_sum(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``h = x + residual`` rounded to ``x.dtype`` (elementwise: adds no reduction order)."""
    return (x + residual).to(x.dtype)


def forward_residual(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float, chunk_size: int,
    topology: str, leaf: str, accumulate: str, casting_mode: str, offset: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, h, rms)``: ``h = x + residual`` (in ``x.dtype``), ``y, rms = forward(h)``."""
    h = residual_sum(x, residual)
    y, rms = forward(h, weight, eps, chunk_size, topology, leaf, accumulate, casting_mode, offset)
    return y, h, rms
