"""Nodes of the IR: :class:`Node` (frozen, slotted, ordered operands) and its
immutable attribute mapping :class:`Attrs`; for the passes that make millions of
them, :func:`make_nodes` / :func:`make_attrs` (in bulk), :class:`Indexed` (per-node
data by id through one index) and :func:`gc_paused`.  Pure Python."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any, TypeVar

from .ops import Op

__all__ = ["Attrs", "Indexed", "Node", "gc_paused", "make_attrs", "make_nodes"]

_T = TypeVar("_T")


class Attrs(Mapping[str, Any]):
    """An immutable, hashable mapping of node attributes (values must be hashable)."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, Any] | Iterable[tuple[str, Any]] = ()) -> None:
        pairs = dict(items)
        self._items: tuple[tuple[str, Any], ...] = tuple(sorted(pairs.items()))
        hash(self._items)  # fail now, not when the node is first put in a set

    def __getitem__(self, key: str) -> Any:
        for k, v in self._items:
            if k == key:
                return v
        raise KeyError(key)

    # Mapping's get and `in` go through __getitem__ and a caught KeyError, which
    # costs more than the scan itself; readers ask for absent keys on every node.
    def get(self, key: str, default: Any = None) -> Any:
        for k, v in self._items:
            if k == key:
                return v
        return default

    def __contains__(self, key: object) -> bool:
        for k, _ in self._items:
            if k == key:
                return True
        return False

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    @classmethod
    def from_sorted(cls, pairs: tuple[tuple[str, Any], ...]) -> Attrs:
        """Attrs from ``(name, value)`` pairs already sorted by name, with distinct names
        and hashable values: none of that is checked (builders make millions)."""
        attrs = object.__new__(cls)
        attrs._items = pairs
        return attrs

    @property
    def pairs(self) -> tuple[tuple[str, Any], ...]:
        """The ``(name, value)`` pairs, sorted by name (``dict(attrs.pairs)`` is fast)."""
        return self._items

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Attrs):
            return self._items == other._items
        return isinstance(other, Mapping) and dict(self._items) == dict(other)

    def __repr__(self) -> str:
        return "Attrs({" + ", ".join(f"{k!r}: {v!r}" for k, v in self._items) + "})"


#: The attributes of a node that has none (shared: builders make millions of them).
_NO_ATTRS = Attrs()


@dataclass(frozen=True, slots=True)
class Node:
    """One task: ``op`` applied to the results of ``inputs`` (ids, in operand order)."""

    id: str
    op: Op
    inputs: tuple[str, ...] = ()
    # Typed as a Mapping so that builders may pass dicts; __post_init__ always
    # stores an immutable, hashable Attrs.
    attrs: Mapping[str, Any] = _NO_ATTRS

    def __post_init__(self) -> None:
        # Accept lists and dicts from hand-written graphs, but store frozen values.
        if not isinstance(self.inputs, tuple):
            object.__setattr__(self, "inputs", tuple(self.inputs))
        if not isinstance(self.attrs, Attrs):
            object.__setattr__(self, "attrs", Attrs(self.attrs))

    def replace(self, **changes: Any) -> Node:
        """A copy of this node with some fields changed (the node itself is frozen)."""
        return dataclasses.replace(self, **changes)


class Indexed(Mapping[str, _T]):
    """A mapping from id to ``items[index[id]]``: per-node data by id through a
    graph's :attr:`Graph.index`, without a second million-entry dict."""

    __slots__ = ("_index", "_items")

    def __init__(self, index: Mapping[str, int], items: Sequence[_T]) -> None:
        self._index, self._items = index, items

    def __getitem__(self, node_id: str) -> _T:
        return self._items[self._index[node_id]]

    def get(self, node_id: str, default: Any = None) -> Any:
        at = self._index.get(node_id)
        return default if at is None else self._items[at]

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


def _filled(cls: type, count: int, fields: Iterable[tuple[str, Iterable[Any]]]) -> list[Any]:
    """``count`` new instances of the slotted ``cls``, each slot set from its iterable
    by the slot's own descriptor: all in C (``map``), with no ``__init__`` run."""
    made: list[Any] = list(map(object.__new__, repeat(cls, count)))
    for name, values in fields:
        deque(map(cls.__dict__[name].__set__, made, values), 0)
    return made


def make_attrs(pairs: Iterable[tuple[tuple[str, Any], ...]], count: int) -> list[Attrs]:
    """``count`` :class:`Attrs`, as :meth:`Attrs.from_sorted` would make them from
    ``pairs`` (sorted by name, distinct names, hashable values: not checked)."""
    made: list[Attrs] = _filled(Attrs, count, (("_items", pairs),))
    return made


def make_nodes(ids: Sequence[str], op: Op, inputs: Iterable[tuple[str, ...]],
               attrs: Iterable[Attrs] | Attrs = _NO_ATTRS) -> list[Node]:
    """A :class:`Node` per id, equal to ``Node(id, op, inputs, attrs)`` but made a few
    times faster (builders make millions): ``inputs`` must already be tuples and
    ``attrs`` :class:`Attrs` (one shared, or one per node); neither is checked."""
    count = len(ids)
    each = repeat(attrs, count) if isinstance(attrs, Attrs) else attrs
    made: list[Node] = _filled(Node, count, (
        ("id", ids), ("op", repeat(op, count)), ("inputs", inputs), ("attrs", each)))
    return made


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Hold off Python's cyclic garbage collector while a pass makes millions of objects.

    Building, reading and lowering a graph allocate a few objects per node and free
    none of them: every collection in between would walk them all again for
    nothing (about 40% of the time of a million-leaf graph).  Collection resumes
    afterwards, if it was on, and finds everything it would have found.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()

