"""``torch.library`` ops: RMSNorm through a merge graph, its residual form and its backward.

:func:`rms_norm` and :func:`rms_norm_residual` are the functional faces: they check
the input like ``F.rms_norm``, resolve ``eps`` and call the op, which
``torch.compile`` (``fullgraph=True``) and ``torch.export`` keep as one opaque node and
autograd differentiates with the native backward.  ``tgn.RMSNorm`` and
``tgn.normalize_sync`` call them whenever a gradient is recorded or a tracer is
looking (:func:`needs_op`); otherwise they go straight to the kernel.

The op handles themselves are ``torch.ops.taskgraph_norm.rms_norm``,
``rms_norm_residual`` and ``rms_norm_backward`` (docs/design.md, "The ops").
"""

from __future__ import annotations

import torch

from ..checks import check_input, check_residual, resolve_eps
from ..topologies import build_graph
from .library import (LIBRARY, EagerRMSNorm, eager_apply, residual_apply, rms_norm_backward_op, rms_norm_op,
                      rms_norm_residual_op)
from .routing import DIRECT, EAGER, TRACED, dtensor_face, dual, jit_tracing, needs_op, route, tracing
from .layer import layer_norm_backward_op, layer_norm_op  # LayerNorm's ops (issue 23)
from .gated import gated_rms_norm, gated_rms_norm_backward_op, gated_rms_norm_op  # gated, grouped (issue 24)

__all__ = [
    "DIRECT", "EAGER", "EagerRMSNorm", "gated_rms_norm", "gated_rms_norm_backward_op", "gated_rms_norm_op", "LIBRARY", "TRACED", "layer_norm_backward_op", "layer_norm_op", "call_checked", "call_checked_residual", "dtensor_face", "eager_apply", "jit_tracing", "needs_op", "route", "rms_norm", "rms_norm_backward_op", "rms_norm_op", "rms_norm_residual",
    "rms_norm_residual_op", "tracing",
]


def _checked(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float | None, topology: str, chunk_size: int,
    leaf: str, accumulate: str,
) -> float:
    if jit_tracing():
        # jit sizes are tensors (every check would warn); the options are checked when
        # the traced call's kernel first runs, the input by the op's schema and kernel.
        return resolve_eps(eps, x.dtype)
    check_input(x, (x.shape[-1] if isinstance(x, torch.Tensor) and x.dim() else 1,), weight)
    # A bad option fails here in eager code (dynamo does not trace the builder: a
    # compiled call's options are checked when its kernel first runs).
    if not torch.compiler.is_compiling():
            build_graph(max(x.shape[-1], 1), chunk_size=chunk_size, topology=topology, leaf=leaf,
                    accumulate=accumulate)
    return resolve_eps(eps, x.dtype)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor | None = None, eps: float | None = None, *,
    topology: str = "tree", chunk_size: int = 64, leaf: str = "pairwise", accumulate: str = "float",
    casting_mode: str = "torch", offset: float = 0.0,
) -> torch.Tensor:
    """RMSNorm of ``x`` over its last dim through the op ``taskgraph_norm::rms_norm``.

    The same bits as :func:`taskgraph_norm.normalize_sync`; differentiable (the
    native backward), traceable by ``torch.compile``, ``torch.export`` and
    ``torch.jit.trace``.
    """
    e = _checked(x, weight, eps, topology, chunk_size, leaf, accumulate)
    return call_checked(x, weight, e, chunk_size, topology, leaf, accumulate, casting_mode, offset)


def call_checked(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, chunk_size: int, topology: str, leaf: str,
    accumulate: str, casting_mode: str = "torch", offset: float = 0.0, *, how: int | None = None,
) -> torch.Tensor:
    """:func:`rms_norm` of a checked input with ``eps`` resolved: the op under a tracer,
    its kernels under eager autograd (:class:`~.library.EagerRMSNorm`: the same bits
    without the dispatcher's overhead).  ``how``: the caller's :func:`route`, if known."""
    if (route(x, weight) if how is None else how) == TRACED:
        y: torch.Tensor = rms_norm_op(x, weight, eps, chunk_size, topology, leaf, accumulate, casting_mode,
                                      offset)[0]
        return y
    return eager_apply(x, weight, (eps, chunk_size, topology, leaf, accumulate, casting_mode, offset))


def call_checked_residual(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float, chunk_size: int,
    topology: str, leaf: str, accumulate: str, casting_mode: str = "torch", offset: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rms_norm_residual` of checked inputs with ``eps`` resolved: ``(y, h)``."""
    if torch._C._are_functorch_transforms_active() or dual(x, residual, weight):
        # torch.func / forward-mode AD: the op has neither rule; the same bits by pieces
        return residual_apply(x, residual, weight, (eps, chunk_size, topology, leaf, accumulate, casting_mode, offset))
    y, h, _ = rms_norm_residual_op(x, residual, weight, eps, chunk_size, topology, leaf, accumulate,
                                   casting_mode, offset)
    return y, h


def rms_norm_residual(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None = None, eps: float | None = None, *,
    topology: str = "tree", chunk_size: int = 64, leaf: str = "pairwise", accumulate: str = "float",
    casting_mode: str = "torch", offset: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, h)`` with ``h = x + residual`` rounded to ``x.dtype`` and ``y = rms_norm(h)``
    (vLLM's ``fused_add_rms_norm``), through the op ``taskgraph_norm::rms_norm_residual``."""
    e = _checked(x, weight, eps, topology, chunk_size, leaf, accumulate)
    check_residual(x, residual)
    return call_checked_residual(x, residual, weight, e, chunk_size, topology, leaf, accumulate, casting_mode,
                                 offset)
