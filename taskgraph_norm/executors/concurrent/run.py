"""One run of the concurrent executor (:mod:`.executor`): the state machine
:class:`Run`, under one lock, counts each node's unfinished operands, keeps the
ready set and asks the schedule policy for every decision; worker threads run the
nodes and drive it; :meth:`Run.wait` awaits the end on the event loop, and stops
the run on the first failure or a cancellation.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from types import MappingProxyType
from typing import Any

import anyio
import torch

from ... import torch_state
from ...graph import Graph
from .devices import Lane, WorkerPool
from ..interpreter import GraphInterpreter, call_with, profiling
from .run_plan import plan_for
from .schedules import ANY, COMPLETE, DISPATCH, Scheduler
from .streams import launch_on_lane
from .trace import Decision, NodeSpan, Trace

__all__ = ["Run"]

_KINDS = ("dispatch", "complete")
_LOCAL_BUDGET = 256  # nodes a worker runs in a row before going back to the queue


def _waker(event: anyio.Event) -> Callable[[], None]:
    """A thread-safe, non-blocking ``event.set`` for the running event loop."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    if loop is not None:
        asyncio_loop = loop

        def wake_asyncio() -> None:
            asyncio_loop.call_soon_threadsafe(event.set)

        return wake_asyncio
    import trio

    token = trio.lowlevel.current_trio_token()

    def wake_trio() -> None:
        token.run_sync_soon(event.set)

    return wake_trio


class Run:
    """One execution of one graph; every mutable field is guarded by ``lock``."""

    def __init__(
        self, graph: Graph, interp: GraphInterpreter, pool: WorkerPool, scheduler: Scheduler,
        limit: int, tracing: bool,
    ) -> None:
        plan = plan_for(graph)
        nodes = graph.nodes
        self.nodes, self.inputs, self.users, self.sources = nodes, plan.inputs, plan.users, plan.sources
        self.inline, self.output, self.interp = plan.inline, plan.output, interp
        self.positions = plan.positions
        self.pending = list(plan.pending)
        self.uses = [len(u) for u in plan.users]
        self.accumulating: dict[int, list[int]] = {i: [] for i in plan.accumulates}
        # Unbound methods, called as fn(interp, node, args); CALL nodes get their
        # function resolved once per run instead of once per node.
        methods = {m: getattr(type(interp), m) for m in set(plan.methods)}
        calls = {name: call_with(interp.functions[name]) for name in set(plan.calls) if isinstance(name, str)}
        self.fns = [
            calls[name] if isinstance(name, str) else methods[m] for m, name in zip(plan.methods, plan.calls)
        ]
        self.pool, self.scheduler, self.limit, self.tracing = pool, scheduler, limit, tracing
        self.state = torch_state.capture()  # the lanes compute under the caller's grad/inference mode
        self.uses_streams = pool.uses_streams
        self.lock = threading.Lock()
        self.values: list[Any] = [None] * len(nodes)
        self.ready: deque[int] = deque(plan.ready)
        self.in_flight: list[int] = []
        self.finished: dict[int, Any] = {}  # physically finished, not yet committed
        self.awaiting: int | None = None
        self.running = 0
        self.stopped = self.done = self.woken = False
        self.error: BaseException | None = None
        self.error_node: int | None = None
        self.result: Any = None
        self.decisions: list[tuple[int, int]] = []
        self.spans: list[NodeSpan] = []
        self.events: list[Any] = [None] * len(nodes)  # accelerator: (stream, event) per node
        self.t0 = time.perf_counter_ns()
        self.wake: Callable[[], None] = lambda: None
        self.outbox: list[tuple[int, Any]] | None = None  # set while a worker advances
        self.event: anyio.Event | None = None

    # -- the state machine (lock held) --------------------------------------------

    def _advance(self) -> None:
        while not self.stopped:
            if self.awaiting is None:
                ready = self.ready
                if not ready and not self.in_flight:
                    return
                kind, k = self.scheduler.decide(ready, self.in_flight, self.limit - len(self.in_flight))
                if kind == DISPATCH:
                    if k == 0:
                        node = ready.popleft()
                    else:
                        node = ready[k]
                        del ready[k]
                    self._dispatch(node)
                    continue
                self.awaiting = ANY if k == ANY else self.in_flight[k]
            if self.awaiting == ANY:
                if not self.finished:
                    return
                node = next(iter(self.finished))
            else:
                node = self.awaiting
                if node not in self.finished:
                    return
            self.awaiting = None
            self._commit(node, self.finished.pop(node))

    def _dispatch(self, i: int) -> None:
        ins = self.inputs[i]
        values = self.values
        arrived = self.accumulating.get(i)
        if arrived is not None:  # merge in arrival order: the interpreter folds in list order
            args = [values[ins[p]] for p in arrived]
        else:
            args = [values[s] for s in ins]
        uses = self.uses
        for s in self.sources[i]:
            uses[s] -= 1
            if uses[s] == 0:
                values[s] = None  # free a partial once its last user has it
        self.in_flight.append(i)
        if self.tracing:
            self.decisions.append((DISPATCH, i))
        if self.inline[i]:
            self.finished[i] = self.fns[i](self.interp, self.nodes[i], args)
            if self.events[i] is None and ins:
                self.events[i] = self.events[ins[0]]
            return
        payload: Any = (args, [self.events[s] for s in ins]) if self.uses_streams else args
        if self.outbox is not None:
            self.outbox.append((i, payload))
        else:
            self.pool.submit(self._work, i, payload)

    def _commit(self, i: int, value: Any) -> None:
        self.in_flight.remove(i)
        if self.tracing:
            self.decisions.append((COMPLETE, i))
        if i == self.output:
            self.result, self.done = value, True
            return
        self.values[i] = value
        pending, ready = self.pending, self.ready
        for u in self.users[i]:
            arrived = self.accumulating.get(u)
            if arrived is not None:
                arrived.extend(self.positions[u][i])
            pending[u] -= 1
            if pending[u] == 0:
                ready.append(u)

    def _fail(self, i: int | None, exc: BaseException) -> None:
        if not self.stopped:
            self.stopped = True
            self.error, self.error_node = exc, i

    def _settled(self) -> bool:
        return (self.done or self.stopped) and self.running == 0

    # -- worker side ------------------------------------------------------------------

    def _work(self, i: int, payload: Any, lane: Lane) -> None:
        """Run node ``i`` on this worker, then drive the state machine.

        The first node the state machine dispatches in response is kept and run
        right here (the rest go to the pool's queue): a chain then runs on one
        thread with no queue hand-off per node.  After ``_LOCAL_BUDGET`` nodes
        in a row the worker yields to the queue, so runs sharing a pool take turns.
        """
        with self.lock:
            if self.stopped:
                return  # dispatched before the run stopped: never starts
            self.running += 1
        budget = _LOCAL_BUDGET
        tracing, stream = self.tracing, lane.stream
        while True:
            start = time.perf_counter_ns() if tracing else 0
            exc: BaseException | None = None
            value: Any = None
            produced: Any = None
            try:
                if stream is None:
                    value = self.state.run(self._compute, i, payload)
                else:
                    value, produced = self.state.run(launch_on_lane, partial(self._compute, i), payload[0],
                                                     payload[1], lane)
            except BaseException as e:  # noqa: BLE001 - KeyboardInterrupt too: execute re-raises it
                exc = e
            with self.lock:
                self.running -= 1
                try:
                    keep = self._finish(i, value, produced, exc, lane, start)
                except BaseException as e:  # noqa: BLE001 - fails the run; the awaiting caller gets it
                    self._fail(None, e)
                    keep = None
                budget -= 1
                if keep is not None and budget <= 0:
                    self._submit(keep)
                    keep = None
                if keep is not None:
                    self.running += 1
                wake = (self.done or self.stopped) and self.running == 0 and not self.woken
                if wake:
                    self.woken = True
            if wake:
                try:
                    self.wake()
                except RuntimeError:  # the event loop is gone; nobody is waiting any more
                    pass
            if keep is None:
                return
            i, payload = keep

    def _finish(
        self, i: int, value: Any, produced: Any, exc: BaseException | None, lane: Lane, start: int
    ) -> tuple[int, Any] | None:
        """Record node ``i``'s outcome and advance (lock held); returns the first
        newly dispatched work item for the calling worker to keep, if any."""
        if exc is not None:
            self._fail(i, exc)
            return None
        if self.stopped:
            return None
        self.finished[i] = value
        if produced is not None:
            self.events[i] = produced
        if self.tracing:
            self.spans.append(NodeSpan(
                self.nodes[i].id, self.nodes[i].op.value, lane.name,
                start - self.t0, time.perf_counter_ns() - self.t0,
                None if lane.stream is None else f"{lane.name}-stream",
            ))
        outbox: list[tuple[int, Any]] = []
        self.outbox = outbox
        try:
            self._advance()
        except BaseException as e:  # noqa: BLE001 - a policy error fails the run
            self._fail(None, e)
        finally:
            self.outbox = None
        if not outbox or self.stopped:
            return None
        for item in outbox[1:]:
            self._submit(item)
        return None if self.stopped else outbox[0]

    def _submit(self, item: tuple[int, Any]) -> None:
        """Queue a work item (lock held); a closed pool fails the run, not the worker."""
        try:
            self.pool.submit(self._work, *item)
        except BaseException as e:  # noqa: BLE001
            self._fail(None, e)

    def _compute(self, i: int, args: list[Any]) -> Any:
        node = self.nodes[i]
        if profiling():
            with torch.profiler.record_function(f"tgn.{node.op.value}:{node.id}"):
                return self.fns[i](self.interp, node, args)
        return self.fns[i](self.interp, node, args)

    # -- event-loop side ------------------------------------------------------------

    async def wait(self) -> Any:
        """Run to the end; return the output value or raise the first failure."""
        self.event = anyio.Event()
        self.wake = _waker(self.event)
        with self.lock:
            try:
                self._advance()
            except BaseException as e:  # noqa: BLE001 - e.g. a replay that does not fit
                self._fail(None, e)
            settled = self._settled()
            if settled:
                self.woken = True
        if not settled:
            try:
                await self.event.wait()
            except BaseException:
                with self.lock:
                    self.stopped = True  # nothing new starts; queued nodes are dropped
                    must_wait = not self.woken and self.running > 0
                if must_wait:
                    with anyio.CancelScope(shield=True):
                        await self.event.wait()
                raise
        if self.error is not None:
            if self.error_node is not None:
                node = self.nodes[self.error_node]
                self.error.add_note(f"raised by node {node.id!r} ({node.op.name}) of a concurrent run")
            raise self.error
        return self.result

    def trace(self, schedule: object) -> Trace:
        ids = tuple(n.id for n in self.nodes)
        return Trace(
            node_ids=ids,
            spans=tuple(self.spans),
            decisions=tuple(Decision(_KINDS[k], ids[i]) for k, i in self.decisions),  # type: ignore[arg-type]
            arrival=MappingProxyType({ids[i]: tuple(p) for i, p in self.accumulating.items()}),
            schedule=repr(schedule),
            device=str(self.pool.device),
        )

