"""Executors: each runs a validated graph on a checked input and returns ``y``.

``reference`` is the sequential oracle (:mod:`taskgraph_norm.kernels.reference`:
the kernels node by node, where the backends' fallbacks reach it too).
``concurrent`` is the async executor (:mod:`.concurrent`: an ``async def`` runner
the API awaits on the event loop instead of calling it on a thread).  ``compiled``
and ``triton`` are backends (:mod:`taskgraph_norm.backends`) named here too:
``compiled`` runs a certified graph through its lowered plan (same bits, a few
fused tensor ops, or native C kernels); ``triton`` runs the same plan as one Triton
kernel on CUDA (and on CPU tensors in Triton's interpreter, ``TRITON_INTERPRET=1``).
The pipeline's ``auto`` picks ``concurrent`` for a general graph (one with CALL
nodes), ``compiled`` for every certified graph it can lower, and ``reference``
otherwise (an uncertified graph, e.g. a float race over three or more chunks, is
never compiled).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..backends.native.direct import direct_call
from ..backends.torch_ops.compiled import run_compiled
from ..backends.triton import run_triton
from ..kernels.reference import Cancelled, ReferenceInterpreter, reference_sum_of_squares, run_reference
from ..lowering import Plan, lower_certified
from .concurrent.executor import run_concurrent

__all__ = [
    "EXECUTORS",
    "ASYNC_EXECUTORS",
    "Cancelled",
    "direct_call",
    "Plan",
    "ReferenceInterpreter",
    "lower_certified",
    "reference_sum_of_squares",
    "run_compiled",
    "run_concurrent",
    "run_reference",
    "run_triton",
    "PLAN_EXECUTORS",
]

Runner = Callable[..., Any]

#: The executors this version can run, by name.  The pipeline
#: (:mod:`taskgraph_norm.pipeline`) chooses one per configuration and hands the
#: compiled executor its plan; no executor ever proves a graph.
EXECUTORS: dict[str, Runner] = {
    "reference": run_reference,
    "concurrent": run_concurrent,
    "compiled": run_compiled,
    "triton": run_triton,
}

#: The executors that run a lowered plan (the pipeline hands them ``plan=``).
PLAN_EXECUTORS = frozenset({"compiled", "triton"})

#: The executors whose runner is ``async def`` (awaited on the event loop).
ASYNC_EXECUTORS = frozenset({"concurrent"})
