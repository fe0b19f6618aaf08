"""Per-node overhead of the concurrent executor against dask's threaded scheduler.

Two graph shapes of no-op nodes, built identically for both schedulers:

* chain:  ``n0 -> n1 -> ... -> n{N-1}`` (every node waits for the previous one);
* fan-in: ``N`` independent leaves merged by one node that takes them all.

Per-node overhead is wall time / N (the nodes do nothing), median of
``--repeats`` runs, with the same worker count for both.  Also measured: the
overhead of ``await tgn.normalize(x)`` over ``tgn.normalize_sync(x)`` on a
(1, 4096) input, for the default executor and for ``executor="concurrent"``.
Every ratio is against a baseline measured in the same process, same run.

Run:  python benchmarks/executor_overhead.py [--nodes 10000] [--repeats 5] [--workers 2]
Needs the ``bench`` extra (dask).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import anyio
import torch

import taskgraph_norm as tgn
from taskgraph_norm import Graph, Node, Op
from common import median_seconds  # benchmarks/common.py (this script's folder)


def noop(*args: Any) -> int:
    return 0


def chain_graph(n: int) -> Graph:
    nodes = [Node("x", Op.INPUT)]
    prev = "x"
    for i in range(n):
        nodes.append(Node(f"n{i}", Op.CALL, (prev,), {"fn": "noop"}))
        prev = f"n{i}"
    nodes.append(Node("y", Op.OUTPUT, (prev,)))
    return Graph(nodes, "y")


def fan_in_graph(n: int) -> Graph:
    leaves = [Node(f"l{i}", Op.CALL, ("x",), {"fn": "noop"}) for i in range(n)]
    merge = Node("merge", Op.CALL, tuple(leaf.id for leaf in leaves), {"fn": "noop"})
    return Graph([Node("x", Op.INPUT), *leaves, merge, Node("y", Op.OUTPUT, ("merge",))], "y")


def dask_chain(n: int) -> tuple[dict[str, Any], str]:
    dsk: dict[str, Any] = {"x": 0}
    prev = "x"
    for i in range(n):
        dsk[f"n{i}"] = (noop, prev)
        prev = f"n{i}"
    return dsk, prev


def dask_fan_in(n: int) -> tuple[dict[str, Any], str]:
    dsk: dict[str, Any] = {"x": 0}
    for i in range(n):
        dsk[f"l{i}"] = (noop, "x")
    dsk["merge"] = (noop, [f"l{i}" for i in range(n)])
    return dsk, "merge"


def bench_shapes(n: int, repeats: int, workers: int) -> list[tuple[str, float, float]]:
    import dask.threaded

    rows = []
    pool = tgn.WorkerPool(workers, name="bench")
    try:
        for shape, build, build_dask in (
            ("chain", chain_graph, dask_chain), ("fan-in", fan_in_graph, dask_fan_in)
        ):
            graph = tgn.validate(build(n))
            dsk, key = build_dask(n)

            async def ours(graph: Graph = graph) -> object:
                return await tgn.execute(
                    graph, 0, executor="concurrent", pool=pool, functions={"noop": noop}
                )

            t_ours = median_seconds(lambda: anyio.run(ours), repeats=repeats)
            t_dask = median_seconds(
                lambda: dask.threaded.get(dsk, key, num_workers=workers), repeats=repeats
            )
            rows.append((shape, t_ours / n * 1e6, t_dask / n * 1e6))
    finally:
        pool.close()
    return rows


def bench_normalize(repeats: int) -> list[tuple[str, float, float, float]]:
    """Per-call times of ``await normalize`` and ``normalize_sync``, measured in
    alternating pairs so that load drifting on a shared box hits both alike;
    returns medians and the median of the per-pair ratios."""
    x = torch.randn(1, 4096, generator=torch.Generator().manual_seed(0))
    loops = 20

    rows = []
    for executor in ("auto", "concurrent"):

        def sync_loop(executor: str = executor) -> None:
            for _ in range(loops):
                tgn.normalize_sync(x, executor=executor)

        async def async_loop(executor: str = executor) -> None:
            for _ in range(loops):
                await tgn.normalize(x, executor=executor)

        sync_loop()
        anyio.run(async_loop)  # warm up both
        t_sync, t_async = [], []
        for _ in range(max(repeats, 3) * 2 + 1):
            t = time.perf_counter()
            sync_loop()
            t_sync.append((time.perf_counter() - t) / loops)
            t = time.perf_counter()
            anyio.run(async_loop)
            t_async.append((time.perf_counter() - t) / loops)
        ratio = statistics.median(a / b for a, b in zip(t_async, t_sync))
        rows.append((executor, statistics.median(t_async) * 1e6, statistics.median(t_sync) * 1e6, ratio))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the nodes are no-ops; keep torch's own pool out of the timing

    print(f"per-node overhead, {args.nodes} no-op nodes, {args.workers} workers, "
          f"median of {args.repeats} (baseline: dask.threaded.get, same run)")
    print(f"{'shape':<8} {'tgn us/node':>12} {'dask us/node':>13} {'tgn/dask':>9}  target <= 0.143")
    for shape, ours, dask_us in bench_shapes(args.nodes, args.repeats, args.workers):
        print(f"{shape:<8} {ours:>12.2f} {dask_us:>13.2f} {ours / dask_us:>9.3f}"
              f"  {'ok' if ours / dask_us <= 1 / 7 else 'MISSED'}")
    print()
    print("await normalize() vs normalize_sync(), (1, 4096) fp32, tree/64, per call "
          "(baseline: normalize_sync, same run)")
    print(f"{'executor':<11} {'async us':>9} {'sync us':>8} {'overhead us':>12} {'ratio':>6}"
          "  (ratio: median of paired runs)")
    for executor, t_async, t_sync, ratio in bench_normalize(args.repeats):
        print(f"{executor:<11} {t_async:>9.1f} {t_sync:>8.1f} {t_async - t_sync:>12.1f} {ratio:>6.2f}")


if __name__ == "__main__":
    main()
