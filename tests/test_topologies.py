from __future__ import annotations

import pytest

from taskgraph_norm import ConfigError, Op, build_graph
from taskgraph_norm.topologies import chunk_bounds


def ops(g, op: Op) -> list:
    return [n for n in g if n.op is op]


def leaves_bounds(g) -> list[tuple[int, int]]:
    return [(n.attrs["start"], n.attrs["stop"]) for n in ops(g, Op.SUMSQ)]


@pytest.mark.parametrize(
    ("hidden", "chunk", "expected"),
    [
        (256, 64, [(0, 64), (64, 128), (128, 192), (192, 256)]),
        (100, 30, [(0, 30), (30, 60), (60, 90), (90, 100)]),  # ragged last chunk
        (7, 64, [(0, 7)]),  # chunk_size >= hidden_size: one chunk
        (7, 7, [(0, 7)]),
        (1, 1, [(0, 1)]),
        (13, 1, [(k, k + 1) for k in range(13)]),  # prime hidden size, unit chunks
    ],
)
def test_chunk_bounds(hidden: int, chunk: int, expected) -> None:
    assert list(chunk_bounds(hidden, chunk)) == expected
    for topology in ("linear", "tree", "race", "cat"):
        assert leaves_bounds(build_graph(hidden, chunk_size=chunk, topology=topology)) == expected


def seed_tree(parts: list[str]) -> str:
    """The original report's V3 loop, building the expression instead of summing."""
    temp = [f"({parts[i]}+{parts[i + 1]})" if i + 1 < len(parts) else parts[i] for i in range(0, len(parts), 2)]
    while len(temp) > 1:
        temp = [f"({temp[i]}+{temp[i + 1]})" if i + 1 < len(temp) else temp[i] for i in range(0, len(temp), 2)]
    return temp[0]


def expression(g, node_id: str) -> str:
    node = g[node_id]
    if node.op is Op.SUMSQ:
        return f"p{node.attrs['index']}"
    if node.op is Op.ADD:
        return f"({expression(g, node.inputs[0])}+{expression(g, node.inputs[1])})"
    raise AssertionError(node)


@pytest.mark.parametrize("n_chunks", [1, 2, 3, 5, 6, 7, 8, 13, 64, 65])
def test_tree_matches_the_report_v3_loop(n_chunks: int) -> None:
    g = build_graph(n_chunks * 4, chunk_size=4, topology="tree")
    total = g["finalize"].inputs[1]
    assert expression(g, total) == seed_tree([f"p{k}" for k in range(n_chunks)])


@pytest.mark.parametrize("n_chunks", [1, 2, 5])
def test_linear_is_a_left_fold(n_chunks: int) -> None:
    g = build_graph(n_chunks * 3, chunk_size=3, topology="linear")
    want = "p0"
    for k in range(1, n_chunks):
        want = f"({want}+p{k})"
    assert expression(g, g["finalize"].inputs[1]) == want
    assert len(ops(g, Op.ADD)) == n_chunks - 1


def test_race_and_cat_merge_every_partial_in_one_node() -> None:
    for topology, op in (("race", Op.ACCUMULATE), ("cat", Op.CATSUM)):
        g = build_graph(300, chunk_size=64, topology=topology)
        (merge,) = ops(g, op)
        assert merge.inputs == tuple(f"p{k}" for k in range(5))
        assert g["finalize"].inputs == ("x", merge.id)


def test_standard_is_one_opaque_node() -> None:
    g = build_graph(4096, topology="standard")
    assert [n.op for n in g] == [Op.INPUT, Op.RMSNORM, Op.OUTPUT]


def test_exact_graph_has_a_max_phase_before_the_sums() -> None:
    g = build_graph(256, chunk_size=64, topology="race", accumulate="exact")
    assert len(ops(g, Op.ROWMAX)) == 4 and len(ops(g, Op.MAX)) == 3
    (scale,) = ops(g, Op.SCALE)
    assert all(n.inputs == ("x", scale.id) for n in ops(g, Op.SUMSQ))


def test_leaf_choice_is_recorded_on_every_leaf() -> None:
    g = build_graph(256, chunk_size=64, leaf="native")
    assert {n.attrs["leaf"] for n in ops(g, Op.SUMSQ)} == {"native"}


def test_graph_depends_only_on_its_parameters() -> None:
    a = build_graph(4096, chunk_size=64, topology="tree")
    from taskgraph_norm.topologies import _build_cached

    _build_cached.cache_clear()
    b = build_graph(4096, chunk_size=64, topology="tree")
    assert a is not b and a == b


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"hidden_size": 0}, "hidden_size"),
        ({"hidden_size": 4, "chunk_size": 0}, "chunk_size"),
        ({"hidden_size": 4, "chunk_size": -3}, "chunk_size"),
        ({"hidden_size": 4, "chunk_size": 2.0}, "chunk_size"),
        ({"hidden_size": 4, "chunk_size": True}, "chunk_size"),
        ({"hidden_size": 4, "topology": "ring"}, "topology"),
        ({"hidden_size": 4, "leaf": "kahan"}, "leaf"),
        ({"hidden_size": 4, "accumulate": "double"}, "accumulate"),
        ({"hidden_size": 4, "topology": "standard", "accumulate": "exact"}, "accumulate"),
    ],
)
def test_bad_parameters_raise_value_error(kwargs, name: str) -> None:
    hidden = kwargs.pop("hidden_size")
    with pytest.raises(ConfigError) as info:
        build_graph(hidden, **kwargs)
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith(f"{name}=")
    assert "expected" in str(info.value)
