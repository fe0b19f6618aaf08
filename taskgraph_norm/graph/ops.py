"""The operations a node may perform (:class:`Op`, each member's docstring its
semantics) and how many operands each takes (:data:`ARITY`).  Pure Python."""

from __future__ import annotations

import enum
from collections.abc import Mapping

__all__ = ["Op", "ARITY"]


class Op(enum.Enum):
    """The operations a node may perform.  Each value's docstring is its semantics."""

    INPUT = "input"
    """The input tensor ``x`` of shape ``(..., D)``; no operands.  With attr
    ``residual=True`` its value is ``h = x + residual`` rounded to ``x.dtype`` (one
    elementwise add; the executor also hands ``h`` back), and the graph normalises ``h``."""
    SUMSQ = "sumsq"
    """Sum of squares of ``x[..., start:stop]`` per row (attrs ``start``, ``stop``,
    ``leaf``).  ``leaf="pairwise"`` sums by explicit halving (see kernels), so its
    order is fully specified; ``leaf="native"`` calls ``torch.sum``, whose order is
    the backend's.  Operands: ``(x,)``, or ``(x, scale)`` in the exact domain.
    With attr ``centered=True`` (LayerNorm's variance leaf) it sums the squared
    deviations ``d * d``, ``d = x[..., start:stop].to(acc) - mean`` (each ``d`` rounded
    once in the accumulation dtype): operands ``(x, mean)``, or ``(x, mean, scale)``
    in the exact domain (:mod:`taskgraph_norm.kernels.layer`)."""
    SUM = "sum"
    """LayerNorm's plain-sum leaf: the sum of ``x[..., start:stop].to(acc)`` per row
    (attrs ``start``, ``stop``, ``leaf``, ``domain``, ``index``), in the leaf order
    SUMSQ's ``leaf`` names.  Operands ``(x,)``, or ``(x, scale)`` in the exact domain
    (every value pre-rounded onto the scale's two grids: docs/exact.md)."""
    MEAN = "mean"
    """LayerNorm's mean: the row total of the SUM leaves divided by ``D`` (attr
    ``hidden_size``; attr ``domain``), a value of its own kind (``(..., 1)`` in the
    accumulation dtype).  Float: ``total / D`` with a tensor divisor.  Exact: the
    exact pair's value divided by ``D``, correctly rounded once
    (:func:`taskgraph_norm.kernels.layer.mean_exact`).  Operand ``(total,)``."""
    ADD = "add"
    """Ordered binary merge ``a + b`` of two partial sums; operands ``(a, b)``."""
    ACCUMULATE = "accumulate"
    """``acc += p`` for every operand, in the order the operands *arrive*.  The
    operand tuple lists the partials; it does not fix the order of the additions."""
    CATSUM = "catsum"
    """``torch.sum(torch.cat(parts, -1), -1)``: the order inside is the backend's."""
    ROWMAX = "rowmax"
    """Exact domain: maximum of the squares of ``x[..., start:stop]`` per row; operand
    ``(x,)``.  Attr ``power=1``: the maximum of ``|x|`` instead (the scale of a SUM);
    attr ``centered=True``: of the squared deviations ``d * d`` (as a centered
    SUMSQ forms them), operands ``(x, mean)``.  Either way in fp64."""
    MAX = "max"
    """Exact domain: elementwise maximum of two row maxima (exact in any order)."""
    SCALE = "scale"
    """Exact domain: the power-of-two pre-rounding scale from the row maximum."""
    RMSNORM = "rmsnorm"
    """Opaque ``torch.nn.functional.rms_norm`` over the last dim (the baseline)."""
    LAYERNORM = "layernorm"
    """Opaque ``torch.nn.functional.layer_norm`` over the last dim (LayerNorm's
    baseline); operand ``(x,)``, attr ``hidden_size``."""
    FINALIZE = "finalize"
    """``x / sqrt(total / D + eps) * w`` computed in the accumulation dtype and cast
    back to the input dtype; operands ``(x, total)``, attr ``hidden_size``.  Attrs
    ``casting_mode`` (``"torch"`` when absent, ``"llama"``, ``"gemma"``) and
    ``offset`` (``0.0`` when absent; the weight used is ``offset + w``) say how it
    rounds: :func:`taskgraph_norm.kernels.finalize`.

    With attr ``norm="layer"`` (LayerNorm; absent means ``"rms"``), operands
    ``(x, total, mean)``: ``total`` is the sum of the squared deviations (the
    centered SUMSQ merge), and ``y = (x.to(acc) - mean) / sqrt(var / D + eps) * w + b``
    with ``var`` the total rounded once to the accumulation dtype, cast once to
    ``x``'s dtype (:func:`taskgraph_norm.kernels.layer.finalize_layer` states the
    op order).  No ``casting_mode`` or ``offset`` with ``norm="layer"``."""
    OUTPUT = "output"
    """Marks the graph's single result; operand ``(y,)``."""
    CALL = "call"
    """A user function, for general graphs run by the concurrent executor: attr
    ``fn`` is a *name* (a string, so the graph stays hashable and printable) that
    the executor resolves through its ``functions`` mapping, and the result is
    ``functions[fn](*operands)`` with operands in order.  Any number of operands.
    The prover treats it as opaque: nothing about its order is known."""

    ROWSUM = "rowsum"
    """Weight-gradient leaf: for every column, the sum over the rows ``[start, stop)``
    of one backward call of ``dy * x_hat`` (``x_hat = x / rms``, the forward's value
    before the weight); operand ``(x,)``, where INPUT stands for the step's rows.
    Attrs ``start``, ``stop`` (global row indices), ``domain`` and ``index``;
    optional labels ``micro_batch`` and ``rank`` say which backward call and which
    process own the rows.  ``domain="float"``: pairwise halving over the block's rows
    in the accumulation dtype (one block of :func:`taskgraph_norm.kernels.weight_grad_float`);
    ``domain="exact"``: every product added without rounding onto the exact
    accumulator's integer grid (:mod:`taskgraph_norm.kernels.exact_sum`).  ADD and
    ACCUMULATE over exact partials are integer additions of their states."""
    ROUND = "round"
    """Weight gradient: the column sums rounded to the weight's dtype; operand
    ``(total,)``.  Float domain: one cast, after each backward call (then ``.grad +=``
    adds the rounded values); exact domain: the accumulator's state correctly
    rounded once (:func:`taskgraph_norm.kernels.exact_sum.round_state`)."""

    # Members are singletons compared by identity, so identity hashing is exact; it
    # is C-level, where Enum's own __hash__ is a Python call on every dict lookup
    # (readers look ops up a few times per node, for millions of nodes).
    __hash__ = object.__hash__


#: Allowed operand counts per op: ``(minimum, maximum)``; ``None`` is unbounded.
ARITY: Mapping[Op, tuple[int, int | None]] = {
    Op.INPUT: (0, 0),
    Op.SUMSQ: (1, 3),
    Op.SUM: (1, 2),
    Op.MEAN: (1, 1),
    Op.ADD: (2, 2),
    Op.ACCUMULATE: (1, None),
    Op.CATSUM: (1, None),
    Op.ROWMAX: (1, 2),
    Op.MAX: (2, 2),
    Op.SCALE: (1, 1),
    Op.RMSNORM: (1, 1),
    Op.LAYERNORM: (1, 1),
    Op.FINALIZE: (2, 3),
    Op.OUTPUT: (1, 1),
    Op.CALL: (0, None),
    Op.ROWSUM: (1, 1),
    Op.ROUND: (1, 1),
}

