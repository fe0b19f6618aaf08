"""LayerNorm's backward on the native backend: ``dx``, ``dW`` and ``db`` of a float plan in
one C call (``csrc/native_layer_backward.c``).

:func:`layer_backward_rows` takes what the forward's C kernel takes (a float plan with
pairwise leaves and ADD merges, contiguous CPU fp32/bf16/fp16 rows, a weight of ``x``'s
dtype or fp32) and gives the torch-ops backend's bits
(:func:`..torch_ops.layer.layer_backward`): ``dx``'s two row sums in the forward's
merge order (batch-invariant), ``dW`` and ``db`` over fixed blocks of
:data:`~taskgraph_norm.constants.BACKWARD_ROW_BLOCK` rows merged in one order, each
row read once.  Rows are shared among torch's threads from
:data:`.team.BACKWARD_SPLIT_NUMEL` elements on, in whole row blocks, so the split
never changes a bit.  Everything else (exact plans, fp64, strided tensors, a call with
a non-finite statistic, row sum or result: NaN bits are torch's) returns ``None`` and
the caller runs torch ops.
"""

from __future__ import annotations

import torch

from ...constants import BACKWARD_ROW_BLOCK
from ...lowering import Plan
from . import loader as _native
from . import team as _team
from .direct import advise_fresh
from .layer_plan import CODES, plan_fixed

__all__ = ["layer_backward_rows"]

Grads = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]


def _usable(t: torch.Tensor | None, dtypes: tuple[torch.dtype, ...]) -> bool:
    return t is None or (t.is_cpu and t.is_contiguous() and t.dtype in dtypes)


def layer_backward_rows(
    plan: Plan, dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor,
    den: torch.Tensor, *, input_grad: bool, weight_grad: bool, bias_grad: bool,
    weight_dtype: torch.dtype | None = None, bias_dtype: torch.dtype | None = None, threads: int | None = None,
) -> Grads | None:
    """``(dx, dW, db)`` of 2-D ``dy`` and ``x`` (``(rows, D)``) with the forward's ``(rows, 1)``
    fp32 ``mean`` and ``den`` from one C call, or ``None`` where the kernel does not take
    the call (see the module doc).  ``dW``/``db`` are cast to ``weight_dtype``/``bias_dtype``
    (default ``x``'s dtype) by torch, as the torch-ops backend casts them; ``threads``: how
    many threads share the rows (default: torch's, for a large input)."""
    fixed = plan_fixed(plan)
    code = CODES.get(x.dtype)
    if fixed is None or code is None or not _native.enabled() or dy.dtype != x.dtype or dy.shape != x.shape:
        return None
    acc = (torch.float32,)
    if not (_usable(x, (x.dtype,)) and _usable(dy, (x.dtype,)) and _usable(mean, acc) and _usable(den, acc)
            and _usable(weight, (x.dtype, torch.float32))):
        return None
    rows, hidden = x.shape
    dx = None
    if input_grad:
        dx = torch.empty_like(x)
        advise_fresh(dx)
    want_w, want_b = weight_grad, bias_grad
    dwb = torch.empty((want_w + want_b) * hidden, dtype=torch.float32) if want_w or want_b else None
    if threads is None:
        threads = _team.threads() if x.numel() >= _team.BACKWARD_SPLIT_NUMEL and rows > BACKWARD_ROW_BLOCK else 1
    chunk, adds, n_adds, root, exact, _ = fixed
    bad = _native.module().layer_backward(
        x.data_ptr(), dy.data_ptr(), None if dx is None else dx.data_ptr(),
        None if weight is None else weight.data_ptr(), mean.data_ptr(), den.data_ptr(), rows, hidden, chunk, adds,
        n_adds, root, exact, code, CODES[weight.dtype] if weight is not None else code, int(want_w), int(want_b),
        None if dwb is None else dwb.data_ptr(), BACKWARD_ROW_BLOCK, threads)
    if bad == -1:
        raise MemoryError("the native LayerNorm backward could not allocate its scratch")
    if bad:
        return None
    dw = db = None
    if dwb is not None:
        if want_w:
            dw = dwb[:hidden].to(weight_dtype or x.dtype, copy=True)
        if want_b:
            db = dwb[dwb.numel() - hidden:].to(bias_dtype or x.dtype, copy=True)
    return dx, dw, db
