"""Accelerator streams for the concurrent executor: launches ordered by events.

A lane launches a node on its own stream after ``stream.wait_event`` on the
event of every operand produced on another stream, so nothing waits on the
host.  A run starts after an event on the caller's current stream and ends by
making the caller's current stream wait on the output's event.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .devices import Lane, WorkerPool

__all__ = ["StreamEvent", "caller_event", "join_caller_stream", "launch_on_lane", "pin_to_lanes"]

#: ``(stream, event)``: where a value was produced and the event that marks it done.
StreamEvent = tuple[Any, Any]


def _on_device(t: object) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type != "cpu"


def launch_on_lane(
    compute: Callable[[list[Any]], Any], args: list[Any],
    producer_events: Sequence[StreamEvent | None], lane: Lane,
) -> tuple[Any, StreamEvent]:
    """Enqueue ``compute(args)`` on the lane's stream after its producers' events."""
    stream = lane.stream
    for produced in producer_events:
        if produced is not None and produced[0] is not stream:
            stream.wait_event(produced[1])
    for a in args:
        if _on_device(a):
            a.record_stream(stream)  # keep the caching allocator off it until we are done
    with stream:
        value = compute(args)
        event = torch.Event(device=lane.device)
        event.record(stream)
    return value, (stream, event)


def caller_event(pool: WorkerPool) -> StreamEvent:
    """An event on the caller's current stream: lanes see ``x`` as the caller left it."""
    current = torch.accelerator.current_stream(pool.device)
    ready = torch.Event(device=pool.device)
    ready.record(current)
    return current, ready


def pin_to_lanes(tensor: Any, pool: WorkerPool) -> None:
    """Mark a tensor read by nodes but not passed as an operand (the weight)."""
    if _on_device(tensor):
        for lane in pool.lanes:
            tensor.record_stream(lane.stream)


def join_caller_stream(produced: StreamEvent | None, value: torch.Tensor) -> None:
    """Order the caller's stream after the output's producer: no host wait."""
    if produced is None:
        return
    current = torch.accelerator.current_stream(value.device)
    if produced[0] is not current:
        current.wait_event(produced[1])
        if _on_device(value):
            value.record_stream(current)
