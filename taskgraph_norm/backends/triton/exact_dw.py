"""The exact weight gradient's Triton launches: ``state += sum over rows of dy * x_hat``.

:func:`add_products_` gives ``kernels.exact_sum.add_products_``'s state, bit for bit
(the state's normal form is unique, so any split of the products into blocks gives
the same bits), by the kernels of :mod:`.exact_dw_kernels`: one program per (group
of ``ROW_BLOCK``-row blocks, ``TILE`` columns) forms the fp64 products, folds them
exactly into integer digit contributions (the C kernel's route,
``tgn_exact_dw_f32``) and adds those to the int64 state with atomic adds (integer
addition: any order, the same bits); a second kernel normalises.
:func:`add_products_` with ``rms=`` takes ``x`` instead of ``x_hat`` and makes
``x_hat = (x / rms)`` rounded to x's dtype in the kernel (``ops.exact_weight``'s
``_x_hat``), so no ``x_hat`` tensor is written.

``ops/exact_grad.ExactSum`` calls it for CUDA tensors (:func:`runs`); on CPU
tensors only under ``TRITON_INTERPRET=1`` with :data:`TRITON_ON_CPU` set (tests).
"""

from __future__ import annotations

from typing import Any

import torch

from ...constants import EXACT_DW_FOLD_L as FOLD_L
from ...constants import EXACT_DW_MAX_FOLDS as MAX_FOLDS
from ...constants import EXACT_DW_MIN_SCALE as SMIN
from ...constants import EXACT_DW_ROW_BLOCK as ROW_BLOCK
from ...errors import ExactSumError, ExactSumOverflowError, ExecutionError
from ...kernels import exact_sum as es
from .layout import next_pow2
from .runner import _kernels, available, interpreting, quiet_numpy

__all__ = ["ROW_BLOCK", "TILE", "TRITON_ON_CPU", "add_products_", "launch_constants", "runs"]

#: Run the kernels on CPU tensors too when ``TRITON_INTERPRET=1`` (tests only: slow).
TRITON_ON_CPU = False
# ROW_BLOCK (rows of one fold block), FOLD_L, MAX_FOLDS and SMIN are the C kernel's
# (taskgraph_norm.constants); FOLD_L is a module attribute a test sets (its negative control).
#: Columns of one program's tile.
TILE = 64
#: Blocks one program may take (its digit contributions meet in registers, then one
#: atomic add per digit): fewer atomics, while the grid keeps >= ``_PROGRAMS`` programs.
MAX_GROUPS = 16
_PROGRAMS = 1024


def runs(t: torch.Tensor) -> bool:
    """True when :func:`add_products_` runs for a sum on ``t``'s device: a CUDA tensor
    with triton installed (a CPU one only under ``TRITON_INTERPRET=1`` with
    :data:`TRITON_ON_CPU`)."""
    if t.device.type != "cuda" and not (TRITON_ON_CPU and t.device.type == "cpu" and interpreting()):
        return False
    return available()


def _operands(state: torch.Tensor, dy: torch.Tensor, b: torch.Tensor, rms: torch.Tensor | None,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    es.check_state(state)
    if not state.is_contiguous():
        raise ExactSumError("the triton exact dW adds into a contiguous state")
    name = "x_hat" if rms is None else "x"
    if dy.shape != b.shape:
        raise ExactSumError(f"dy {list(dy.shape)} and {name} {list(b.shape)} must have the same shape")
    if dy.device != state.device or b.device != state.device:
        raise ExactSumError(f"dy and {name} must be on the sum's device {state.device}")
    n = state.shape[1]
    a, b = es.as_rows(dy, n, "dy", widen=False), es.as_rows(b, n, name, widen=False)
    if n > 1 and (a.stride(1) != 1 or b.stride(1) != 1):
        a, b = a.contiguous(), b.contiguous()
    if rms is not None:
        if rms.dtype != torch.float32 or rms.numel() != a.shape[0] or rms.device != state.device:
            raise ExactSumError(f"rms must be float32 with one value per row ({a.shape[0]}) on {state.device}; "
                                f"got {rms.dtype}{list(rms.shape)} on {rms.device}")
        rms = rms.reshape(-1).contiguous()
    return a, b, rms


def add_products_(state: torch.Tensor, dy: torch.Tensor, x_hat: torch.Tensor,
                  rms: torch.Tensor | None = None) -> torch.Tensor:
    """``state += sum over rows of dy * x_hat``, exactly, in place, normalised; returns ``state``.

    As ``kernels.exact_sum.add_products_`` (the same bits): ``dy`` and ``x_hat`` fp32,
    bf16 or fp16 (each its own; widened exactly in the kernel), whole rows of
    ``n = state.shape[1]``.  With ``rms`` (fp32, one per row), ``x_hat`` is ``x`` and
    the products are ``dy * (x / rms)`` rounded to x's dtype (``ops.exact_weight``).

    Raises :class:`ExactSumError` for bad operands, :class:`ExactSumOverflowError`
    past the accumulator's range, :class:`ExecutionError` for a CPU tensor outside
    ``TRITON_INTERPRET=1``.
    """
    a, b, rms = _operands(state, dy, x_hat, rms)
    interpret = interpreting()
    if state.device.type != "cuda" and not (state.device.type == "cpu" and interpret):
        raise ExecutionError("the triton exact dW runs CUDA tensors, or CPU ones under TRITON_INTERPRET=1")
    rows, n = a.shape
    if rows == 0:
        return state
    module = _kernels(interpret, "exact_dw_kernels")
    flags = torch.zeros(2, dtype=torch.int32, device=state.device)  # unfinished folds, overflowed columns
    with quiet_numpy(interpret):  # (the interpreter's numpy: inf - inf, 0 * inf)
        # Why no int64 digit can overflow: a fold adds below 2**33 to each of three
        # digits (lo < 2**32; (lo >> 32) + (hi mod 2**32) < 2**33; hi >> 32 < 2**20), a
        # block takes at most MAX_FOLDS = 2**5 folds, so a block adds below 2**38 to a
        # digit and a launch of at most ROWS_PER_ADD = 2**24 rows (2**18 blocks) below
        # 2**56, onto a normalised state (|digit| <= 2**40): far below 2**63.
        # The counters grow by one per row.  Normalising after each launch (and
        # checking the top digit there) keeps that true launch after launch.
        for start in range(0, rows, es.ROWS_PER_ADD):
            stop = min(rows, start + es.ROWS_PER_ADD)
            _launch(module, state, a[start:stop], b[start:stop], None if rms is None else rms[start:stop],
                    flags, interpret)
            unfinished, over = flags.tolist()
            if unfinished:
                raise RuntimeError("the triton exact dW kernel did not converge (a bug: please report it)")
            if over:
                raise ExactSumOverflowError(over, f"|sum| must stay below 2**{40 + 256}")
    return state


def launch_constants(n: int, from_x: bool, interpret: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """The compile-time arguments of ``exact_dw_kernel`` and ``normalize_kernel`` for
    ``n`` columns (``from_x``: the fused ``x / rms`` entry)."""
    tile = min(TILE, next_pow2(n))
    norm = dict(N=n, BN=tile, LOG_BN=tile.bit_length() - 1, FOLDS=interpret)
    dw = dict(norm, RB=ROW_BLOCK, LOG_RB=ROW_BLOCK.bit_length() - 1, L=FOLD_L, FROM_X=from_x, MAX_FOLDS=MAX_FOLDS,
              SMIN=SMIN)
    return dw, norm


def _launch(module: object, state: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rms: torch.Tensor | None,
            flags: torch.Tensor, interpret: bool) -> None:
    rows, n = a.shape
    dw_constants, norm_constants = launch_constants(n, rms is not None, interpret)
    col_tiles = -(-n // dw_constants["BN"])
    blocks = -(-rows // ROW_BLOCK)
    per_program = min(MAX_GROUPS, max(1, -(-blocks * col_tiles // _PROGRAMS)))
    grid = (-(-blocks // per_program), col_tiles)
    dw = getattr(module, "exact_dw_kernel")
    dw[grid](a, b, b if rms is None else rms, state, flags, rows, per_program, a.stride(0), b.stride(0),
             num_warps=4, enable_fp_fusion=False, **dw_constants)
    norm = getattr(module, "normalize_kernel")
    norm[(col_tiles,)](state, flags[1:], num_warps=4, enable_fp_fusion=False, **norm_constants)
