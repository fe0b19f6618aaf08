"""The prover's answer: :class:`Proof`, what :func:`~taskgraph_norm.prover.rules.prove`
returns (the rule it rests on, the canonical expression and fingerprint, the reasons),
and the witness search a refutation runs once, when its witness is first read.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from typing import Any

from ..graph import Graph
from .grouping import GroupingSearch, GroupingWitness
from .witness import Witness

__all__ = ["Proof", "WitnessSearch"]


@dataclass(frozen=True)
class Proof:
    """The prover's verdict on one graph.  :meth:`explain` says why, in words.

    Attributes
    ----------
    deterministic:
        Every run on the same input gives the same bits (under ``assumptions``).
    batch_invariant:
        A row's bits do not depend on the batch it is in, the thread count or the
        row tiling (implies ``deterministic``).
    rule:
        ``"structure"``, ``"exact"``, ``"refuted"`` or ``"unknown"`` (refused).
    expression:
        Canonical form of the reduction; leaves named by chunk bounds.
    fingerprint:
        16 hex digits of sha256 over the canonical form: the same on every machine.
        For ``"unknown"`` it also hashes the problem found, which names a node, so
        only certified and refuted fingerprints are independent of node ids.
    assumptions:
        What the verdict takes on trust (the backend's order inside ``torch.sum``...).
    witness:
        For ``"refuted"``: a replayable counterexample (a property: searched for on
        first access, then kept; None if the small search budget found none).
    why_deterministic, why_batch_invariant:
        The argument, one line per op kind.
    world_size_invariant, why_world_size_invariant:
        For a distributed graph (nodes with a ``placement``): whether every rank gets
        the single-process bits at every world size, and why.  None on one process.
        For a weight-gradient graph: whether the gradient's bits are the same at
        every world size (the same rows split over more or fewer ranks).
    micro_batch_invariant:
        For a weight-gradient graph (``topologies.build_weight_grad_graph``) only:
        whether the gradient's bits are the same for every split of the rows into
        backward calls (then ``batch_invariant`` says the same and
        ``why_batch_invariant`` argues it); None for any other graph.
    grouping_witness:
        For a float weight-gradient graph: two groupings of the same rows whose
        gradients differ (searched for on first access).
    refuted_in:
        For a LayerNorm graph's refutation: the reduction whose race it refutes
        (``"mean"`` or ``"variance"``); empty otherwise.
    """

    deterministic: bool
    batch_invariant: bool
    rule: str
    expression: str
    fingerprint: str
    assumptions: tuple[str, ...] = ()
    why_deterministic: tuple[str, ...] = ()
    why_batch_invariant: tuple[str, ...] = ()
    world_size_invariant: bool | None = None
    why_world_size_invariant: tuple[str, ...] = ()
    micro_batch_invariant: bool | None = None
    refuted_in: str = ""
    # The witness searches, run on first access; never compared, hashed or printed.
    _witness: WitnessSearch | None = field(default=None, repr=False, compare=False)
    _grouping: GroupingSearch | None = field(default=None, repr=False, compare=False)

    @property
    def grouping_witness(self) -> GroupingWitness | None:
        """For a float weight-gradient graph: two groupings whose bits differ."""
        return None if self._grouping is None else self._grouping.result()

    @property
    def witness(self) -> Witness | None:
        """For ``"refuted"``: a replayable counterexample, searched for on first access."""
        return None if self._witness is None else self._witness.result()

    @property
    def certified(self) -> bool:
        """Deterministic *and* batch-invariant: the same bits every time, in every batch."""
        return self.deterministic and self.batch_invariant

    @property
    def summary(self) -> str:
        """A few words for a table cell: ``"certified (structure)"``, ``"refuted"``..."""
        if self.rule == "refuted":
            return f"refuted (witness, {self.refuted_in})" if self.refuted_in else "refuted (witness)"
        if self.rule == "unknown":
            return "not certified (unknown)"
        if self.certified:
            return f"certified ({self.rule})"
        return f"deterministic only ({self.rule})"

    def short_expression(self, width: int = 96) -> str:
        """The expression, cut in the middle to at most ``width`` characters."""
        text = self.expression
        if len(text) <= width:
            return text
        keep = max(8, (width - 24) // 2)
        return f"{text[:keep]} ...<{len(text) - 2 * keep} chars>... {text[-keep:]}"

    def explain(self, *, full: bool = True, width: int = 96) -> str:
        """The verdict and the argument for it, as a few readable lines.

        Parameters
        ----------
        full:
            Print the whole expression; otherwise shorten it to ``width``.
        width:
            Target width of a shortened expression.
        """
        if self.micro_batch_invariant is not None and self.rule != "unknown":
            verdict = ("weight gradient: " + ("deterministic" if self.deterministic else "NOT deterministic")
                       + (", micro-batch and world-size invariant" if self.certified
                          else ", NOT micro-batch or world-size invariant"))
        elif self.rule == "refuted":
            verdict = "REFUTED: not deterministic" + (
                f" (a race in the {self.refuted_in}'s reduction)" if self.refuted_in else "")
        elif self.rule == "unknown":
            verdict = "NOT CERTIFIED: the prover cannot read this graph"
        elif self.certified:
            verdict = "CERTIFIED: deterministic and batch-invariant"
        else:
            verdict = "deterministic, NOT certified batch-invariant"
        lines = [
            f"{verdict} (rule: {self.rule})",
            "expression: " + (self.expression if full else self.short_expression(width)),
            f"fingerprint: {self.fingerprint}",
            "why deterministic:" if self.deterministic else "why not deterministic:",
        ]
        lines += [f"  - {r}" for r in self.why_deterministic]
        lines.append(
            ("why micro-batch invariant (any split of the rows into backward calls):"
             if self.batch_invariant else "why NOT micro-batch invariant:")
            if self.micro_batch_invariant is not None else
            "why batch-invariant (and thread-count and row-tiling invariant):"
            if self.batch_invariant else "why not batch-invariant:"
        )
        lines += [f"  - {r}" for r in self.why_batch_invariant]
        if self.world_size_invariant is not None:
            lines.append("why world-size invariant:" if self.world_size_invariant
                         else "why NOT world-size invariant:")
            lines += [f"  - {r}" for r in self.why_world_size_invariant]
        lines.append("assumptions:" + ("" if self.assumptions else " none"))
        lines += [f"  - {a}" for a in self.assumptions]
        if self._witness is not None and self.witness is None:
            lines.append("witness: none found in the search budget; the structure does not "
                         "fix one order, so determinism is not certified")
        if self.grouping_witness is not None:
            lines.append("witness: " + self.grouping_witness.describe())
        if self.witness is not None:
            w = self.witness
            lines.append(
                f"witness: {w.dtype} input (seed {w.seed}, {w.shape[0]}x{w.shape[1]}"
                + (f", row {w.row}" if w.row is not None else "")
                + f"), arrival {_short(w.orders[0])} vs {_short(w.orders[1])}: "
                f"the {w.observed} bits differ"
            )
            command = w.replay_command()
            if command is not None:
                lines.append(f"replay: {command}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.explain(full=False)


class WitnessSearch:
    """The witness search of one refutation, run once, on first demand (it runs the
    reference executor on thousands of rows: far too slow for the path of a call)."""

    __slots__ = ("_graph", "_node", "_dtype", "_lock", "_done", "_found")

    def __init__(self, graph: Graph, node: str, dtype: str) -> None:
        self._graph, self._node, self._dtype = graph, node, dtype
        self._lock = threading.Lock()
        self._done = False
        self._found: Witness | None = None

    def result(self) -> Witness | None:
        with self._lock:
            if not self._done:
                from . import witness

                self._found = witness.find_witness(self._graph, self._node, dtype=self._dtype)
                self._done = True
            return self._found


def _short(order: tuple[int, ...]) -> str:
    if len(order) <= 8:
        return str(order)
    return "(" + ", ".join(str(i) for i in order[:3]) + ", ..., " + ", ".join(
        str(i) for i in order[-2:]) + ")"
