from __future__ import annotations

import inspect
import threading

import anyio
import pytest
import torch

import taskgraph_norm as tgn
from taskgraph_norm import kernels
from .helpers import assert_bits_equal

from .conftest import gen


async def test_normalize_equals_normalize_sync_and_execute() -> None:
    x = torch.randn(64, 1000, generator=gen(0))
    w = torch.randn(1000, generator=gen(1))
    for topology in ("linear", "tree", "race", "cat", "standard"):
        a = await tgn.normalize(x, w, topology=topology, chunk_size=100)
        b = tgn.normalize_sync(x, w, topology=topology, chunk_size=100)
        c = await tgn.execute(tgn.build_graph(1000, chunk_size=100, topology=topology), x, w)
        d = await tgn.execute(tgn.build_graph(1000, chunk_size=100, topology=topology), x, w, executor="reference")
        assert_bits_equal(a, b)
        assert_bits_equal(a, c)
        assert_bits_equal(a, d)


def _record_threads(monkeypatch) -> list[int]:
    seen: list[int] = []
    original = kernels.finalize

    def spy(*args, **kwargs):
        seen.append(threading.get_ident())
        return original(*args, **kwargs)

    monkeypatch.setattr(kernels, "finalize", spy)
    return seen


async def test_large_inputs_run_off_the_event_loop_thread(monkeypatch) -> None:
    seen = _record_threads(monkeypatch)
    loop_thread = threading.get_ident()
    # The spy sits in kernels.finalize, which only the reference executor calls
    # (test_compiled has the same check for the compiled path).
    await tgn.normalize(torch.randn(64, 4096), executor="reference")
    await tgn.normalize(torch.randn(1, 16), executor="reference")
    assert seen[0] != loop_thread, "a large input was computed on the event-loop thread"
    assert seen[1] == loop_thread, "a tiny input should not pay for a thread hop"


async def test_event_loop_keeps_ticking_during_a_large_normalize() -> None:
    ticks = 0
    done = anyio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await anyio.sleep(0)

    x = torch.randn(2048, 4096)
    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        await anyio.sleep(0)
        start = ticks
        await tgn.normalize(x, topology="linear", chunk_size=16)
        done.set()
    assert ticks - start > 1


async def test_out_writes_into_the_callers_buffer() -> None:
    x = torch.randn(8, 256, generator=gen(2))
    out = torch.empty_like(x)
    got = await tgn.normalize(x, out=out)
    assert got is out
    assert_bits_equal(out, tgn.normalize_sync(x))
    out2 = torch.empty_like(x)
    assert tgn.normalize_sync(x, out=out2) is out2


def test_normalize_sync_works_inside_a_running_loop() -> None:
    async def main() -> torch.Tensor:
        return tgn.normalize_sync(torch.ones(2, 8))

    assert torch.equal(anyio.run(main), torch.ones(2, 8))


def test_one_pipeline_per_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    from taskgraph_norm import pipeline, topologies

    tgn.clear_caches()
    built: list[tgn.Pipeline] = []
    real_init = pipeline.Pipeline.__init__

    def spy(self: pipeline.Pipeline, *args: object, **kwargs: object) -> None:
        built.append(self)
        real_init(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pipeline.Pipeline, "__init__", spy)
    for rows in (2, 5, 1, 300):
        tgn.normalize_sync(torch.randn(rows, 96), chunk_size=32)
    tgn.normalize_sync(torch.randn(2, 96), chunk_size=32, topology="linear")
    assert len(built) == 2  # one per configuration, not per call or batch size
    assert topologies._build_cached.cache_info().misses == 2
    pipe = pipeline.for_config(96, 32, "tree", "pairwise", "float", "auto")
    assert pipe is built[0] and pipe.executor == "compiled" and pipe.plan is not None


def test_clear_caches_empties_every_cache() -> None:
    from taskgraph_norm import pipeline, topologies
    from taskgraph_norm.prover import rules

    tgn.normalize_sync(torch.randn(2, 96), chunk_size=32)
    before = pipeline.for_config(96, 32, "tree", "pairwise", "float", "auto")
    tgn.clear_caches()
    assert topologies._build_cached.cache_info().currsize == 0
    assert rules._prove_cached.cache_info().currsize == 0
    assert not pipeline.PIPELINES and not pipeline._by_graph
    after = pipeline.for_config(96, 32, "tree", "pairwise", "float", "auto")
    assert after is not before
    x = torch.randn(3, 96)
    assert_bits_equal(after(x), before(x))  # caches change the time of a call, never its bits


def test_execute_sync_is_execute_from_sync_code() -> None:
    g = tgn.build_graph(96, chunk_size=32, topology="linear")
    x, w = torch.randn(4, 96), torch.randn(96)
    assert_bits_equal(tgn.execute_sync(g, x, w), anyio.run(lambda: tgn.execute(g, x, w)))
    assert_bits_equal(tgn.execute_sync(g, x, w, executor="reference"), tgn.normalize_sync(x, w, chunk_size=32, topology="linear"))


def test_all_matches_the_real_exports() -> None:
    public = {name for name in dir(tgn) if not name.startswith("_")}
    modules = {n for n in public if inspect.ismodule(getattr(tgn, n))}
    assert set(tgn.__all__) == public - modules - {"annotations"}
    # No subpackage (executors/ was once execute/) may shadow the public coroutine function.
    assert inspect.iscoroutinefunction(tgn.execute)
    for name in tgn.__all__:
        assert getattr(tgn, name) is not None


@pytest.mark.parametrize("bad", ["gpu", "compiled-ish"])
async def test_unknown_executor_fails_before_running(bad: str) -> None:
    with pytest.raises(ValueError, match=f"executor='{bad}'"):
        await tgn.execute(tgn.build_graph(8), torch.ones(1, 8), executor=bad)
