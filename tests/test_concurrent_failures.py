"""Failure and cancellation: the first error comes out as the original object, no
node starts after it, cancel scopes stop runs promptly, KeyboardInterrupt
propagates, and no worker thread leaks."""

from __future__ import annotations

import gc
import threading
import time

import anyio
import pytest

import taskgraph_norm as tgn
from taskgraph_norm.executors.concurrent import run as concurrent_run
from taskgraph_norm.executors.concurrent.devices import WorkerPool, default_pool

from ._executor_helpers import BACKENDS, Recorder, call_graph, run, tgn_threads


class Boom(Exception):
    pass


def fan_in(n: int, first: str = "bad") -> tgn.Graph:
    spec = {first: ("bad", ("x",))} | {f"l{i}": ("slow", ("x",)) for i in range(n)}
    spec["m"] = ("slow", tuple(spec))
    return call_graph(spec, "m")


def chain(n: int) -> tgn.Graph:
    spec = {f"n{i}": ("slow", (f"n{i - 1}" if i else "x",)) for i in range(n)}
    return call_graph(spec, f"n{n - 1}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_failing_node_raises_the_original_exception_unwrapped(backend: str) -> None:
    rec, original = Recorder(), Boom("node failed")
    g = fan_in(30)

    async def main() -> None:
        async with tgn.WorkerPool(2, name="tgn-fail") as pool:
            await tgn.execute(g, 0, executor="concurrent", pool=pool, functions={
                "bad": rec.task("bad", 0.002, fail=original), "slow": rec.task("slow", 0.01)})

    with pytest.raises(Boom) as info:
        run(main, backend=backend)
    assert info.value is original  # not wrapped, not copied
    assert any("'bad'" in note for note in getattr(info.value, "__notes__", []))
    # 2 workers: 'bad' and at most one neighbour started, plus at most one node
    # claimed in the instant between the raise and the executor seeing it.
    assert len(rec.starts()) <= 3
    assert rec.running == 0  # nothing of the run still computes after execute returns


def test_no_node_starts_after_the_failure() -> None:
    rec = Recorder()
    spec = {"bad": ("bad", ("x",))} | {f"n{i}": ("slow", (f"n{i - 1}" if i else "x",)) for i in range(40)}
    spec["m"] = ("slow", ("bad", "n39"))
    g = call_graph(spec, "m")

    async def main() -> None:
        async with tgn.WorkerPool(2, name="tgn-fail") as pool:
            await tgn.execute(g, 0, executor="concurrent", pool=pool, functions={
                "bad": rec.task("bad", 0.05, fail=Boom()), "slow": rec.task("slow", 0.005)})

    with pytest.raises(Boom):
        run(main)
    failed_at = next(t for kind, n, t in rec.log if kind == "end" and n == "bad")
    late = [n for kind, n, t in rec.log if kind == "start" and t > failed_at]
    assert len(late) <= 1  # at most the node claimed while the exception was in flight
    count = len(rec.log)
    time.sleep(0.05)
    assert len(rec.log) == count  # nothing starts later either


@pytest.mark.parametrize("backend", BACKENDS)
def test_trace_is_delivered_for_a_failed_run(backend: str) -> None:
    traces: list[tgn.Trace] = []
    g = fan_in(4)
    with pytest.raises(Boom):
        run(lambda: tgn.execute(g, 0, executor="concurrent", trace=traces.append,
                                functions={"bad": Recorder().task("b", fail=Boom()), "slow": lambda *a: 0}),
            backend=backend)
    assert len(traces) == 1 and "bad" in traces[0].dispatch_order


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["move_on_after", "fail_after", "cancel_scope"])
def test_cancellation_stops_the_run_promptly(backend: str, how: str) -> None:
    """A 60-node chain of 20 ms nodes (1.2 s) cancelled after 0.1 s returns within
    one node's time of the cancel; no node of it runs or starts afterwards."""
    gc.collect()  # a full collection inside the 0.1 s window would starve it of nodes
    rec = Recorder()
    g = chain(60)

    async def main() -> float:
        async with tgn.WorkerPool(2, name="tgn-cancel") as pool:
            t0 = time.perf_counter()
            options = dict(executor="concurrent", pool=pool, functions={"slow": rec.task("slow", 0.02)})
            if how == "move_on_after":
                with anyio.move_on_after(0.1):
                    await tgn.execute(g, 0, **options)
            elif how == "fail_after":
                with pytest.raises(TimeoutError):
                    with anyio.fail_after(0.1):
                        await tgn.execute(g, 0, **options)
            else:
                async with anyio.create_task_group() as tg:
                    async def runner() -> None:
                        await tgn.execute(g, 0, **options)
                    tg.start_soon(runner)
                    await anyio.sleep(0.1)
                    tg.cancel_scope.cancel()
            elapsed = time.perf_counter() - t0
            assert rec.running == 0  # the node running at the cancel had returned
            return elapsed

    elapsed = run(main, backend=backend)
    assert elapsed < 0.6, elapsed
    started = len(rec.starts())
    assert 1 <= started < 30  # stopped long before the 60-node chain was done
    time.sleep(0.05)
    assert len(rec.starts()) == started


@pytest.mark.parametrize("backend", BACKENDS)
def test_keyboard_interrupt_in_a_node_propagates(backend: str) -> None:
    g = fan_in(3)
    pool = default_pool("cpu")
    with pytest.raises(KeyboardInterrupt):
        run(lambda: tgn.execute(g, 0, executor="concurrent", functions={
            "bad": Recorder().task("b", fail=KeyboardInterrupt()), "slow": lambda *a: 0}), backend=backend)
    # The pool's workers survived it and still run nodes.
    assert all(t.is_alive() for t in pool._threads)
    assert run(lambda: tgn.execute(fan_in(3), 0, executor="concurrent", functions={
        "bad": lambda x: 0, "slow": lambda *a: 0})) == 0


def test_no_worker_threads_leak_across_failures_and_cancellations() -> None:
    default_pool("cpu")  # the shared pool is made once and lives on: count after it exists
    before = {t.ident for t in tgn_threads()}

    async def churn() -> None:
        for k in range(10):
            async with tgn.WorkerPool(2, name="tgn-churn") as pool:
                functions = {"bad": Recorder().task("b", 0.001, fail=Boom()), "slow": Recorder().task("s", 0.001)}
                with pytest.raises(Boom):
                    await tgn.execute(fan_in(6), 0, executor="concurrent", pool=pool, functions=functions)
                with anyio.move_on_after(0.005):
                    await tgn.execute(chain(50), 0, executor="concurrent", pool=pool, functions=functions)
            with pytest.raises(Boom):
                await tgn.execute(fan_in(6), 0, executor="concurrent", functions=functions)

    for backend in BACKENDS:
        run(churn, backend=backend)
    assert {t.ident for t in tgn_threads()} == before
    assert threading.active_count() >= len(before)


def test_closing_a_pool_under_a_running_graph_never_strands_it() -> None:
    """close() lets work already queued or kept by a worker finish; a run that
    needs to queue more afterwards fails with PoolClosedError.  Either way the
    awaiting task ends."""
    rec = Recorder()
    spec = {f"l{i}": ("slow", ("x",)) for i in range(40)}
    spec["m"] = ("slow", tuple(spec))
    g = call_graph(spec, "m")
    pool = tgn.WorkerPool(2, name="tgn-closing")

    async def main() -> None:
        async def close_soon() -> None:
            await anyio.sleep(0.03)
            await pool.aclose()

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(close_soon)
                await tgn.execute(g, 0, executor="concurrent", pool=pool,
                                  functions={"slow": rec.task("slow", 0.005)})

    try:
        run(main)
    except tgn.PoolClosedError:
        pass
    assert rec.running == 0 and pool.closed


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_error_in_the_runs_bookkeeping_reaches_the_awaiting_caller(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure after a node returned, in the worker's own bookkeeping
    (``Run._finish``), fails the run: the caller gets that exception, not a hang."""
    original = Boom("bookkeeping failed")

    def broken_finish(self: concurrent_run.Run, *args: object) -> None:
        raise original

    monkeypatch.setattr(concurrent_run.Run, "_finish", broken_finish)

    async def main() -> None:
        with anyio.fail_after(5):  # without the fix the run never ends
            async with tgn.WorkerPool(2, name="tgn-finish") as pool:
                await tgn.execute(fan_in(3), 0, executor="concurrent", pool=pool,
                                  functions={"bad": lambda x: 0, "slow": lambda *a: 0})

    with pytest.raises(Boom) as info:
        run(main, backend=backend)
    assert info.value is original


def test_a_work_function_that_raises_is_reported_and_its_lane_lives_on(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pool's contract is that work functions do not raise; one that does is a
    bug, reported through ``threading.excepthook`` (never swallowed), and the
    lane goes on taking work."""
    seen: list[threading.ExceptHookArgs] = []
    monkeypatch.setattr(threading, "excepthook", seen.append)
    done = threading.Event()

    def broken(a: object, b: object, lane: object) -> None:
        raise Boom("a work function raised")

    with WorkerPool(1, name="tgn-report") as pool:
        pool.submit(broken, None, None)
        pool.submit(lambda a, b, lane: done.set(), None, None)
        assert done.wait(5)
    assert len(seen) == 1 and isinstance(seen[0].exc_value, Boom)
    assert seen[0].thread is not None and seen[0].thread.name == "tgn-report-cpu-0"
