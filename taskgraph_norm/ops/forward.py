"""The real (non-fake) forward of the ops: ``y`` and each row's ``rms``, from the pipeline.

Both come from :meth:`taskgraph_norm.pipeline.Pipeline.forward` with ``stats=True``
(graph, proof, plan and backend made once per configuration), so the ops give the
bits every other face gives.  The backward needs each row's ``rms = sqrt(total / D
+ eps)``, the value FINALIZE divided by: the native backend writes it in the same
call as ``y``; the others sum the squares again in the plan's order.
"""

from __future__ import annotations

import math

import torch

from .. import kernels, pipeline
from ..checks import check_input, check_residual
from ..errors import ConfigError

__all__ = ["CASTING_MODES", "check_model_options", "forward", "forward_op", "forward_pipe", "forward_residual",
           "rms_shape"]

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


def forward(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, chunk_size: int, topology: str,
    leaf: str, accumulate: str, casting_mode: str, offset: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, rms)`` of ``x`` (``(..., D)``): ``y`` as ``normalize_sync`` gives it, ``rms``
    in the accumulation dtype, shape ``(..., 1)``."""
    y, rms, _ = forward_pipe(x, weight, eps, chunk_size, topology, leaf, accumulate, casting_mode, offset)
    return y, rms


def forward_pipe(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, chunk_size: int, topology: str,
    leaf: str, accumulate: str, casting_mode: str, offset: float,
) -> tuple[torch.Tensor, torch.Tensor, pipeline.Pipeline | None]:
    """:func:`forward`'s ``(y, rms)`` and the pipeline that made them (``None`` for an
    empty ``x``), which the backward may call again without looking it up."""
    hidden = x.shape[-1] if x.dim() else 0
    if hidden == 0 or x.numel() == 0:
        check_model_options(casting_mode, offset)  # (else for_config's builder checks them)
        out_dtype = kernels.output_dtype(x.dtype, None if weight is None else weight.dtype, casting_mode)
        return (torch.empty_like(x, dtype=out_dtype),
                x.new_empty(rms_shape(x), dtype=kernels.accumulation_dtype(x.dtype)), None)
    pipe = pipeline.for_config(hidden, chunk_size, topology, leaf, accumulate, "auto", casting_mode, offset)
    y, rms = pipe.forward(x, weight, eps, stats=True)
    assert rms is not None
    return y, rms, pipe


def forward_op(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, chunk_size: int, topology: str,
    leaf: str, accumulate: str, casting_mode: str, offset: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The op ``rms_norm``'s kernel: :func:`forward` after the faces' checks (a raw op
    call gets torch's errors for a 0-d input or a weight of the wrong shape, dtype or
    device, never a read past a tensor)."""
    check_input(x, (x.shape[-1] if x.dim() else 1,), weight)
    return forward(x, weight, eps, chunk_size, topology, leaf, accumulate, casting_mode, offset)


def residual_sum(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``h = x + residual`` rounded to ``x.dtype`` (elementwise: adds no reduction order;
    kernels.residual_add, whose NaN bits do not depend on the element's position)."""
    return kernels.residual_add(x, residual).to(x.dtype)


def forward_residual(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float, chunk_size: int,
    topology: str, leaf: str, accumulate: str, casting_mode: str, offset: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, h, rms)``: ``h = x + residual`` (in ``x.dtype``), ``y, rms = forward(h)``;
    the residual has ``x``'s shape, dtype and device (never broadcast or promoted)."""
    check_input(x, (x.shape[-1] if x.dim() else 1,), weight)
    check_residual(x, residual)
    h = residual_sum(x, residual)
    y, rms = forward(h, weight, eps, chunk_size, topology, leaf, accumulate, casting_mode, offset)
    return y, h, rms
