"""Lowering: a certified merge DAG becomes a :class:`Plan` of level-batched steps.

The plan is pure data; the backends (:mod:`taskgraph_norm.backends`) run it.
"""

from __future__ import annotations

from .lower import Plan as Plan
from .lower import halving_steps as halving_steps
from .lower import lower as lower
from .lower import tree_levels as tree_levels

__all__ = ["Plan", "halving_steps", "lower", "tree_levels"]
