"""LayerNorm on the native backend: its rows in C (``csrc/native_layer.c``).

:class:`NativeLayer` is the native backend's LayerNorm half (:class:`~..registry.NativeBackend`
inherits it in place of :class:`~..base.NoLayerKernel`): a float plan with pairwise
leaves and ADD merges (:func:`.loader.runs_plan`), and every exact plan
(``csrc/native_layer_exact.c``: the exact pairs, the correctly rounded mean), on CPU rows
of fp32, bf16 or fp16 runs in one C call per input (rows shared among torch's threads
from :data:`~taskgraph_norm.constants.SPLIT_NUMEL` elements on, as the RMSNorm direct
path shares them), with the torch-ops backend's bits: ``y``, and with ``stats`` each
row's ``mean`` and ``den``.  The rest falls back to the torch-ops backend
(:func:`..torch_ops.layer.run_layer`, the same bits): fp64 rows, strided tensors, a
row whose ``y`` holds a NaN (C's NaNs need not be torch's), an exact row with an Inf.
The backward of the same plans and inputs is one C call too (:mod:`.layer_grads`).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import torch

from ... import kernels
from ...constants import SPLIT_NUMEL, TEAM_GRAIN
from ..base import LayerForward
from ..torch_ops import layer as _torch_layer
from . import loader as _native
from . import team as _team
from .direct import advise_fresh
from .layer_direct import LayerRouted, layer_direct
from .layer_grads import layer_backward_rows
from .layer_plan import CODES, plan_fixed

if TYPE_CHECKING:
    from ...graph import Graph
    from ...lowering import Plan

__all__ = ["NativeLayer", "layer_rows"]

def layer_rows(
    plan: Plan, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
    out: torch.Tensor | None = None, stats: bool = False, threads: int | None = None,
) -> LayerForward | None:
    """``y`` of a checked ``x`` (and ``mean``, ``den`` with ``stats``) from one C call, or
    ``None`` where the kernel does not take it (the caller runs torch ops): not a float
    LayerNorm plan it runs, not contiguous CPU fp32/bf16/fp16 tensors, or a NaN in some
    row's ``y`` (a non-finite weight or bias: every row).  ``threads``: how many threads
    share the rows (default: torch's, for a large input)."""
    fixed = plan_fixed(plan)
    code = CODES.get(x.dtype)
    if fixed is None or code is None or not x.is_cpu or not x.is_contiguous() or not _native.enabled():
        return None
    w_code, w_ptr, b_ptr = code, None, None
    if weight is not None:
        if not weight.is_cpu or not weight.is_contiguous():
            return None
        w_code, w_ptr = CODES[weight.dtype], weight.data_ptr()
    if bias is not None:
        if not bias.is_cpu or not bias.is_contiguous():
            return None
        w_code, b_ptr = CODES[bias.dtype], bias.data_ptr()
    if out is not None and not out.is_contiguous():
        return None
    hidden = plan.hidden_size
    numel = x.numel()
    rows = numel // hidden
    if out is None:
        y = torch.empty_like(x)
        advise_fresh(y)  # (32 MiB or more: a huge-page candidate)
    else:
        y = out
    mean = den = None
    if stats:
        mean = torch.empty((*x.shape[:-1], 1), dtype=torch.float32)
        den = torch.empty((*x.shape[:-1], 1), dtype=torch.float32)
    grain = max(1, TEAM_GRAIN // hidden)
    if threads is None:
        threads = _team.forward_threads(numel, rows, grain, SPLIT_NUMEL)
    chunk, adds, n_adds, root, exact, _ = fixed
    bad = _native.module().layer_rows(
        x.data_ptr(), y.data_ptr(), rows, hidden, chunk, adds, n_adds, root, exact, w_ptr, b_ptr, eps,
        None if mean is None else mean.data_ptr(), None if den is None else den.data_ptr(), code, w_code, grain,
        threads)
    if bad < 0:
        raise MemoryError("the native LayerNorm kernel could not allocate its scratch")
    return None if bad else LayerForward(y, mean, den)


class NativeLayer:
    """The native backend's LayerNorm methods (see the module doc)."""

    name: str

    def layer_reasons(self, plan: Plan) -> list[str]:
        """Why the C kernels do not run a LayerNorm plan: ``[]`` (every LayerNorm plan the
        choice gives this backend runs in C, or falls back per call to torch ops)."""
        return []

    def layer_direct(self, plan: Plan) -> LayerRouted | None:
        """The faces' warm entry for ``plan`` (:func:`.layer_direct.layer_direct`), or ``None``."""
        return layer_direct(plan)

    def layer_forward(
        self, graph: Graph, plan: Plan, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
        eps: float, *, out: torch.Tensor | None = None, residual: torch.Tensor | None = None,
        residual_out: torch.Tensor | None = None, stats: bool = False, cancel: threading.Event | None = None,
    ) -> LayerForward:
        """One C call where :func:`layer_rows` takes the input (a residual plan's ``h = x +
        residual`` made first, by the torch op the torch-ops backend runs); else torch ops."""
        h = x
        if residual is not None:
            h = kernels.residual_add(x, residual, out=residual_out)
        found = layer_rows(plan, h, weight, bias, eps, out, stats)
        if found is not None:
            return found
        return _torch_layer.run_layer(plan, h, weight, bias, eps, out=out, stats=stats, cancel=cancel)

    def layer_backward(
        self, plan: Plan, dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor,
        den: torch.Tensor, **kwargs: Any,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """One C call where :func:`.layer_grads.layer_backward_rows` takes the call; else the
        torch-ops backend's backward (the same bits)."""
        found = layer_backward_rows(plan, dy, x, weight, mean, den, **kwargs)
        if found is not None:
            return found
        return _torch_layer.layer_backward(plan, dy, x, weight, mean, den, **kwargs)
