"""A gated, grouped RMSNorm's no-grad forward in one native pass (``csrc/native_gated.c``).

:func:`gated_call` gives, for the float plan of one group, a function that runs the
whole construction of :mod:`taskgraph_norm.ops.gated` (the gate's ``silu``, the
product before the norm or after it, each group row's sums in the plan's order,
FINALIZE with the weight and the cast order's roundings) reading ``x`` and the gate
once and writing ``y`` once, on the team's threads.  The bits are those of the path it
replaces (tests/test_native_gated.py).  It returns ``None`` for a call it does not take
(a dtype other than fp32, bf16 and fp16, a strided tensor, a NaN in a row's total or
result): the caller then runs that path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ...constants import DTYPE_BF16, DTYPE_F16, DTYPE_F32, SPLIT_NUMEL, TEAM_GRAIN
from ...lowering import Plan
from ..torch_ops.finish import finish_rule
from . import loader as _native
from . import team as _team
from .direct import advise_fresh

__all__ = ["GatedCall", "gated_call"]

#: ``fn(x, gate, weight, eps, groups, after, out_dtype) -> y | None`` for checked,
#: contiguous CPU tensors (``x`` and ``gate`` of one shape, the weight of the full
#: hidden size or ``None``) and no gradient to record.
GatedCall = Callable[..., "torch.Tensor | None"]

_CODES = {torch.float32: DTYPE_F32, torch.bfloat16: DTYPE_BF16, torch.float16: DTYPE_F16}


def gated_call(plan: Plan, groups: int, casting_mode: str, offset: float) -> GatedCall | None:
    """The one-pass kernel for ``plan`` (one group's plan: its hidden size is the group
    size, its sums' order the groups') over ``groups`` groups per row, in
    ``casting_mode``'s cast order with ``offset`` added to the weight, or ``None``
    where there is none (an exact plan, no native form, the kernels not built)."""
    if plan.accumulate == "exact" or not _native.runs_plan(plan) or not _native.available():
        return None
    size = plan.hidden_size
    hidden = size * groups
    adds = tuple(t for level in plan.adds for t in level)
    recipe = _native.FloatRecipe(plan.chunk_size, plan.n_chunks, adds, plan.root)
    lib = _native.module()
    grain = max(1, TEAM_GRAIN // hidden)
    llama = casting_mode == "llama"
    configs: dict[tuple[Any, ...], bytes | None] = {}

    def configure(x_dtype: torch.dtype, w_dtype: torch.dtype | None, out_dtype: torch.dtype) -> bytes | None:
        # llama's roundings are FINALIZE's for x's dtype and the product's (the
        # promoted dtype of the weight and x; x's own with no weight); torch's and
        # gemma's: none, the weight made in fp32.
        rule = finish_rule("llama" if llama else "torch", x_dtype, x_dtype if w_dtype is None else w_dtype)
        w_round = rule.weight_dtype if llama else torch.float32
        codes = (_CODES.get(x_dtype), _CODES.get(out_dtype), _CODES.get(w_dtype or torch.float32),
                 _CODES.get(w_round or torch.float32))
        if rule.flags is None or None in codes:
            return None
        x_code, y_code, w_code, w_code_round = codes
        cfg: bytes = lib.rows_config(exact=0, hidden=size, chunk=recipe.chunk_size, adds=recipe.adds.data_ptr(),
                                     n_adds=recipe.n_adds, root=recipe.root, flags=rule.flags,
                                     offset=offset, grain=grain, x_dtype=x_code, y_dtype=y_code,
                                     w_dtype=w_code, w_round=w_code_round)
        return cfg

    def call(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor | None, eps: float, after: bool,
             out_dtype: torch.dtype) -> torch.Tensor | None:
        w_dtype = None if weight is None else weight.dtype
        key = (x.dtype, w_dtype, out_dtype)
        try:
            cfg = configs[key]
        except KeyError:
            cfg = configs[key] = configure(x.dtype, w_dtype, out_dtype)
        g_code = _CODES.get(gate.dtype)
        if cfg is None or g_code is None or x.shape[-1] != hidden:
            return None
        y = torch.empty(x.shape, dtype=out_dtype)
        advise_fresh(y)  # (a fresh output of 32 MiB or more: a huge-page candidate, as the direct path's)
        numel = x.numel()
        rows = numel // hidden
        threads = _team.forward_threads(numel, rows, grain, SPLIT_NUMEL)
        bad = lib.gated_rows(cfg, x.data_ptr(), gate.data_ptr(), g_code, y.data_ptr(), rows,
                             None if weight is None else weight.data_ptr(), eps, groups, int(after), threads)
        return None if bad else y

    # (holds the adds tensor whose address the configurations hold)
    call.keep = recipe  # type: ignore[attr-defined]
    return call
