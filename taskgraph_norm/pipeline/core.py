"""The :class:`Pipeline`: one configuration built, proved, lowered, with its backends.

A :class:`Pipeline` is to a graph what ``torch.fx.GraphModule`` is to an fx graph:
the graph is the program, the pipeline is the thing you call.  It holds the graph,
its proof, the lowered plan and the executor chosen for it, all made once, and picks
a backend once per (device, dtype); a warm call checks its input and makes one
kernel call.  Every face calls through it: ``normalize``, ``normalize_sync``,
``execute``, ``execute_sync`` and ``RMSNorm`` call it, and the ops call its
:meth:`~Pipeline.forward` and :meth:`~Pipeline.backward`.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Mapping
from typing import Any, Literal, overload

import anyio
import anyio.to_thread
import torch

from .. import kernels, torch_state
from ..backends.base import Backend, Forward, allowed, triton_asked
from ..backends.native.direct import DirectCall
from ..backends.registry import BACKENDS, choose
from ..backends.torch_ops.rowsum import graph_backward, graph_rms
from ..checks import PLAIN_TENSORS as _PLAIN
from ..checks import check_input, check_no_partial_overlap, check_out, check_real, check_residual, resolve_eps
from ..errors import ConfigError, ExecutionError, GraphError
from ..executors import ASYNC_EXECUTORS, EXECUTORS, PLAN_EXECUTORS
from ..executors.concurrent.loops import run_coroutine_sync
from ..graph import Graph, Op, validate
from ..lowering import Plan, lower_certified
from ..prover import Proof, prove

__all__ = ["OFFLOAD_NUMEL", "Pipeline", "check_executor"]

#: Inputs with at least this many elements are computed on a worker thread by the
#: async faces; smaller ones run inline, where a thread hop would cost more than the work.
OFFLOAD_NUMEL = 1 << 15

_grad_enabled = torch.is_grad_enabled


def _not_taken(*args: Any) -> None:
    """The direct entry of a pipeline without one."""
    return None


class Pipeline:
    """One configuration, built once: ``graph``, ``proof``, ``plan`` and ``executor``.

    ``executor`` is the name actually run (``"auto"`` resolved: ``concurrent`` for
    a general graph with CALL nodes, ``compiled`` for a certified graph that lowers,
    else ``reference``).  Calling it::

        pipe = Pipeline(tgn.build_graph(4096))
        y = pipe(x, weight)            # sync, input checked like F.rms_norm
        y = await pipe.acall(x, weight)

    Raises ConfigError for an unknown executor name, ExecutionError when
    ``executor="compiled"`` is asked of a graph the prover does not certify.
    """

    __slots__ = ("graph", "executor", "plan", "hidden_size", "_proof", "_runner", "_direct", "routed", "_direct_known",
                 "_backends", "casting_mode", "offset", "residual", "options", "_weight_shape", "face")

    def __init__(self, graph: Graph, executor: str = "auto") -> None:
        if not isinstance(graph, Graph):
            raise TypeError(f"graph must be a taskgraph_norm.Graph, got {type(graph).__name__}")
        check_executor(executor)
        validate(graph)
        self.graph = graph
        hidden = graph.meta.get("hidden_size")
        self.hidden_size: int | None = hidden if isinstance(hidden, int) else None
        self._weight_shape = (self.hidden_size,)  # (what the direct path's weight must be)
        if self.hidden_size is None and Op.CALL not in graph.ops:
            raise ConfigError("graph", graph, "a graph made by build_graph (meta has no hidden_size)")
        self._proof: Proof | None = None
        self.plan: Plan | None = None
        if executor == "auto":
            executor = "concurrent" if Op.CALL in graph.ops else "compiled"
            if executor == "compiled":
                try:
                    self.plan = lower_certified(graph, self.proof)
                except (ExecutionError, GraphError):
                    executor = "reference"
        elif executor in PLAN_EXECUTORS:
            self.plan = lower_certified(graph, self.proof)
        self.casting_mode, self.offset, self.residual = _semantics(graph)
        meta = graph.meta
        #: ``(chunk_size, topology, leaf, accumulate, casting_mode, offset)``: the ops'
        #: configuration arguments for this pipeline's graph (``None`` for a general graph).
        self.options: tuple[Any, ...] | None = None if self.hidden_size is None else (
            meta.get("chunk_size"), meta.get("topology"), meta.get("leaf"), meta.get("accumulate"),
            self.casting_mode, self.offset)
        self.executor = executor
        self._runner = EXECUTORS[executor]
        #: The backend chosen per (device type, dtype, allowed backends, options given).
        self._backends: dict[tuple[Any, ...], Backend] = {}
        self._direct: DirectCall | None = None
        self._direct_known = self.plan is None or executor != "compiled"  # triton runs its kernels
        #: ``routed(x, weight, eps, out) -> y | None``: :meth:`try_direct` for a call the
        #: faces sent straight to the kernel (:func:`taskgraph_norm.ops.route` said
        #: ``DIRECT``: ``x`` and ``weight`` plain tensors, no gradient recorded) on this
        #: pipeline, found by ``x.shape[-1]``: the direct kernel's own entry once known.
        self.routed: DirectCall = _not_taken if self._direct_known else self._routed_first
        #: The direct call's configurations for the C face (backends/native/face.py,
        #: which finds this pipeline in :data:`~.cache.PIPELINES`), once it is known.
        self.face: dict[int, bytes] | None = None

    @property
    def proof(self) -> Proof:
        """The graph's proof (made on first use; the witness of a refutation is
        searched only when ``proof.witness`` is read)."""
        if self._proof is None:
            self._proof = prove(self.graph)
        return self._proof

    def __repr__(self) -> str:
        return (f"Pipeline(graph={len(self.graph)} nodes, hidden_size={self.hidden_size}, "
                f"executor={self.executor!r}, proof={self.proof.summary!r})")

    # -- the sync core ------------------------------------------------------------

    @overload
    def __call__(
        self, x: torch.Tensor, weight: torch.Tensor | None = None, eps: float | None = None,
        out: torch.Tensor | None = None, *, residual: None = None, residual_out: None = None, **options: Any,
    ) -> torch.Tensor: ...

    @overload
    def __call__(
        self, x: torch.Tensor, weight: torch.Tensor | None = None, eps: float | None = None,
        out: torch.Tensor | None = None, *, residual: torch.Tensor, residual_out: torch.Tensor | None = None,
        **options: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    @overload
    def __call__(
        self, x: torch.Tensor, weight: torch.Tensor | None = None, eps: float | None = None,
        out: torch.Tensor | None = None, *, residual: torch.Tensor | None = None,
        residual_out: torch.Tensor | None = None, **options: Any,
    ) -> Any: ...

    def __call__(
        self, x: torch.Tensor, weight: torch.Tensor | None = None, eps: float | None = None,
        out: torch.Tensor | None = None, *, residual: torch.Tensor | None = None,
        residual_out: torch.Tensor | None = None, **options: Any,
    ) -> Any:
        """``y`` for ``x`` (shape ``(..., hidden_size)``), checked like ``F.rms_norm``;
        ``(y, h)`` for a residual graph (``h = x + residual``, written into
        ``residual_out`` when given)."""
        if self.residual or residual is not None or residual_out is not None:
            return self._call_residual(x, weight, eps, out, residual, residual_out, options)
        if not options:
            y = self.try_direct(x, weight, eps, out)
            if y is not None:
                return y
        return self.general(x, weight, eps, out, options)

    def general(
        self, x: torch.Tensor, weight: torch.Tensor | None, eps: float | None, out: torch.Tensor | None,
        options: Mapping[str, Any] | None = None,
    ) -> torch.Tensor:
        """:meth:`__call__` without the direct kernel (a call :meth:`try_direct` did not
        take): the full checks, then :meth:`run`."""
        x, weight, e = self.check(x, weight, eps, out)
        return self.run(x, weight, e, out, options)

    def try_direct(
        self, x: torch.Tensor, weight: torch.Tensor | None, eps: float | None, out: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """``y`` from the direct native kernel, or ``None`` where it does not take the
        call (then :meth:`general` runs it, or raises what the checks raise).  The kernel
        refuses a tensor it cannot read and an input that records a gradient."""
        # The checks of check_input the direct path needs, inline: any other input falls
        # through to the full checks, which raise torch's errors.
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != self.hidden_size:
            return None
        if weight is not None and not isinstance(weight, torch.Tensor):
            return None
        if type(x) not in _PLAIN or _grad_enabled() and (x.requires_grad or weight is not None
                                                          and weight.requires_grad):
            return None  # (a fake or traced tensor; a gradient to record: the ops' path)
        return self.routed(x, weight, eps, out)

    def _routed_first(
        self, x: torch.Tensor, weight: torch.Tensor | None, eps: float | None, out: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """:attr:`routed` until the direct kernel is known."""
        return self.routed(x, weight, eps, out) if self._resolve_direct() is not None else None

    def _call_residual(
        self, x: torch.Tensor, weight: torch.Tensor | None, eps: float | None, out: torch.Tensor | None,
        residual: torch.Tensor | None, residual_out: torch.Tensor | None, options: Mapping[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x, weight, e = self.check(x, weight, eps, out)
        r, h = self.check_residual(x, residual, residual_out)
        if not options:
            direct = self._direct if self._direct_known else self._resolve_direct()
            if direct is not None:
                y = direct(x, weight, e, out, r, h)
                if y is not None:
                    return y, h
        return self.run(x, weight, e, out, {**options, "residual": r, "residual_out": h}), h

    @overload
    def check_residual(self, x: torch.Tensor, residual: object, residual_out: object,
                       fresh: Literal[True] = True) -> tuple[torch.Tensor, torch.Tensor]: ...

    @overload
    def check_residual(self, x: torch.Tensor, residual: object, residual_out: object,
                       fresh: bool) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def check_residual(
        self, x: torch.Tensor, residual: object, residual_out: object, fresh: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(residual, h)`` for a residual graph: the residual must have ``x``'s
        shape, dtype and device (as must ``residual_out``, which may be ``x`` or the
        residual itself, and must not partly overlap either); ``h`` is ``residual_out``,
        else a fresh tensor (``None`` with ``fresh=False``)."""
        if not self.residual:
            raise ConfigError("residual", "a tensor", "None: this pipeline's graph adds no residual "
                              "(build it with residual=True)")
        check_residual(x, residual)
        assert isinstance(residual, torch.Tensor)
        checked: list[torch.Tensor | None] = [residual]
        if residual_out is None:
            checked.append(torch.empty_like(x) if fresh else None)
        else:
            check_residual(x, residual_out, "residual_out")
            assert isinstance(residual_out, torch.Tensor)
            checked.append(residual_out)
        if checked[1] is not None:
            check_no_partial_overlap(checked[1], x, checked[0])
        assert checked[0] is not None
        return checked[0], checked[1]

    def direct(self) -> DirectCall | None:
        """This configuration's direct native kernel (:func:`backends.native.direct.direct_call`), or
        ``None`` where there is none (no native form, not built, switched off)."""
        return self._direct if self._direct_known else self._resolve_direct()

    def _resolve_direct(self) -> DirectCall | None:
        if "native" not in allowed():
            return None  # backends.use() without native is in force: ask again on a later call
        assert self.plan is not None
        self._direct = BACKENDS["native"].direct(self.plan)  # type: ignore[attr-defined]
        self.routed = _not_taken if self._direct is None else self._direct.routed  # type: ignore[union-attr]
        self.face = getattr(self._direct, "face", None)
        self._direct_known = True
        return self._direct

    def backend(self, device: torch.device, dtype: torch.dtype, compiled_options: bool = False) -> Backend:
        """The backend that runs this pipeline's plan on ``device`` for ``dtype`` input:
        chosen once per (device type, dtype) and per set of backends this context
        allows (:func:`taskgraph_norm.backends.use`).  ``executor="triton"`` allows only
        Triton; ``compiled_options``: the call passes the compiled executor's own options
        (``tile_rows``, ``threads``), which only the torch-ops and native backends take.

        Raises ExecutionError (``NoBackendError``) listing every backend's reasons when
        none runs it; a graph with no plan (run node by node) has no backend."""
        if self.plan is None:
            raise ExecutionError(f"this pipeline runs its graph on the {self.executor} executor, not a backend")
        names = allowed()
        key = (device.type, dtype, names, compiled_options, triton_asked())
        found = self._backends.get(key)
        if found is None:
            if self.executor == "triton":
                names = ("triton",)
            elif compiled_options:
                names = tuple(n for n in names if n != "triton")
            found = self._backends[key] = choose(self.plan, device, dtype, names, by_name=self.executor == "triton")
        return found

    def _backend_of(self, x: torch.Tensor) -> Backend:
        """:meth:`backend` for ``x``'s device and dtype, from one dict lookup when known."""
        key = ("cpu" if x.is_cpu else x.device.type, x.dtype, allowed(), triton_asked())
        found = self._backends.get(key)
        if found is None:
            found = self._backends[key] = self.backend(x.device, x.dtype)
        return found

    def forward(
        self, x: torch.Tensor, weight: torch.Tensor | None, eps: float, *, out: torch.Tensor | None = None,
        residual: torch.Tensor | None = None, residual_out: torch.Tensor | None = None, stats: bool = False,
        cancel: threading.Event | None = None, options: Mapping[str, Any] | None = None,
    ) -> Forward:
        """``y`` of a checked ``x`` (``eps`` resolved) and, with ``stats``, each row's ``rms``
        (``(..., 1)``, the accumulation dtype): what the ops' backward needs.  A plan runs
        on this pipeline's backend; a graph with no plan on its executor."""
        if not options and self.plan is not None and self.executor in PLAN_EXECUTORS:
            # the training path's call: no dict of options (building and unpacking one cost
            # ~0.5 us of a 13 us (1, 4096) forward), the backend from one lookup
            backend = self._backend_of(x)
            if backend.name == "native" and residual is None:
                return backend.forward(self.graph, self.plan, x, weight, eps, out=out, stats=stats, cancel=cancel,
                                       direct=self.direct())
            return backend.forward(self.graph, self.plan, x, weight, eps, out=out, residual=residual,
                                   residual_out=residual_out, stats=stats, cancel=cancel)
        opts = dict(options or {})
        if self.plan is None or self.executor not in PLAN_EXECUTORS:
            extra = {} if residual is None else {"residual": residual, "residual_out": residual_out}
            y = self.run(x, weight, eps, out, {**opts, **extra}, cancel)
            h = x if residual_out is None else residual_out
            return Forward(y, graph_rms(self.graph, h, eps) if stats else None)
        backend = self.backend(x.device, x.dtype, bool(opts))
        if backend.name == "native" and residual is None:
            opts["direct"] = self.direct()
        return backend.forward(self.graph, self.plan, x, weight, eps, out=out, residual=residual,
                               residual_out=residual_out, stats=stats, cancel=cancel, **opts)

    def backward(
        self, dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, rms: torch.Tensor, *,
        input_grad: bool, weight_grad: bool, round_x_hat: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(dx, dW)`` of 2-D ``dy`` and ``x`` with ``(rows, 1)`` ``rms`` (``None`` where not
        asked): ``dx`` through the forward graph's merge order (batch-invariant by its
        proof), ``dW`` over fixed row blocks; on this pipeline's backend."""
        if self.plan is None:
            return graph_backward(self.graph, dy, x, weight, rms, input_grad, weight_grad, self.offset, round_x_hat)
        backend = self._backend_of(x)
        return backend.backward(self.plan, dy, x, weight, rms, input_grad=input_grad, weight_grad=weight_grad,
                                offset=self.offset, round_x_hat=round_x_hat)

    def backward_exact_dw(
        self, dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, rms: torch.Tensor,
        state: torch.Tensor, dx: torch.Tensor | None, *, fresh: bool = False, rounded: torch.Tensor | None = None,
    ) -> bool:
        """:meth:`backward`'s ``dx`` (into ``dx``, if given) with the exact weight
        gradient's ``sum over rows of dy * (x / rms)`` added to ``state`` (written whole,
        and rounded into ``rounded``, with ``fresh``), in one pass where the backend has
        one (:meth:`.Backend.backward_exact_dw`); else ``False``."""
        return self.plan is not None and self._backend_of(x).backward_exact_dw(
            self.plan, dy, x, weight, rms, state, dx, offset=self.offset, fresh=fresh, rounded=rounded)

    def check(
        self, x: object, weight: object | None, eps: float | None, out: object | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, float]:
        """Reject what ``F.rms_norm`` rejects; returns ``(x, weight, eps)`` with ``eps``
        resolved.  A general graph's input goes to its INPUT node unchecked."""
        if self.hidden_size is None:
            return x, weight, eps  # type: ignore[return-value]
        check_input(x, (self.hidden_size,), weight)
        assert isinstance(x, torch.Tensor)
        w = weight if isinstance(weight, torch.Tensor) else None
        # (an offset without a weight has no effect, as in Liger-Kernel)
        check_out(out, x, kernels.output_dtype(x.dtype, None if w is None else w.dtype, self.casting_mode), w)
        return x, w, resolve_eps(eps, x.dtype)

    def run(
        self, x: torch.Tensor, weight: torch.Tensor | None, eps: float, out: torch.Tensor | None = None,
        options: Mapping[str, Any] | None = None, cancel: threading.Event | None = None,
    ) -> torch.Tensor:
        """The one code path every call ends in (input already checked, ``eps`` resolved)."""
        opts = dict(options or {})
        if self.hidden_size is not None:
            check_real(x)  # a tracer's tensor never reaches a kernel or a workspace cache
        if self.hidden_size is not None and x.numel() == 0:
            if "residual" in opts:
                kernels.residual_add(x, opts["residual"], out=opts["residual_out"])
            return out if out is not None else torch.empty_like(x, dtype=kernels.output_dtype(
                x.dtype, None if weight is None else weight.dtype, self.casting_mode))
        if self.executor in PLAN_EXECUTORS:
            residual = opts.pop("residual", None)
            residual_out = opts.pop("residual_out", None)
            return self.forward(x, weight, eps, out=out, residual=residual, residual_out=residual_out,
                                cancel=cancel, options=opts).y
        if self.executor in ASYNC_EXECUTORS:
            y = run_coroutine_sync(functools.partial(self._runner, self.graph, x, weight, eps, **opts))
        elif self.executor == "reference":
            y = self._runner(self.graph, x, weight, eps, cancel=cancel, **opts)
        else:
            y = self._runner(self.graph, x, weight, eps, **opts)
        return y if out is None else out.copy_(y)

    # -- the async face -----------------------------------------------------------

    async def acall(
        self, x: torch.Tensor, weight: torch.Tensor | None = None, eps: float | None = None,
        out: torch.Tensor | None = None, *, residual: torch.Tensor | None = None,
        residual_out: torch.Tensor | None = None, **options: Any,
    ) -> Any:
        """:meth:`__call__` from async code.  An async executor is awaited on the event
        loop; a sync one runs inline for a small input and on a worker thread for a
        large one, stopped between tiles (or nodes) when the caller is cancelled."""
        if (self.executor not in ASYNC_EXECUTORS and isinstance(x, torch.Tensor)
                and x.numel() < OFFLOAD_NUMEL):
            return self(x, weight, eps, out, residual=residual, residual_out=residual_out, **options)
        x, weight, e = self.check(x, weight, eps, out)
        if self.residual or residual is not None or residual_out is not None:
            r, h = self.check_residual(x, residual, residual_out)
            options = {**options, "residual": r, "residual_out": h}
            y = await self._arun(x, weight, e, out, options)
            return y, h
        return await self._arun(x, weight, e, out, options)

    async def _arun(
        self, x: torch.Tensor, weight: torch.Tensor | None, e: float, out: torch.Tensor | None,
        options: Mapping[str, Any],
    ) -> torch.Tensor:
        if self.executor in ASYNC_EXECUTORS and not (self.hidden_size is not None and x.numel() == 0):
            y: torch.Tensor = await self._runner(self.graph, x, weight, e, **options)
            return y if out is None else out.copy_(y)
        cancel = threading.Event()
        state = torch_state.capture()  # the worker computes under the caller's grad/inference mode
        try:
            result: torch.Tensor = await anyio.to_thread.run_sync(
                functools.partial(state.run, self.run, x, weight, e, out, options, cancel), abandon_on_cancel=True,
            )
        finally:
            cancel.set()  # a cancelled caller's thread stops before its next tile
        return result


def check_executor(executor: object) -> None:
    """``executor`` must be ``"auto"`` or a name in :data:`taskgraph_norm.executors.EXECUTORS`."""
    if executor != "auto" and (not isinstance(executor, str) or executor not in EXECUTORS):
        raise ConfigError("executor", executor, "'auto' or one of " + ", ".join(repr(k) for k in EXECUTORS))


def _semantics(graph: Graph) -> tuple[str, float, bool]:
    """The graph's ``(casting_mode, offset, residual)``, read from its FINALIZE and INPUT nodes."""
    mode, offset, residual = "torch", 0.0, False
    for node in graph.nodes:
        if node.op is Op.FINALIZE:
            mode, offset = node.attrs.get("casting_mode", "torch"), float(node.attrs.get("offset", 0.0))
        elif node.op is Op.INPUT:
            residual = bool(node.attrs.get("residual", False))
    return mode, offset, residual
