"""Executors: each runs a validated graph on a checked input and returns ``y``.

``reference`` is the sequential oracle.  ``concurrent`` is the async executor
(an ``async def`` runner: the API awaits it on the event loop instead of
calling it on a thread).  ``compiled`` runs a certified graph through its
lowered plan (same bits, a few fused tensor ops).  ``auto`` picks ``concurrent``
for a general graph (one with CALL nodes), ``compiled`` for every certified
graph it can lower, and ``reference`` otherwise (an uncertified graph, e.g. a
float race over three or more chunks, is never compiled).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import ConfigError
from ..graph import Graph, Op
from .compiled import compile_graph, plan_or_error, run_compiled
from .concurrent import run_concurrent
from .lowering import Plan
from .reference import ReferenceInterpreter, reference_sum_of_squares, run_reference

__all__ = [
    "EXECUTORS",
    "Plan",
    "compile_graph",
    "run_compiled",
    "ReferenceInterpreter",
    "reference_sum_of_squares",
    "resolve_executor",
    "run_concurrent",
    "run_reference",
]

Runner = Callable[..., Any]

#: The executors this version can run, by name (a runner may be ``async def``).
EXECUTORS: dict[str, Runner] = {
    "reference": run_reference,
    "concurrent": run_concurrent,
    "compiled": run_compiled,
}


def resolve_executor(name: str, graph: Graph) -> tuple[str, Runner]:
    """The executor to use for ``graph``: ``(name, runner)``.

    Raises ConfigError (a ValueError) for a name this version does not provide.
    """
    if name == "auto":
        if Op.CALL in graph.ops:
            name = "concurrent"
        else:
            name = _auto_executor(graph)
    runner: Any = EXECUTORS.get(name)
    if runner is None:
        raise ConfigError("executor", name, "'auto' or one of " + ", ".join(repr(k) for k in EXECUTORS))
    return name, runner


def _auto_executor(graph: Graph) -> str:
    """``compiled`` for a certified graph that lowers, else ``reference`` (cached)."""
    return "reference" if isinstance(plan_or_error(graph), Exception) else "compiled"
