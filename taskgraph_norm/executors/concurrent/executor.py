"""The concurrent executor: dependency counting, a ready set, a persistent pool.

One run is one :class:`~.run.Run`: a state machine under one lock that
counts each node's unfinished operands, keeps the ready set, and asks the schedule policy
(:mod:`.schedules`) for every decision -- dispatch a ready node, or complete
(commit) a dispatched one.  Worker threads of a shared :class:`~.devices.WorkerPool`
run the nodes and then drive the state machine themselves, so the event loop is
touched once per run (to wake the awaiting task), not once per node.

ACCUMULATE nodes merge their operands in the order those operands completed
(the order the policy committed them): under :class:`~.schedules.Fifo` that is
the order worker threads really finished, so ``race`` graphs really race; under
a seeded policy or a replay it is the policy's order, so a run is reproducible
bit for bit.  Each node is computed by the reference interpreter's method for
its op (one set of numerics), plus ``CALL`` for general graphs.

Failure and cancellation (structured concurrency): the first node that raises
stops the run -- no node starts after it -- and, once the nodes already running
on threads have returned, its original exception object is raised unwrapped
(with a note naming the node).  Cancelling the awaiting task (a cancel scope,
``fail_after``) stops the run the same way and waits, shielded, only for nodes
already running on a thread: a torch kernel cannot be interrupted, and waiting
guarantees no node of the run is still computing when ``execute`` returns.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ...errors import ConfigError
from ...graph import Graph, Op
from .run import Run
from .devices import WorkerPool, current_pool, default_pool
from ..interpreter import GraphInterpreter
from .schedules import resolve_schedule
from .streams import caller_event, join_caller_stream, pin_to_lanes
from .trace import Trace

__all__ = ["GraphInterpreter", "run_concurrent"]


def _pick_pool(
    x: Any, device: str | torch.device | None, max_workers: int | None, pool: WorkerPool | None
) -> WorkerPool:
    x_device = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
    if device is not None:
        try:
            want = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ConfigError("device", device, "a torch device such as 'cpu' or 'cuda'") from exc
        if want.type != x_device.type:
            raise ConfigError("device", device, f"the input's device ({x_device}); move x first")
    if pool is not None:
        if not isinstance(pool, WorkerPool):
            raise ConfigError("pool", pool, "a taskgraph_norm WorkerPool")
        if pool.device.type != x_device.type:
            raise ConfigError("pool", pool, f"a pool for the input's device ({x_device})")
        return pool
    return default_pool(x_device, max_workers)


async def run_concurrent(
    graph: Graph,
    x: Any,
    weight: torch.Tensor | None,
    eps: float | None,
    *,
    device: str | torch.device | None = None,
    max_workers: int | None = None,
    schedule: object = None,
    trace: Callable[[Trace], object] | None = None,
    pool: WorkerPool | None = None,
    functions: Mapping[str, Callable[..., Any]] | None = None,
    residual: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> Any:
    """Execute ``graph`` concurrently and return its output value.

    Parameters
    ----------
    device:
        Must match the input's device type (default: the input's device).
    max_workers:
        The most nodes of this run in flight at once.  Without ``pool`` it also
        picks the shared pool of that size (one per device and size, persistent).
    schedule:
        A policy from :mod:`taskgraph_norm.executors.schedules` (default ``Fifo()``).
    trace:
        Called with the run's :class:`Trace` when the run ends, failed or not.
    pool:
        An explicit :class:`WorkerPool` to run on (you close it).
    functions:
        ``{name: callable}`` for the graph's CALL nodes.
    residual, residual_out:
        For a graph whose INPUT adds a residual: the residual, and where
        ``h = x + residual`` is written (as in :func:`.reference.run_reference`).
    bias:
        LayerNorm's ``b`` (a LayerNorm graph's FINALIZE adds it; as in ``run_reference``).

    Raises
    ------
    GraphError, CycleError
        for a malformed graph, before any node runs.
    ConfigError
        for a bad option.
    BaseException
        the original exception of the first node that failed.
    """
    interp = GraphInterpreter(graph, functions)  # validates the graph first
    if max_workers is not None and (
        isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1
    ):
        raise ConfigError("max_workers", max_workers, "an integer >= 1")
    if trace is not None and not callable(trace):
        raise ConfigError("trace", trace, "a callable taking a Trace (e.g. list.append) or None")
    chosen = _pick_pool(x, device, max_workers, pool)
    nested = current_pool() is chosen
    if nested:  # called from a node running on this pool: a pool of its own, never a wait on itself
        chosen = WorkerPool(1, device=chosen.device, name="tgn-nested")
    policy = resolve_schedule(schedule)
    scheduler = policy.start(graph)
    interp.x, interp.weight = x, weight
    interp.residual, interp.residual_out = residual, residual_out
    interp.bias = bias
    interp.eps = eps  # type: ignore[assignment]  # None for a general graph that takes no eps
    limit = max_workers or chosen.max_workers
    run = Run(graph, interp, chosen, scheduler, limit, tracing=trace is not None)
    if chosen.uses_streams:
        ready = caller_event(chosen)
        for i, node in enumerate(graph.nodes):
            if node.op is Op.INPUT:
                run.events[i] = ready
        pin_to_lanes(weight, chosen)
    try:
        value = await run.wait()
    finally:
        if nested:
            chosen.close()
        if trace is not None:
            trace(run.trace(policy))
    if chosen.uses_streams and isinstance(value, torch.Tensor):
        join_caller_stream(run.events[run.output], value)
    return value

