"""Counterexamples to micro-batch and world-size invariance of the weight gradient.

A :class:`GroupingWitness` is two weight-gradient graphs over the same rows (two
groupings: micro-batches, world sizes, or two arrival orders of one ACCUMULATE),
a seeded ``dy`` and ``x_hat``, and the two gradients, which differ in some column.
:func:`evaluate` computes a graph's gradient node by node with the kernels the
backward runs (``pairwise_halving_`` for a float block, as in
``kernels.weight_grad_float``; the exact accumulator's integer states), so a
replay is the backward's own arithmetic.  torch is imported only inside functions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..graph import Graph, Op

if TYPE_CHECKING:
    import torch

__all__ = ["GroupingWitness", "evaluate", "find_grouping_witness", "grouping_input"]

#: Columns of a witness input (each column is one independent sum over the rows).
COLUMNS = 64
_SEEDS = 32


def grouping_input(seed: int, rows: int, columns: int = COLUMNS) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dy, x_hat)``, fp32 ``(rows, columns)``, from ``seed`` (exponents spread wide)."""
    from .witness import witness_input

    return (witness_input(seed, (rows, columns), "float32"),
            witness_input(seed + 1_000_003, (rows, columns), "float32"))


def evaluate(graph: Graph, dy: torch.Tensor, x_hat: torch.Tensor,
             orders: Mapping[str, Sequence[int]] | None = None) -> torch.Tensor:
    """The gradient ``graph`` computes from fp32 ``dy`` and ``x_hat`` ``(rows, columns)``.

    ``orders`` gives an ACCUMULATE's arrival order (operand positions); index order
    otherwise.  Float values are fp32 columns; exact ones are the accumulator's states.
    """
    import torch

    from ..kernels import exact_sum as es
    from ..kernels import pairwise_halving_

    orders = orders or {}
    vals: dict[str, torch.Tensor] = {}
    for node in graph.topological_nodes:
        args = [vals[i] for i in node.inputs if i in vals]
        if node.op is Op.INPUT:
            continue
        if node.op is Op.ROWSUM:
            a, b = node.attrs["start"], node.attrs["stop"]
            if node.attrs["domain"] == "exact":
                state = es.empty_state(dy.shape[1])
                vals[node.id] = es.normalize_(es.add_products_(state, dy[a:b], x_hat[a:b]))
            else:
                products = (dy[a:b] * x_hat[a:b]).t().contiguous()
                vals[node.id] = pairwise_halving_(products)[:, 0].clone()
            continue
        if node.op is Op.ACCUMULATE:
            args = [args[k] for k in orders.get(node.id, range(len(args)))]
        if node.op is Op.ROUND and args[0].dtype == torch.int64:
            vals[node.id] = es.round_state(args[0], torch.float32)
        elif node.op in (Op.ADD, Op.ACCUMULATE):
            total = args[0].clone()
            for part in args[1:]:
                total = total + part
            vals[node.id] = es.normalize_(total) if total.dtype == torch.int64 else total
        else:  # ROUND of fp32 (a cast to an fp32 weight), OUTPUT
            vals[node.id] = args[0]
    return vals[graph.output]


@dataclass(frozen=True, eq=False)
class GroupingWitness:
    """Two groupings of the same rows whose weight gradients differ in ``column``.

    ``graphs[k]`` evaluated on ``grouping_input(seed, rows, columns)`` with the
    ACCUMULATE arrival orders ``orders[k]`` gives ``outputs[k]``.
    """

    graphs: tuple[Graph, Graph]
    orders: tuple[tuple[tuple[str, tuple[int, ...]], ...], tuple[tuple[str, tuple[int, ...]], ...]]
    seed: int
    rows: int
    columns: int
    column: int
    outputs: tuple[torch.Tensor, torch.Tensor]

    def replay(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Recompute both gradients from the seed."""
        dy, x_hat = grouping_input(self.seed, self.rows, self.columns)
        return (evaluate(self.graphs[0], dy, x_hat, dict(self.orders[0])),
                evaluate(self.graphs[1], dy, x_hat, dict(self.orders[1])))

    def differs(self) -> bool:
        """Whether a replay still gives different bits (it always should)."""
        a, b = self.replay()
        return not bool(_bits(a).equal(_bits(b)))

    def describe(self) -> str:
        a, b = (float(o[self.column]) for o in self.outputs)
        return (f"rows {self.rows} of grouping_input(seed={self.seed}, columns={self.columns}): "
                f"{_name(self.graphs[0], self.orders[0])} gives dW[{self.column}] = {a!r}, "
                f"{_name(self.graphs[1], self.orders[1])} gives {b!r}")


def find_grouping_witness(
    first: Graph, second: Graph, *,
    orders: tuple[Mapping[str, Sequence[int]], Mapping[str, Sequence[int]]] = ({}, {}),
    columns: int = COLUMNS,
) -> GroupingWitness | None:
    """Search a few seeds for an input on which two graphs over the same rows differ."""
    rows = int(first.meta.get("rows", 0))
    fixed = tuple(tuple((k, tuple(v)) for k, v in o.items()) for o in orders)
    for seed in range(_SEEDS):
        dy, x_hat = grouping_input(seed, rows, columns)
        a = evaluate(first, dy, x_hat, orders[0])
        b = evaluate(second, dy, x_hat, orders[1])
        differ = (_bits(a) != _bits(b)).nonzero()
        if len(differ):
            return GroupingWitness((first, second), (fixed[0], fixed[1]), seed, rows, columns,
                                   int(differ[0, 0]), (a, b))
    return None


def _bits(t: torch.Tensor) -> torch.Tensor:
    from .witness import bits

    return bits(t)


def _name(graph: Graph, order: tuple[tuple[str, tuple[int, ...]], ...]) -> str:
    meta = graph.meta
    text = f"micro_batches={list(meta.get('micro_batches', ()))} x world_size={meta.get('world_size')}"
    return text + (f" with arrival {dict(order)}" if order else "")


class GroupingSearch:
    """:func:`find_grouping_witness` for one refutation, run once, on first demand."""

    __slots__ = ("_args", "_lock", "_done", "_found")

    def __init__(self, first: Graph, others: Sequence[Graph],
                 orders: tuple[Mapping[str, Sequence[int]], Mapping[str, Sequence[int]]] = ({}, {})) -> None:
        import threading

        self._args = (first, tuple(others), orders)
        self._lock = threading.Lock()
        self._done = False
        self._found: GroupingWitness | None = None

    def result(self) -> GroupingWitness | None:
        with self._lock:
            if not self._done:
                first, others, orders = self._args
                for second in others:  # the first grouping that differs
                    self._found = find_grouping_witness(first, second, orders=orders)
                    if self._found is not None:
                        break
                self._done = True
            return self._found


def regrouped(graph: Graph) -> tuple[Graph, ...]:
    """Other groupings of ``graph``'s rows (``rows >= 2``) to compare with: one backward
    call on one rank, two halves, the first row alone (blocks shifted by one row).
    Aligned splits can coincide with ``graph`` (128 rows on 2 ranks is the one call's
    own tree), so a search tries them in turn."""
    from ..topologies import build_weight_grad_graph

    meta = graph.meta
    rows, kind, block = int(meta["rows"]), str(meta["weight_grad"]), int(meta["row_block"])
    splits = (None, [rows // 2, rows - rows // 2], [1, rows - 1])
    candidates = (build_weight_grad_graph(rows, weight_grad=kind, row_block=block, micro_batches=s)
                  for s in splits)
    return tuple(g for g in candidates if g != graph)
