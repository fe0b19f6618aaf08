"""What a witness (prover/witness.py) is made of: its seeded input, a graph run under
one arrival order by the reference interpreter, and the bits two runs are compared by.

Like the witness, this module imports torch (and the interpreter) only inside
functions, so that ``prove`` stays importable without a tensor library.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..graph import Graph, Node, Op, ancestors

if TYPE_CHECKING:
    import torch

__all__ = ["bits", "input_width", "witness_input"]

#: Input exponents are drawn from ``[-spread, spread]``: partials of very different
#: size make reorderings round differently far more often than ``randn`` does.
_SPREAD = 6


def witness_input(seed: int, shape: Sequence[int], dtype: str, spread: int = _SPREAD) -> torch.Tensor:
    """A seeded input with an exponent spread: ``±m * 2**e``, ``m`` in [1, 2).

    Parameters
    ----------
    seed:
        Seed of a fresh CPU ``torch.Generator`` (global RNG state is untouched).
    shape:
        ``(rows, hidden_size)``.
    dtype:
        ``"float32"``, ``"float64"``, ``"float16"`` or ``"bfloat16"``.
    spread:
        Exponents are uniform in ``[-spread, spread]``; keep it small enough for
        the dtype's range (the default 6 suits fp16).

    Returns
    -------
    torch.Tensor
        on the CPU, of the given dtype.
    """
    import torch

    gen = torch.Generator().manual_seed(int(seed))
    dims = tuple(int(d) for d in shape)
    mantissa = torch.rand(dims, generator=gen, dtype=torch.float64) + 1.0
    sign = torch.randint(0, 2, dims, generator=gen, dtype=torch.int64) * 2 - 1
    exponent = torch.randint(-spread, spread + 1, dims, generator=gen, dtype=torch.int64)
    return torch.ldexp(mantissa * sign, exponent).to(_torch_dtype(dtype))



def input_width(graph: Graph) -> int:
    """The hidden size ``D`` a graph expects: from FINALIZE/RMSNORM, else the chunks."""
    for n in graph.nodes:
        if n.op in (Op.FINALIZE, Op.RMSNORM) and isinstance(n.attrs.get("hidden_size"), int):
            return int(n.attrs["hidden_size"])
    stops = [int(n.attrs.get("stop", 1)) for n in graph.nodes if n.op in (Op.SUMSQ, Op.ROWMAX)]
    return max(stops, default=1)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor as a same-width integer tensor (NaN-safe, -0 != +0)."""
    import torch

    int_of_width = {8: torch.int64, 4: torch.int32, 2: torch.int16}
    return t.contiguous().view(int_of_width[t.element_size()])


# --- internals ------------------------------------------------------------------------


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    return {
        "float32": torch.float32,
        "float64": torch.float64,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
    }[name]


def _order_pairs(n: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    index = tuple(range(n))
    pairs = [(index, tuple(reversed(index)))]
    pairs += [(index, index[k:] + index[:k]) for k in (1, n - 1) if 0 < k < n]
    return pairs


def _order_code(order: tuple[int, ...]) -> str:
    """Python source for a permutation, short for the ones the search tries."""
    n = len(order)
    if n > 4:
        for k in range(n):
            if order == tuple(range(k, n)) + tuple(range(k)):
                return f"tuple(range({n}))" if k == 0 else (
                    f"tuple(range({k}, {n})) + tuple(range({k}))")
        if order == tuple(range(n - 1, -1, -1)):
            return f"tuple(range({n - 1}, -1, -1))"
    return repr(order)


def _observed_graph(graph: Graph, node: str, observed: str) -> Graph:
    """The graph itself, or its sub-graph that ends at ``node`` (the accumulator)."""
    if observed == "output":
        return graph
    needed = ancestors(graph, node)
    out_id = f"{node}:observed"
    kept = [n for n in graph.nodes if n.id in needed]
    return Graph(kept + [Node(out_id, Op.OUTPUT, (node,))], out_id, graph.meta)


def _run(graph: Graph, node: str, x: torch.Tensor, eps: float, order: Sequence[int]) -> torch.Tensor:
    import torch

    from ..kernels.reference import run_reference

    residual = torch.full_like(x, -0.0)  # h = x + (-0.0) is x, bit for bit, for a residual graph
    return run_reference(graph, x, None, eps, arrival={node: tuple(order)}, residual=residual,
                         residual_out=torch.empty_like(x))


def _select_row(x: torch.Tensor, row: int | None) -> torch.Tensor:
    return x if row is None else x[row : row + 1].clone()


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    import torch

    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def _row_differs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (bits(a) != bits(b)).reshape(a.shape[0], -1).any(dim=1)


def _first_difference(
    a: torch.Tensor, b: torch.Tensor
) -> tuple[tuple[int, ...], int, str, str, float, float] | None:
    import torch

    mask = bits(a) != bits(b)
    if not bool(mask.any()):
        return None
    index = tuple(int(i) for i in torch.nonzero(mask)[0])
    width = a.element_size() * 2
    raw_a, raw_b = int(bits(a)[index]), int(bits(b)[index])
    mod = 1 << (8 * a.element_size())
    return (
        index,
        int(mask.sum()),
        f"0x{raw_a % mod:0{width}x}",
        f"0x{raw_b % mod:0{width}x}",
        float(a[index]),
        float(b[index]),
    )
