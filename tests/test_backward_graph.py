"""The backward's merge DAGs: the weight gradient's graph, its proof and its picture;
dx's reduction is the forward's graph, and the forward's proof says so."""

from __future__ import annotations

import pytest
import torch

import taskgraph_norm as tgn
from taskgraph_norm import kernels
from taskgraph_norm.errors import ConfigError
from taskgraph_norm.graph import Node, Op, validate
from taskgraph_norm.kernels import exact_sum as es
from taskgraph_norm.prover.grouping import evaluate, find_grouping_witness, grouping_input
from taskgraph_norm.topologies import ROW_BLOCK, build_input_grad_graph, build_weight_grad_graph

from .helpers import assert_bits_equal, bits_equal


def test_row_block_matches_the_kernels() -> None:
    assert ROW_BLOCK == kernels.ROW_BLOCK


def test_builder_shape() -> None:
    g = validate(build_weight_grad_graph(100))
    leaves = [n for n in g if n.op is Op.ROWSUM]
    assert [(n.attrs["start"], n.attrs["stop"]) for n in leaves] == [(0, 32), (32, 64), (64, 96), (96, 100)]
    assert sum(n.op is Op.ADD for n in g) == 3 and sum(n.op is Op.ROUND for n in g) == 1
    g = build_weight_grad_graph(192, micro_batches=[64, 32], world_size=2)
    assert sum(n.op is Op.ROUND for n in g) == 4  # one cast per backward call
    (reduce,) = [n for n in g if n.op is Op.ACCUMULATE]
    assert reduce.attrs["placement"] == "all_reduce" and len(reduce.inputs) == 2
    # blocks restart at each call's first row: the rank-1 second call is rows 160..192
    assert ("r1.m1.b0", 160, 192) in [(n.id, n.attrs["start"], n.attrs["stop"]) for n in g if n.op is Op.ROWSUM]
    e = build_weight_grad_graph(192, weight_grad="exact", micro_batches=[64, 32], world_size=2)
    assert [n.op for n in e][-2:] == [Op.ROUND, Op.OUTPUT] and sum(n.op is Op.ROUND for n in e) == 1
    assert build_weight_grad_graph(100) is build_weight_grad_graph(100)


@pytest.mark.parametrize("kwargs", [
    {"rows": 0}, {"rows": 10, "weight_grad": "fast"}, {"rows": 10, "world_size": 3},
    {"rows": 10, "micro_batches": [4, 4]}, {"rows": 10, "micro_batches": [10, 0]},
    {"rows": 10, "row_block": 0},
])
def test_builder_rejects_bad_options(kwargs: dict[str, object]) -> None:
    rows = kwargs.pop("rows")
    with pytest.raises(ConfigError):
        build_weight_grad_graph(rows, **kwargs)  # type: ignore[arg-type]


def _rows(rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return grouping_input(seed, rows, 48)


def test_float_graph_is_the_kernels_order() -> None:
    # One call: the graph's value is kernels.weight_grad_float's, bit for bit; micro-
    # batches: its `.grad +=` of one weight_grad_float per call, in call order.
    dy, x_hat = _rows(200)
    ones = torch.ones(200, 1)
    want = kernels.weight_grad_float(x_hat, dy, ones, torch.float32)
    assert_bits_equal(evaluate(build_weight_grad_graph(200), dy, x_hat), want)
    grad = None
    for a, b in ((0, 70), (70, 200)):
        g = kernels.weight_grad_float(x_hat[a:b], dy[a:b], ones[a:b], torch.float32)
        grad = g if grad is None else grad + g
    assert grad is not None
    assert_bits_equal(evaluate(build_weight_grad_graph(200, micro_batches=[70, 130]), dy, x_hat), grad)
    assert not bits_equal(grad, want)  # negative control: the split changes the bits


def test_exact_graph_is_the_accumulator() -> None:
    dy, x_hat = _rows(200)
    want = es.round_state(es.add_products_(es.empty_state(48), dy, x_hat), torch.float32)
    for kw in ({}, {"micro_batches": [70, 130]}, {"world_size": 4, "micro_batches": [1, 9, 40]}):
        got = evaluate(build_weight_grad_graph(200, weight_grad="exact", **kw), dy, x_hat)  # type: ignore[arg-type]
        assert_bits_equal(got, want)


def test_prove_exact_certifies_micro_batch_and_world_size_invariance() -> None:
    proofs = [tgn.prove(build_weight_grad_graph(192, weight_grad="exact", **kw))  # type: ignore[arg-type]
              for kw in ({}, {"micro_batches": [64, 128]}, {"world_size": 2}, {"world_size": 4, "micro_batches": [8, 40]})]
    for p in proofs:
        assert p.rule == "exact" and p.certified
        assert p.micro_batch_invariant is True and p.world_size_invariant is True
        assert p.grouping_witness is None
    assert len({p.fingerprint for p in proofs}) == 1  # one integer, one form
    assert "micro-batch and world-size invariant" in proofs[0].explain()


def test_prove_float_refutes_invariance_with_a_replayable_witness() -> None:
    for kw in ({}, {"micro_batches": [64, 128]}, {"world_size": 2}):
        p = tgn.prove(build_weight_grad_graph(192, **kw))  # type: ignore[arg-type]
        assert p.rule == "structure" and p.deterministic  # one grouping: the same bits
        assert p.micro_batch_invariant is False and p.world_size_invariant is False
        assert not p.batch_invariant and not p.certified
        w = p.grouping_witness
        assert w is not None and w.differs()
        a, b = w.replay()
        assert bits_equal(a, w.outputs[0]) and bits_equal(b, w.outputs[1])
        assert not bits_equal(a[w.column], b[w.column])
        assert "witness: rows 192" in p.explain()
    assert len({tgn.prove(build_weight_grad_graph(192, micro_batches=m)).fingerprint
                for m in ([192], [96, 96], [64, 128])}) == 3


def test_world_size_witness_through_a_float_all_reduce() -> None:
    one, two = build_weight_grad_graph(192), build_weight_grad_graph(192, world_size=2)
    w = find_grouping_witness(one, two)
    assert w is not None and w.differs()
    # Aligned splits can coincide: 128 rows on 2 ranks are the single call's own tree
    # ((b0+b1)+(b2+b3)), so no input tells them apart -- invariance is per pair of
    # groupings, and the proof's False means "not at every world size".
    assert find_grouping_witness(build_weight_grad_graph(128), build_weight_grad_graph(128, world_size=2)) is None
    # the same comparison in the exact domain finds nothing (the control)
    assert find_grouping_witness(build_weight_grad_graph(128, weight_grad="exact"),
                                 build_weight_grad_graph(128, weight_grad="exact", world_size=2)) is None


def test_float_all_reduce_over_many_ranks_is_not_deterministic() -> None:
    p = tgn.prove(build_weight_grad_graph(128, world_size=4))
    assert p.rule == "refuted" and not p.deterministic
    w = p.grouping_witness
    assert w is not None and w.differs() and w.orders[1] == (("all_reduce", (3, 2, 1, 0)),)


def test_an_aligned_split_still_gets_a_witness() -> None:
    # 128 rows in halves is the one call's tree: the search moves on to another split
    for kw in ({}, {"world_size": 2}):
        w = tgn.prove(build_weight_grad_graph(128, **kw)).grouping_witness  # type: ignore[arg-type]
        assert w is not None and w.differs()


def test_two_rows_are_invariant_in_float() -> None:
    p = tgn.prove(build_weight_grad_graph(2))
    assert p.certified and p.micro_batch_invariant and p.grouping_witness is None


def test_hand_edited_weight_grad_graphs_are_refused() -> None:
    g = build_weight_grad_graph(64)
    dup = g.replace_node(Node("b1", Op.ROWSUM, ("x",), {"start": 0, "stop": 32, "domain": "float"}))
    assert tgn.prove(dup).rule == "unknown" and "summed twice" in tgn.prove(dup).explain()
    e = build_weight_grad_graph(64, weight_grad="exact")
    inner = e.replace_node(e["b1"].replace(attrs={**e["b1"].attrs, "domain": "float"}))
    assert tgn.prove(inner).rule == "unknown"


def test_dx_is_certified_by_the_forward_proof() -> None:
    g = tgn.build_graph(256, chunk_size=64, topology="tree")
    assert build_input_grad_graph(256, chunk_size=64, topology="tree") is g
    text = tgn.prove(g).explain()
    assert "dx's row sum" in text and "certifies dx too" in text
    assert "dx" not in tgn.prove(tgn.build_graph(256, topology="race")).explain()


def test_viz_draws_the_weight_gradient(tmp_path: object) -> None:
    g = build_weight_grad_graph(192, micro_batches=[64, 32], world_size=2)
    dot = tgn.viz.to_dot(g, tgn.prove(g))
    assert '"r0.m0.tree1.0"' in dot and "rows [160:192)" in dot and "world_size 2" in dot
    assert "ROUND" in tgn.viz.to_mermaid(g)
    big = build_weight_grad_graph(8192)
    assert tgn.viz.build_scene(big).collapsed and "ROWSUM \u00d7256" in tgn.viz.to_mermaid(big)
    exact = build_weight_grad_graph(192, weight_grad="exact", micro_batches=[64, 128])
    assert 'kind="exactmerge"' in tgn.viz.to_dot(exact)
    pytest.importorskip("matplotlib")
    from pathlib import Path

    out = tgn.render(g, Path(str(tmp_path)) / "dw.svg", tgn.prove(g))
    assert out.read_text().lstrip().startswith("<?xml")
