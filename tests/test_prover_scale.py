"""Build, prove and lower stay near-linear in the node count (docs/design.md, "The pipeline").

One leaf per element of D = 65,536 is 65k to 262k nodes: linear work takes a
second or two here, the quadratic steps this guards against took minutes (a
left fold's expression rebuilt at every ADD, the lowering's levels scanned once
per level, a list membership test per user of the input).  The bound is loose
on purpose: it catches a return to superlinear, not a slow machine.
``benchmarks/prover_scale.py`` prints the figures.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

import taskgraph_norm as tgn
from taskgraph_norm.errors import GraphError
from taskgraph_norm.lowering.lower import _lower_cached, lower
from taskgraph_norm.prover.rules import _prove_cached
from taskgraph_norm.topologies import _build_cached

from .conftest import FULL

D = 1 << 16

#: Seconds for build + prove + lower of one configuration; linear takes 0.5 to 3.
BOUND = 20.0

CONFIGS = [(t, "float") for t in ("linear", "tree", "race", "cat", "standard")] + [
    (t, "exact") for t in (("linear", "tree", "race", "cat") if FULL else ("linear",))
]


@pytest.fixture(autouse=True)
def _drop_big_graphs() -> Iterator[None]:
    yield
    # A graph of D = 65,536 leaves and its proof hold ~100 MB: do not keep them cached.
    for cache in (_build_cached, _prove_cached, _lower_cached):
        cache.cache_clear()


@pytest.mark.slow
@pytest.mark.parametrize(("topology", "accumulate"), CONFIGS)
def test_a_leaf_per_element_builds_proves_and_lowers_in_seconds(
    topology: str, accumulate: str
) -> None:
    t0 = time.perf_counter()
    graph = tgn.build_graph(D, chunk_size=1, topology=topology, accumulate=accumulate)
    proof = tgn.prove(graph)
    if proof.certified:
        plan = lower(graph, proof.fingerprint)
        assert plan.n_chunks == D
    elapsed = time.perf_counter() - t0
    assert elapsed < BOUND, f"{topology}/{accumulate}: {elapsed:.1f} s for {len(graph)} nodes"
    # The work was all done: every leaf was read into the expression.
    if accumulate == "float" and topology != "standard":
        assert proof.expression.count("s[") == D
    want = "exact" if accumulate == "exact" else "refuted" if topology == "race" else "structure"
    assert proof.rule == want


def test_a_refuted_proof_of_many_chunks_is_quick() -> None:
    # The witness search runs only when asked: proving a 4096-chunk race is a read.
    graph = tgn.build_graph(4096, chunk_size=1, topology="race")
    t0 = time.perf_counter()
    proof = tgn.prove(graph)
    assert proof.rule == "refuted" and time.perf_counter() - t0 < 5.0
    with pytest.raises(GraphError):
        lower(graph, proof.fingerprint)  # negative control: a refuted race never lowers
