"""Random general DAGs: every node runs exactly once, only after its operands,
and the result equals a sequential evaluation -- under every policy.  As in
dask's tests, the ordering checks are repeated with the node names reversed."""

from __future__ import annotations

import random

import pytest

import taskgraph_norm as tgn
from taskgraph_norm import Graph, Node, Op
from taskgraph_norm.executors.concurrent.schedules import PCT, Fifo, Random

from ._executor_helpers import run


def random_dag(seed: int, n: int) -> Graph:
    rng = random.Random(seed)
    nodes = [Node("x", Op.INPUT)]
    ids = ["x"]
    for i in range(n):
        k = rng.randint(1, min(3, len(ids)))
        operands = tuple(rng.sample(ids, k))
        nodes.append(Node(f"n{i:03d}", Op.CALL, operands, {"fn": "mix"}))
        ids.append(f"n{i:03d}")
    sinks = [i for i in ids[1:] if not any(i in nd.inputs for nd in nodes)]
    nodes.append(Node("join", Op.CALL, tuple(sinks), {"fn": "mix"}))
    nodes.append(Node("y", Op.OUTPUT, ("join",)))
    return Graph(nodes, "y")


def sequential(graph: Graph, x: int) -> int:
    env: dict[str, int] = {}
    for node_id in graph.topological_order:
        node = graph[node_id]
        args = [env[i] for i in node.inputs]
        env[node_id] = x if node.op is Op.INPUT else (args[0] if node.op is Op.OUTPUT else mix(*args))
    return env[graph.output]


def mix(*args: int) -> int:
    acc = 17
    for a in args:  # order-sensitive, so a swapped operand would show
        acc = (acc * 31 + a) % 1_000_003
    return acc


def reverse_names(graph: Graph) -> Graph:
    work = [n.id for n in graph.nodes if n.op is Op.CALL]
    return graph.relabel(dict(zip(work, reversed(work))))


@pytest.mark.parametrize("policy", [Fifo(), Random(4), PCT(seed=4, depth=3), Random()])
@pytest.mark.parametrize("reversed_names", [False, True])
def test_random_dags_run_each_node_once_after_its_operands(policy: object, reversed_names: bool) -> None:
    for seed in range(6):
        g = random_dag(seed, 40)
        if reversed_names:
            g = reverse_names(g)
        traces: list[tgn.Trace] = []
        y = run(lambda g=g: tgn.execute(g, 5, executor="concurrent", schedule=policy, max_workers=3,
                                        trace=traces.append, functions={"mix": mix}))
        assert y == sequential(g, 5)
        tr = traces[0]
        completed: set[str] = set()
        for d in tr.decisions:
            if d.kind == "dispatch":
                assert all(i in completed for i in g[d.node].inputs), d.node
            else:
                assert d.node not in completed
                completed.add(d.node)
        assert completed == {n.id for n in g}
        assert len(tr.spans) == len([n for n in g if n.op is Op.CALL])


def test_seeded_schedule_follows_positions_not_names() -> None:
    g = random_dag(1, 30)
    r = reverse_names(g)
    orders = []
    for graph in (g, r):
        traces: list[tgn.Trace] = []
        run(lambda graph=graph: tgn.execute(graph, 5, executor="concurrent", schedule=Random(9),
                                            trace=traces.append, functions={"mix": mix}))
        position = {nid: k for k, nid in enumerate(traces[0].node_ids)}
        orders.append([position[nid] for nid in traces[0].completion_order])
    assert orders[0] == orders[1]
