"""Counterexamples to determinism: a seeded input and two arrival orders that differ.

A :class:`Witness` is everything needed to show, on any machine, that an
arrival-order ``ACCUMULATE`` gives different bits for different arrival orders:
the seed and shape of a generated input, the two orders, and the two outputs.
:meth:`Witness.replay` recomputes both with the reference executor.

This module imports torch (and the executor) only inside functions, so that
``prove`` stays importable, and cheap, without a tensor library.  The input, the runs
under one arrival order and the bits compared are ``prover/witness_runs.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import ConfigError, GraphError
from ..graph import Graph, Op
from .witness_runs import _SPREAD, _bits_equal, _first_difference, _observed_graph, _order_code, _order_pairs
from .witness_runs import _row_differs, _run, _select_row, _torch_dtype
from .witness_runs import bits as bits
from .witness_runs import input_width as input_width
from .witness_runs import witness_input as witness_input

if TYPE_CHECKING:
    import torch

__all__ = ["Witness", "find_witness", "witness_input", "OBSERVED", "WITNESS_DTYPES"]

#: What a witness compares: the graph's output ``y`` or the fp32/fp64 accumulator.
OBSERVED: tuple[str, ...] = ("output", "accumulator")

#: Input dtypes a witness can be searched for.
WITNESS_DTYPES: tuple[str, ...] = ("float32", "float64", "float16", "bfloat16")

#: Elements per searched batch: enough rows that a one-ulp change of the total
#: shows up in some rounded fp16/bf16 output, few enough to stay well under 0.1 s.
_BUDGET_ELEMENTS = 1 << 16


@dataclass(frozen=True, eq=False)
class Witness:
    """A replayable counterexample: one input, two arrival orders, two outputs.

    The input is ``witness_input(seed, shape, dtype, spread)``, restricted to row
    ``row`` when that is not None.  ``orders`` are permutations of the operand
    positions of the ``ACCUMULATE`` node ``node``; every other ``ACCUMULATE``
    takes index order.  ``observed`` says whether ``outputs`` are the graph's
    output ``y`` or the value of ``node`` itself (the fp32 accumulator), which
    is used only when no output difference was found in the search budget.
    """

    graph: Graph
    node: str
    seed: int
    shape: tuple[int, int]
    row: int | None
    dtype: str
    spread: int
    orders: tuple[tuple[int, ...], tuple[int, ...]]
    observed: str
    eps: float
    outputs: tuple[torch.Tensor, torch.Tensor]

    @classmethod
    def rebuild(
        cls,
        graph: Graph,
        *,
        node: str,
        seed: int,
        shape: Sequence[int],
        row: int | None,
        dtype: str,
        orders: Sequence[Sequence[int]],
        spread: int = _SPREAD,
        observed: str = "output",
    ) -> Witness:
        """Recompute a witness from its recipe (what a replay command calls).

        Returns
        -------
        Witness
            with ``outputs`` freshly computed by the reference executor.

        Raises
        ------
        ConfigError
            for an unknown ``dtype`` or ``observed``, or a shape that is not ``(rows, D)``.
        GraphError
            if ``node`` is not an ``ACCUMULATE`` node of ``graph``.
        """
        if dtype not in WITNESS_DTYPES:
            raise ConfigError("dtype", dtype, "one of " + ", ".join(WITNESS_DTYPES))
        if observed not in OBSERVED:
            raise ConfigError("observed", observed, "one of " + ", ".join(OBSERVED))
        dims = tuple(int(d) for d in shape)
        if len(dims) != 2 or min(dims) < 1:
            raise ConfigError("shape", shape, "(rows, hidden_size), both >= 1")
        if row is not None and not 0 <= row < dims[0]:
            raise ConfigError("row", row, f"None or a row index below {dims[0]}")
        pair = (tuple(orders[0]), tuple(orders[1]))
        from ..kernels import default_eps

        eps = default_eps(_torch_dtype(dtype))
        x = _select_row(witness_input(seed, dims, dtype, spread), row)
        target = _observed_graph(graph, node, observed)
        outputs = (_run(target, node, x, eps, pair[0]), _run(target, node, x, eps, pair[1]))
        return cls(graph, node, seed, (dims[0], dims[1]), row, dtype, spread, pair,
                   observed, eps, outputs)

    def input(self) -> torch.Tensor:
        """The witness input, regenerated from the seed."""
        return _select_row(witness_input(self.seed, self.shape, self.dtype, self.spread), self.row)

    def replay(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Recompute both outputs with the reference executor.

        Returns
        -------
        tuple of two tensors
            the observed value under ``orders[0]`` and under ``orders[1]``; their
            bits differ (compare with :func:`bits`), and equal :attr:`outputs`.
        """
        x = self.input()
        target = _observed_graph(self.graph, self.node, self.observed)
        return (
            _run(target, self.node, x, self.eps, self.orders[0]),
            _run(target, self.node, x, self.eps, self.orders[1]),
        )

    def differs(self) -> bool:
        """Whether the two stored outputs have different bits."""
        return not _bits_equal(*self.outputs)

    def describe(self) -> str:
        """Replay the witness and say, in words, where the bits differ."""
        a, b = self.replay()
        reproduced = _bits_equal(a, self.outputs[0]) and _bits_equal(b, self.outputs[1])
        lines = [
            f"witness: ACCUMULATE {self.node!r}, arrival {_order_code(self.orders[0])} vs "
            f"{_order_code(self.orders[1])}",
            f"input: seed {self.seed}, {self.dtype}{list(self.shape)}"
            + (f" row {self.row}" if self.row is not None else "")
            + f", exponents in [-{self.spread}, {self.spread}], eps={self.eps!r}",
            f"observed: {self.observed}",
        ]
        diff = _first_difference(a, b)
        if diff is None:
            lines.append("replay: the two outputs have the SAME bits (no counterexample)")
        else:
            index, count, bits_a, bits_b, val_a, val_b = diff
            lines.append(
                f"replay: bits differ in {count} of {a.numel()} elements; first at "
                f"{list(index)}: {bits_a} vs {bits_b} ({val_a!r} vs {val_b!r})"
            )
        lines.append("replay reproduces the stored outputs: " + ("yes" if reproduced else "NO"))
        return "\n".join(lines)

    def replay_command(self) -> str | None:
        """A shell command that rebuilds this witness and prints :meth:`describe`.

        None when the graph is not one that :func:`taskgraph_norm.build_graph`
        makes from its ``meta`` (a hand-edited graph): replay it from Python.
        """
        meta = dict(self.graph.meta)
        keys = ("hidden_size", "chunk_size", "topology", "leaf", "accumulate")
        if any(k not in meta for k in keys):
            return None
        from ..topologies import build_graph, build_layer_graph

        args = {k: meta[k] for k in keys[1:]}
        layer = meta.get("norm") == "layer"
        try:
            rebuilt = (build_layer_graph if layer else build_graph)(meta["hidden_size"], **args)
        except (ConfigError, TypeError):
            return None
        if rebuilt != self.graph:
            return None
        build = ("tgn.topologies.build_layer_graph(" if layer else "tgn.build_graph(") + f"{meta['hidden_size']!r}, " + ", ".join(
            f"{k}={v!r}" for k, v in args.items()
        ) + ")"
        recipe = (
            f"node={self.node!r}, seed={self.seed!r}, shape={self.shape!r}, row={self.row!r}, "
            f"dtype={self.dtype!r}, spread={self.spread!r}, "
            f"orders=({_order_code(self.orders[0])}, {_order_code(self.orders[1])}), "
            f"observed={self.observed!r}"
        )
        code = (
            f"import taskgraph_norm as tgn; g = {build}; "
            f"print(tgn.Witness.rebuild(g, {recipe}).describe())"
        )
        return f'python -c "{code}"'

    def __repr__(self) -> str:
        return (
            f"Witness(node={self.node!r}, seed={self.seed}, shape={self.shape}, row={self.row}, "
            f"dtype={self.dtype!r}, orders={self.orders}, observed={self.observed!r})"
        )


def find_witness(
    graph: Graph,
    node: str,
    *,
    dtype: str = "float32",
    seeds: Sequence[int] = (0, 1, 2, 3),
) -> Witness | None:
    """Search, deterministically, for an input on which two arrival orders differ.

    Orders tried: index order against reversed order, then against rotations.
    The graph's output is compared first; a low-precision output can round a
    reordering away, so if no seed shows a difference there, the search looks at
    the accumulator itself (its fp32 value).  A found witness is shrunk to one row
    where that row alone still shows the difference.

    Parameters
    ----------
    graph:
        A validated graph.
    node:
        Id of an ``ACCUMULATE`` node with at least three operands.
    dtype:
        Input dtype, one of :data:`WITNESS_DTYPES`.
    seeds:
        Seeds to try, in order.

    Returns
    -------
    Witness or None
        None when no seed and order pair shows a difference (the budget is small).
    """
    import torch

    if dtype not in WITNESS_DTYPES:
        raise ConfigError("dtype", dtype, "one of " + ", ".join(WITNESS_DTYPES))
    acc = graph.by_id.get(node)
    if acc is None or acc.op is not Op.ACCUMULATE:
        raise GraphError(node, "a witness needs an ACCUMULATE node")
    width = input_width(graph)
    rows = max(1, min(4096, _BUDGET_ELEMENTS // width))
    pairs = _order_pairs(len(acc.inputs))
    from ..kernels import default_eps

    eps = default_eps(_torch_dtype(dtype))
    # The output is what users see, so try it first, but only briefly: in bf16 a
    # reordering rarely survives the final rounding, and the fp32 accumulator
    # shows it at once.
    plan = (("output", tuple(seeds)[:2]), ("accumulator", tuple(seeds)))
    for observed, tried in plan:
        target = _observed_graph(graph, node, observed)
        for seed in tried:
            x = witness_input(seed, (rows, width), dtype)
            first = _run(target, node, x, eps, pairs[0][0])
            for base, other in pairs:
                second = _run(target, node, x, eps, other)
                differ = _row_differs(first, second)
                if bool(differ.any()):
                    row = int(torch.nonzero(differ)[0, 0])
                    single = Witness.rebuild(
                        graph, node=node, seed=seed, shape=(rows, width), row=row,
                        dtype=dtype, orders=(base, other), observed=observed,
                    )
                    if single.differs():
                        return single
                    return Witness(graph, node, seed, (rows, width), None, dtype, _SPREAD,
                                   (base, other), observed, eps, (first, second))
    return None
