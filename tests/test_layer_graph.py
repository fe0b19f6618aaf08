"""LayerNorm's graph (topologies.build_layer_graph), its proof and its lowering."""

from __future__ import annotations

import pytest

import taskgraph_norm as tgn
from taskgraph_norm.errors import ConfigError, ExecutionError, GraphError
from taskgraph_norm.graph import Graph, Node, Op, validate
from taskgraph_norm.lowering import lower, lower_certified
from taskgraph_norm.topologies import build_graph, build_layer_graph

CHUNKED = ("linear", "tree", "race", "cat")


def _merges(graph: Graph, prefix: str) -> list[tuple[str, tuple[str, ...]]]:
    """The merge structure of one reduction, ids without the reduction's prefix."""
    return [(n.op.name, tuple(i.removeprefix(prefix) for i in n.inputs)) for n in graph.nodes
            if n.id.startswith(prefix) and n.op in (Op.ADD, Op.ACCUMULATE, Op.CATSUM, Op.MAX)]


@pytest.mark.parametrize("topology", CHUNKED)
@pytest.mark.parametrize("accumulate", ["float", "exact"])
@pytest.mark.parametrize("hidden,chunk", [(256, 64), (200, 64), (100, 300), (7, 2)])
def test_both_dags_have_rmsnorms_shape(topology: str, accumulate: str, hidden: int, chunk: int) -> None:
    g = build_layer_graph(hidden, chunk_size=chunk, topology=topology, accumulate=accumulate)
    rms = build_graph(hidden, chunk_size=chunk, topology=topology, accumulate=accumulate)
    assert g is build_layer_graph(hidden, chunk_size=chunk, topology=topology, accumulate=accumulate)
    assert g.meta["norm"] == "layer" and validate(g) is g
    # RMSNorm's merges over p0.. (and m0.. when exact), with the same operand order.
    want = [(n.op.name, n.inputs) for n in rms.nodes if n.op in (Op.ADD, Op.ACCUMULATE, Op.CATSUM, Op.MAX)]
    strip = [(op, tuple(i.split("tree")[-1].split("fold")[-1].split("max")[-1] for i in ins))
             for op, ins in want]
    for prefix in ("mean.", "var."):
        got = [(op, tuple(i.split("tree")[-1].split("fold")[-1].split("max")[-1] for i in ins))
               for op, ins in _merges(g, prefix)]
        assert got == strip
    sums = [n for n in g.nodes if n.op is Op.SUM]
    squares = [n for n in g.nodes if n.op is Op.SUMSQ]
    bounds = [(n.attrs["start"], n.attrs["stop"]) for n in rms.nodes if n.op is Op.SUMSQ]
    assert [(n.attrs["start"], n.attrs["stop"]) for n in sums] == bounds
    assert [(n.attrs["start"], n.attrs["stop"]) for n in squares] == bounds
    assert all(n.attrs["centered"] is True and n.inputs[:2] == ("x", "mean") for n in squares)
    fin = g[g[g.output].inputs[0]]
    assert fin.op is Op.FINALIZE and fin.attrs["norm"] == "layer" and fin.inputs[2] == "mean"
    if accumulate == "exact":
        maxima = [n for n in g.nodes if n.op is Op.ROWMAX]
        assert {n.attrs.get("power") for n in maxima if n.id.startswith("mean.")} == {1}
        assert all(n.attrs["centered"] and n.inputs == ("x", "mean") for n in maxima if n.id.startswith("var."))


def test_standard_and_checks() -> None:
    g = build_layer_graph(64, topology="standard")
    assert [n.op for n in g.nodes] == [Op.INPUT, Op.LAYERNORM, Op.OUTPUT]
    for bad in (dict(topology="standard", accumulate="exact"), dict(chunk_size=0), dict(leaf="x"),
                dict(residual=1)):
        with pytest.raises(ConfigError):
            build_layer_graph(64, **bad)  # type: ignore[arg-type]
    assert build_layer_graph(64, residual=True)["x"].attrs["residual"] is True


def test_rmsnorm_graphs_are_untouched() -> None:
    # The golden fingerprints (tests/golden) pin these; the LayerNorm ops add nothing to them.
    g = build_graph(256, chunk_size=64, topology="tree")
    assert {n.op for n in g.nodes} == {Op.INPUT, Op.SUMSQ, Op.ADD, Op.FINALIZE, Op.OUTPUT}
    assert all("centered" not in n.attrs and "norm" not in n.attrs for n in g.nodes)
    assert tgn.prove(g).expression == "((s[0:64]+s[64:128])+(s[128:192]+s[192:256]))"
    assert lower(g).norm == "rms"


@pytest.mark.parametrize("leaf", ["pairwise", "native"])
@pytest.mark.parametrize("topology", [*CHUNKED, "standard"])
@pytest.mark.parametrize("accumulate", ["float", "exact"])
def test_verdicts(topology: str, leaf: str, accumulate: str) -> None:
    if topology == "standard" and accumulate == "exact":
        return
    proofs = {c: tgn.prove(build_layer_graph(256, chunk_size=c, topology=topology, leaf=leaf,
                                             accumulate=accumulate)) for c in (64, 128, 256)}
    for chunk, proof in proofs.items():
        if topology == "standard":
            assert proof.deterministic and not proof.batch_invariant and proof.rule == "structure"
        elif accumulate == "exact":
            assert proof.certified and proof.rule == "exact"
        elif topology == "race" and chunk == 64:  # 4 partials
            assert proof.rule == "refuted" and not proof.deterministic and proof.refuted_in == "mean"
            assert "mean's reduction" in proof.explain() and "variance's reduction races too" in proof.explain()
        else:
            assert proof.certified and proof.rule == "structure"
            if leaf == "pairwise" and topology in ("linear", "tree"):
                assert proof.assumptions == ()
    if accumulate == "exact" and topology != "standard":  # one fingerprint for every chunking and topology
        assert len({p.fingerprint for p in proofs.values()}) == 1
        assert proofs[64].fingerprint == tgn.prove(build_layer_graph(256, topology="tree", accumulate="exact")).fingerprint
    # LayerNorm's fingerprints are never RMSNorm's
    if topology != "standard":
        rms = tgn.prove(build_graph(256, chunk_size=64, topology=topology, leaf=leaf, accumulate=accumulate))
        assert rms.fingerprint != proofs[64].fingerprint


def test_the_witness_replays() -> None:
    proof = tgn.prove(build_layer_graph(256, chunk_size=32, topology="race"))
    witness = proof.witness
    assert witness is not None and witness.node == "mean.accumulate" and witness.differs()
    a, b = witness.replay()
    assert not bool((a.view(tgn_int(a)) == b.view(tgn_int(b))).all())
    command = witness.replay_command()
    assert command is not None and "build_layer_graph" in command
    code = command.split('"')[1]
    namespace: dict[str, object] = {}
    exec(code.replace("print(", "_ = ("), namespace)  # noqa: S102 -- the command itself, printed away
    # the variance's race alone (a hand-made graph: the mean merged by a fixed tree) is refuted too
    tree = build_layer_graph(256, chunk_size=32, topology="tree")
    race = build_layer_graph(256, chunk_size=32, topology="race")
    nodes = [n for n in tree.nodes if not n.id.startswith("var.") and n.id not in ("finalize", "y")]
    nodes += [n for n in race.nodes if n.id.startswith("var.") or n.id in ("finalize", "y")]
    mixed = Graph(nodes, "y")
    proof = tgn.prove(mixed)
    assert proof.rule == "refuted" and proof.refuted_in == "variance"
    assert proof.witness is not None and proof.witness.node == "var.accumulate" and proof.witness.differs()


def tgn_int(t: object) -> object:
    import torch

    assert isinstance(t, torch.Tensor)
    return {4: torch.int32, 8: torch.int64, 2: torch.int16}[t.element_size()]


def _edit(graph: Graph, node_id: str, **changes: object) -> Graph:
    return graph.replace_node(graph[node_id].replace(**changes))


def test_the_prover_refuses_what_does_not_fit() -> None:
    g = build_layer_graph(256, chunk_size=64, topology="tree")
    e = build_layer_graph(256, chunk_size=64, topology="tree", accumulate="exact")
    bad = [
        _edit(g, "var.p1", attrs={**g["var.p1"].attrs, "centered": "yes"}),
        _edit(g, "finalize", attrs={**g["finalize"].attrs, "norm": "group"}),
        _edit(g, "finalize", attrs={**g["finalize"].attrs, "offset": 1.0}),
        _edit(g, "mean", attrs={**g["mean"].attrs, "hidden_size": 128}),
        # a merge of a sum of x with a sum of squares
        _edit(g.add_nodes(Node("mix", Op.ADD, ("var.tree2.0", "mean.tree2.0"))), "finalize",
              inputs=("x", "mix", "mean")),
        # the mean's scale sized from squares, not |x|
        _edit(e, "mean.m0", attrs={k: v for k, v in e["mean.m0"].attrs.items() if k != "power"}),
        # the variance's scale from |x|, not (x - mean)^2
        _edit(e, "var.m0", inputs=("x",), attrs={"index": 0, "start": 0, "stop": 64, "power": 1}),
        # mixed domains
        _edit(e, "finalize", attrs={**e["finalize"].attrs, "domain": "float"}),
    ]
    for graph in bad:
        proof = tgn.prove(graph)
        assert proof.rule == "unknown" and not proof.certified, proof.explain()
    # LayerNorm nodes in an RMSNorm graph
    rms = build_graph(256, chunk_size=64, topology="tree")
    extra = Graph([*rms.nodes[:-2], Node("s", Op.SUM, ("x",), {"start": 0, "stop": 4, "leaf": "pairwise"}),
                   Node("m", Op.MEAN, ("s",), {"hidden_size": 256}),
                   rms["finalize"].replace(inputs=("x", "tree2.0", "m")), rms["y"]], "y")
    assert tgn.prove(extra).rule == "unknown"


@pytest.mark.parametrize("topology", CHUNKED)
@pytest.mark.parametrize("accumulate", ["float", "exact"])
@pytest.mark.parametrize("chunk", [64, 100, 256])
def test_lowering(topology: str, accumulate: str, chunk: int) -> None:
    g = build_layer_graph(256, chunk_size=chunk, topology=topology, accumulate=accumulate)
    proof = tgn.prove(g)
    if not proof.certified:
        with pytest.raises(ExecutionError):
            lower_certified(g, proof)
        return
    plan = lower_certified(g, proof)
    rms = lower(build_graph(256, chunk_size=chunk, topology=topology, accumulate=accumulate))
    assert plan.norm == "layer" and plan.fingerprint == proof.fingerprint
    for field in ("hidden_size", "chunk_size", "n_full", "tail", "leaf", "accumulate", "merge", "adds", "root"):
        assert getattr(plan, field) == getattr(rms, field), field
    text = str(plan)
    assert text.startswith("LayerNorm Plan(") and "mean" in text and "y += b.to(acc)" in text


def test_lowering_refuses_two_recipes() -> None:
    tree = build_layer_graph(256, chunk_size=64, topology="tree")
    linear = build_layer_graph(256, chunk_size=64, topology="linear")
    nodes = [n for n in tree.nodes if not n.id.startswith("var.") and n.id not in ("finalize", "y")]
    nodes += [n for n in linear.nodes if n.id.startswith("var.") or n.id in ("finalize", "y")]
    mixed = Graph(nodes, "y")
    assert tgn.prove(mixed).certified
    with pytest.raises(GraphError, match="different recipes"):
        lower(mixed)


def test_viz_draws_both_dags() -> None:
    from taskgraph_norm import viz

    g = build_layer_graph(256, chunk_size=64, topology="race")
    dot = viz.to_dot(g, proof=tgn.prove(g))
    assert '"mean.p0"' in dot and '"var.p0"' in dot and "MEAN" in dot and "(x-mean)^2" in dot
    big = viz.to_dot(build_layer_graph(8192, chunk_size=64, topology="tree", accumulate="exact"))
    assert "mean ADD level 1" in big and "var ADD level 1" in big and "var SUMSQ" in big
    assert "mean" in viz.to_mermaid(g)
