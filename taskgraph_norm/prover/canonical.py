"""Read a merge DAG into its canonical expression and the facts the prover needs.

Pure Python over the IR.  Every node gets a canonical expression built only from
what it computes: leaves are named by their chunk bounds (``s[0:64]`` a pairwise
leaf, ``n[0:64]`` a native ``torch.sum`` leaf, ``q[0:64]`` a pre-rounded exact
leaf), ``(a+b)`` is an ordered ADD, ``race{a, b, c}`` an arrival-order
ACCUMULATE (operands sorted: their order means nothing), ``catsum(a, b)`` a
CATSUM.  Node ids never appear, so relabelling a graph never changes its form.

A node may declare ``depends_on=("batch_size", ...)`` (values from
:data:`taskgraph_norm.prover.rules.DEPENDENCIES`): a builder never does, and a hand-made
graph that does is marked ``@batch_size`` in the expression and is never
certified batch-invariant.  Any attribute or operand the reader does not
understand sets :attr:`Reading.problem`: the prover then refuses to certify.

This module is the reader's face; the pieces live in :mod:`.readers` (one node:
its attributes, operand kinds and per-op reader), :mod:`.conclusions`
(:func:`read_graph` and the float / exact / standard conclusions), :mod:`.layer`
(LayerNorm's two reductions; its :func:`~.layer.read_any` is this module's
``read_graph``) and
:mod:`.placement` (whether a distributed graph's bits depend on the world size).
"""

from __future__ import annotations

from .conclusions import Reading as Reading
from .layer import read_any as read_graph
from .placement import ASSUME_COLLECTIVES as ASSUME_COLLECTIVES
from .placement import read_placement as read_placement
from .readers import DEPENDENCIES as DEPENDENCIES
from .readers import PLACEMENTS as PLACEMENTS

__all__ = ["Reading", "read_graph", "read_placement", "DEPENDENCIES", "PLACEMENTS"]
