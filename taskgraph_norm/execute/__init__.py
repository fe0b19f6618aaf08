"""Executors: each runs a validated graph on a checked input and returns ``y``.

``reference`` is the sequential oracle.  ``concurrent`` is the async executor
(an ``async def`` runner: the API awaits it on the event loop instead of
calling it on a thread).  ``auto`` picks the best executor this version has for
a graph: ``concurrent`` for a general graph (one with CALL nodes), else
``reference``.  The compiled executor of DESIGN.md section 6 plugs in here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import ConfigError
from ..graph import Graph, Op
from .concurrent import run_concurrent
from .reference import ReferenceInterpreter, reference_sum_of_squares, run_reference

__all__ = [
    "EXECUTORS",
    "ReferenceInterpreter",
    "reference_sum_of_squares",
    "resolve_executor",
    "run_concurrent",
    "run_reference",
]

Runner = Callable[..., Any]

#: The executors this version can run, by name (a runner may be ``async def``).
EXECUTORS: dict[str, Runner] = {"reference": run_reference, "concurrent": run_concurrent}


def resolve_executor(name: str, graph: Graph) -> tuple[str, Runner]:
    """The executor to use for ``graph``: ``(name, runner)``.

    Raises ConfigError (a ValueError) for a name this version does not provide.
    """
    if name == "auto":
        name = "concurrent" if any(n.op is Op.CALL for n in graph.nodes) else "reference"
    runner: Any = EXECUTORS.get(name)
    if runner is None:
        raise ConfigError("executor", name, "'auto' or one of " + ", ".join(repr(k) for k in EXECUTORS))
    return name, runner
