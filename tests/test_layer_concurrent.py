"""LayerNorm graphs on the concurrent executor (``executor="concurrent"``): the reference
interpreter's bits for every certified graph (float tree, linear, cat; an exact race) under
any schedule, with weight, bias and the fused residual, fp32 and bf16; a float race, which
the prover refutes, is the negative control whose bits move with the schedule."""

from __future__ import annotations

import anyio
import pytest
import torch

import taskgraph_norm as tgn
from taskgraph_norm.executors.concurrent.executor import run_concurrent
from taskgraph_norm.executors.concurrent.schedules import Random
from taskgraph_norm.kernels.reference import run_reference
from taskgraph_norm.pipeline.layer import layer_pipeline
from taskgraph_norm.testing import bits_equal


def _inputs(rows: int, hidden: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, hidden, generator=g) * torch.exp2(torch.randint(-10, 10, (rows, hidden), generator=g).float())
    return (x + 1.5).to(dtype), torch.randn(hidden, generator=g).to(dtype), torch.randn(hidden, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("topology,accumulate", [("tree", "float"), ("linear", "float"), ("cat", "float"),
                                                 ("race", "exact")])
def test_the_faces_give_the_reference_bits(dtype: torch.dtype, topology: str, accumulate: str) -> None:
    x, w, b = _inputs(12, 200, dtype)
    opts = dict(topology=topology, accumulate=accumulate, chunk_size=16)
    want = tgn.layer_norm_sync(x, w, b, executor="reference", **opts)  # type: ignore[arg-type]
    assert bits_equal(tgn.layer_norm_sync(x, w, b, executor="concurrent", **opts), want)  # type: ignore[arg-type]
    assert bits_equal(anyio.run(lambda: tgn.layer_norm(x, w, b, executor="concurrent", **opts)), want)
    r = x.flip(0)
    y, h = tgn.layer_norm_sync(x, w, b, residual=r, executor="concurrent", **opts)  # type: ignore[arg-type]
    wy, wh = tgn.layer_norm_sync(x, w, b, residual=r, executor="reference", **opts)  # type: ignore[arg-type]
    assert bits_equal(y, wy) and bits_equal(h, wh)


def _scheduled(graph: object, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, seed: int) -> torch.Tensor:
    y: torch.Tensor = anyio.run(lambda: run_concurrent(graph, x, w, 1e-5, bias=b, schedule=Random(seed),  # type: ignore[arg-type]
                                                       max_workers=4))
    return y


def test_an_exact_race_gives_the_same_bits_under_every_schedule() -> None:
    x, w, b = _inputs(8, 256, torch.float32)
    exact = layer_pipeline(256, 8, "race", accumulate="exact").graph
    want = run_reference(exact, x, w, 1e-5, bias=b)
    for seed in range(8):
        assert bits_equal(_scheduled(exact, x, w, b, seed), want), seed
    # negative control: a float race over the same chunks moves with the schedule
    race = layer_pipeline(256, 8, "race", accumulate="float").graph
    outputs = {_scheduled(race, x, w, b, seed).view(torch.int32).numpy().tobytes() for seed in range(8)}
    outputs.add(run_reference(race, x, w, 1e-5, bias=b).view(torch.int32).numpy().tobytes())
    assert len(outputs) > 1
