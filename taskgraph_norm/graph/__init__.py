"""The merge-DAG IR: frozen nodes with ordered operands, an immutable graph, validation.

This package is pure Python on purpose: it imports neither torch nor anything
else of ours (but the errors), so the prover and the drawing code can read graphs without
loading a tensor library.  Operand order is semantics (``ADD(a, b)`` is not
``ADD(b, a)`` once rounding is involved), so inputs are tuples, never sets.

``ops`` holds :class:`Op` and :data:`ARITY`, ``nodes`` :class:`Node` and
:class:`Attrs`, ``dag`` :class:`Graph` and :func:`validate`; this module
re-exports them.
"""

from __future__ import annotations

from .dag import Graph as Graph
from .dag import ancestors as ancestors
from .dag import validate as validate
from .nodes import Attrs as Attrs
from .nodes import Node as Node
from .nodes import gc_paused as gc_paused
from .ops import ARITY as ARITY
from .ops import Op as Op

__all__ = ["Op", "Attrs", "Node", "Graph", "validate", "ancestors", "ARITY", "gc_paused"]
