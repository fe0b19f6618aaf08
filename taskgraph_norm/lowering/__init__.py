"""Lowering: a certified merge DAG becomes a :class:`Plan` of level-batched steps.

The plan (:mod:`.plan`) is pure data; :mod:`.lower` makes it from a graph and the
proof the caller hands over; the backends (:mod:`taskgraph_norm.backends`) run it.
"""

from __future__ import annotations

from .lower import lower as lower
from .lower import lower_certified as lower_certified
from .plan import Plan as Plan
from .plan import halving_steps as halving_steps
from .plan import tree_levels as tree_levels

__all__ = ["Plan", "halving_steps", "lower", "lower_certified", "tree_levels"]
