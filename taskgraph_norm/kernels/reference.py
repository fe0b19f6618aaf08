"""The reference executor: a sequential interpreter, the oracle for every other one.

It walks the graph in its deterministic topological order and dispatches each
node to the method named after its op (``Op.SUMSQ`` -> :meth:`sumsq`), so a
subclass can override one op in a few lines, as with ``torch.fx.Interpreter``.

It lives beside the kernels it dispatches to, below both the executors (the
concurrent executor's interpreter subclasses it) and the backends (their
fallback rows, and runs that record gradients, take its bits), so neither
imports the other's family for it.  ``kernels/__init__`` does not import it:
the kernels themselves never read a graph.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch

from .. import kernels
from . import layer
from ..errors import ConfigError, ExecutionError, GraphError
from ..graph import Graph, Node, Op, validate

__all__ = ["ReferenceInterpreter", "finish_from_h", "reference_sum_of_squares", "run_reference"]


class Cancelled(Exception):
    """Raised inside a run whose ``cancel`` event was set (the async caller has gone)."""


class ReferenceInterpreter:
    """Runs one graph on one input, sequentially.

    Parameters
    ----------
    graph:
        A graph; it is validated first, so a malformed one never runs a node.
    arrival:
        For ``ACCUMULATE`` nodes, the order in which their operands arrive, as a
        permutation of operand positions (``{"accumulate": (2, 0, 1)}``).  Without
        an entry, operands arrive in index order.
    """

    def __init__(self, graph: Graph, *, arrival: Mapping[str, Sequence[int]] | None = None) -> None:
        self.graph = validate(graph)
        self.arrival = _check_arrival(graph, arrival or {})
        self._order = graph.topological_order
        self._frees = _frees(graph)
        self.cancel: threading.Event | None = None

    #: A residual graph's ``residual`` operand and the tensor ``h`` is written into
    #: (set by the runner; see :func:`run_reference`).
    residual: torch.Tensor | None = None
    residual_out: torch.Tensor | None = None
    #: LayerNorm's bias (set by the runner; RMSNorm graphs never read it).
    bias: torch.Tensor | None = None

    def run(self, x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        """The graph's output for ``x``."""
        y: torch.Tensor = self.run_values(x, weight, eps, keep=())[self.graph.output]
        return y

    def run_values(
        self, x: torch.Tensor, weight: torch.Tensor | None, eps: float, *, keep: Collection[str]
    ) -> dict[str, Any]:
        """The output and the values of the ``keep`` nodes (e.g. a merge root, to read
        the sum of squares itself); every other intermediate is freed after its last use."""
        self.x, self.weight, self.eps = x, weight, eps
        kept = set(keep) | {self.graph.output}
        env: dict[str, Any] = {}
        cancel = self.cancel
        value_of = env.__getitem__
        # The method named after each op, looked up once per run, not once per node.
        handler = {op: getattr(self, op.value) for op in self.graph.ops}
        for node, frees in zip(self.graph.topological_nodes, self._frees):
            if cancel is not None and cancel.is_set():
                raise Cancelled("the caller was cancelled; stopped between nodes")
            env[node.id] = handler[node.op](node, list(map(value_of, node.inputs)))
            for done in frees:
                if done not in kept:
                    del env[done]
        return {k: env[k] for k in kept}

    # -- one method per op ------------------------------------------------------

    def input(self, node: Node, args: list[Any]) -> torch.Tensor:
        if not node.attrs.get("residual"):
            return self.x
        if self.residual is None or self.residual_out is None:
            raise ExecutionError(f"node {node.id!r} adds a residual: pass residual= and residual_out=")
        return kernels.residual_add(self.x, self.residual, out=self.residual_out)

    def sumsq(self, node: Node, args: list[Any]) -> torch.Tensor:
        attrs = node.attrs
        start, stop, leaf = attrs["start"], attrs["stop"], attrs["leaf"]
        if attrs.get("centered"):
            if attrs.get("domain") == "exact":
                return layer.sumsq_centered_exact(args[0], start, stop, args[1], args[2])
            if leaf == "native":
                return layer.sumsq_centered_native(args[0], start, stop, args[1])
            return layer.sumsq_centered_pairwise(args[0], start, stop, args[1])
        if attrs.get("domain") == "exact":
            return kernels.sumsq_exact(args[0], start, stop, args[1])
        if leaf == "native":
            return kernels.sumsq_native(args[0], start, stop)
        return kernels.sumsq_pairwise(args[0], start, stop)

    def sum(self, node: Node, args: list[Any]) -> torch.Tensor:
        attrs = node.attrs
        start, stop = attrs["start"], attrs["stop"]
        if attrs.get("domain") == "exact":
            return layer.xsum_exact(args[0], start, stop, args[1])
        if attrs["leaf"] == "native":
            return layer.xsum_native(args[0], start, stop)
        return layer.xsum_pairwise(args[0], start, stop)

    def mean(self, node: Node, args: list[Any]) -> torch.Tensor:
        dtype = kernels.accumulation_dtype(self.x.dtype)
        if node.attrs.get("domain") == "exact":
            return layer.mean_exact(args[0], node.attrs["hidden_size"], dtype)
        return layer.mean_float(args[0], node.attrs["hidden_size"])

    def add(self, node: Node, args: list[Any]) -> torch.Tensor:
        return kernels.add(args[0], args[1])

    def accumulate(self, node: Node, args: list[Any]) -> torch.Tensor:
        order = self.arrival.get(node.id, range(len(args)))
        return kernels.accumulate([args[i] for i in order])

    def catsum(self, node: Node, args: list[Any]) -> torch.Tensor:
        return kernels.catsum(args)

    def rowmax(self, node: Node, args: list[Any]) -> torch.Tensor:
        start, stop = node.attrs["start"], node.attrs["stop"]
        if node.attrs.get("centered"):
            return layer.rowmax_centered(args[0], start, stop, args[1])
        if node.attrs.get("power") == 1:
            return layer.rowmax_abs(args[0], start, stop)
        return kernels.rowmax_sq(args[0], start, stop)

    def max(self, node: Node, args: list[Any]) -> torch.Tensor:
        return kernels.maximum(args[0], args[1])

    def scale(self, node: Node, args: list[Any]) -> torch.Tensor:
        return kernels.exact_scale(args[0], node.attrs["hidden_size"])

    def rmsnorm(self, node: Node, args: list[Any]) -> torch.Tensor:
        return kernels.rms_norm_standard(args[0], node.attrs["hidden_size"], self.eps, self.weight)

    def layernorm(self, node: Node, args: list[Any]) -> torch.Tensor:
        return layer.layer_norm_standard(args[0], node.attrs["hidden_size"], self.eps, self.weight, self.bias)

    def finalize(self, node: Node, args: list[Any]) -> torch.Tensor:
        if node.attrs.get("norm") == "layer":
            return layer.finalize_layer(args[0], args[1], args[2], node.attrs["hidden_size"], self.eps,
                                        self.weight, self.bias)
        return kernels.finalize(args[0], args[1], node.attrs["hidden_size"], self.eps, self.weight,
                                node.attrs.get("casting_mode", "torch"), node.attrs.get("offset", 0.0))

    def output(self, node: Node, args: list[Any]) -> torch.Tensor:
        y: torch.Tensor = args[0]
        return y


def _check_arrival(
    graph: Graph, arrival: Mapping[str, Sequence[int]]
) -> dict[str, tuple[int, ...]]:
    checked: dict[str, tuple[int, ...]] = {}
    for node_id, order in arrival.items():
        node = graph.by_id.get(node_id)
        if node is None or node.op is not Op.ACCUMULATE:
            raise GraphError(node_id, "an arrival order is given, but it is not an ACCUMULATE node")
        perm = tuple(order)
        if sorted(perm) != list(range(len(node.inputs))):
            raise ConfigError(
                f"arrival[{node_id!r}]", perm,
                f"a permutation of 0..{len(node.inputs) - 1}",
            )
        checked[node_id] = perm
    return checked


@functools.lru_cache(maxsize=64)
def _frees(graph: Graph) -> tuple[tuple[str, ...], ...]:
    """For each step of the topological order, the ids whose last consumer runs at
    that step (the output is kept).  Cached per graph: a witness search or a report
    runs one graph many times."""
    last: dict[str, int] = {}
    for step, node in enumerate(graph.topological_nodes):
        for src in node.inputs:
            last[src] = step  # steps only grow: the last write is the last use
    by_step: list[list[str]] = [[] for _ in graph.topological_nodes]
    for src, step in last.items():
        if src != graph.output:
            by_step[step].append(src)
    return tuple(map(tuple, by_step))


def run_reference(
    graph: Graph,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    *,
    arrival: Mapping[str, Sequence[int]] | None = None,
    cancel: threading.Event | None = None,
    residual: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Execute ``graph`` sequentially on ``x`` (already checked) and return ``y``.

    ``bias``: LayerNorm's ``b`` (a LayerNorm graph's FINALIZE adds it; RMSNorm
    graphs ignore it), keyword-only so that RMSNorm's calls keep their form.

    ``cancel``: an event the caller sets to stop the run between nodes (it then
    raises :class:`Cancelled`).  A graph whose INPUT adds a residual takes
    ``residual`` (``x``'s shape and dtype) and writes ``h = x + residual`` into
    ``residual_out`` (which may be ``x`` or ``residual`` itself)."""
    interpreter = ReferenceInterpreter(graph, arrival=arrival)
    interpreter.cancel = cancel
    interpreter.residual, interpreter.residual_out = residual, residual_out
    interpreter.bias = bias
    return interpreter.run(x, weight, eps)


def finish_from_h(graph: Graph, h: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """The reference's ``y`` of a residual graph for rows whose ``h`` is already made
    (a fast path wrote it, perhaps over ``x`` or the residual).  The INPUT node adds
    a residual of ``-0.0``, which gives every ``h`` back bit for bit (``+0 + -0`` is
    ``+0``, ``-0 + -0`` is ``-0``, a NaN keeps its payload)."""
    return run_reference(graph, h, weight, eps, residual=torch.full_like(h, -0.0), residual_out=torch.empty_like(h))


def reference_sum_of_squares(graph: Graph, x: torch.Tensor) -> torch.Tensor:
    """The per-row sum of squares a chunked graph computes, as FINALIZE receives it,
    rounded once to the accumulation dtype (shape ``(..., 1)``)."""
    finalize = next((n for n in graph.nodes if n.op is Op.FINALIZE), None)
    if finalize is None:
        raise GraphError(None, "the graph has no FINALIZE node to read a sum of squares from")
    total_id = finalize.inputs[1]
    total: torch.Tensor = ReferenceInterpreter(graph).run_values(x, None, 0.0, keep=(total_id,))[total_id]
    if total.shape[-1] == kernels.EXACT_CHANNELS:
        total = kernels.combine_exact(total)
    return total.to(kernels.accumulation_dtype(x.dtype))
