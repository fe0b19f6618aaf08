"""The concurrent executor: same bits as the reference, general graphs, both anyio
backends, bounded concurrency under load, pool lifecycle."""

from __future__ import annotations

import threading

import anyio
import pytest
import torch

import taskgraph_norm as tgn
from taskgraph_norm.executors.concurrent.devices import default_pool
from taskgraph_norm.executors.concurrent.schedules import Random

from ._executor_helpers import BACKENDS, Recorder, call_graph, run, tgn_threads, wide_input
from .helpers import bits, bits_equal

CERTIFIED = [
    ("tree", "pairwise", "float"),
    ("linear", "pairwise", "float"),
    ("cat", "pairwise", "float"),
    ("tree", "native", "float"),
    ("linear", "native", "exact"),
    ("race", "pairwise", "exact"),
    ("standard", "pairwise", "float"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("topology,leaf,accumulate", CERTIFIED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_concurrent_matches_reference_bits(
    backend: str, topology: str, leaf: str, accumulate: str, dtype: torch.dtype
) -> None:
    g = tgn.build_graph(520, chunk_size=64, topology=topology, leaf=leaf, accumulate=accumulate)
    x, w = wide_input(3, 520, seed=1, dtype=dtype), torch.randn(520).to(dtype)

    async def main() -> tuple[torch.Tensor, torch.Tensor]:
        ref = await tgn.execute(g, x, w, executor="reference")
        got = await tgn.execute(g, x, w, executor="concurrent", schedule=Random(7))
        return ref, got

    ref, got = run(main, backend=backend)
    assert bits_equal(ref, got)


@pytest.mark.parametrize("backend", BACKENDS)
def test_race_matches_reference_at_the_recorded_arrival_order(backend: str) -> None:
    g = tgn.build_graph(1024, chunk_size=64, topology="race")
    x = wide_input(4, 1024, seed=2)

    async def main() -> list[bool]:
        agree, traces = [], []
        for seed in range(8):
            y = await tgn.execute(g, x, executor="concurrent", schedule=Random(seed), trace=traces.append)
            ref = await tgn.execute(g, x, executor="reference", arrival=traces[-1].arrival)
            agree.append(bits_equal(y, ref))
        # Negative control: against the reference's default (index) order, some differ.
        index_order = await tgn.execute(g, x, executor="reference")
        control = [
            await tgn.execute(g, x, executor="concurrent", schedule=Random(s)) for s in range(8)
        ]
        agree.append(all(bits_equal(index_order, y) for y in control))
        return agree

    *matches, all_equal_to_index_order = run(main, backend=backend)
    assert all(matches)
    assert not all_equal_to_index_order


def test_bit_comparison_tells_zero_signs_apart() -> None:
    assert not bits_equal(torch.tensor([0.0]), torch.tensor([-0.0]))
    assert bits_equal(torch.tensor([float("nan")]), torch.tensor([float("nan")]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_general_graph_of_torch_ops(backend: str) -> None:
    """The documented example: a user's own graph of torch ops (docs/executor.md)."""
    w1, w2 = torch.randn(16, 32), torch.randn(16, 32)
    functions = {
        "left": lambda x: x @ w1,
        "right": lambda x: x @ w2,
        "gate": lambda a, b: torch.nn.functional.silu(a) * b,
    }
    g = call_graph({"a": ("left", ("x",)), "b": ("right", ("x",)), "h": ("gate", ("a", "b"))}, "h")
    x = torch.randn(4, 16)

    async def main() -> torch.Tensor:
        return await tgn.execute(g, x, executor="concurrent", functions=functions)

    y = run(main, backend=backend)
    assert bits_equal(y, torch.nn.functional.silu(x @ w1) * (x @ w2))


def test_auto_picks_concurrent_for_a_general_graph() -> None:
    g = call_graph({"double": ("double", ("x",))}, "double")
    y = run(lambda: tgn.execute(g, torch.ones(2), functions={"double": lambda t: t * 2}))
    assert torch.equal(y, torch.full((2,), 2.0))


def test_normalize_sync_with_the_concurrent_executor() -> None:
    x = wide_input(2, 300, seed=3)
    ref = tgn.normalize_sync(x, topology="tree", chunk_size=32, executor="reference")
    assert bits_equal(tgn.normalize_sync(x, topology="tree", chunk_size=32, executor="concurrent"), ref)


def test_unregistered_function_is_rejected_before_any_node_runs() -> None:
    rec = Recorder()
    g = call_graph({"a": ("a", ("x",)), "b": ("missing", ("a",))}, "b")
    with pytest.raises(tgn.GraphError, match="'missing'"):
        run(lambda: tgn.execute(g, 0, executor="concurrent", functions={"a": rec.task("a")}))
    assert rec.starts() == []


@pytest.mark.parametrize("bad", ["cycle", "missing input"])
def test_malformed_graph_is_rejected_before_any_node_runs(bad: str) -> None:
    rec = Recorder()
    if bad == "cycle":
        g = call_graph({"a": ("f", ("x", "c")), "b": ("f", ("a",)), "c": ("f", ("b",))}, "c")
        error: type[Exception] = tgn.CycleError
    else:
        g = call_graph({"a": ("f", ("x",)), "b": ("f", ("a", "nowhere"))}, "b")
        error = tgn.GraphError
    with pytest.raises(error):
        run(lambda: tgn.execute(g, 0, executor="concurrent", functions={"f": rec.task("f")}))
    assert rec.starts() == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_many_concurrent_calls_share_a_bounded_pool(backend: str) -> None:
    """1000 awaits from 50 tasks on one pool of 3 workers: all correct, no deadlock,
    never more than 3 nodes at once, no thread created per call."""
    calls, tasks = 1000, 50
    x = wide_input(2, 256, seed=4)
    g = tgn.build_graph(256, chunk_size=64, topology="tree")
    expected = tgn.normalize_sync(x, topology="tree", chunk_size=64, executor="reference")
    rec = Recorder()
    side = call_graph({"a": ("f", ("x",)), "b": ("f", ("x",)), "c": ("f", ("a", "b"))}, "c")
    before = {t.ident for t in threading.enumerate()}

    async def main() -> list[bool]:
        ok: list[bool] = []
        async with tgn.WorkerPool(3, name="tgn-load") as pool:

            async def client(k: int) -> None:
                for j in range(calls // tasks):
                    if j % 4 == 3:  # mix in general graphs whose nodes count concurrency
                        await tgn.execute(side, 0, executor="concurrent", pool=pool,
                                          functions={"f": rec.task(f"{k}.{j}")})
                        ok.append(True)
                    else:
                        y = await tgn.execute(g, x, executor="concurrent", pool=pool,
                                              schedule=Random(k * 100 + j) if j % 2 else None)
                        ok.append(bits_equal(y, expected))

            with anyio.fail_after(120):
                async with anyio.create_task_group() as tg:
                    for k in range(tasks):
                        tg.start_soon(client, k)
            assert pool.stats.peak_busy <= 3
            assert rec.running == 0  # every node of every run had returned
        return ok

    ok = run(main, backend=backend)
    assert len(ok) == calls and all(ok)
    assert rec.peak <= 3
    # anyio's own cached worker thread (used by aclose) may linger; ours must not.
    assert [t for t in tgn_threads() if t.ident not in before] == []


def test_load_normalize_default_pool_bounded() -> None:
    """``await normalize(executor="concurrent")`` from 50 tasks shares the default pool."""
    x = wide_input(1, 128, seed=5)
    expected = tgn.normalize_sync(x, chunk_size=32, executor="reference")
    pool = default_pool("cpu")

    async def main() -> list[bool]:
        ok: list[bool] = []

        async def client() -> None:
            for _ in range(20):
                ok.append(bits_equal(await tgn.normalize(x, chunk_size=32, executor="concurrent"), expected))

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for _ in range(50):
                    tg.start_soon(client)
        return ok

    threads_before = len(tgn_threads())
    ok = run(main)
    assert len(ok) == 1000 and all(ok)
    assert pool.stats.peak_busy <= pool.max_workers
    assert len(tgn_threads()) <= threads_before + pool.max_workers  # the default pool, made once


def test_max_workers_bounds_one_run() -> None:
    rec = Recorder()
    spec = {f"l{i}": ("slow", ("x",)) for i in range(12)}
    spec["m"] = ("slow", tuple(spec))
    g = call_graph(spec, "m")

    async def main() -> None:
        async with tgn.WorkerPool(4, name="tgn-bound") as pool:
            await tgn.execute(g, 0, executor="concurrent", pool=pool, max_workers=2,
                              functions={"slow": rec.task("slow", 0.005)})

    run(main)
    assert 1 <= rec.peak <= 2


def test_pool_threads_are_persistent_and_closed() -> None:
    def ours() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name.startswith("tgn-life-")}

    assert ours() == set()
    g = call_graph({f"l{i}": ("f", ("x",)) for i in range(20)} | {"m": ("f", tuple(f"l{i}" for i in range(20)))}, "m")
    with tgn.WorkerPool(3, name="tgn-life") as pool:
        started = ours()
        assert len(started) == 3
        for _ in range(5):
            run(lambda: tgn.execute(g, 0, executor="concurrent", pool=pool, functions={"f": lambda *a: 0}))
        assert ours() == started  # no thread per run or per node
    assert ours() == set() and not any(t.is_alive() for t in started)
    with pytest.raises(tgn.PoolClosedError):
        run(lambda: tgn.execute(g, 0, executor="concurrent", pool=pool, functions={"f": lambda *a: 0}))


def test_bad_options_are_config_errors() -> None:
    g = tgn.build_graph(64, chunk_size=16)
    x = torch.randn(1, 64)
    for options in ({"max_workers": 0}, {"schedule": "lifo"}, {"device": "meta"}, {"trace": 3}):
        with pytest.raises(tgn.ConfigError):
            run(lambda o=options: tgn.execute(g, x, executor="concurrent", **o))


def test_bits_helper_is_an_int_view() -> None:
    assert bits(torch.tensor([1.0])).dtype == torch.int32


def test_accumulate_with_a_repeated_operand_matches_reference() -> None:
    """A hand-edited race node that lists one partial twice: both positions arrive
    when that partial completes, and the reference agrees at the recorded order."""
    g = tgn.build_graph(512, chunk_size=64, topology="race")
    acc = g["accumulate"]
    g = g.replace_node(acc.replace(inputs=acc.inputs + (acc.inputs[0],)))
    x = wide_input(2, 512, seed=9)

    async def main() -> None:
        for seed in range(4):
            traces: list[tgn.Trace] = []
            y = await tgn.execute(g, x, executor="concurrent", schedule=Random(seed), trace=traces.append)
            order = traces[0].arrival["accumulate"]
            assert sorted(order) == list(range(9))
            assert bits_equal(y, await tgn.execute(g, x, executor="reference", arrival={"accumulate": order}))

    run(main)
