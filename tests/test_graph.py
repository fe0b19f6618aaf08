from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import taskgraph_norm

from taskgraph_norm import CycleError, Graph, GraphError, Node, Op, build_graph, validate
from taskgraph_norm.graph import ARITY, Attrs


def small_graph() -> Graph:
    return Graph(
        [
            Node("x", Op.INPUT),
            Node("a", Op.SUMSQ, ("x",), {"start": 0, "stop": 2, "leaf": "pairwise"}),
            Node("b", Op.SUMSQ, ("x",), {"start": 2, "stop": 4, "leaf": "pairwise"}),
            Node("s", Op.ADD, ("b", "a")),
            Node("f", Op.FINALIZE, ("x", "s"), {"hidden_size": 4}),
            Node("y", Op.OUTPUT, ("f",)),
        ],
        "y",
        {"hidden_size": 4},
    )


def test_node_is_frozen_slotted_and_hashable() -> None:
    n = Node("a", Op.ADD, ["p", "q"], {"k": 1})
    assert n.inputs == ("p", "q") and isinstance(n.attrs, Attrs)
    with pytest.raises(AttributeError):
        n.id = "b"  # type: ignore[misc]
    assert not hasattr(n, "__dict__")
    assert hash(n) == hash(Node("a", Op.ADD, ("p", "q"), {"k": 1}))


def test_attrs_reject_unhashable_values() -> None:
    with pytest.raises(TypeError):
        Attrs({"bad": [1, 2]})


def test_operand_order_is_semantics() -> None:
    assert Node("s", Op.ADD, ("a", "b")) != Node("s", Op.ADD, ("b", "a"))


def test_networkx_view_carries_operand_positions() -> None:
    g = small_graph().to_networkx()
    assert g.edges["b", "s"]["position"] == 0
    assert g.edges["a", "s"]["position"] == 1
    assert g.nodes["s"]["op"] is Op.ADD
    assert g.number_of_nodes() == 6


def test_valid_graph_passes_and_order_is_topological() -> None:
    g = validate(small_graph())
    order = g.topological_order
    pos = {n: i for i, n in enumerate(order)}
    for n in g:
        for src in n.inputs:
            assert pos[src] < pos[n.id]


def test_topological_order_does_not_lean_on_names() -> None:
    g = small_graph()
    renamed = g.relabel({"a": "zz", "b": "aa"})
    mapping = {"zz": "a", "aa": "b"}
    assert [mapping.get(i, i) for i in renamed.topological_order] == list(g.topological_order)


def test_cycle_error_names_the_path() -> None:
    g = small_graph().replace_node(Node("a", Op.SUMSQ, ("s",), {"start": 0, "stop": 2}))
    with pytest.raises(CycleError) as info:
        validate(g)
    path = info.value.path
    assert path[0] == path[-1] and set(path) == {"a", "s"}
    assert " -> ".join(path) in str(info.value)
    g_nx = g.to_networkx()
    assert all(g_nx.has_edge(u, v) for u, v in zip(path, path[1:]))


@pytest.mark.parametrize(
    ("edit", "node", "words"),
    [
        (lambda g: g.replace_node(Node("s", Op.ADD, ("b",))), "s", "ADD takes 2 operands, got 1"),
        (lambda g: g.replace_node(Node("s", Op.ADD, ("b", "nope"))), "s", "operand 'nope' does not exist"),
        (lambda g: g.add_nodes(Node("a", Op.SUMSQ, ("x",))), "a", "duplicate node id"),
        (lambda g: g.replace_node(Node("s", "add", ("a", "b"))), "s", "unknown op"),  # type: ignore[arg-type]
        (lambda g: g.add_nodes(Node("c", Op.SUMSQ, ("x",))), "c", "does not contribute to the output"),
        (lambda g: Graph(g.nodes, "missing"), "missing", "output node does not exist"),
    ],
)
def test_validation_errors_name_the_node(edit, node: str, words: str) -> None:
    with pytest.raises(GraphError) as info:
        validate(edit(small_graph()))
    assert f"node {node!r}" in str(info.value)
    assert words in str(info.value)
    assert isinstance(info.value, ValueError)


def test_two_inputs_rejected() -> None:
    g = small_graph().add_nodes(Node("x2", Op.INPUT))
    with pytest.raises(GraphError, match="exactly one INPUT"):
        validate(g)


def test_edits_return_new_graphs() -> None:
    g = small_graph()
    h = g.replace_node(Node("s", Op.ADD, ("a", "b")))
    assert g["s"].inputs == ("b", "a") and h["s"].inputs == ("a", "b")
    assert g != h


def test_arity_table_covers_every_op() -> None:
    assert set(ARITY) == set(Op)


def test_ir_does_not_import_torch() -> None:
    # taskgraph_norm/__init__ imports torch through api; load the IR modules alone.
    code = (
        "import sys, importlib.util, types;"
        "pkg = types.ModuleType('taskgraph_norm'); pkg.__path__ = ['taskgraph_norm']; sys.modules['taskgraph_norm'] = pkg;"
        "import taskgraph_norm.graph, taskgraph_norm.topologies as t;"
        "t.build_graph(128, chunk_size=32); print('torch' in sys.modules)"
    )
    root = Path(taskgraph_norm.__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root
    )
    assert out.stdout.strip() == "False"


def test_builder_graphs_are_valid_and_cached() -> None:
    g = build_graph(100, chunk_size=30, topology="linear")
    assert validate(g) is g
    assert build_graph(100, chunk_size=30, topology="linear") is g


def test_graph_hash_walks_the_nodes_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from taskgraph_norm.graph import dag as graph_module

    walked: list[str] = []
    real = graph_module._node_id

    def spy(node: Node) -> str:
        walked.append(node.id)
        return real(node)  # type: ignore[no-any-return]

    monkeypatch.setattr(graph_module, "_node_id", spy)
    g = Graph(small_graph().nodes, "y")  # a fresh graph: nothing cached yet
    first = hash(g)
    assert sorted(walked) == sorted(n.id for n in g)  # the first hash reads every node
    assert hash(g) == first and {g: 1}[g] == 1
    assert len(walked) == len(g)  # later ones read none
    # Negative control: another graph object is hashed afresh.
    hash(Graph(g.nodes, "y"))
    assert len(walked) == 2 * len(g)


def test_graph_hash_agrees_with_equality() -> None:
    g = small_graph()
    same = Graph(list(g.nodes), "y", {"other": "meta"})  # meta is not part of equality
    assert same == g and hash(same) == hash(g)
    # The hash reads ids and operands only: a graph that differs in an attribute alone
    # may share it, and equality still tells the two apart.
    other = g.replace_node(g["f"].replace(attrs={"hidden_size": 5}))
    assert other != g and hash(other) == hash(g)
    assert len({g, same, other}) == 2


def test_a_pickled_graph_hashes_afresh() -> None:
    import pickle

    g = small_graph()
    hash(g)
    copy = pickle.loads(pickle.dumps(g))
    assert copy._hash is None  # string hashes differ between processes: never carried
    assert copy == g and hash(copy) == hash(g) and copy.meta == g.meta


def test_validation_without_build_order() -> None:
    # Operands named before they are built: valid, ordered by Kahn's algorithm.
    g = small_graph()
    shuffled = Graph([g["y"], g["f"], g["s"], g["a"], g["x"], g["b"]], "y")
    assert validate(shuffled) is shuffled
    assert shuffled.topological_order == ("x", "a", "b", "s", "f", "y")
    assert [n.id for n in shuffled.topological_nodes] == list(shuffled.topological_order)
    # A node that names itself is a cycle, not an operand built before its user.
    loop = g.replace_node(Node("s", Op.ADD, ("s", "a")))
    with pytest.raises(CycleError):
        validate(loop)
    # Negative control: in build order the order is the build order.
    assert validate(small_graph()).topological_order == tuple(n.id for n in small_graph())


def test_a_dead_chain_is_found_in_a_forward_graph() -> None:
    dead = small_graph().add_nodes(
        Node("c", Op.SUMSQ, ("x",), {"start": 0, "stop": 1, "leaf": "pairwise"}),
        Node("d", Op.ADD, ("c", "a")),
    )
    with pytest.raises(GraphError, match="node 'c': does not contribute"):
        validate(dead)


def test_builder_attrs_are_what_the_checked_constructor_makes() -> None:
    for accumulate in ("float", "exact"):
        g = build_graph(100, chunk_size=30, topology="tree", accumulate=accumulate)
        for n in g:
            checked = Attrs(dict(n.attrs))
            assert checked.pairs == n.attrs.pairs and hash(checked) == hash(n.attrs)  # type: ignore[attr-defined]
