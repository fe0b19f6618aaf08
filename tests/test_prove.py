"""Tests for the prover (taskgraph_norm.prover.rules, .canonical, .witness) and `taskgraph-norm prove`.

Every invariance claim is checked on bits (int views), and each has a negative
control that must find a difference, so a test that cannot fail is caught.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import os
import pathlib
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import redirect_stdout

import pytest
import torch

import taskgraph_norm as tgn
from taskgraph_norm.tools import cli
from taskgraph_norm.kernels.reference import run_reference
from taskgraph_norm.graph import Graph, Node, Op
from taskgraph_norm.prover.rules import _prove_cached
from taskgraph_norm.prover.witness import bits, find_witness, witness_input

ROOT = pathlib.Path(__file__).resolve().parents[1]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def run(graph: Graph, x: torch.Tensor, arrival: dict[str, tuple[int, ...]] | None = None) -> torch.Tensor:
    eps = torch.finfo(torch.float32).eps
    return run_reference(graph, x, None, eps, arrival=arrival)


# --- the verdict table --------------------------------------------------------------------

S, B, R, U = "structure", "exact", "refuted", "unknown"

#: (topology, leaf, accumulate) -> (deterministic, batch_invariant, rule), for D=256 in
#: four chunks of 64.  `standard` ignores the leaf and has no exact variant.
VERDICTS = {
    ("standard", "pairwise", "float"): (True, False, S),
    ("standard", "native", "float"): (True, False, S),
    ("linear", "pairwise", "float"): (True, True, S),
    ("linear", "native", "float"): (True, True, S),
    ("linear", "pairwise", "exact"): (True, True, B),
    ("linear", "native", "exact"): (True, True, B),
    ("tree", "pairwise", "float"): (True, True, S),
    ("tree", "native", "float"): (True, True, S),
    ("tree", "pairwise", "exact"): (True, True, B),
    ("tree", "native", "exact"): (True, True, B),
    ("race", "pairwise", "float"): (False, False, R),
    ("race", "native", "float"): (False, False, R),
    ("race", "pairwise", "exact"): (True, True, B),
    ("race", "native", "exact"): (True, True, B),
    ("cat", "pairwise", "float"): (True, True, S),
    ("cat", "native", "float"): (True, True, S),
    ("cat", "pairwise", "exact"): (True, True, B),
    ("cat", "native", "exact"): (True, True, B),
}


def test_the_table_covers_every_combination() -> None:
    from taskgraph_norm.topologies import ACCUMULATES, LEAVES, TOPOLOGIES

    want = {
        (t, leaf, a) for t in TOPOLOGIES for leaf in LEAVES for a in ACCUMULATES
        if not (t == "standard" and a == "exact")
    }
    assert set(VERDICTS) == want


@pytest.mark.parametrize(("topology", "leaf", "accumulate"), sorted(VERDICTS))
def test_verdict(topology: str, leaf: str, accumulate: str) -> None:
    g = tgn.build_graph(256, chunk_size=64, topology=topology, leaf=leaf, accumulate=accumulate)
    p = tgn.prove(g)
    assert (p.deterministic, p.batch_invariant, p.rule) == VERDICTS[topology, leaf, accumulate]
    assert (p.witness is not None) == (p.rule == R)
    assert re.fullmatch(r"[0-9a-f]{16}", p.fingerprint)


@pytest.mark.parametrize(
    ("topology", "leaf", "needle"),
    [("linear", "pairwise", None), ("tree", "pairwise", None), ("tree", "native", "native leaf"),
     ("cat", "pairwise", "cat topology"), ("standard", "pairwise", "standard topology")],
)
def test_assumptions_are_listed_never_hidden(topology: str, leaf: str, needle: str | None) -> None:
    p = tgn.prove(tgn.build_graph(256, chunk_size=64, topology=topology, leaf=leaf))
    if needle is None:
        assert p.assumptions == ()
    else:
        assert any(needle in a for a in p.assumptions)
        assert needle in p.explain()


def test_standard_is_not_certified_batch_invariant_and_says_why() -> None:
    p = tgn.prove(tgn.build_graph(256, topology="standard"))
    assert p.deterministic and not p.batch_invariant and not p.certified
    assert any("does not promise batch invariance" in r for r in p.why_batch_invariant)


@pytest.mark.parametrize("hidden", [64, 128])  # one and two chunks of 64
def test_race_over_one_or_two_partials_is_certified(hidden: int) -> None:
    g = tgn.build_graph(hidden, chunk_size=64, topology="race")
    p = tgn.prove(g)
    assert (p.deterministic, p.batch_invariant, p.rule, p.witness) == (True, True, S, None)
    # Empirically: both arrival orders agree on every row of a spread input ...
    x = witness_input(0, (512, hidden), "float32")
    n = len(g["accumulate"].inputs)
    assert same_bits(run(g, x), run(g, x, {"accumulate": tuple(reversed(range(n)))}))
    # ... while with three partials the same harness finds a difference (negative control).
    g3 = tgn.build_graph(192, chunk_size=64, topology="race")
    x3 = witness_input(0, (512, 192), "float32")
    assert not same_bits(run(g3, x3), run(g3, x3, {"accumulate": (2, 1, 0)}))


# --- expressions and fingerprints --------------------------------------------------------


def test_expressions_name_leaves_by_chunk_bounds() -> None:
    assert tgn.prove(tgn.build_graph(256, chunk_size=64, topology="tree")).expression == (
        "((s[0:64]+s[64:128])+(s[128:192]+s[192:256]))"
    )
    assert tgn.prove(tgn.build_graph(200, chunk_size=64, topology="linear", leaf="native")).expression == (
        "(((n[0:64]+n[64:128])+n[128:192])+n[192:200])"
    )
    assert tgn.prove(tgn.build_graph(160, chunk_size=64, topology="tree")).expression == (
        "((s[0:64]+s[64:128])+s[128:160])"  # the odd element is carried up unchanged
    )
    assert tgn.prove(tgn.build_graph(192, chunk_size=64, topology="cat")).expression == (
        "catsum(s[0:64], s[64:128], s[128:192])"
    )
    assert tgn.prove(tgn.build_graph(192, chunk_size=64, topology="race")).expression == (
        "race{s[0:64], s[64:128], s[128:192]}"
    )
    assert tgn.prove(tgn.build_graph(192, topology="race", accumulate="exact")).expression == (
        "exact_sum(x[0:192])"
    )


#: Pinned, so that a change of the canonical form is a conscious decision.
PINNED_TREE_256_64 = tgn.prove(tgn.build_graph(256, chunk_size=64, topology="tree")).fingerprint

CONFIGS = [
    (256, 64, "tree", "pairwise", "float"),
    (256, 64, "linear", "pairwise", "float"),
    (4096, 64, "race", "native", "float"),
    (256, 32, "cat", "pairwise", "exact"),
    (100, 7, "standard", "pairwise", "float"),
]


def test_fingerprints_are_stable_across_processes() -> None:
    code = (
        "import taskgraph_norm as tgn\n"
        f"for d, c, t, l, a in {CONFIGS!r}:\n"
        "    g = tgn.build_graph(d, chunk_size=c, topology=t, leaf=l, accumulate=a)\n"
        "    print(tgn.prove(g).fingerprint)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True, timeout=120).stdout.split()
    here = [tgn.prove(tgn.build_graph(d, chunk_size=c, topology=t, leaf=l, accumulate=a)).fingerprint
            for d, c, t, l, a in CONFIGS]
    assert out == here
    assert len(set(here)) == len(here)
    assert here[0] == PINNED_TREE_256_64


def test_fingerprints_differ_between_linear_and_tree() -> None:
    def fp(topology: str, hidden: int) -> str:
        return tgn.prove(tgn.build_graph(hidden, chunk_size=64, topology=topology)).fingerprint

    assert fp("linear", 256) != fp("tree", 256)
    assert fp("linear", 4096) != fp("tree", 4096)
    # With two chunks both are the single expression (s0+s1): the same computation.
    assert fp("linear", 128) == fp("tree", 128)


def test_exact_fingerprint_is_one_per_hidden_size() -> None:
    fps = {
        tgn.prove(tgn.build_graph(256, chunk_size=c, topology=t, leaf=leaf, accumulate="exact")).fingerprint
        for t in ("linear", "tree", "race", "cat") for c in (1, 16, 64, 100, 256)
        for leaf in ("pairwise", "native")
    }
    assert len(fps) == 1
    other = tgn.prove(tgn.build_graph(255, chunk_size=64, accumulate="exact")).fingerprint
    assert other not in fps  # negative control: another row length is another sum
    assert tgn.prove(tgn.build_graph(256, chunk_size=64)).fingerprint not in fps


def _relabelled(g: Graph) -> Graph:
    """Ids replaced by opaque names in reverse order, nodes listed in reverse."""
    ids = [n.id for n in g.nodes]
    mapping = {old: f"v{len(ids) - k}" for k, old in enumerate(ids)}
    renamed = g.relabel(mapping)
    return Graph(tuple(reversed(renamed.nodes)), renamed.output, renamed.meta)


@pytest.mark.parametrize(
    ("topology", "accumulate"),
    [("standard", "float")] + [(t, a) for t in ("linear", "tree", "race", "cat")
                               for a in ("float", "exact")],
)
def test_relabelled_graphs_prove_the_same(topology: str, accumulate: str) -> None:
    g = tgn.build_graph(320, chunk_size=64, topology=topology, accumulate=accumulate)
    p, q = tgn.prove(g), tgn.prove(_relabelled(g))
    assert (p.deterministic, p.batch_invariant, p.rule, p.expression, p.fingerprint) == (
        q.deterministic, q.batch_invariant, q.rule, q.expression, q.fingerprint)


def test_relabelling_negative_control() -> None:
    g = _relabelled(tgn.build_graph(320, chunk_size=64, topology="tree"))
    add = next(n for n in g.nodes if n.op is Op.ADD)
    swapped = g.replace_node(add.replace(inputs=add.inputs[::-1]))
    assert tgn.prove(swapped).fingerprint != tgn.prove(g).fingerprint


# --- witnesses ----------------------------------------------------------------------------


@pytest.mark.parametrize("chunks", [3, 8, 64])
def test_witness_replays_to_differing_bits(chunks: int) -> None:
    g = tgn.build_graph(chunks * 16, chunk_size=16, topology="race")
    p = tgn.prove(g)
    assert p.rule == R and not p.deterministic
    w = p.witness
    assert w is not None and w.node == "accumulate" and w.observed == "output"
    assert sorted(w.orders[0]) == sorted(w.orders[1]) == list(range(chunks))
    a, b = w.replay()
    assert not same_bits(a, b)
    assert same_bits(a, w.outputs[0]) and same_bits(b, w.outputs[1])
    # The replay is the reference executor on the regenerated input, nothing else.
    x = w.input()
    assert same_bits(run(g, x, {"accumulate": w.orders[1]}), b)
    assert "bits differ" in w.describe()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize(("hidden", "chunk"), [(3, 1), (192, 64), (4096, 64)])
def test_witness_search_succeeds_in_low_precision(dtype: str, hidden: int, chunk: int) -> None:
    g = tgn.build_graph(hidden, chunk_size=chunk, topology="race")
    w = find_witness(g, "accumulate", dtype=dtype)
    assert w is not None and w.input().dtype == getattr(torch, dtype)
    a, b = w.replay()
    assert not same_bits(a, b)


@pytest.fixture
def witness_searches(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The node of every witness search from now on (a spy on ``find_witness``)."""
    from taskgraph_norm.prover import witness as witness_module

    searched: list[str] = []
    real = witness_module.find_witness

    def spy(graph: Graph, node: str, **kwargs: object) -> object:
        searched.append(node)
        return real(graph, node, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(witness_module, "find_witness", spy)
    _prove_cached.cache_clear()  # no proof made before the spy
    yield searched
    _prove_cached.cache_clear()  # nor one made with it, for later tests


def test_prove_does_not_search_for_a_witness_until_it_is_read(witness_searches: list[str]) -> None:
    g = tgn.build_graph(192, chunk_size=64, topology="race")  # a float race over 3 chunks
    p = tgn.prove(g)
    assert (p.deterministic, p.batch_invariant, p.rule) == (False, False, R)
    # Nothing but reading the witness searches: not the verdict, repr, hash or equality.
    assert p.summary == "refuted (witness)" and "Proof(" in repr(p)
    assert hash(p) == hash(tgn.prove(g)) and p == tgn.prove(g)
    assert witness_searches == []
    w = p.witness
    assert witness_searches == ["accumulate"]
    assert w is not None and p.witness is w and witness_searches == ["accumulate"]  # kept
    a, b = w.replay()
    assert not same_bits(a, b)
    assert same_bits(a, w.outputs[0]) and same_bits(b, w.outputs[1])


def test_explain_searches_for_the_witness(witness_searches: list[str]) -> None:
    p = tgn.prove(tgn.build_graph(192, chunk_size=64, topology="race"))
    assert witness_searches == []
    text = p.explain()
    assert witness_searches == ["accumulate"] and "witness:" in text and "replay:" in text
    # Negative control: a certified proof has no witness to search for.
    tgn.prove(tgn.build_graph(192, chunk_size=64, topology="tree")).explain()
    assert witness_searches == ["accumulate"]


def test_a_race_of_equal_operands_has_no_witness_and_is_not_certified(
    witness_searches: list[str],
) -> None:
    # Every arrival order adds the same values in the same order: no input tells two
    # orders apart, so the search would fail; the prover refuses without running it.
    linear = tgn.build_graph(256, chunk_size=64, topology="linear")
    same = linear.remove_nodes("fold1", "p1", "p2").replace_node(
        Node("fold2", Op.ACCUMULATE, ("p0", "p0", "p0")))
    p = tgn.prove(same)
    assert (p.deterministic, p.rule, p.witness) == (False, U, None)
    assert witness_searches == []
    # Negative control: three different operands are refuted, with a witness.
    different = linear.remove_nodes("fold1").replace_node(
        Node("fold2", Op.ACCUMULATE, ("p0", "p1", "p2")))
    assert tgn.prove(different).rule == R and tgn.prove(different).witness is not None
    assert witness_searches == ["fold2"]


def test_prove_searches_the_witness_in_the_dtype_asked_for() -> None:
    g = tgn.build_graph(256, chunk_size=64, topology="race")
    w = tgn.prove(g, witness_dtype="bfloat16").witness
    assert w is not None and w.dtype == "bfloat16" and w.differs()
    with pytest.raises(tgn.ConfigError):
        tgn.prove(g, witness_dtype="int8")


def test_exact_race_gives_the_same_bits_in_every_order_and_float_race_does_not() -> None:
    x = witness_input(3, (256, 192), "float32")
    exact = tgn.build_graph(192, chunk_size=64, topology="race", accumulate="exact")
    orders = [(0, 1, 2), (2, 1, 0), (1, 2, 0)]
    ys = [run(exact, x, {"accumulate": o}) for o in orders]
    assert all(same_bits(ys[0], y) for y in ys[1:])
    assert same_bits(ys[0], run(tgn.build_graph(192, chunk_size=16, topology="tree",
                                                accumulate="exact"), x))
    floating = tgn.build_graph(192, chunk_size=64, topology="race")  # negative control
    assert not same_bits(run(floating, x, {"accumulate": orders[0]}),
                         run(floating, x, {"accumulate": orders[1]}))


# --- batch invariance ---------------------------------------------------------------------


def test_certified_graph_is_batch_invariant_and_batch_dependent_chunking_is_not() -> None:
    g = tgn.build_graph(320, chunk_size=64, topology="tree")
    p = tgn.prove(g)
    assert p.batch_invariant
    for op in ("INPUT", "SUMSQ", "ADD", "FINALIZE"):
        assert any(line.startswith(op) for line in p.why_batch_invariant)
    assert "thread count and row tiling" in " ".join(p.why_batch_invariant)
    x = witness_input(7, (64, 320), "float32")
    full = run(g, x)
    for row in (0, 17, 63):
        assert same_bits(run(g, x[row : row + 1]), full[row : row + 1])
        assert same_bits(run(g, x[: row + 1]), full[: row + 1])

    # Negative control: a chunking chosen from the batch size changes some row's bits...
    def chunking(batch: int) -> int:
        return 64 if batch == 1 else 32

    by_batch = tgn.build_graph(320, chunk_size=chunking(64), topology="linear")
    alone = torch.cat([run(tgn.build_graph(320, chunk_size=chunking(1), topology="linear"),
                           x[r : r + 1]) for r in range(64)])
    assert not same_bits(run(by_batch, x), alone)
    # ... and a graph that declares such a dependence is never certified.
    marked = _mark_leaves(by_batch, ("batch_size",))
    q = tgn.prove(marked)
    assert q.deterministic and not q.batch_invariant
    assert any("batch size" in r for r in q.why_batch_invariant)


def _mark_leaves(g: Graph, deps: tuple[str, ...]) -> Graph:
    for n in g.nodes:
        if n.op is Op.SUMSQ:
            g = g.replace_node(n.replace(attrs={**n.attrs, "depends_on": deps}))
    return g


@pytest.mark.parametrize(
    ("topology", "leaf", "accumulate"),
    [("linear", "pairwise", "float"), ("tree", "native", "float"), ("cat", "native", "float"),
     ("race", "pairwise", "exact")],
)
def test_certified_graphs_keep_a_rows_bits_in_any_batch(topology: str, leaf: str, accumulate: str) -> None:
    # Native leaves and CATSUM are certified under an assumption about torch.sum's
    # order; this checks the assumption holds on the backend the tests run on.
    g = tgn.build_graph(1024, chunk_size=64, topology=topology, leaf=leaf, accumulate=accumulate)
    assert tgn.prove(g).certified
    x = witness_input(11, (48, 1024), "float32")
    full = run(g, x)
    for row in (0, 31, 47):
        assert same_bits(run(g, x[row : row + 1]), full[row : row + 1])
        assert same_bits(run(g, x[row:]), full[row:])


# --- mutations ----------------------------------------------------------------------------


@pytest.fixture
def tree4() -> Graph:
    return tgn.build_graph(256, chunk_size=64, topology="tree")


def test_mutation_swapped_operands(tree4: Graph) -> None:
    add = tree4["tree1.0"]
    mutant = tree4.replace_node(add.replace(inputs=(add.inputs[1], add.inputs[0])))
    p = tgn.prove(mutant)
    assert p.fingerprint != tgn.prove(tree4).fingerprint
    assert p.expression == "((s[64:128]+s[0:64])+(s[128:192]+s[192:256]))"


def test_mutation_add_replaced_by_a_two_way_race(tree4: Graph) -> None:
    add = tree4["tree1.0"]
    mutant = tree4.replace_node(Node(add.id, Op.ACCUMULATE, add.inputs))
    p = tgn.prove(mutant)
    # One addition commutes exactly: still certified, but visibly a different graph.
    assert p.deterministic and p.rule == S
    assert p.fingerprint != tgn.prove(tree4).fingerprint
    assert "race{s[0:64], s[64:128]}" in p.expression


def test_mutation_add_replaced_by_a_three_way_race() -> None:
    linear = tgn.build_graph(256, chunk_size=64, topology="linear")
    mutant = linear.remove_nodes("fold1").replace_node(
        Node("fold2", Op.ACCUMULATE, ("p0", "p1", "p2")))
    p = tgn.prove(mutant)
    assert (p.deterministic, p.rule) == (False, R)
    assert p.witness is not None and p.witness.node == "fold2"
    a, b = p.witness.replay()
    assert not same_bits(a, b)
    assert p.witness.replay_command() is None  # not a builder graph: replay from Python


def test_mutation_extra_leaf(tree4: Graph) -> None:
    extra = Node("extra", Op.SUMSQ, ("x",),
                 {"start": 0, "stop": 64, "leaf": "pairwise", "index": 4, "domain": "float"})
    root = Node("tree3.0", Op.ADD, ("tree2.0", "extra"))
    mutant = tree4.add_nodes(extra, root).replace_node(
        tree4["finalize"].replace(inputs=("x", "tree3.0")))
    p = tgn.prove(mutant)
    assert p.fingerprint != tgn.prove(tree4).fingerprint
    assert any("do not cover x[0:256] exactly once" in r for r in p.why_deterministic)


def test_mutation_batch_dependent_chunking(tree4: Graph) -> None:
    for dep in ("batch_size", "thread_count", "row_tiling"):
        p = tgn.prove(_mark_leaves(tree4, (dep,)))
        assert p.deterministic and not p.batch_invariant and p.rule == S
        assert f"@{dep}" in p.expression
        assert p.fingerprint != tgn.prove(tree4).fingerprint
    marked_finalize = tree4.replace_node(
        tree4["finalize"].replace(attrs={**tree4["finalize"].attrs, "depends_on": ("batch_size",)}))
    p = tgn.prove(marked_finalize)
    assert not p.batch_invariant and p.fingerprint != tgn.prove(tree4).fingerprint


def test_mutations_of_an_exact_graph() -> None:
    g = tgn.build_graph(256, chunk_size=64, topology="tree", accumulate="exact")
    base = tgn.prove(g)
    add = g["tree1.0"]
    # Swapping operands changes no bit in the exact domain, and the form says so.
    swapped = tgn.prove(g.replace_node(add.replace(inputs=add.inputs[::-1])))
    assert swapped.fingerprint == base.fingerprint and swapped.rule == B
    # A max that misses a chunk leaves the grid too fine: the prover refuses.
    short_max = g.replace_node(g["max2.0"].replace(op=Op.MAX, inputs=("max1.0", "max1.0")))
    short_max = short_max.remove_nodes("max1.1", "m2", "m3")
    p = tgn.prove(short_max)
    assert (p.deterministic, p.rule) == (False, U)
    # A batch-dependent exact graph is still refused batch invariance.
    assert not tgn.prove(_mark_leaves(g, ("batch_size",))).batch_invariant


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda g: g.replace_node(g["p0"].replace(attrs={**g["p0"].attrs, "tile": 8})),
                     id="unknown-attr"),
        pytest.param(lambda g: g.replace_node(g["p0"].replace(attrs={**g["p0"].attrs, "leaf": "fancy"})),
                     id="unknown-leaf"),
        pytest.param(lambda g: g.add_nodes(Node("bad", Op.ADD, ("tree1.0", "x"))).replace_node(
            g["tree2.0"].replace(inputs=("bad", "tree1.1"))), id="add-over-input"),
        pytest.param(lambda g: g.replace_node(
            g["p0"].replace(attrs={**g["p0"].attrs, "depends_on": ("moon_phase",)})),
                     id="unknown-dependence"),
        pytest.param(lambda g: g.replace_node(g["p0"].replace(attrs={**g["p0"].attrs, "domain": "exact"})),
                     id="mixed-domains"),
    ],
)
def test_what_the_prover_cannot_read_is_never_certified(tree4: Graph, edit: object) -> None:
    p = tgn.prove(edit(tree4))  # type: ignore[operator]
    assert (p.deterministic, p.batch_invariant, p.rule) == (False, False, U)
    assert "refused to certify" in p.explain()


def test_an_op_the_prover_does_not_know_is_never_certified(monkeypatch: pytest.MonkeyPatch) -> None:
    from taskgraph_norm.prover import readers

    g = tgn.build_graph(256, chunk_size=64, topology="cat")
    assert tgn.prove(g).certified  # negative control: known, it is certified
    known = {op: a for op, a in readers._KNOWN_ATTRS.items() if op is not Op.CATSUM}
    monkeypatch.setattr(readers, "_KNOWN_ATTRS", known)
    _prove_cached.cache_clear()
    p = tgn.prove(g)
    assert (p.deterministic, p.rule) == (False, U) and "does not understand" in p.explain()
    _prove_cached.cache_clear()


def test_witness_recipe_is_checked() -> None:
    g = tgn.build_graph(192, chunk_size=64, topology="race")
    recipe = dict(node="accumulate", seed=0, shape=(4, 192), dtype="float32", orders=((0, 1, 2), (2, 1, 0)))
    with pytest.raises(tgn.ConfigError):
        tgn.Witness.rebuild(g, row=4, **recipe)  # type: ignore[arg-type]
    with pytest.raises(tgn.ConfigError):
        tgn.Witness.rebuild(g, row=None, **{**recipe, "dtype": "int32"})  # type: ignore[arg-type]
    with pytest.raises(tgn.GraphError):
        tgn.Witness.rebuild(g, row=None, **{**recipe, "node": "finalize"})  # type: ignore[arg-type]


def test_invalid_graphs_raise() -> None:
    g = tgn.build_graph(256, chunk_size=64, topology="linear")
    cyclic = g.replace_node(g["fold1"].replace(inputs=("fold3", "p1")))
    with pytest.raises(tgn.CycleError):
        tgn.prove(cyclic)


# --- the Proof value, caching, layering -------------------------------------------------


def test_proof_is_frozen_cached_and_explains_itself() -> None:
    g = tgn.build_graph(256, chunk_size=64, topology="tree")
    p = tgn.prove(g)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.rule = "exact"  # type: ignore[misc]
    assert tgn.prove(g) is p
    text = str(p)
    assert text.startswith("CERTIFIED") and "why deterministic" in text and p.expression in text


def test_public_names() -> None:
    for name in ("prove", "Proof", "Witness"):
        assert name in tgn.__all__
    assert callable(tgn.prove) and not isinstance(tgn.prove, type(sys))  # not the module


@pytest.mark.parametrize(
    ("topology", "accumulate", "summary"),
    [("tree", "float", "certified (structure)"), ("race", "exact", "certified (exact)"),
     ("race", "float", "refuted (witness)"), ("standard", "float", "deterministic only (structure)")],
)
def test_summary_for_a_table_cell(topology: str, accumulate: str, summary: str) -> None:
    g = tgn.build_graph(256, chunk_size=64, topology=topology, accumulate=accumulate)
    assert tgn.prove(g).summary == summary


def test_prove_is_cheap_for_64_chunks() -> None:
    g = tgn.build_graph(4096, chunk_size=64, topology="race")
    _prove_cached.cache_clear()
    start = time.perf_counter()
    tgn.prove(g)
    assert time.perf_counter() - start < 1.0  # about 0.05 s here; 0.5 s is the target


def test_the_prover_imports_torch_only_lazily() -> None:
    for name in ("rules.py", "canonical.py", "readers.py", "conclusions.py", "placement.py", "witness.py"):
        tree = ast.parse((ROOT / "taskgraph_norm" / "prover" / name).read_text())
        for stmt in tree.body:
            if isinstance(stmt, ast.Import):
                assert not any(a.name.startswith("torch") for a in stmt.names), name
            if isinstance(stmt, ast.ImportFrom):
                mod = stmt.module or ""
                assert not mod.startswith(("torch", "kernels", "executors")), (name, mod)


# --- command line ------------------------------------------------------------------------


def _cli(*argv: str) -> tuple[int, str]:
    buf = io.StringIO()
    with redirect_stdout(buf):
        code = cli.main(["prove", *argv])
    return code, buf.getvalue()


def test_cli_certified_exit_0_and_shortened_expression() -> None:
    code, out = _cli("--topology", "tree", "--hidden-size", "4096", "--chunk-size", "64")
    assert code == 0 and "CERTIFIED" in out and "rule: structure" in out and "chars>" in out
    code, full = _cli("--topology", "tree", "--hidden-size", "4096", "--chunk-size", "64", "--full")
    expression = tgn.prove(tgn.build_graph(4096, chunk_size=64, topology="tree")).expression
    assert code == 0 and f"expression: {expression}\n" in full


def test_cli_refuted_exit_1_with_a_replay_command_that_works() -> None:
    code, out = _cli("--topology", "race", "--hidden-size", "192", "--chunk-size", "64",
                     "--leaf", "native", "--accumulate", "float")
    assert code == 1 and "REFUTED" in out
    command = next(line for line in out.splitlines() if line.startswith("replay: "))
    match = re.fullmatch(r'replay: python -c "(.*)"', command)
    assert match is not None
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", match.group(1)], capture_output=True,
                            text=True, env=env, check=True, timeout=120)
    assert "bits differ" in result.stdout and "reproduces the stored outputs: yes" in result.stdout


def test_cli_exact_race_and_standard() -> None:
    assert _cli("--topology", "race", "--hidden-size", "256", "--accumulate", "exact")[0] == 0
    code, out = _cli("--topology", "standard", "--hidden-size", "256")
    assert code == 1 and "NOT certified batch-invariant" in out


def test_docs_examples_run() -> None:
    text = (ROOT / "docs" / "prover.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 2
    for block in blocks:
        with redirect_stdout(io.StringIO()):
            exec(compile(block, "docs/prover.md", "exec"), {})
