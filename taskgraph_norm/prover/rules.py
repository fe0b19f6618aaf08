"""The prover: read a merge DAG and certify, or refute, determinism and batch invariance.

:func:`prove` reads only the IR.  It walks the graph once, gives every node a
canonical expression built from what the node computes (chunk bounds, leaf
kind, operand order), never from node ids, and checks one of three rules:

``structure``  every merge has a fixed order (ordered ``ADD``, an ``ACCUMULATE``
               over at most two partials, an op whose inside order is the
               backend's, listed as an assumption) => every valid schedule
               evaluates one expression => deterministic.
``exact``      every summand is pre-rounded onto one fixed-point grid (docs/exact.md)
               => every addition is exact => any order, topology and
               chunking give the same bits.
``refuted``    an ``ACCUMULATE`` adds three or more inexact partials in arrival
               order; a :class:`~taskgraph_norm.prover.witness.Witness` shows two orders
               giving different bits.  It is searched for when ``proof.witness`` is
               first read (``explain()`` and the CLI read it), never by :func:`prove`.

A fourth answer, ``unknown``, is the prover refusing to certify what it cannot
read (an unknown attribute, an operand of the wrong kind, inconsistent domains).
Batch invariance is certified when the graph is deterministic, every op is
row-local, and no node declares a dependence on the batch size, the thread
count, the row tiling or the device (attribute ``depends_on``).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import replace
from typing import Any

from .backward import is_weight_grad_graph, read_weight_grad
from .canonical import ASSUME_COLLECTIVES, DEPENDENCIES, Reading, read_graph, read_placement
from .. import caches
from ..graph import Graph, gc_paused, validate
from .grouping import GroupingSearch, regrouped
from .proof import Proof, WitnessSearch

__all__ = ["Proof", "prove", "RULES", "DEPENDENCIES", "FINGERPRINT_VERSION"]

#: The rules a proof can rest on.  ``unknown``: the prover refused to certify.
RULES: tuple[str, ...] = ("structure", "exact", "refuted", "unknown")

#: Bumped whenever the canonical form changes, so old fingerprints never collide.
FINGERPRINT_VERSION = "tgn-proof-1"


def prove(graph: Graph, *, witness_dtype: str = "float32") -> Proof:
    """Certify or refute that ``graph`` gives the same bits every time, in every batch.

    The graph is validated first.  Near-linear in the node count (a million
    leaves in seconds), and cached per graph (and its ``meta``), so calling this
    for every report row is cheap.  A refutation does not search for its witness:
    reading ``proof.witness`` does, once (well under a second for 64 chunks).

    Parameters
    ----------
    graph:
        Any merge DAG; builder-made or edited by hand.
    witness_dtype:
        Input dtype of the counterexample a refutation searches for when asked:
        ``"float32"`` (default), ``"float64"``, ``"float16"`` or ``"bfloat16"``.

    Returns
    -------
    Proof
        frozen; ``str(proof)`` explains it.

    Raises
    ------
    GraphError, CycleError
        if the graph breaks a structural rule (see :func:`validate`).
    ConfigError
        for an unknown ``witness_dtype``.

    Examples
    --------
    >>> import taskgraph_norm as tgn
    >>> p = tgn.prove(tgn.build_graph(256, chunk_size=64, topology="tree"))
    >>> p.deterministic, p.batch_invariant, p.rule
    (True, True, 'structure')
    >>> p.expression
    '((s[0:64]+s[64:128])+(s[128:192]+s[192:256]))'
    """
    from .witness import WITNESS_DTYPES

    if witness_dtype not in WITNESS_DTYPES:
        from ..errors import ConfigError

        raise ConfigError("witness_dtype", witness_dtype, "one of " + ", ".join(WITNESS_DTYPES))
    validate(graph)
    if is_weight_grad_graph(graph):
        return _prove_weight_grad(graph)
    return _prove_cached(graph, tuple(graph.meta.items()), witness_dtype)


@functools.lru_cache(maxsize=256)
def _prove_cached(graph: Graph, meta: tuple[tuple[str, Any], ...], witness_dtype: str) -> Proof:
    with gc_paused():
        reading = read_graph(graph)
        proof = _prove_structure(graph, reading, witness_dtype)
        invariant, why = read_placement(graph, reading, proof.rule)
    if invariant is None:
        return proof
    return Proof(
        deterministic=proof.deterministic, batch_invariant=proof.batch_invariant,
        rule=proof.rule, expression=proof.expression, fingerprint=proof.fingerprint,
        assumptions=proof.assumptions + (ASSUME_COLLECTIVES,),
        why_deterministic=proof.why_deterministic,
        why_batch_invariant=proof.why_batch_invariant,
        world_size_invariant=invariant, why_world_size_invariant=why,
        _witness=proof._witness,
    )


def _prove_structure(graph: Graph, reading: Reading, witness_dtype: str) -> Proof:
    if reading.problem is not None:
        return _unknown(reading.expression, reading.problem)
    fingerprint = _fingerprint(reading.canonical)
    if reading.races:
        return _refute(graph, reading, fingerprint, witness_dtype)
    batch_invariant = not reading.batch_blockers
    return Proof(
        deterministic=True,
        batch_invariant=batch_invariant,
        rule="exact" if reading.exact else "structure",
        expression=reading.expression,
        fingerprint=fingerprint,
        assumptions=reading.assumptions,
        why_deterministic=reading.why_deterministic,
        why_batch_invariant=reading.batch_blockers if reading.batch_blockers
        else reading.row_local + (_DX_LINE,),
    )


#: What the forward's proof says about the backward's dx (its row sum runs through
#: the same merge DAG: topologies.build_input_grad_graph).
_DX_LINE = ("backward: dx's row sum s = sum(dy * w * x) is reduced through this same merge "
            "DAG (kernels.input_grad; the rest of dx is elementwise), so this argument "
            "certifies dx too")


@functools.lru_cache(maxsize=64)
def _prove_weight_grad(graph: Graph) -> Proof:
    reading = read_weight_grad(graph)
    if reading.problem is not None:
        return replace(_unknown(reading.expression, reading.problem), micro_batch_invariant=False)
    deterministic = not reading.races
    search = None
    if reading.races:  # a float all-reduce over 3+ ranks: two arrival orders
        node, count = reading.races[0]
        search = GroupingSearch(graph, (graph,), ({}, {node: tuple(range(count))[::-1]}))
    elif not reading.invariant and {"rows", "weight_grad", "row_block"} <= set(graph.meta):
        search = GroupingSearch(graph, regrouped(graph))
    why_det = reading.why_deterministic if deterministic else (
        f"ACCUMULATE {reading.races[0][0]!r} adds {reading.races[0][1]} float partials in "
        "arrival order (the collective's), which the graph does not fix",)
    return Proof(
        deterministic=deterministic, batch_invariant=deterministic and reading.invariant,
        rule="exact" if reading.exact else "structure" if deterministic else "refuted",
        expression=reading.expression, fingerprint=_fingerprint(reading.canonical),
        assumptions=reading.assumptions, why_deterministic=why_det,
        why_batch_invariant=reading.why_invariant,
        world_size_invariant=deterministic and reading.invariant,
        why_world_size_invariant=reading.why_invariant,
        micro_batch_invariant=deterministic and reading.invariant, _grouping=search,
    )


def _refute(graph: Graph, reading: Reading, fingerprint: str, witness_dtype: str) -> Proof:
    node_id, count = reading.races[0]
    where = reading.race_in[0] if reading.race_in else ""
    why: tuple[str, ...] = (
        f"ACCUMULATE {_node_expr(reading, node_id)} adds {count} inexact partials in arrival "
        "order" + (f", in the {where}'s reduction" if where else "") + "; float addition is not "
        "associative, so different arrival orders round differently",
    ) + tuple(f"the {other}'s reduction races too (ACCUMULATE {_node_expr(reading, node)})"
              for (node, _), other in zip(reading.races[1:], reading.race_in[1:]))
    if _same_operands(graph, reading, node_id):
        # Every arrival order adds the same values in the same sequence: no input can
        # tell two orders apart, so there is no witness to search for.
        why += ("no counterexample exists among arrival orders of equal operands, but the "
                "structure does not fix one order, so determinism is not certified",)
        search = None
    else:
        why += ("a counterexample (an input and two arrival orders whose bits differ) is "
                "searched for when proof.witness is first read; explain() shows it",)
        search = WitnessSearch(graph, node_id, witness_dtype)
    return Proof(
        deterministic=False,
        batch_invariant=False,
        rule="refuted" if search is not None else "unknown",
        expression=reading.expression,
        fingerprint=fingerprint,
        assumptions=reading.assumptions,
        why_deterministic=why,
        why_batch_invariant=("a graph that is not deterministic cannot be batch-invariant",),
        refuted_in=where,
        _witness=search,
    )


def _same_operands(graph: Graph, reading: Reading, node_id: str) -> bool:
    first, *rest = graph.by_id[node_id].inputs
    exprs = reading.node_expressions
    text = exprs[first]
    return all(i == first or exprs[i] == text for i in rest)


def _unknown(expression: str, problem: str) -> Proof:
    return Proof(
        deterministic=False,
        batch_invariant=False,
        rule="unknown",
        expression=expression,
        fingerprint=_fingerprint("unknown\n" + expression + "\n" + problem),
        why_deterministic=(f"refused to certify: {problem}",),
        why_batch_invariant=("refused to certify (see above)",),
    )


def _fingerprint(canonical: str) -> str:
    digest = hashlib.sha256(f"{FINGERPRINT_VERSION}\n{canonical}".encode()).hexdigest()
    return digest[:16]


def _node_expr(reading: Reading, node_id: str) -> str:
    text: str = reading.node_expressions.get(node_id, node_id)
    return text if len(text) <= 60 else text[:28] + "..." + text[-28:]


caches.register(_prove_cached.cache_clear)
caches.register(_prove_weight_grad.cache_clear)
