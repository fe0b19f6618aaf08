"""Cancellation, sync calls inside running event loops, and nested calls.

Each test here failed on the code before the pipeline (issue 13): the default path
ignored cancellation, ``normalize_sync(executor="concurrent")`` raised inside a
running asyncio loop.
"""

from __future__ import annotations

import asyncio
import threading
import time

import anyio
import pytest
import torch
import trio

import taskgraph_norm as tgn
from taskgraph_norm.backends.torch_ops import compiled as compiled_mod
from taskgraph_norm.backends.torch_ops import pools
from taskgraph_norm.kernels import reference as reference_mod

from .helpers import assert_bits_equal

EXECUTORS = ("compiled", "reference", "concurrent")


@pytest.mark.parametrize("executor", EXECUTORS)
async def test_cancelling_normalize_stops_the_work(executor: str, monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(16384, 4096)
    steps: list[float] = []
    # Count the work as it happens: tiles on the compiled executor, nodes on the reference.
    real_tiles, real_node = compiled_mod._run_tiles, reference_mod.ReferenceInterpreter.sumsq

    def tiles(*args, **kwargs):  # type: ignore[no-untyped-def]
        steps.append(time.perf_counter())
        return real_tiles(*args, **kwargs)

    def node(self, *args):  # type: ignore[no-untyped-def]
        steps.append(time.perf_counter())
        return real_node(self, *args)

    monkeypatch.setattr(compiled_mod, "_run_tiles", tiles)
    monkeypatch.setattr(reference_mod.ReferenceInterpreter, "sumsq", node)
    # The case: (16384, 4096) fp32.  The async face sends it through the tiled
    # path (never the direct one), where cancellation is checked between tiles.
    start = time.perf_counter()
    with anyio.move_on_after(0.05) as scope:
        await tgn.normalize(x, executor=executor)
    took = time.perf_counter() - start
    assert scope.cancelled_caught, "the call finished before it could be cancelled: make x larger"
    assert took < 0.3, f"cancelled call returned after {took:.2f} s"
    # The work stops: no step starts once the abandoned thread has seen the event.
    await anyio.sleep(0.3)
    count = len(steps)
    await anyio.sleep(0.3)
    assert len(steps) == count, "work went on after the call was cancelled"
    # And the next call is right.
    small = torch.randn(4, 4096)
    assert_bits_equal(await tgn.normalize(small, executor=executor),
                      tgn.normalize_sync(small, executor="reference"))


async def test_a_call_that_is_not_cancelled_is_unaffected() -> None:
    x = torch.randn(512, 4096)
    with anyio.move_on_after(30) as scope:
        y = await tgn.normalize(x)
    assert not scope.cancelled_caught
    assert_bits_equal(y, tgn.normalize_sync(x, executor="reference"))


def _every_face(executor: str) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    x, w = torch.randn(3, 128, generator=gen), torch.randn(128, generator=gen)
    g = tgn.build_graph(128)
    module = tgn.RMSNorm(128)
    with torch.no_grad():
        module.weight.copy_(w)
    out = [tgn.normalize_sync(x, w, executor=executor), tgn.execute_sync(g, x, w, executor=executor)]
    if executor == "compiled":
        out.append(module(x))
    return out


@pytest.mark.parametrize("executor", EXECUTORS)
def test_sync_faces_work_inside_a_running_asyncio_loop(executor: str) -> None:
    async def cell() -> list[torch.Tensor]:  # a notebook cell, an async web handler
        return _every_face(executor)

    got = asyncio.run(cell())
    for y in got:
        assert_bits_equal(y, got[0])
    assert_bits_equal(got[0], _every_face("reference")[0])


@pytest.mark.parametrize("executor", EXECUTORS)
def test_sync_faces_work_inside_a_running_trio_loop(executor: str) -> None:
    async def cell() -> list[torch.Tensor]:
        return _every_face(executor)

    got = trio.run(cell)
    for y in got:
        assert_bits_equal(y, got[0])


def test_a_sync_call_from_a_tile_worker_runs_inline() -> None:
    # A nested call made on one of the compiled executor's tile threads must not
    # wait on its own pool: it runs on the calling thread.
    x = torch.randn(3, 64)
    expected = tgn.normalize_sync(x, executor="reference")
    pool = pools.tile_pool(2)
    results = list(pool.map(lambda _: tgn.execute_sync(tgn.build_graph(64), x, executor="compiled",
                                                      tile_rows=1), range(4)))
    for y in results:
        assert_bits_equal(y, expected)


@pytest.mark.parametrize("executor", ["concurrent", "compiled", "auto"])
def test_a_node_that_calls_normalize_sync_never_deadlocks_the_pool(executor: str) -> None:
    # More nodes than the shared pool has workers, each running a graph on the same
    # executor from inside the node: before, the inner runs queued behind the nodes
    # waiting for them, on the same shared pool, and every worker waited forever.
    from taskgraph_norm.executors.concurrent.devices import default_workers

    from ._executor_helpers import call_graph

    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(3))
    expected = tgn.normalize_sync(x, executor="reference")

    def inner(v: torch.Tensor) -> torch.Tensor:
        return tgn.normalize_sync(v, executor=executor)

    def first(*parts: torch.Tensor) -> torch.Tensor:
        return parts[0]

    width = 2 * default_workers() + 1
    spec = {f"n{i}": ("inner", ("x",)) for i in range(width)}
    spec["out"] = ("first", tuple(spec))
    g = call_graph(spec, "out")
    done: list[torch.Tensor] = []
    t = threading.Thread(target=lambda: done.append(
        tgn.execute_sync(g, x, executor="concurrent", functions={"inner": inner, "first": first})))
    t.daemon = True  # a deadlock must fail the test, not hang the suite
    t.start()
    t.join(60)
    assert done, "the nested calls deadlocked"
    assert_bits_equal(done[0], expected)
