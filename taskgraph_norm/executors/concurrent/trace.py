"""Run traces: what ran where and when, and every schedule decision, as frozen data.

A :class:`Trace` is enough to replay a run (``tgn.schedules.Replay(trace)``),
to check the order an ACCUMULATE merged its operands in (:attr:`Trace.arrival`,
which the reference executor accepts as ``arrival=``), and to look at the run
in Perfetto (:meth:`Trace.to_chrome`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["Decision", "NodeSpan", "Trace"]


@dataclass(frozen=True, slots=True)
class NodeSpan:
    """One node's execution: where (worker thread, and stream on accelerators)
    and when (nanoseconds since the run started, host clock).  On an
    accelerator the span covers the host-side launch, not the kernel time."""

    node: str
    op: str
    worker: str
    start_ns: int
    end_ns: int
    stream: str | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """One schedule decision: ``dispatch`` a ready node, or ``complete`` (commit)
    a dispatched one."""

    kind: Literal["dispatch", "complete"]
    node: str


@dataclass(frozen=True, slots=True)
class Trace:
    """Everything one concurrent run did.

    Attributes
    ----------
    node_ids:
        The graph's node ids in build order (a replay checks them).
    spans:
        One :class:`NodeSpan` per node that ran on a worker, in the order they
        finished (INPUT and OUTPUT are identities run inline: they have none).
    decisions:
        Every dispatch and completion, in the order the run took them.
    arrival:
        For each ACCUMULATE node, the operand positions in the order they arrived
        (the order its merge used).
    schedule, device:
        ``repr`` of the schedule policy and the device the run used.
    """

    node_ids: tuple[str, ...]
    spans: tuple[NodeSpan, ...]
    decisions: tuple[Decision, ...]
    arrival: Mapping[str, tuple[int, ...]]
    schedule: str
    device: str

    @property
    def completion_order(self) -> tuple[str, ...]:
        """Node ids in the order the run committed them."""
        return tuple(d.node for d in self.decisions if d.kind == "complete")

    @property
    def dispatch_order(self) -> tuple[str, ...]:
        """Node ids in the order the run dispatched them."""
        return tuple(d.node for d in self.decisions if d.kind == "dispatch")

    @property
    def workers(self) -> tuple[str, ...]:
        """The distinct workers (or streams) that ran nodes, sorted."""
        return tuple(sorted({s.worker for s in self.spans}))

    def to_chrome_dict(self) -> dict[str, Any]:
        """The trace in Chrome's Trace Event Format (what Perfetto and
        ``chrome://tracing`` read): one complete (``"X"``) event per node on its
        worker's track, and one instant (``"i"``) event per decision."""
        tids = {w: i + 1 for i, w in enumerate(self.workers)}
        events: list[dict[str, Any]] = [
            {"name": "process_name", "ph": "M", "pid": 1, "tid": 0,
             "args": {"name": f"taskgraph_norm run ({self.device}, {self.schedule})"}},
            {"name": "thread_name", "ph": "M", "pid": 1, "tid": 0, "args": {"name": "decisions"}},
        ]
        for worker, tid in tids.items():
            events.append(
                {"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": worker}}
            )
        for s in self.spans:
            args: dict[str, Any] = {"op": s.op}
            if s.stream is not None:
                args["stream"] = s.stream
            events.append({
                "name": s.node, "cat": s.op, "ph": "X", "pid": 1, "tid": tids[s.worker],
                "ts": s.start_ns / 1000.0, "dur": max(s.end_ns - s.start_ns, 0) / 1000.0,
                "args": args,
            })
        # Decisions carry no clock of their own: place them at their sequence
        # number (in ns) on their own track, so their order is what one sees.
        for k, d in enumerate(self.decisions):
            events.append({
                "name": f"{d.kind} {d.node}", "cat": "decision", "ph": "i", "s": "t",
                "pid": 1, "tid": 0, "ts": k / 1000.0, "args": {"step": k},
            })
        return {"traceEvents": events, "displayTimeUnit": "ns"}

    def to_chrome(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_chrome_dict` as JSON to ``path`` (open it in ui.perfetto.dev)."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_chrome_dict(), f)
