"""The native LayerNorm kernels' fixed arguments: the dtype codes and each float plan's
ADD triples (``csrc/native_layer.c`` and ``csrc/native_layer_backward.c`` take the same)."""

from __future__ import annotations

import threading
from typing import Any

import torch

from ...constants import DTYPE_BF16, DTYPE_F16, DTYPE_F32
from ...lowering import Plan
from . import loader as _native

__all__ = ["CODES", "Fixed", "plan_fixed"]

#: The dtypes the C kernel reads and writes, by their codes there.
CODES = {torch.float32: DTYPE_F32, torch.bfloat16: DTYPE_BF16, torch.float16: DTYPE_F16}

#: The C calls' fixed arguments of a plan: (chunk, ADD triples' address, count, root,
#: exact, and the recipe that holds the triples' tensor).
Fixed = tuple[int, int, int, int, int, Any]

#: Each plan's :data:`Fixed`, or None for a plan the kernels do not run; by the plan's id
#: (a plan lives as long as its cached pipeline; the entry keeps the plan, so its id is
#: not reused while the entry is there).
_entries: dict[int, tuple[Plan, Fixed | None]] = {}
_lock = threading.Lock()
_MAX_ENTRIES = 256


def plan_fixed(plan: Plan) -> Fixed | None:
    """The C calls' :data:`Fixed` of a LayerNorm plan the kernels run (every exact plan,
    and float plans with pairwise leaves and ADD merges: :func:`.loader.runs_plan`), or
    ``None``.  An exact plan's chunk and ADDs are a one-chunk dummy (the C ignores them)."""
    found = _entries.get(id(plan))
    if found is not None and found[0] is plan:
        return found[1]
    fixed = None
    if plan.norm == "layer" and _native.runs_plan(plan) and _native.available():
        exact = plan.accumulate == "exact"
        recipe = (_native.FloatRecipe(plan.hidden_size, 1, (), 0) if exact else
                  _native.FloatRecipe(plan.chunk_size, plan.n_chunks, tuple(t for level in plan.adds for t in level),
                                      plan.root))
        fixed = (recipe.chunk_size, recipe.adds.data_ptr(), recipe.n_adds, recipe.root, int(exact), recipe)
    with _lock:
        if len(_entries) >= _MAX_ENTRIES:
            _entries.clear()
        _entries[id(plan)] = (plan, fixed)
    return fixed
