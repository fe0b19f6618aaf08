"""The stream plumbing, checked on the CPU with stand-in streams and events: a
node on one lane waits on the event of every operand produced on another lane,
the INPUT is ordered after the caller's stream, and the caller's stream waits on
the output.  (The real thing runs in test_concurrent_gpu.py, ``pytest -m gpu``.)"""

from __future__ import annotations

import itertools
import threading
from typing import Any

import pytest
import torch

import taskgraph_norm as tgn
from taskgraph_norm.executors.concurrent import devices
from taskgraph_norm.executors.concurrent import streams

from ._executor_helpers import call_graph, run


class FakeEvent:
    ids = itertools.count()

    def __init__(self, device: Any = None) -> None:
        self.id = next(self.ids)
        self.stream: FakeStream | None = None

    def record(self, stream: FakeStream) -> None:
        self.stream = stream


class FakeStream:
    lock = threading.Lock()
    log: list[tuple[str, str, Any]] = []

    def __init__(self, name: str) -> None:
        self.name = name

    def wait_event(self, event: FakeEvent) -> None:
        with self.lock:
            self.log.append(("wait", self.name, event))

    def __enter__(self) -> FakeStream:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


@pytest.fixture
def fake_streams(monkeypatch: pytest.MonkeyPatch) -> FakeStream:
    caller = FakeStream("caller")
    FakeStream.log.clear()
    monkeypatch.setattr(devices, "_make_streams", lambda dev, n: [FakeStream(f"s{i}") for i in range(n)])
    monkeypatch.setattr(streams.torch, "Event", FakeEvent)
    monkeypatch.setattr(streams.torch.accelerator, "current_stream", lambda device=None: caller)
    return caller


def test_cross_lane_operands_are_waited_on_by_event(fake_streams: FakeStream) -> None:
    functions = {"a": lambda x: x + 1, "b": lambda x: x * 3, "c": lambda a, b: a * 2 + b}
    g = call_graph({"a": ("a", ("x",)), "b": ("b", ("x",)), "c": ("c", ("a", "b"))}, "c")
    x = torch.arange(4.0)
    with tgn.WorkerPool(2, name="tgn-fake") as pool:
        assert pool.uses_streams
        for _ in range(5):
            traces: list[tgn.Trace] = []
            y = run(lambda: tgn.execute(g, x, executor="concurrent", pool=pool, trace=traces.append,
                                        functions=functions))
            assert torch.equal(y, (x + 1) * 2 + x * 3)
    waits = FakeStream.log
    # Every lane that ran a consumer of x waited on the caller's event first.
    assert any(kind == "wait" and ev.stream is fake_streams for kind, _, ev in waits)
    # c waited on the event of whichever producer ran on the other lane, and the
    # caller's stream waited on c's event at the end.
    assert any(name == "caller" and ev.stream is not fake_streams for _, name, ev in waits)
    for _, name, ev in waits:
        assert ev.stream is not None and ev.stream.name != name  # never waits on its own stream
