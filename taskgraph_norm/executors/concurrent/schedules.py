"""Schedule policies: who decides which ready node starts next and which running
node counts as finished next.

A run of the concurrent executor is a sequence of *decisions* taken under one
lock: ``dispatch`` a ready node to the workers, or ``complete`` a node that was
dispatched (commit its result: its users' dependency counts drop, and an
ACCUMULATE user records it as the next arrival).  A policy makes each decision
from the state alone, so a policy whose choices depend only on its seed yields
the same decision sequence -- the same completion order and the same bits --
however the worker threads happen to be timed.

Policies are frozen values; :meth:`Schedule.start` makes the per-run chooser,
so one policy object can drive many runs (a seeded one gives each run the same
schedule).

``Fifo``    dispatch in the order nodes became ready; a node completes when its
            worker finishes it (the real race: the performance policy).
``Random``  seeded uniform choice of the node to dispatch and of the node to
            complete; ``seed=None`` draws fresh entropy per run.
``PCT``     probabilistic concurrency testing (Burckhardt et al., ASPLOS 2010):
            random node priorities, the highest-priority candidate goes first,
            and ``depth - 1`` random change points demote the chosen node.
``Replay``  follow the decisions recorded in a :class:`~.trace.Trace`.

Writing your own: any object with ``start(graph) -> Scheduler`` works, where
the scheduler's ``decide(ready, in_flight, slots)`` returns
``(DISPATCH, i)`` (start ``ready[i]``), ``(COMPLETE, i)`` (commit
``in_flight[i]``, waiting for it if it is still running) or ``(COMPLETE, ANY)``
(commit whichever running node finishes first).  ``ready`` and ``in_flight``
hold node positions in ``graph.nodes``; ``slots`` is how many more nodes the
run may have in flight.  It is called with the run's lock held: keep it short.
"""

from __future__ import annotations

import os
import random as _random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast

from ...errors import ConfigError, ScheduleError
from ...graph import Graph

if TYPE_CHECKING:
    from .trace import Trace

__all__ = [
    "ANY",
    "COMPLETE",
    "DISPATCH",
    "PCT",
    "Fifo",
    "Random",
    "Replay",
    "Schedule",
    "Scheduler",
    "resolve_schedule",
]

#: Decision kinds (small ints: ``decide`` runs once per node per kind).
DISPATCH = 0
COMPLETE = 1
#: ``(COMPLETE, ANY)``: commit whichever in-flight node finishes first.
ANY = -1

Decision = tuple[int, int]


class Scheduler(Protocol):
    """The per-run chooser a :class:`Schedule` starts."""

    def decide(self, ready: Sequence[int], in_flight: Sequence[int], slots: int) -> Decision:
        """The next decision; called only when ``ready`` or ``in_flight`` is non-empty."""
        ...


class Schedule(Protocol):
    """A schedule policy: a frozen value that starts one :class:`Scheduler` per run."""

    def start(self, graph: Graph) -> Scheduler: ...


def _fill_first(ready: Sequence[int], slots: int) -> bool:
    return slots > 0 and len(ready) > 0


# -- Fifo ---------------------------------------------------------------------------


class _FifoScheduler:
    __slots__ = ()

    def decide(self, ready: Sequence[int], in_flight: Sequence[int], slots: int) -> Decision:
        if slots > 0 and ready:
            return (DISPATCH, 0)
        return (COMPLETE, ANY)


_FIFO = _FifoScheduler()


@dataclass(frozen=True, slots=True)
class Fifo:
    """Dispatch ready nodes first-come first-served; completions happen in the
    order workers really finish (so ``race`` graphs really race).  The default."""

    def start(self, graph: Graph) -> Scheduler:
        return _FIFO


# -- Random -------------------------------------------------------------------------


class _RandomScheduler:
    __slots__ = ("_rng",)

    def __init__(self, rng: _random.Random) -> None:
        self._rng = rng

    def decide(self, ready: Sequence[int], in_flight: Sequence[int], slots: int) -> Decision:
        if _fill_first(ready, slots):
            return (DISPATCH, self._rng.randrange(len(ready)))
        return (COMPLETE, self._rng.randrange(len(in_flight)))


@dataclass(frozen=True, slots=True)
class Random:
    """Uniformly random dispatch and completion choices.

    With an integer ``seed`` every run makes the same choices, so it has the
    same completion order and gives the same bits; with ``seed=None`` each run
    draws fresh entropy.  Free slots are always filled first, so runs stay as
    parallel as the worker bound allows.
    """

    seed: int | None = None

    def __post_init__(self) -> None:
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ConfigError("seed", self.seed, "an int or None")

    def start(self, graph: Graph) -> Scheduler:
        seed = self.seed if self.seed is not None else int.from_bytes(os.urandom(8), "little")
        return _RandomScheduler(_random.Random(seed))


# -- PCT ----------------------------------------------------------------------------


class _PCTScheduler:
    __slots__ = ("_priority", "_changes", "_step")

    def __init__(self, rng: _random.Random, n_nodes: int, depth: int) -> None:
        # Initial priorities depth .. depth+n-1 (a random permutation); change
        # point i demotes the chosen node to priority depth-1-i, below every
        # initial one, as in the PCT paper.
        base = list(range(depth, depth + n_nodes))
        rng.shuffle(base)
        self._priority = base
        steps = max(2 * n_nodes, depth)  # every node is dispatched once and completed once
        points = rng.sample(range(1, steps + 1), depth - 1) if depth > 1 else []
        self._changes = {p: depth - 1 - i for i, p in enumerate(sorted(points))}
        self._step = 0

    def _pick(self, candidates: Sequence[int]) -> int:
        prio = self._priority
        best, best_priority = 0, -1
        for k, node in enumerate(candidates):  # one pass: candidates may be a deque
            if prio[node] > best_priority:
                best, best_priority = k, prio[node]
        self._step += 1
        demote = self._changes.get(self._step)
        if demote is not None:
            prio[candidates[best]] = demote
        return best

    def decide(self, ready: Sequence[int], in_flight: Sequence[int], slots: int) -> Decision:
        if _fill_first(ready, slots):
            return (DISPATCH, self._pick(ready))
        return (COMPLETE, self._pick(in_flight))


@dataclass(frozen=True, slots=True)
class PCT:
    """Probabilistic concurrency testing with bug depth ``depth`` (>= 1).

    Each node gets a random priority; at every decision the candidate with the
    highest priority goes first; at ``depth - 1`` random decision steps the
    chosen node is demoted below all others.  A bug that needs ``d`` ordering
    constraints is found with probability at least ``1 / (n * k**(d-1))`` per
    run.  Seeded like :class:`Random`.
    """

    seed: int | None = None
    depth: int = 3

    def __post_init__(self) -> None:
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ConfigError("seed", self.seed, "an int or None")
        if isinstance(self.depth, bool) or not isinstance(self.depth, int) or self.depth < 1:
            raise ConfigError("depth", self.depth, "an integer >= 1")

    def start(self, graph: Graph) -> Scheduler:
        seed = self.seed if self.seed is not None else int.from_bytes(os.urandom(8), "little")
        return _PCTScheduler(_random.Random(seed), len(graph.nodes), self.depth)


# -- Replay -------------------------------------------------------------------------


class _ReplayScheduler:
    __slots__ = ("_decisions", "_next", "_ids")

    def __init__(self, decisions: tuple[tuple[int, int], ...], ids: Sequence[str]) -> None:
        self._decisions = decisions
        self._next = 0
        self._ids = ids

    def decide(self, ready: Sequence[int], in_flight: Sequence[int], slots: int) -> Decision:
        k = self._next
        if k >= len(self._decisions):
            raise ScheduleError(f"replay ran out of recorded decisions after {k}")
        kind, node = self._decisions[k]
        self._next = k + 1
        pool = ready if kind == DISPATCH else in_flight
        for i, candidate in enumerate(pool):  # short: in_flight is bounded, ready is scanned once
            if candidate == node:
                return (kind, i)
        what = "ready to dispatch" if kind == DISPATCH else "in flight"
        raise ScheduleError(
            f"replay diverged at decision {k}: node {self._ids[node]!r} is not {what}",
            "replay a trace on the graph, inputs and executor options it was recorded with",
        )


@dataclass(frozen=True)
class Replay:
    """Follow a recorded :class:`~.trace.Trace` decision by decision.

    Guarantee: the replayed run dispatches and completes nodes in exactly the
    recorded order, so every ACCUMULATE merges its operands in the recorded
    arrival order and, with the same graph, inputs, device and kernels, the
    result has the same bits -- whatever the thread timing and the worker
    count.  Wall-clock times are not replayed.  A trace that does not fit the
    graph raises :class:`~taskgraph_norm.errors.ScheduleError` before any node
    runs; one that diverges mid-run raises it then.
    """

    trace: Trace

    def start(self, graph: Graph) -> Scheduler:
        ids = [n.id for n in graph.nodes]
        if tuple(ids) != self.trace.node_ids:
            raise ScheduleError(
                "the trace was recorded on a different graph",
                "node ids differ; record and replay on the same graph",
            )
        position = {nid: i for i, nid in enumerate(ids)}
        kinds = {"dispatch": DISPATCH, "complete": COMPLETE}
        decisions = tuple((kinds[d.kind], position[d.node]) for d in self.trace.decisions)
        return _ReplayScheduler(decisions, ids)


def resolve_schedule(schedule: object) -> Schedule:
    """``None`` -> :class:`Fifo`; a name (``"fifo"``, ``"random"``, ``"pct"``) -> that
    policy unseeded; an object with ``start`` -> itself."""
    if schedule is None:
        return Fifo()
    if isinstance(schedule, str):
        named: dict[str, Callable[[], Schedule]] = {"fifo": Fifo, "random": Random, "pct": PCT}
        if schedule in named:
            return named[schedule]()
        raise ConfigError("schedule", schedule, "'fifo', 'random', 'pct' or a schedule object")
    if callable(getattr(schedule, "start", None)):
        return cast(Schedule, schedule)
    raise ConfigError("schedule", schedule, "a schedule policy such as tgn.schedules.Random(seed)")
