"""The interpreter the concurrent executor computes nodes with.

:class:`GraphInterpreter` is the reference interpreter's op methods (one set of
numerics for every executor) plus ``CALL`` for general graphs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.autograd.profiler as _torch_profiler

from ..errors import GraphError
from ..graph import Graph, Node, Op
from .concurrent.run_plan import plan_for
from ..kernels.reference import ReferenceInterpreter

__all__ = ["GraphInterpreter", "call_with", "profiling"]


class GraphInterpreter(ReferenceInterpreter):
    """The reference interpreter's op methods, plus ``CALL`` through ``functions``.

    Raises GraphError before anything runs if a CALL node names a function that
    ``functions`` does not have.
    """

    def __init__(self, graph: Graph, functions: Mapping[str, Callable[..., Any]] | None = None) -> None:
        # Not super().__init__: it validates and orders the graph for a sequential
        # walk, which plan_for does once per graph.  Only the op methods are used.
        plan = plan_for(graph)
        self.graph = graph
        self.arrival = {}
        self.functions = dict(functions or {})
        for node, name in zip(graph.nodes, plan.calls):
            if node.op is Op.CALL and (not isinstance(name, str) or name not in self.functions):
                raise GraphError(
                    node.id, f"CALL names function {name!r}, which is not registered",
                    "pass functions={name: callable} to execute",
                )

    def call(self, node: Node, args: list[Any]) -> Any:
        return self.functions[node.attrs["fn"]](*args)


def profiling() -> bool:
    """Whether a torch profiler is on.  Its per-thread flag is off in our worker
    threads, so the module-level flag that ``profile.__enter__`` sets is read too;
    recording those threads needs ``profile_all_threads=True`` (docs/executor.md)."""
    return bool(getattr(_torch_profiler, "_is_profiler_enabled", False)) or bool(
        torch.autograd._profiler_enabled()  # type: ignore[attr-defined]
    )


def call_with(fn: Callable[..., Any]) -> Callable[[Any, Node, list[Any]], Any]:
    def call(interp: Any, node: Node, args: list[Any]) -> Any:
        return fn(*args)

    return call
