"""The native kernels of the backward and of the exact weight gradient: their checked
wrappers over the extension module's functions (the module, its loading and the
forward's wrappers are :mod:`.loader`)."""

from __future__ import annotations

import functools
import threading

import torch

from ... import caches
from ...constants import EXACT_DIGITS, EXACT_TOP_LIMIT
from ...errors import ExactSumOverflowError
from ...lowering import Plan
from .loader import FloatRecipe, module

__all__ = ["backward_exact_dw", "backward_rows", "exact_dw", "exact_round", "recipe_of", "rms_of_totals"]


@functools.lru_cache(maxsize=256)
def _recipe(plan: Plan) -> FloatRecipe:
    if plan.accumulate == "exact":
        return FloatRecipe(plan.hidden_size, 1, (), 0)
    return FloatRecipe(plan.chunk_size, plan.n_chunks, tuple(t for level in plan.adds for t in level), plan.root)


#: id(plan) -> (plan, its recipe): the training path asks once per backward, and
#: hashing a frozen Plan (every field, the adds included) took ~1 us.
_by_id: dict[int, tuple[Plan, FloatRecipe]] = {}
_by_id_lock = threading.Lock()


def recipe_of(plan: Plan) -> FloatRecipe:
    """The :class:`FloatRecipe` of a float plan (an exact plan gets a one-chunk dummy)."""
    found = _by_id.get(id(plan))
    if found is not None and found[0] is plan:
        return found[1]
    recipe = _recipe(plan)
    with _by_id_lock:
        while len(_by_id) >= 256:
            del _by_id[next(iter(_by_id))]
        _by_id[id(plan)] = (plan, recipe)
    return recipe


@caches.register
def _clear() -> None:
    _recipe.cache_clear()
    with _by_id_lock:
        _by_id.clear()


def backward_rows(
    x: torch.Tensor, dy: torch.Tensor, weight: torch.Tensor | None, rms: torch.Tensor, recipe: FloatRecipe,
    dx: torch.Tensor | None, dw: torch.Tensor | None, *, exact: bool, threads: int = 1, grain: int = 32,
) -> int:
    """The backward of fp32 rows in C (``kernels.input_grad`` and
    ``kernels.weight_grad_float``): ``dx`` (or ``None``) gets each row's input
    gradient, ``dw`` (or ``None``, ``(D,)``) the weight gradient: the sums of
    ``dy * x_hat`` over blocks of 32 rows merged as ``kernels.merge_blocks_`` merges
    them, streamed in C (scratch of a few rows per thread, none that grows with the
    rows).  ``x``, ``dy``, ``dx`` are contiguous ``(rows, D)`` fp32, ``rms`` ``(rows, 1)``
    fp32.  ``exact`` picks the exact row sum (an exact plan) over the recipe's float
    DAG.  ``threads`` share the rows (native_team.c: torch's OpenMP team or its own
    worker) in blocks of ``grain`` rows, rounded up to whole row blocks of 32, so every
    block sum is made by one thread, and the merge's order is the same: the bits do not
    depend on the split.  Returns the number of rows whose ``s`` or ``k`` is not finite
    plus the number of values of ``dw`` that are not finite (C's NaNs: the caller
    recomputes them with torch ops).
    """
    lib = module()
    rows, hidden = x.shape
    fp32 = torch.float32
    for t in (x, dy, rms, weight, dx, dw):
        if t is not None and (t.dtype is not fp32 or not t.is_cpu or not t.is_contiguous()):
            raise ValueError("backward_rows needs contiguous fp32 CPU tensors")
    if dw is not None and dw.numel() != hidden:
        raise ValueError(f"dw must hold {hidden} values")
    if rows == 0:
        return 0
    bad = int(lib.backward_rows_f32_team(
        x.data_ptr(), dy.data_ptr(), None if weight is None else weight.data_ptr(), rms.data_ptr(),
        rows, hidden, recipe.chunk_size, recipe.adds.data_ptr(), recipe.n_adds, recipe.root, int(exact),
        None if dx is None else dx.data_ptr(), None if dw is None else dw.data_ptr(), grain, threads))
    if bad < 0:
        raise MemoryError("the native backward could not allocate its scratch")
    return bad


def backward_exact_dw(
    x: torch.Tensor, dy: torch.Tensor, weight: torch.Tensor | None, rms: torch.Tensor, recipe: FloatRecipe,
    dx: torch.Tensor | None, state: torch.Tensor, *, exact: bool, threads: int = 1, grain: int = 32,
    fresh: bool = False, rounded: torch.Tensor | None = None,
) -> int:
    """:func:`backward_rows`'s ``dx`` with the exact weight gradient in the same pass:
    ``state`` (a contiguous ``(22, D)`` int64 CPU state in its normal form) += the exact
    ``sum over rows of dy * (x / rms)``, the state :func:`exact_dw` with ``rms`` gives.
    Each thread adds its row blocks' products into a state of its own right after their
    ``dx`` (native_dw_fused.c: kept between calls, zero between them), then those are
    added into ``state``: integer sums, so the state does not depend on the split.
    With ``fresh``, ``state``'s memory holds anything: it is written whole with this
    call's sum alone; with ``rounded`` too (a contiguous fp32 CPU tensor of ``D``
    values), the sums correctly rounded to fp32 (:func:`exact_round`'s bits) are
    written into it, from the digit rows the sum reached.
    Returns the rows whose ``s`` or ``k`` is not finite; when there are any, nothing is
    added to ``state`` (a fresh one is zeroed; the caller runs the two passes, whose
    NaNs are torch's) and ``rounded`` is not written.
    Raises :class:`~taskgraph_norm.errors.ExactSumOverflowError` when a column passes
    the state's range (the state is then as the other kernels leave it)."""
    lib = module()
    rows, hidden = x.shape
    fp32 = torch.float32
    for t in (x, dy, rms, weight, dx):
        if t is not None and (t.dtype is not fp32 or not t.is_cpu or not t.is_contiguous()):
            raise ValueError("backward_exact_dw needs contiguous fp32 CPU tensors")
    if (state.shape != (EXACT_DIGITS + 3, hidden) or state.dtype != torch.int64 or not state.is_contiguous()
            or not state.is_cpu):
        raise ValueError(f"state must be a contiguous ({EXACT_DIGITS + 3}, {hidden}) int64 CPU tensor")
    if rounded is not None and (not fresh or rounded.dtype is not fp32 or not rounded.is_cpu
                                or not rounded.is_contiguous() or rounded.numel() != hidden):
        raise ValueError(f"rounded must be a contiguous fp32 CPU tensor of {hidden} values, with fresh")
    if rows == 0:
        return 0
    bad = int(lib.backward_exact_dw_f32_team(
        x.data_ptr(), dy.data_ptr(), None if weight is None else weight.data_ptr(), rms.data_ptr(),
        rows, hidden, recipe.chunk_size, recipe.adds.data_ptr(), recipe.n_adds, recipe.root, int(exact),
        None if dx is None else dx.data_ptr(), state.data_ptr(), grain, threads, int(fresh),
        None if rounded is None else rounded.data_ptr()))
    if bad == -1:
        raise MemoryError("the native backward could not allocate its scratch")
    if bad == -2:
        raise RuntimeError("the native exact dW kernel did not converge (a bug: please report it)")
    if bad == -3:
        over = int((state[EXACT_DIGITS - 1].abs() > EXACT_TOP_LIMIT).sum())
        raise ExactSumOverflowError(over, f"|sum| must stay below 2**{40 + 256}")
    return bad


def rms_of_totals(total: torch.Tensor, hidden: int, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`kernels.finalize_rms` of fp32 rows in C (the same bits; one call instead of
    six small torch ops): ``total`` is a contiguous ``(rows, 1)`` fp32 or ``(rows, 2)``
    fp64 (exact pairs) tensor; returns ``(rows, 1)`` fp32, written into ``out`` if given
    (which may be a float ``total`` itself: each row is read before it is written)."""
    rows, channels = total.shape
    if not total.is_contiguous() or (channels, total.dtype) not in ((1, torch.float32), (2, torch.float64)):
        raise ValueError("total must be a contiguous (rows, 1) float32 or (rows, 2) float64 tensor")
    rms = torch.empty(rows, 1, dtype=torch.float32) if out is None else out
    if rms.shape != (rows, 1) or rms.dtype != torch.float32 or not rms.is_contiguous():
        raise ValueError("out must be a contiguous (rows, 1) float32 tensor")
    module().rms_of_totals_f32(total.data_ptr(), rows, channels, hidden, float(eps), rms.data_ptr())
    return rms


def exact_dw(state: torch.Tensor, dy: torch.Tensor, x_hat: torch.Tensor, columns: tuple[int, int] | None = None,
             rms: torch.Tensor | None = None, *, threads: int = 1, grain: int = 256) -> int:
    """``state += sum over rows of dy * x_hat``, exactly, for columns ``[c0, c1)``.

    The C route to :func:`kernels.exact_sum.add_products_` (the same state, bit for
    bit): ``dy`` and ``x_hat`` are 2-D CPU float32 ``(rows, n)`` with unit stride
    along a row, ``state`` a contiguous ``(22, n)`` int64 state in its normal form (an
    :class:`ExactSum`'s: the kernel normalises only the digits it adds to), normalised after.
    With ``rms`` (a contiguous fp32 ``(rows,)`` or ``(rows, 1)``), ``x_hat`` is ``x``
    and the kernel forms ``x / rms`` row by row, in fp32: the bits
    ``torch.div(x, rms)`` gives, without writing them anywhere.
    ``columns`` (default all) lets callers share one call's columns; ``threads`` share
    them inside the call (native_team.c: torch's OpenMP team or its own worker), in
    blocks of ``grain`` columns: each column's state is one thread's, so the state
    does not depend on the split.  Returns how
    many columns overflowed (the caller raises); rows must not pass
    ``exact_sum.ROWS_PER_ADD``.
    """
    lib = module()
    rows, n = dy.shape
    c0, c1 = columns or (0, n)
    if (dy.dtype != torch.float32 or x_hat.dtype != torch.float32 or x_hat.shape != dy.shape
            or dy.device.type != "cpu" or x_hat.device.type != "cpu"
            or (n > 1 and (dy.stride(1) != 1 or x_hat.stride(1) != 1))):
        raise ValueError("exact_dw needs two 2-D CPU float32 tensors of one shape, unit stride along rows")
    if state.shape != (22, n) or state.dtype != torch.int64 or not state.is_contiguous() or not 0 <= c0 <= c1 <= n:
        raise ValueError("state must be a contiguous (22, n) int64 tensor and columns within [0, n]")
    if rms is not None and (rms.dtype != torch.float32 or rms.device.type != "cpu" or rms.numel() != rows
                            or not rms.is_contiguous()):
        raise ValueError(f"rms must be a contiguous CPU float32 tensor of {rows} values, one per row")
    if rows == 0 or c0 == c1:
        return 0
    item = dy.element_size()
    a, b = dy.data_ptr() + c0 * item, x_hat.data_ptr() + c0 * item
    over = int(lib.exact_dw_f32_team(a, dy.stride(0), b, x_hat.stride(0), None if rms is None else rms.data_ptr(),
                                     rows, c1 - c0, state.data_ptr() + c0 * 8, n, grain, threads))
    if over == -1:
        raise MemoryError("the native exact dW kernel could not allocate its scratch")
    if over < 0:
        raise RuntimeError("the native exact dW kernel did not converge (a bug: please report it)")
    return over


def exact_round(state: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """:func:`kernels.exact_sum.round_state` in C (the same bits): each column of a
    normalised, contiguous ``(22, n)`` int64 CPU state correctly rounded to ``dtype``
    (fp32, bf16, fp16; the last two by rounding to odd at fp32 in C, then torch's
    ties-to-even conversion, as the torch form does)."""
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"exact_round rounds to float32, bfloat16 or float16; not {dtype}")
    if (state.dim() != 2 or state.shape[0] != 22 or state.dtype != torch.int64 or state.device.type != "cpu"
            or not state.is_contiguous()):
        raise ValueError("state must be a contiguous (22, n) int64 CPU tensor")
    n = state.shape[1]
    out = torch.empty(n, dtype=torch.float32)
    if n:
        module().exact_round_f32(state.data_ptr(), n, n, int(dtype != torch.float32), out.data_ptr())
    if dtype == torch.float32:
        return out
    nan = out.isnan()  # torch's vectorised fp32 -> bf16 gives NaN other bits than a NaN scalar does
    return out.to(dtype).masked_fill_(nan, float("nan")) if bool(nan.any()) else out.to(dtype)
