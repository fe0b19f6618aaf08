"""The values the reader gives nodes, and the ranges of ``x`` each one sums.

A value's *segments* are the ``[start, stop)`` ranges of its leaves, one per
occurrence in its expression, so a leaf reached along two paths counts twice.
Storing them per value would copy every operand's list into every merge
(quadratic for a left fold); a :class:`Value` instead names its own range and
its operands, and the lists are walked only where they are read: in order, for
an ``ACCUMULATE``'s operands (:meth:`Value.segments`), or as ranges with
multiplicities, by counting paths once per DAG (:func:`weighted_segments`).

Pure Python; no torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .forms import Text

__all__ = ["Value", "weighted_segments", "multiset", "merged", "contains", "segment_text",
           "coverage_note"]

Segment = tuple[int, int]


class Value:
    """What one node computes, as the reader sees it (never mutated once built).

    ``kind`` is ``"x"``, ``"partial"``, ``"max"``, ``"scale"``, ``"y"`` or ``"out"``;
    ``expr`` its canonical expression; ``leaf`` the range it reads itself (a leaf or
    ROWMAX); ``operands`` the values whose segments follow, in operand order;
    ``scales`` the ids of the SCALE nodes its exact leaves use; ``hidden_size``
    the ``D`` of a SCALE's sigma; ``index`` its place in the reading order (set by
    the reader).
    """

    __slots__ = ("kind", "expr", "leaf", "operands", "scales", "hidden_size", "index")

    def __init__(self, kind: str, expr: Text, leaf: Segment | None = None,
                 operands: tuple[Value, ...] = (), scales: frozenset[str] = frozenset(),
                 hidden_size: int = 0) -> None:
        self.kind = kind
        self.expr = expr
        self.leaf = leaf
        self.operands = operands
        self.scales = scales
        self.hidden_size = hidden_size
        self.index = -1

    def segments(self) -> tuple[Segment, ...]:
        """Every summed (or maximised) range, in operand order, with repeats."""
        if not self.operands:
            return () if self.leaf is None else (self.leaf,)
        out: list[Segment] = []
        stack: list[Value] = [self]
        while stack:
            value = stack.pop()
            if value.leaf is not None:
                out.append(value.leaf)
            stack.extend(reversed(value.operands))
        return tuple(out)


def weighted_segments(root: Value, values: Sequence[Value]) -> list[tuple[Segment, int]]:
    """``(range, times)`` for every leaf under ``root``: ``times`` is the number of
    paths from ``root`` to it, i.e. how often it occurs in the expression.

    ``values`` holds every value at its ``index``, operands before their users (the
    reading order).  One sweep, linear in the DAG however heavily operands are shared.
    """
    paths = [0] * len(values)
    paths[root.index] = 1
    found: list[tuple[Segment, int]] = []
    for at in range(root.index, -1, -1):  # every user before its operands
        times = paths[at]
        if not times:
            continue
        value = values[at]
        if value.leaf is not None:
            found.append((value.leaf, times))
        for operand in value.operands:
            paths[operand.index] += times
    return found


def multiset(segments: Iterable[tuple[Segment, int]]) -> list[tuple[int, int, int]]:
    """Ranges with multiplicity ``(start, stop, times)``, sorted, adjacent equal merged."""
    delta: dict[int, int] = {}
    for (a, b), times in segments:
        delta[a] = delta.get(a, 0) + times
        delta[b] = delta.get(b, 0) - times
    out: list[tuple[int, int, int]] = []
    depth, prev = 0, 0
    for pos in sorted(delta):
        if depth and pos > prev:
            if out and out[-1][1] == prev and out[-1][2] == depth:
                out[-1] = (out[-1][0], pos, depth)
            else:
                out.append((prev, pos, depth))
        depth += delta[pos]
        prev = pos
    return out


def merged(ranges: Iterable[tuple[int, int, int]]) -> list[Segment]:
    """The union of :func:`multiset`'s ranges, as sorted disjoint ranges."""
    out: list[Segment] = []
    for a, b, _ in ranges:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def contains(outer: list[Segment], inner: list[Segment]) -> bool:
    """Whether every range of ``inner`` lies inside one of ``outer`` (both as
    :func:`merged` returns them: sorted, disjoint, so one pass suffices)."""
    i = 0
    for c, d in inner:
        while i < len(outer) and outer[i][1] < d:
            i += 1
        if i == len(outer) or outer[i][0] > c:
            return False
    return True


def segment_text(seg: tuple[int, int, int]) -> str:
    a, b, times = seg
    return f"x[{a}:{b}]" if times == 1 else f"{times}*x[{a}:{b}]"


def coverage_note(ranges: list[tuple[int, int, int]], hidden: int) -> str:
    """What :func:`multiset`'s ``ranges`` cover of ``x[0:hidden]``."""
    if ranges == [(0, hidden, 1)]:
        return f"the leaves cover x[0:{hidden}] exactly once"
    return (f"note: the leaves do not cover x[0:{hidden}] exactly once "
            f"({', '.join(segment_text(s) for s in ranges)}); the result is "
            "deterministic but it is not the RMSNorm of x")
