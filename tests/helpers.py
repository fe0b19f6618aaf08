"""What the tests share: the bits helpers and short ways into the pipeline.

Bits: :mod:`taskgraph_norm.testing` is the one bits helper (int views of the
tensors: NaN-safe, tells -0.0 from +0.0); the tests import it from here.

Executors are handed their plan by the pipeline; ``compile_graph`` and
``run_compiled`` below do what the pipeline does, for tests that drive the
compiled executor directly.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch

import taskgraph_norm as tgn
from taskgraph_norm.backends.torch_ops import compiled
from taskgraph_norm.lowering import Plan
from taskgraph_norm.testing import (
    assert_bits_equal,
    bits,
    bits_equal,
    correctly_rounded_sumsq,
    count_bit_differences,
)

__all__ = [
    "assert_bits_equal",
    "bits",
    "bits_equal",
    "compile_graph",
    "correctly_rounded_sumsq",
    "count_bit_differences",
    "executor_of",
    "spy_direct_calls",
    "run_compiled",
]


def compile_graph(graph: tgn.Graph) -> Plan:
    """The plan the pipeline lowers for ``graph`` with ``executor="compiled"``
    (raises ExecutionError for a graph the prover does not certify)."""
    plan = tgn.Pipeline(graph, "compiled").plan
    assert plan is not None
    return plan


def run_compiled(
    graph: tgn.Graph, x: torch.Tensor, weight: torch.Tensor | None, eps: float, **options: Any
) -> torch.Tensor:
    """The compiled executor on ``graph`` with the plan the pipeline would hand it."""
    return compiled.run_compiled(graph, x, weight, eps, plan=compile_graph(graph), **options)


def spy_direct_calls(monkeypatch: Any) -> list[bool]:
    """Count the pipeline's direct native calls from now on (a fresh cache): the list
    gets ``True`` for each call the direct kernel took, ``False`` for one it declined.
    Skips the test where the native kernels are not built."""
    import pytest

    from taskgraph_norm.backends import registry
    from taskgraph_norm.backends.native import loader as native

    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.why_unavailable()}")
    taken: list[bool] = []
    real = registry.direct_call

    def spy(plan: Any) -> Any:
        call = real(plan)
        assert call is not None

        def counted(*args: Any) -> Any:
            y = call(*args)
            taken.append(y is not None)
            return y

        def counted_routed(*args: Any) -> Any:  # (the faces' entry: Pipeline.routed)
            y = call.routed(*args)
            taken.append(y is not None)
            return y

        counted.routed = counted_routed  # type: ignore[attr-defined]
        return counted

    monkeypatch.setattr(registry, "direct_call", spy)
    tgn.clear_caches()
    return taken


def executor_of(graph: tgn.Graph, executor: str = "auto") -> str:
    """The executor the pipeline resolves ``executor`` to for ``graph``."""
    return tgn.Pipeline(graph, executor).executor


def backend_backward(name: str, pipe: Any, dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor | None,
                     rms: torch.Tensor, input_grad: bool, weight_grad: bool, offset: float = 0.0,
                     round_x_hat: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The backend ``name``'s ``(dx, dW)`` for ``pipe``'s plan (tests call each backend directly)."""
    from taskgraph_norm.backends.registry import BACKENDS

    result: tuple[torch.Tensor | None, torch.Tensor | None] = BACKENDS[name].backward(
        pipe.plan, dy, x, w, rms, input_grad=input_grad, weight_grad=weight_grad, offset=offset,
        round_x_hat=round_x_hat)
    return result


def product_columns(cols: list[list[tuple[float, float]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``dy`` and ``x_hat`` whose column ``j`` holds the products ``cols[j]`` (pairs of
    factors), padded with zeros: exact weight-gradient sums chosen column by column."""
    rows = max(len(c) for c in cols)
    dy = torch.zeros(rows, len(cols))
    x_hat = torch.zeros(rows, len(cols))
    for j, col in enumerate(cols):
        for i, (a, b) in enumerate(col):
            dy[i, j], x_hat[i, j] = a, b
    return dy, x_hat


def retries(seconds: float = 10.0, pause: float = 0.002) -> Iterator[int]:
    """Attempt numbers until ``seconds`` have passed, pausing ``pause`` between them:
    for the checks that a second thread ran rows (on a loaded machine a worker can wake
    after the caller has run every block, many calls in a row)."""
    deadline = time.monotonic() + seconds
    attempt = 0
    while True:
        yield attempt
        attempt += 1
        if time.monotonic() > deadline:
            return
        time.sleep(pause)
