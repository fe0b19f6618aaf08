"""The backend protocol: what the pipeline asks of torch ops, native C and Triton.

A backend runs a lowered :class:`~taskgraph_norm.lowering.Plan` (never a
graph node by node: that is the executors' work, and never proves anything: it is
handed a certified plan).  Each is one object with one protocol, in the manner of
xformers' attention operators:

* :meth:`Backend.not_supported_reasons` -- whether it runs a plan on a device and
  dtype, and if not, why (an empty list: it does);
* :meth:`Backend.forward` -- ``y`` (with the fused residual add) and, when asked, the
  per-row ``rms`` the backward needs;
* :meth:`Backend.backward` -- ``dx`` through the forward's merge order and the float
  ``dW`` over fixed row blocks;
* :meth:`Backend.accumulate_exact` -- the exact weight gradient's accumulate: add
  ``sum over rows of dy * x_hat`` to an exact state.

The pipeline picks a backend once per (device, dtype) by walking a priority list
(:func:`taskgraph_norm.backends.choose`); when none fits, the error lists every
backend's reasons.  Which backends may be chosen is per call or per context
(:func:`use`, a ``contextvars`` variable), never a process-wide switch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch

if TYPE_CHECKING:
    import threading

    from ..lowering import Plan
    from ..graph import Graph

__all__ = ["Backend", "BACKEND_NAMES", "Forward", "LayerForward", "NoLayerKernel", "allowed", "triton_asked", "use"]

#: Every backend's name, fastest first (the default priority).
BACKEND_NAMES = ("triton", "native", "torch_ops")

_allowed: ContextVar[tuple[str, ...]] = ContextVar("taskgraph_norm_backends", default=BACKEND_NAMES)
#: Whether this context asked for Triton by name (:func:`use`): only then do CPU
#: tensors run in its interpreter (slow: a test and debugging tool).
_triton_asked: ContextVar[bool] = ContextVar("taskgraph_norm_triton_asked", default=False)


@contextlib.contextmanager
def use(*names: str) -> Iterator[None]:
    """Let only the backends ``names`` run the calls made in this block (this thread,
    this task and what they hand work to); ``use("torch_ops")`` runs every plan on
    torch ops alone (the portable form: the same bits).  Naming ``"triton"`` also lets
    CPU tensors run in Triton's interpreter when ``TRITON_INTERPRET=1`` (tests).

    Raises ValueError for an unknown name."""
    unknown = [n for n in names if n not in BACKEND_NAMES]
    if unknown or not names:
        raise ValueError(f"unknown backend {unknown or names!r}: expected names from {BACKEND_NAMES}")
    token = _allowed.set(tuple(n for n in BACKEND_NAMES if n in names))
    asked = _triton_asked.set("triton" in names)
    try:
        yield
    finally:
        _triton_asked.reset(asked)
        _allowed.reset(token)


#: ``triton_asked()``: whether this context named Triton in :func:`use` (CPU tensors
#: then run in its interpreter under ``TRITON_INTERPRET=1``).  (The variables' own
#: ``get``: the pipeline asks on every call.)
triton_asked = _triton_asked.get

#: ``allowed()``: the backends this context lets run (:func:`use`), in priority order.
allowed = _allowed.get


class Forward(NamedTuple):
    """A backend's forward: ``y``, and each row's ``rms`` (``(..., 1)``, the accumulation
    dtype) when the caller asked for it (``None`` otherwise).  (A named tuple, not a
    frozen dataclass: it is made on every call of the training path.)"""

    y: torch.Tensor
    rms: torch.Tensor | None


class LayerForward(NamedTuple):
    """A backend's LayerNorm forward: ``y`` and, when asked, each row's ``mean`` and
    ``den = sqrt(var / D + eps)`` (``(..., 1)``, the accumulation dtype): what the
    backward needs (``None`` otherwise)."""

    y: torch.Tensor
    mean: torch.Tensor | None
    den: torch.Tensor | None


class Backend(Protocol):
    """One way to run a plan (see the module doc)."""

    name: str

    def not_supported_reasons(self, plan: Plan, device: torch.device, dtype: torch.dtype) -> list[str]:
        """Why this backend does not run ``plan`` on ``device`` for ``dtype`` input
        (empty when it does)."""
        ...

    def forward(
        self, graph: Graph, plan: Plan, x: torch.Tensor, weight: torch.Tensor | None, eps: float, *,
        out: torch.Tensor | None = None, residual: torch.Tensor | None = None,
        residual_out: torch.Tensor | None = None, stats: bool = False, cancel: threading.Event | None = None,
        **options: Any,
    ) -> Forward:
        """``y`` for a checked ``x`` (``h = x + residual`` written to ``residual_out`` first,
        for a residual plan) and, with ``stats``, each row's ``rms``.  ``options``: what
        one backend takes (the torch-ops tiles' ``tile_rows`` and ``threads``; the native
        backend's ``direct`` call); another raises ``ExecutionError``."""
        ...

    def backward(
        self, plan: Plan, dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, rms: torch.Tensor, *,
        input_grad: bool, weight_grad: bool, offset: float, round_x_hat: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(dx, dW)`` of 2-D ``dy`` and ``x`` with ``(rows, 1)`` ``rms`` (``None`` where
        not asked): ``dx`` through the plan's merge order, ``dW`` over fixed row blocks."""
        ...

    def accumulate_exact(
        self, state: torch.Tensor, dy: torch.Tensor, b: torch.Tensor, rms: torch.Tensor | None,
    ) -> bool:
        """Add ``sum over rows of dy * b`` (``b / rms`` when ``rms`` is given) to the
        exact ``state``, exactly; ``False`` when this backend does not take these operands."""
        ...

    def backward_exact_dw(
        self, plan: Plan, dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, rms: torch.Tensor,
        state: torch.Tensor, dx: torch.Tensor | None, *, offset: float, fresh: bool = False,
        rounded: torch.Tensor | None = None,
    ) -> bool:
        """The backward with the exact weight gradient in the same pass: ``dx`` (when
        given, a tensor like ``x`` to write) as :meth:`backward` makes it, and ``sum over
        rows of dy * (x / rms)`` added to the exact ``state`` as :meth:`accumulate_exact`
        adds it; ``False`` (and nothing written or added) when this backend has no such
        pass for these operands: the caller then runs the two.  With ``fresh``,
        ``state``'s memory holds anything: a ``True`` return has written it whole with
        this call's sum alone (after ``False`` the caller zeroes it), and ``rounded`` (an
        fp32 tensor of ``D`` values, or ``None``) holds the sums correctly rounded to fp32."""
        ...

    def layer_forward(
        self, graph: Graph, plan: Plan, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
        eps: float, *, out: torch.Tensor | None = None, residual: torch.Tensor | None = None,
        residual_out: torch.Tensor | None = None, stats: bool = False, cancel: threading.Event | None = None,
    ) -> LayerForward:
        """LayerNorm's ``y`` (``Plan.norm == "layer"``) for a checked ``x`` and, with
        ``stats``, each row's ``mean`` and ``den``."""
        ...

    def layer_backward(
        self, plan: Plan, dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor,
        den: torch.Tensor, *, input_grad: bool, weight_grad: bool, bias_grad: bool,
        weight_dtype: torch.dtype | None = None, bias_dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """LayerNorm's ``(dx, dW, db)`` of 2-D ``dy`` and ``x`` (``None`` where not asked)."""
        ...


class NoLayerKernel:
    """For a backend with no LayerNorm kernel (none now: native C and Triton have theirs,
    :class:`~.native.layer.NativeLayer` and :class:`~.triton.layer.TritonLayer`): its
    ``not_supported_reasons`` says so
    for a ``norm="layer"`` plan (:meth:`layer_reasons`), so the choice falls to torch
    ops; these methods are never reached through :func:`taskgraph_norm.backends.choose`."""

    name: str

    def layer_reasons(self, plan: Plan) -> list[str]:
        """``["no LayerNorm kernel yet ..."]`` for a LayerNorm plan, else ``[]``."""
        if plan.norm != "layer":
            return []
        return ["no LayerNorm kernel yet (issue 23: the torch-ops backend runs LayerNorm plans)"]

    def layer_forward(self, graph: Graph, plan: Plan, *args: Any, **kwargs: Any) -> LayerForward:
        raise NotImplementedError(f"the {self.name} backend has no LayerNorm kernel yet")

    def layer_backward(
        self, plan: Plan, *args: Any, **kwargs: Any,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        raise NotImplementedError(f"the {self.name} backend has no LayerNorm kernel yet")
