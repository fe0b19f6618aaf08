"""Shared helpers of the concurrent-executor tests (a module, not a conftest, so
these files do not depend on one)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import anyio
import torch

from taskgraph_norm import Graph, Node, Op

FULL = os.environ.get("TGN_FULL") == "1"
BACKENDS = ("asyncio", "trio")


def wide_input(rows: int, hidden: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values over several orders of magnitude, so float sums depend on their order."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=g) * torch.exp(3 * torch.randn(rows, hidden, generator=g))
    return x.to(dtype)


def run(fn: Callable[..., Any], *args: Any, backend: str = "asyncio") -> Any:
    return anyio.run(fn, *args, backend=backend)


def call_graph(spec: dict[str, tuple[str, tuple[str, ...]]], output: str) -> Graph:
    """A general graph: ``{id: (fn name, operand ids)}`` plus INPUT ``x`` and OUTPUT ``y``."""
    nodes = [Node("x", Op.INPUT)]
    nodes += [Node(i, Op.CALL, ins, {"fn": fn}) for i, (fn, ins) in spec.items()]
    nodes.append(Node("y", Op.OUTPUT, (output,)))
    return Graph(nodes, "y")


class Recorder:
    """Thread-safe log of node starts, and a gauge of how many run at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.log: list[tuple[str, str, float]] = []
        self.running = 0
        self.peak = 0

    def enter(self, name: str) -> None:
        with self.lock:
            self.log.append(("start", name, time.perf_counter()))
            self.running += 1
            self.peak = max(self.peak, self.running)

    def leave(self, name: str) -> None:
        with self.lock:
            self.log.append(("end", name, time.perf_counter()))
            self.running -= 1

    def starts(self) -> list[str]:
        with self.lock:
            return [n for kind, n, _ in self.log if kind == "start"]

    def task(self, name: str, seconds: float = 0.0, fail: BaseException | None = None) -> Callable[..., Any]:
        def fn(*args: Any) -> Any:
            self.enter(name)
            try:
                if seconds:
                    time.sleep(seconds)
                if fail is not None:
                    raise fail
                return 0
            finally:
                self.leave(name)

        return fn


def tgn_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("tgn-")]


__all__ = [
    "BACKENDS", "FULL", "Recorder", "call_graph", "run", "tgn_threads", "wide_input",
]
